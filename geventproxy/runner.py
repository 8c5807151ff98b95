"""One proxy process from start to exit, in an explicit order.

Start: logging, file-descriptor limit, bind (proxy, then --admin), saved
totals (--state-file), signals, accept, then the admin endpoint and the
state writer.
Stop (first TERM/INT): stop accepting, let connections finish for
--drain-timeout, close the rest, close the admin endpoint, write the state
file, write a final report, exit 0. A second TERM/INT closes everything at
once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import socket
import time

import gevent
from gevent.event import Event

from . import __version__, accel, signals
from .admin import AdminServer, serve
from .config import Config
from .logs import LOGGER, setup
from .report import Reporter
from .server import ProxyServer, format_address, open_listener
from .state import StateWriter, load_baseline
from .stats import Block, Stats, latency_histogram, persistent_totals, snapshot

__all__ = ["raise_fd_limit", "run"]

#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 1.0


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows, say so, return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError):
            pass
    logging.getLogger(LOGGER).info(
        "file descriptor limit", extra={"fields": {"soft_before": soft, "soft": now, "hard": hard}}
    )
    return now


def run(
    config: Config,
    listener: socket.socket | None = None,
    stats: Stats | None = None,
    *,
    worker: int | None = None,
    all_blocks: list[Block] | None = None,
    admin_listener: socket.socket | None = None,
) -> int:
    """Serve until TERM/INT; the exit status.

    As one of several workers (``worker`` is its slot), the parent owns USR1,
    INT, the reports and the state file: this process serves, drains on
    TERM, and serves the admin endpoint if it is handed ``admin_listener``.
    ``all_blocks`` are the blocks a report sums (every worker's, and the
    saved totals).
    """
    log = setup(config.log_level, config.log_format)
    if listener is None:
        raise_fd_limit()
        listener = open_listener(config.listen)
        if listener is None:
            return 1
    if worker is None and config.admin is not None:
        admin_listener = open_listener(config.admin)
        if admin_listener is None:
            return 1
    stats = stats or Stats()
    server = ProxyServer(listener, config, stats)
    if worker is not None:
        # Workers share one listening socket and all wake for each new client: taking
        # one client per wake-up lets the least busy worker take the next one.
        server.max_accept = 1
    stop, force = Event(), Event()
    reporter = None
    if worker is None:
        # Totals saved by an earlier run are a block of their own, summed into every report.
        blocks = [stats.block, *load_baseline_blocks(config)]
        reporter = Reporter(lambda: snapshot(blocks, time.monotonic_ns()))
        signals.install(stop=stop.set, force=force.set, report=reporter.request)
    else:
        blocks = all_blocks or [stats.block]
        signals.install(stop=stop.set, force=force.set, report=None, interrupt=False)
        # The parent forked this worker with TERM blocked; the handler is in place now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        gevent.spawn(_stop_when_orphaned, os.getppid(), stop, log)
    server.start()
    log.info(
        "listening",
        extra={
            "fields": {
                "address": format_address(server.address),
                "worker": worker,
                "forward": str(config.forward),
                "version": __version__,
                "counting": accel.DESCRIPTION,
                "max_connections": config.max_connections,
                "connect_timeout_s": config.connect_timeout,
                "idle_timeout_s": config.idle_timeout,
                "max_line": config.max_line,
                "strict": config.strict,
            }
        },
    )
    # The state file is the parent's in a multi-worker proxy.
    extras = _start_extras(config, server, blocks, admin_listener, state=worker is None)
    stop.wait()
    _shutdown(server, config, force, log)
    _stop_extras(extras)
    if reporter is not None and not reporter.final():
        log.warning("final statistics line dropped: stdout is not being read")
    signals.ignore_report_signal()
    log.info("exit")
    return 0


def _stop_when_orphaned(parent: int, stop: Event, log: logging.Logger) -> None:
    """A worker whose parent died (SIGKILL, OOM killer) drains and exits on its own."""
    while os.getppid() == parent:
        gevent.sleep(PARENT_CHECK_INTERVAL)
    log.warning("parent process gone, stopping", extra={"fields": {"parent": parent}})
    stop.set()


def _shutdown(server: ProxyServer, config: Config, force: Event, log: logging.Logger) -> None:
    open_now = len(server.connections)
    log.info(
        "draining",
        extra={"fields": {"connections": open_now, "drain_timeout_s": config.drain_timeout}},
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


@dataclasses.dataclass
class _Extras:
    """The optional services around the proxy: admin endpoint, state file."""

    admin: AdminServer | None = None
    state: StateWriter | None = None


def load_baseline_blocks(config: Config) -> list[Block]:
    """The totals of the state file as a block to sum in, if there is one."""
    if config.state_file is None:
        return []
    baseline = load_baseline(config.state_file)
    return [] if baseline is None else [baseline]


def _start_extras(
    config: Config,
    server: ProxyServer,
    blocks: list[Block],
    admin_listener: socket.socket | None,
    state: bool,
) -> _Extras:
    """Start what the flags ask for, once the proxy accepts; ``blocks`` as the reports see them."""
    extras = _Extras()
    if admin_listener is not None:
        extras.admin = serve(
            admin_listener,
            forward=config.forward,
            connect_timeout=config.connect_timeout,
            health_interval=config.health_interval,
            snapshot=lambda: snapshot(blocks, time.monotonic_ns()),
            histogram=lambda: latency_histogram(blocks),
            accepting=lambda: not server.closed,
        )
    if state and config.state_file is not None:
        extras.state = StateWriter(
            config.state_file, lambda: persistent_totals(blocks), config.state_interval
        )
        extras.state.start()
    return extras


def _stop_extras(extras: _Extras) -> None:
    """After the drain: close the admin endpoint, then write the final totals."""
    if extras.admin is not None:
        extras.admin.stop()
    if extras.state is not None:
        extras.state.stop()
