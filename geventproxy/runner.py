"""One proxy process from start to exit, in an explicit order.

Start: logging, file-descriptor limit, bind, signals, accept.
Stop (first TERM/INT): stop accepting, let connections finish for
--drain-timeout, close the rest, write a final report, exit 0. A second
TERM/INT closes everything at once.
"""

from __future__ import annotations

import logging
import resource
import socket
import time

import gevent
from gevent.event import Event

from . import __version__, signals
from .config import Config
from .logs import LOGGER, setup
from .report import Reporter
from .server import ProxyServer, format_address, open_listener
from .stats import Stats, snapshot

__all__ = ["raise_fd_limit", "run"]


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
    all_blocks: list[memoryview] | None = None,
) -> int:
    """Serve until TERM/INT; the exit status.

    As one of several workers (``worker`` is its slot), the parent owns USR1,
    INT and the reports: this process only serves and drains on TERM.
    ``all_blocks`` are every worker's statistics, for what reports sums.
    """
    log = setup(config.log_level, config.log_format)
    if listener is None:
        raise_fd_limit()
        listener = open_listener(config.listen)
        if listener is None:
            return 1
    stats = stats or Stats()
    server = ProxyServer(listener, config, stats)
    stop, force = Event(), Event()
    reporter = None
    if worker is None:
        blocks = all_blocks or [stats.block]
        reporter = Reporter(lambda: snapshot(blocks, time.monotonic_ns()))
        signals.install(stop=stop.set, force=force.set, report=reporter.request)
    else:
        signals.install(stop=stop.set, force=force.set, report=None, interrupt=False)
    server.start()
    log.info(
        "listening",
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
    stop.wait()
    _shutdown(server, config, force, log)
    if reporter is not None:
        reporter.final()
    signals.ignore_report_signal()
    log.info("exit")
    return 0


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
