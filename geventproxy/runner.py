"""One proxy process from start to exit, in an explicit order.

Start: logging, file-descriptor limit, bind, signals, accept.
Stop (first TERM/INT): stop accepting, let connections finish for
--drain-timeout, close the rest, write a final report, exit 0. A second
TERM/INT closes everything at once.
"""

from __future__ import annotations

import logging
import resource
import time

import gevent
from gevent.event import Event

from . import __version__, signals
from .config import Config
from .logs import setup
from .report import Reporter
from .server import ProxyServer, make_listener
from .stats import Stats, snapshot

__all__ = ["raise_fd_limit", "run"]


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def run(config: Config, listener: object | None = None, stats: Stats | None = None) -> int:
    """Serve until TERM/INT; the exit status."""
    log = setup(config.log_level, config.log_format)
    before, after = raise_fd_limit()
    log.info("file descriptor limit", extra={"fields": {"soft_before": before, "soft": after}})
    if listener is None:
        try:
            listener = make_listener(config.listen)
        except OSError as exc:
            log.error(
                "cannot listen",
                extra={
                    "fields": {"address": str(config.listen), "error": exc.strerror or str(exc)}
                },
            )
            return 1
    stats = stats or Stats()
    server = ProxyServer(listener, config, stats)
    reporter = Reporter(lambda: snapshot([stats.block], time.monotonic_ns()))
    stop, force = Event(), Event()
    signals.install(report=reporter.request, stop=stop.set, force=force.set)
    server.start()
    host, port = server.address[:2]
    log.info(
        "listening",
        extra={
            "fields": {
                "address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
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
