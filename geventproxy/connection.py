"""One proxied client: its two directions, how they end, and what it costs idle.

The handler greenlet that gevent's server spawns for the client runs the
upstream-to-client copy loop itself. The client-to-upstream loop runs in a
greenlet of its own, but only while the client is active: it is started when
the client first sends, and an idle one is parked (its greenlet ends, a
watcher waits for the next byte and starts a new one). A suspended greenlet
costs about 7 KiB; an idle connection so holds one, the handler's, not two.

Each direction reports how it ended. A half-close (EOF) lets the other
direction go on; anything else aborts both: shutting a socket down wakes
whatever waits on it (a reader sees EOF, a writer EPIPE), so every loop
returns through its normal exit and the handler closes the sockets only
after both loops are done.

A client's EOF ends the connection: a Foo server never closes first, so
waiting for it would hold both sockets for ever. The EOF is passed on to
the upstream at once; the connection then ends as soon as every line the
client sent has been answered and the reply delivered (at once when none
is owed), or after ``--client-fin-timeout`` without an upstream byte.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from greenlet import GreenletExit, getcurrent, greenlet

from .accel import new_meter, new_timer
from .codec import StrictFilter
from .relay import (
    ANSWERED,
    CLIENT_SENDING,
    CLIENT_TO_UPSTREAM,
    PARKED,
    UPSTREAM_TO_CLIENT,
    Direction,
    Park,
    Tally,
    relay,
)
from .stats import CLIENT_CLOSED, ERROR, UPSTREAM_CLOSED

if TYPE_CHECKING:
    from gevent.hub import Hub

    from .stats import Stats

__all__ = ["EOF_REASONS", "ClientSide", "Connection"]

EOF_REASONS = (CLIENT_CLOSED, UPSTREAM_CLOSED)


class ClientSide:
    """The client-to-upstream loop's greenlet: started on the client's first byte,
    parked when idle, waited for (or ended) by the handler.

    A plain greenlet, child of the hub, not a gevent.Greenlet: nothing joins
    or links to it (the handler waits through ``_waiting``), and it is a few
    hundred bytes lighter while it runs and after it ends. Connection adds
    what runs the loop needs (``tally``, ``ended``) and the rules of ending.
    """

    __slots__ = ("_up", "_up_greenlet", "_up_done", "_waiting", "_hub", "_stats", "_bufsize")

    tally: Tally

    def __init__(self) -> None:
        self._up: Direction | None = None
        self._up_greenlet: greenlet | None = None  # None while parked
        self._up_done = False  # the client side has ended for good
        self._waiting: greenlet | None = None  # the handler, once only the client side is left
        # What the client side needs each time it starts again (no closure per connection).
        self._hub: Hub | None = None
        self._stats: Stats | None = None
        self._bufsize = 0

    def ended(self, outcome: str) -> None:
        raise NotImplementedError

    def _start_client_side(self, hub: Hub, up: Direction, stats: Stats, bufsize: int) -> None:
        """Start the client side when the client first sends."""
        self._hub, self._up, self._stats, self._bufsize = hub, up, stats, bufsize
        up.readable.start(self._wake_up)

    def _wait_for_client_side(self) -> None:
        """In the handler: return once the client side has ended for good."""
        while not self._up_done:
            self._suspend()

    def _end_client_side(self) -> None:
        """In the handler, when it is killed: end the client side before its sockets go.

        A client side that parks meanwhile may be restarted by its watcher
        before the handler runs again: each one found running is ended in turn.
        """
        hub, up = self._hub, self._up
        assert hub is not None and up is not None
        while (running := self._up_greenlet) is not None and not running.dead:
            hub.loop.run_callback(self._throw, running, GreenletExit)
            while self._up_greenlet is running and not running.dead:
                self._suspend()
        up.readable.stop()

    def _suspend(self) -> None:
        """In the handler: wait until ``_resume_handler`` (or a kill) switches back."""
        assert self._hub is not None
        self._waiting = getcurrent()
        try:
            self._hub.switch()
        finally:
            self._waiting = None

    def _resume_handler(self) -> None:
        """A loop callback: switch to the handler if it still waits in ``_suspend``.

        Checked when the callback runs, not when it is queued, so a wake-up
        that comes late never lands in another wait of the handler's.
        """
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            waiting.switch()

    def _wake_up(self) -> None:
        """The parked client side has a byte to read: a loop callback, it starts a greenlet."""
        assert self._up is not None and self._hub is not None
        self._up.readable.stop()
        running = self._up_greenlet = greenlet(self._run_up, self._hub)
        running.switch()  # runs until its first wait, then the loop goes on

    def _throw(self, running: greenlet, exc: type[BaseException]) -> None:
        """A loop callback: raise ``exc`` in the client side, if ``running`` still is it."""
        if self._up_greenlet is running:
            running.throw(exc)

    def _run_up(self) -> None:
        """The client-to-upstream loop, until it ends or is parked."""
        up, hub, stats = self._up, self._hub, self._stats
        assert up is not None and hub is not None and stats is not None
        outcome = ERROR
        try:
            outcome = relay(hub, up, stats, self.tally, self._bufsize, self.ended)
        finally:
            self._up_greenlet = None
            if outcome == PARKED:
                up.readable.start(self._wake_up)
            else:
                self._up_done = True
            if self._waiting is not None:  # the handler waits for this side
                hub.loop.run_callback(self._resume_handler)

    def park(self) -> bool:
        """Give back the client side's greenlet if it only waits for the client."""
        up, running, hub = self._up, self._up_greenlet, self._hub
        if up is None or running is None or hub is None or not up.readable.active:
            return False
        hub.loop.run_callback(self._throw, running, Park)
        return True


class Connection(ClientSide):
    """One client and its upstream, from the upstream's dial to the close."""

    __slots__ = (
        "id",
        "peer",
        "started",
        "tally",
        "sockets",
        "reason",
        "first_eof",
        "upstream_eof",
        "seen",
        "seen_at",
        "_down",
    )

    def __init__(self, conn_id: int, peer: str) -> None:
        super().__init__()
        self.id = conn_id
        self.peer = peer
        self.started = time.monotonic()
        self.tally = Tally()
        self.sockets: tuple[socket.socket, ...] = ()
        self.reason: str | None = None  # the first abnormal end, or the proxy's decision
        self.first_eof: str | None = None  # which side half-closed first
        self.upstream_eof = False
        self.seen = 0  # bytes moved at the last sweep
        self.seen_at = self.started  # when that number last changed
        self._down: Direction | None = None

    # -- running ---------------------------------------------------------------

    def run(
        self,
        hub: Hub,
        client: socket.socket,
        upstream: socket.socket,
        stats: Stats,
        max_line: int,
        bufsize: int,
        strict: bool = False,
    ) -> str:
        """Relay both directions until both have ended; return why the connection ended."""
        self.sockets = (client, upstream)
        self.seen_at = time.monotonic()  # idle time counts from here, not from the accept
        if self.reason is not None:  # aborted while dialling (the drain deadline)
            self.abort(self.reason)
        timer = new_timer(stats)
        scanner = (
            StrictFilter(max_line) if strict else new_meter(CLIENT_TO_UPSTREAM, max_line, timer)
        )
        # Only the strict filter reports its messages to the timer itself; a Meter times them.
        up = Direction(
            hub, CLIENT_TO_UPSTREAM, client, upstream, scanner, timer.sent if strict else None
        )
        meter = new_meter(UPSTREAM_TO_CLIENT, max_line, timer)
        down = self._down = Direction(hub, UPSTREAM_TO_CLIENT, upstream, client, meter)
        self._start_client_side(hub, up, stats, bufsize)
        try:
            relay(hub, down, stats, self.tally, bufsize, self.ended)
            self._wait_for_client_side()  # after a half-close it goes on until it ends too
        finally:
            # Normally both loops are over here. Should this greenlet be killed
            # instead, end the client side before its watchers and sockets go.
            try:
                if not self._up_done:
                    self.abort(self.reason or ERROR)
                    self._end_client_side()
            finally:
                up.close()
                down.close()
        return self.reason or self.first_eof or ERROR

    # -- ending ------------------------------------------------------------------

    @property
    def client_eof(self) -> bool:
        """The client has half-closed: the connection waits only for owed replies."""
        return self.tally.owed != CLIENT_SENDING

    def ended(self, outcome: str) -> None:
        """A direction has ended: a half-close lets the other go on; anything else ends both."""
        if outcome == ANSWERED:
            return  # the client is done and has every reply: both loops are over
        if outcome not in EOF_REASONS:
            self.abort(outcome)
            return
        if self.first_eof is None:
            self.first_eof = outcome
        self.seen_at = time.monotonic()  # --fin-timeout / --client-fin-timeout run from here
        if outcome == UPSTREAM_CLOSED:
            self.upstream_eof = True
        else:
            self._client_done()

    def _client_done(self) -> None:
        """The client half-closed: end now if nothing is owed, else when the last reply is out."""
        up, down, tally = self._up, self._down, self.tally
        assert up is not None and down is not None
        # An unfinished last line is answered too (the server reads it at EOF).
        unfinished = 0 if isinstance(up.scanner, StrictFilter) or not up.scanner.mid_line else 1
        tally.owed = tally.lines[CLIENT_TO_UPSTREAM] + unfinished
        # The upstream-to-client loop checks ``owed`` after each chunk it sends in
        # full. Waiting for the upstream with nothing owed (its watcher is active
        # only there, not in the middle of a send), it would wait for ever: end it.
        if tally.lines[UPSTREAM_TO_CLIENT] >= tally.owed and down.readable.active:
            self.abort(CLIENT_CLOSED)

    def abort(self, reason: str) -> None:
        """End both directions now; safe from a relay, the sweeper or the drain."""
        if self.reason is None:
            self.reason = reason
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
