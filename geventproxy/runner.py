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
The parent owns the reports, the state file and the live page's history;
worker 0 serves them over -admin with the figures of every worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import gevent
from gevent.event import Event

from . import __version__, accel, process, signals
from .admin import AdminServer, serve
from .config import Config, format_address
from .history import History
from .logs import event, setup
from .server import ProxyServer
from .sharedstats import SharedStats
from .stats import Stats, latency_histogram, set_pid, snapshot, worker_figures
from .workerset import HANDED_OVER

__all__ = ["run"]

#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0
#: The longest pause between two heartbeats (shorter for a short --worker-timeout).
HEARTBEAT_INTERVAL = 1.0


def run(
    config: Config,
    listener: socket.socket,
    shared: SharedStats,
    block: int,
    *,
    worker: int,
    admin_listener: socket.socket | None = None,
    notify: Callable[..., None] = lambda kind, text="": None,
) -> int:
    """Serve until TERM or USR2, counting into ``shared``'s ``block``; the exit status.

    ``notify`` tells the parent this worker accepts ("ready"), or has frozen
    its block for a report ("frozen"). The admin endpoint, if this worker is
    handed its socket, sums every used block of ``shared``.
    """
    setup(config.log_level, config.log_format, {"worker": worker})
    process.set_name(f"geventproxy w{worker}")
    stats = Stats(shared.blocks[block], mark_start=False)
    set_pid(stats.block, os.getpid())
    server = ProxyServer(listener, config, stats)
    if config.workers > 1:
        # Workers share one listening socket and all wake for each new client: taking
        # one client per wake-up lets the least busy worker take the next one.
        server.max_accept = 1
    stop, force, retire, freeze = Event(), Event(), Event(), Event()
    retiring = lambda: (retire.set(), stop.set())  # noqa: E731
    signals.install(stop=stop.set, force=force.set, retire=retiring, freeze=freeze.set)
    # The parent started this worker with these blocked; the handlers are in place now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDED_OVER)
    with contextlib.ExitStack() as stack:
        stack.callback(event, logging.INFO, "exit")
        server.start()
        admin = stack.enter_context(contextlib.ExitStack())
        if admin_listener is not None:
            admin.callback(_serve_admin(config, server, shared, admin_listener).stop)
        interval = min(HEARTBEAT_INTERVAL, config.worker_timeout / 4 or HEARTBEAT_INTERVAL)
        stack.enter_context(_background(_heartbeat, lambda: shared.beat(block), interval))
        stack.enter_context(_background(_stop_when_orphaned, os.getppid(), stop))
        stack.enter_context(_background(_freezer, freeze, shared, block, notify))
        stack.callback(_drain, server, config, force)
        _log_serving(server, config)
        notify("ready", __version__)
        stop.wait()
        if retire.is_set():
            admin.close()  # now, before the drain: the new workers answer it
    # The interpreter's exit restores USR1's default action, which ends a process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return 0


def _serve_admin(
    config: Config, server: ProxyServer, shared: SharedStats, listener: socket.socket
) -> AdminServer:
    return serve(
        listener,
        forward=config.forward,
        connect_timeout=config.connect_timeout,
        health_interval=config.health_interval,
        snapshot=lambda: snapshot(shared.used(), time.monotonic_ns()),
        histogram=lambda: latency_histogram(shared.used()),
        accepting=lambda: not server.closed,
        history=History(shared.history),
        processes=functools.partial(_processes, shared, os.getppid()),
        workers=lambda: [(str(slot), worker_figures(b)) for slot, b in shared.serving()],
    )


def _processes(shared: SharedStats, parent: int) -> list[tuple[str | None, process.Figures]]:
    """The serving workers, each by its ``worker`` label, and the parent."""
    found = []
    for slot, block in shared.serving():
        pid = worker_figures(block)["pid"]
        figures = process.figures(pid)
        # A pid read a moment ago may by now be another process's: its parent tells.
        if figures is not None and figures.ppid == parent:
            found.append((str(slot), figures))
    # Orphaned (the parent killed), this worker's parent is now some other process.
    figures = process.figures(parent) if os.getppid() == parent else None
    if figures is not None:
        found.append(("parent", figures))
    return found


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


def _freezer(wanted: Event, shared: SharedStats, block: int, notify: Callable[..., None]) -> None:
    """Freeze the block when the parent asks (USR1): a greenlet runs between two
    others, so never between two updates of one chunk or one connection."""
    while True:
        wanted.wait()
        wanted.clear()
        if shared.freeze(block):
            notify("frozen")


def _stop_when_orphaned(parent: int, stop: Event) -> None:
    """A worker whose parent died (SIGKILL, OOM killer) drains and exits on its own."""
    while os.getppid() == parent:
        gevent.sleep(PARENT_CHECK_INTERVAL)
    event(logging.WARNING, "parent process gone, stopping", parent=parent)
    stop.set()


def _log_serving(server: ProxyServer, config: Config) -> None:
    event(
        logging.INFO,
        "serving",
        address=format_address(server.address),
        forward=str(config.forward),
        version=__version__,
        counting=accel.DESCRIPTION,
        max_connections=config.max_connections,
        connect_timeout_s=config.connect_timeout,
        idle_timeout_s=config.idle_timeout,
        max_line=config.max_line,
        strict=config.strict,
    )


def _drain(server: ProxyServer, config: Config, force: Event) -> None:
    open_now = len(server.connections)
    event(logging.INFO, "draining", connections=open_now, drain_timeout_s=config.drain_timeout)
    drainer = gevent.spawn(server.drain, config.drain_timeout)
    gevent.wait([drainer, force], count=1)
    if not drainer.ready():
        event(logging.WARNING, "second signal: closing every connection now")
        drainer.kill()
        closed = server.abort_all()
    else:
        closed = drainer.value or 0
    if closed:
        event(logging.WARNING, "closed connections at shutdown", connections=closed)
