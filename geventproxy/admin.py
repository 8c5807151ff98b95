"""The admin HTTP endpoint: /metrics, /stats, /healthz, /history and the live page at /.

Off unless --admin is set.

Served by gevent's own ``pywsgi`` in the proxy's event loop, so it adds no
dependency and no thread. Every route reads the same counters as the SIGUSR1
report at the moment of the request. A scrape costs a snapshot (a pass over
the rate ring, about a millisecond), so a small handler pool bounds what
a misbehaving scraper can take from the proxy.

The live page is three static files from the package (``static/``) that
draw the charts from ``/history`` and the totals from ``/stats``; its
Content-Security-Policy allows no request to any other origin.

/healthz answers from a cached check, never by dialling the upstream in the
request: a load balancer probing often cannot then multiply connections to
the upstream, and a slow upstream cannot make the probe itself time out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.socket
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from . import __version__
from .config import Address, format_address
from .history import History
from .logs import LOGGER
from .metrics import CONTENT_TYPE, render_prometheus
from .process import Figures
from .report import render

__all__ = ["AdminApp", "AdminServer", "HealthCheck", "serve"]

log = logging.getLogger(LOGGER)

#: Requests served at once; more wait in the listen backlog.
MAX_REQUESTS = 16
#: The shortest pause between two health checks, whatever --health-interval says.
MIN_HEALTH_INTERVAL = 0.05
#: The connect timeout of a health check when --connect-timeout is 0 (no limit).
DEFAULT_HEALTH_TIMEOUT = 5.0

StartResponse = Callable[..., Any]

#: The live page: path -> (file in the package's static/, content type).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live.css": ("live.css", "text/css; charset=utf-8"),
}
#: The page may load its own files and poll its own origin, nothing else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class HealthCheck:
    """Whether the proxy is accepting and the upstream took a TCP connection lately.

    A greenlet connects to the upstream every ``interval`` seconds and closes
    the connection at once; ``status`` reads the last result.
    """

    def __init__(
        self,
        forward: Address,
        connect_timeout: float,
        interval: float,
        accepting: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.forward = forward
        self.timeout = connect_timeout or DEFAULT_HEALTH_TIMEOUT
        self.interval = max(interval, MIN_HEALTH_INTERVAL)
        self.accepting = accepting
        self.clock = clock
        self.reachable: bool | None = None  # None until the first check ends
        self.error = ""
        self.checked_at = float("-inf")
        self._greenlet: gevent.Greenlet | None = None

    def check(self) -> bool:
        """Connect to the upstream once, close at once, remember the outcome."""
        try:
            sock = gevent.socket.create_connection(
                (self.forward.host, self.forward.port), timeout=self.timeout
            )
        except OSError as exc:
            reachable, error = False, str(exc) or type(exc).__name__
        else:
            sock.close()
            reachable, error = True, ""
        if reachable != self.reachable:
            fields = {"upstream": str(self.forward)}
            if reachable:
                log.info("health: upstream reachable", extra={"fields": fields})
            else:
                log.warning(
                    "health: upstream unreachable", extra={"fields": {**fields, "error": error}}
                )
        self.reachable, self.error, self.checked_at = reachable, error, self.clock()
        return reachable

    def upstream_up(self) -> bool:
        """The last check reached the upstream, and it is recent."""
        return bool(self.reachable) and not self._stale()

    def _stale(self) -> bool:
        # A result older than a few rounds means the checker stopped: do not trust it.
        return self.clock() - self.checked_at > 3 * self.interval + self.timeout

    def status(self) -> tuple[bool, str]:
        """(healthy, reason): the reason is "ok" or says what is wrong."""
        if not self.accepting():
            return False, "not accepting connections (shutting down)"
        if self.reachable is None:
            return False, "upstream not checked yet"
        if self._stale():
            return False, "upstream check is stale"
        if not self.reachable:
            return False, f"upstream {self.forward} unreachable: {self.error}"
        return True, "ok"

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.check()
            gevent.sleep(self.interval)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None


class AdminApp:
    """The WSGI application: three read-only routes.

    ``processes`` and ``workers`` give /metrics its per-process figures
    (see ``metrics.render_prometheus``); without them it has none.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        histogram: Callable[[], tuple[list[int], int]],
        health: Any,
        history: History | None = None,
        processes: Callable[[], list[tuple[str | None, Figures]]] | None = None,
        workers: Callable[[], list[tuple[str, dict[str, int]]]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.histogram = histogram
        self.health = health
        self.history = history
        self._files: dict[str, bytes] = {}
        self.processes = processes
        self.workers = workers
        self.routes: dict[str, Callable[[], tuple[str, str, bytes]]] = {
            "/metrics": self.metrics,
            "/stats": self.stats,
            "/healthz": self.healthz,
        }
        for path in PAGE_FILES:
            self.routes[path] = partial(self.page_file, path)
        # Routes that read the query string.
        self.query_routes: dict[str, Callable[[str], tuple[str, str, bytes]]] = {
            "/history": self.history_json,
        }

    def metrics(self) -> tuple[str, str, bytes]:
        # The reads happen without yielding, so they describe the same instant.
        text = render_prometheus(
            self.snapshot(),
            self.histogram(),
            upstream_up=self.health.upstream_up(),
            processes=self.processes() if self.processes else (),
            workers=self.workers() if self.workers else (),
        )
        return "200 OK", CONTENT_TYPE, text.encode()

    def stats(self) -> tuple[str, str, bytes]:
        return "200 OK", "application/json", render(self.snapshot())

    def healthz(self) -> tuple[str, str, bytes]:
        healthy, reason = self.health.status()
        status = "200 OK" if healthy else "503 Service Unavailable"
        return status, "text/plain; charset=utf-8", f"{reason}\n".encode()

    def history_json(self, query: str) -> tuple[str, str, bytes]:
        """The samples of the last five minutes; ``?after=SEQ`` only those newer than SEQ."""
        if self.history is None:
            return "404 Not Found", "text/plain; charset=utf-8", b"no history kept\n"
        values = parse_qs(query).get("after", ["-1"])
        try:
            after = int(values[-1])
        except ValueError:
            return "400 Bad Request", "text/plain; charset=utf-8", b"after: not a number\n"
        document = self.history.document(after, __version__)
        return "200 OK", "application/json", json.dumps(document, separators=(",", ":")).encode()

    def page_file(self, path: str) -> tuple[str, str, bytes]:
        name, ctype = PAGE_FILES[path]
        body = self._files.get(name)
        if body is None:  # read once, on first use: a missing file costs a 500, not the proxy
            body = self._files[name] = (
                resources.files(__package__).joinpath("static", name).read_bytes()
            )
        return "200 OK", ctype, body

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        query_route = self.query_routes.get(path)
        if query_route is not None:
            route = partial(query_route, environ.get("QUERY_STRING", ""))
        else:
            route = self.routes.get(path)
        headers = [("Cache-Control", "no-store")]
        if path in PAGE_FILES:
            headers += [
                ("Content-Security-Policy", PAGE_POLICY),
                ("X-Content-Type-Options", "nosniff"),
            ]
        if route is None:
            status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"not found\n"
        elif method not in ("GET", "HEAD"):
            status, ctype, body = (
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                b"method not allowed\n",
            )
            headers.append(("Allow", "GET, HEAD"))
        else:
            try:
                status, ctype, body = route()
            except Exception:
                log.exception(
                    "admin request failed", extra={"fields": {"path": environ["PATH_INFO"]}}
                )
                status, ctype, body = (
                    "500 Internal Server Error",
                    "text/plain; charset=utf-8",
                    b"internal error\n",
                )
        headers += [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [b""] if method == "HEAD" else [body]


class _LogWriter:
    """pywsgi's file-like logs, routed to the project's logger (stderr, never stdout)."""

    def __init__(self, level: int, message: str) -> None:
        self.level = level
        self.message = message

    def write(self, text: str) -> None:
        text = text.rstrip("\n")
        if text and log.isEnabledFor(self.level):
            log.log(self.level, self.message, extra={"fields": {"line": text}})

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


class AdminServer:
    """The HTTP server and its health checker, started and stopped together."""

    def __init__(self, listener: Any, app: AdminApp, health: HealthCheck) -> None:
        self.health = health
        # The same socket, made cooperative: it may come from a plain bind().
        listener = gevent.socket.socket(fileno=listener.detach())
        self.http = WSGIServer(
            listener,
            app,
            spawn=Pool(MAX_REQUESTS),
            # Access lines at debug: a scrape every few seconds is not news.
            log=_LogWriter(logging.DEBUG, "admin request"),
            error_log=_LogWriter(logging.WARNING, "admin error"),
        )

    @property
    def address(self) -> str:
        return format_address(self.http.address)

    def start(self) -> None:
        # The first check before the first request: a worker that starts serving (at
        # start, or as a reload's new worker 0) never answers "not checked yet".
        self.health.check()
        self.health.start()
        self.http.start()
        log.info(
            "admin started",
            extra={
                "fields": {"address": self.address, "routes": "/,/history,/metrics,/stats,/healthz"}
            },
        )

    def stop(self, timeout: float = 0.5) -> None:
        """Close the listener; requests in progress (they take milliseconds) get ``timeout``."""
        self.http.stop(timeout=timeout)
        self.health.stop()


def serve(
    listener: Any,
    forward: Address,
    connect_timeout: float,
    health_interval: float,
    snapshot: Callable[[], dict[str, Any]],
    histogram: Callable[[], tuple[list[int], int]],
    accepting: Callable[[], bool],
    history: History | None = None,
    processes: Callable[[], list[tuple[str | None, Figures]]] | None = None,
    workers: Callable[[], list[tuple[str, dict[str, int]]]] | None = None,
) -> AdminServer:
    """Build and start the admin endpoint on a bound, listening socket."""
    health = HealthCheck(forward, connect_timeout, health_interval, accepting)
    app = AdminApp(snapshot, histogram, health, history, processes, workers)
    server = AdminServer(listener, app, health)
    server.start()
    return server
