"""The connections' clock: timeouts and parking, checked every tick, not per byte.

The relays never read the clock for this: they add to byte counters, and
the sweeper compares those counters with what it saw at the last tick. So a
connection's deadlines cost nothing on the hot path, and a tick costs one
look at each open connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import gevent

from .config import Config
from .connection import Connection
from .process import trim_heap
from .stats import CLIENT_FIN_TIMEOUT, IDLE_TIMEOUT, UPSTREAM_CLOSED

__all__ = ["Sweeper"]


class Sweeper:
    """Closes connections past a deadline and parks idle ones, every ``tick`` seconds."""

    #: Parked client sides after which the C heap's free pages go back to the system
    #: (process.trim_heap: a parked greenlet's saved stack is freed amid live blocks).
    trim_after = 256

    def __init__(
        self,
        connections: Collection[Connection],
        config: Config,
        park_after: float,
        interval: float,
        finished: Callable[[], bool],
    ) -> None:
        self.connections = connections
        self.idle_timeout = config.idle_timeout
        self.fin_timeout = config.fin_timeout
        self.client_fin_timeout = config.client_fin_timeout
        self.park_after = park_after
        deadlines = (self.idle_timeout, self.fin_timeout, self.client_fin_timeout, park_after)
        shortest = min((t for t in deadlines if t > 0), default=1.0)
        #: A deadline is met within a quarter of itself, and ticks are at most ``interval`` apart.
        self.tick = min(interval, max(0.02, shortest / 4))
        self._finished = finished
        self._greenlet: gevent.Greenlet | None = None
        self._parked = 0  # since the last trim

    @property
    def running(self) -> bool:
        return self._greenlet is not None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _run(self) -> None:
        try:
            while not self._finished():
                gevent.sleep(self.tick)
                self.sweep(time.monotonic())
        finally:
            self._greenlet = None

    def sweep(self, now: float) -> None:
        """One look at every connection: close those past a deadline, park idle ones."""
        for conn in list(self.connections):
            if not conn.sockets:
                continue  # still dialling: --connect-timeout is in charge
            moved = conn.tally.bytes[0] + conn.tally.bytes[1]
            if moved != conn.seen:
                conn.seen, conn.seen_at = moved, now
                continue
            idle = now - conn.seen_at
            if conn.client_eof and self.client_fin_timeout and idle >= self.client_fin_timeout:
                conn.abort(CLIENT_FIN_TIMEOUT)
            elif conn.upstream_eof and self.fin_timeout and idle >= self.fin_timeout:
                conn.abort(UPSTREAM_CLOSED)
            elif self.idle_timeout and idle >= self.idle_timeout:
                conn.abort(IDLE_TIMEOUT)
            elif idle >= self.park_after and conn.park():
                self._parked += 1
        if self._parked >= self.trim_after:
            self._parked = 0
            # Queued after the parks (loop callbacks too): runs once their greenlets have ended.
            gevent.get_hub().loop.run_callback(trim_heap)
