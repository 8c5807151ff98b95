"""One worker's proxy from start to exit, in an explicit order.

Start: accept on the inherited listening socket, then the admin endpoint
(worker 0), the heartbeat and the watch on the parent, then tell the parent
this worker is ready.
Stop (the first TERM, or USR2 when a reload replaces this worker): stop
accepting, let connections finish for --drain-timeout, close the rest,
close the admin endpoint, exit 0. A retiring worker (USR2) closes its admin
endpoint at once instead, so that the new workers alone answer it. A TERM
after either closes every connection at once.

Each step that needs undoing is entered on an ExitStack as it starts, so
the stop runs the same steps in reverse order even when one of them raises.
The parent owns the reports and the state file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import gevent
from gevent.event import Event

from . import __version__, signals
from .admin import AdminServer, serve
from .config import Config
from .listeners import format_address
from .logs import setup
from .server import ProxyServer
from .stats import Block, Stats, latency_histogram, snapshot
from .workerset import HANDED_OVER

__all__ = ["run"]

#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0
#: The longest pause between two heartbeats (shorter for a short --worker-timeout).
HEARTBEAT_INTERVAL = 1.0


def run(
    config: Config,
    listener: socket.socket,
    stats: Stats,
    *,
    worker: int,
    blocks: Callable[[], list[Block]],
    admin_listener: socket.socket | None = None,
    ready: Callable[[], None] = lambda: None,
    beat: Callable[[], None] = lambda: None,
) -> int:
    """Serve until TERM or USR2; the exit status.

    ``blocks`` gives the blocks the admin endpoint sums (every worker's, and
    the saved totals); ``ready`` tells the parent this worker accepts;
    ``beat`` records that its event loop runs.
    """
    log = setup(config.log_level, config.log_format)
    server = ProxyServer(listener, config, stats)
    # Workers share one listening socket and all wake for each new client: taking
    # one client per wake-up lets the least busy worker take the next one.
    server.max_accept = 1
    stop, force, retire = Event(), Event(), Event()
    signals.install(stop=stop.set, force=force.set, retire=lambda: (retire.set(), stop.set()))
    # The parent started this worker with these blocked; the handlers are in place now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDED_OVER)
    with contextlib.ExitStack() as stack:
        stack.callback(log.info, "exit", extra={"fields": {"worker": worker}})
        server.start()
        admin = stack.enter_context(contextlib.ExitStack())
        if admin_listener is not None:
            admin.callback(_serve_admin(config, server, blocks, admin_listener).stop)
        interval = min(HEARTBEAT_INTERVAL, config.worker_timeout / 4 or HEARTBEAT_INTERVAL)
        stack.enter_context(_background(_heartbeat, beat, interval))
        stack.enter_context(_background(_stop_when_orphaned, os.getppid(), stop, log))
        stack.callback(_drain, server, config, force, log, worker)
        _log_serving(log, server, config, worker)
        ready()
        stop.wait()
        if retire.is_set():
            admin.close()  # now, before the drain: the new workers answer it
    return 0


def _serve_admin(
    config: Config,
    server: ProxyServer,
    blocks: Callable[[], list[Block]],
    listener: socket.socket,
) -> AdminServer:
    return serve(
        listener,
        forward=config.forward,
        connect_timeout=config.connect_timeout,
        health_interval=config.health_interval,
        snapshot=lambda: snapshot(blocks(), time.monotonic_ns()),
        histogram=lambda: latency_histogram(blocks()),
        accepting=lambda: not server.closed,
    )


@contextlib.contextmanager
def _background(function: Callable[..., None], *args: object) -> Iterator[None]:
    """A greenlet that lives as long as the ``with`` block."""
    greenlet = gevent.spawn(function, *args)
    try:
        yield
    finally:
        greenlet.kill(block=False)


def _heartbeat(beat: Callable[[], None], interval: float) -> None:
    """Written by the event loop itself: it stops when the loop is stuck."""
    while True:
        beat()
        gevent.sleep(interval)


def _stop_when_orphaned(parent: int, stop: Event, log: logging.Logger) -> None:
    """A worker whose parent died (SIGKILL, OOM killer) drains and exits on its own."""
    while os.getppid() == parent:
        gevent.sleep(PARENT_CHECK_INTERVAL)
    log.warning("parent process gone, stopping", extra={"fields": {"parent": parent}})
    stop.set()


def _log_serving(log: logging.Logger, server: ProxyServer, config: Config, worker: int) -> None:
    log.info(
        "serving",
        extra={
            "fields": {
                "address": format_address(server.address),
                "worker": worker,
                "forward": str(config.forward),
                "version": __version__,
                "max_connections": config.max_connections,
                "connect_timeout_s": config.connect_timeout,
                "idle_timeout_s": config.idle_timeout,
                "max_line": config.max_line,
                "strict": config.strict,
            }
        },
    )


def _drain(
    server: ProxyServer, config: Config, force: Event, log: logging.Logger, worker: int
) -> None:
    log.info(
        "draining",
        extra={
            "fields": {
                "worker": worker,
                "connections": len(server.connections),
                "drain_timeout_s": config.drain_timeout,
            }
        },
    )
    drainer = gevent.spawn(server.drain, config.drain_timeout)
    gevent.wait([drainer, force], count=1)
    if not drainer.ready():
        log.warning("second signal: closing every connection now")
        drainer.kill()
        closed = server.abort_all()
    else:
        closed = drainer.value or 0
    if closed:
        log.warning("closed connections at shutdown", extra={"fields": {"connections": closed}})
