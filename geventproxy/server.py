"""Accept clients, dial the upstream for each, relay both directions, close.

A client's handler owns its two sockets: it opens the upstream (upstream.py),
runs the connection (connection.py: two copy loops, the handler running one
itself and joining the greenlet of the other), and closes both sockets only
after both loops have returned. An error on one connection ends that
connection alone; the listener never sees it. Who gets in, and the count
of open connections, is admission.py's; deadlines are the sweeper's
(sweeper.py).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any

import gevent
import gevent.socket
from gevent.pool import Group
from gevent.server import StreamServer

from .admission import Admission
from .config import Config, format_address
from .connection import Connection
from .listeners import make_listener, open_listener
from .logs import RateLimit, escape, event
from .relay import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT
from .stats import ERROR, SHUTDOWN, STRICT_VIOLATION, UPSTREAM_UNAVAILABLE, Stats
from .sweeper import Sweeper
from .upstream import RESOURCE_ERRNOS, Dialer, OutOfDescriptors, detach, tune

__all__ = ["ProxyServer", "format_address", "make_listener", "open_listener"]


# accept() failures caused by the one client that gave up: ignore.
_CLIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}


def _log_end(conn: Connection, log_connections: bool) -> None:
    """A strict-mode violation at warning level; the close line if connections are logged."""
    if conn.reason == STRICT_VIOLATION:
        event(
            logging.WARNING,
            "client broke strict mode",
            conn=conn.id,
            peer=conn.peer,
            line=escape(conn.tally.violation or b""),
        )
    if not log_connections:
        return
    t = conn.tally
    event(
        logging.INFO,
        "close",
        conn=conn.id,
        peer=conn.peer,
        reason=conn.reason,
        duration_s=round(time.monotonic() - conn.started, 3),
        bytes_in=t.bytes[CLIENT_TO_UPSTREAM],
        bytes_out=t.bytes[UPSTREAM_TO_CLIENT],
        lines_in=t.lines[CLIENT_TO_UPSTREAM],
        lines_out=t.lines[UPSTREAM_TO_CLIENT],
    )


def _take_over(accepted: tuple[Any, Any], stats: Stats) -> tuple[socket.socket, str] | None:
    """The handler's arguments: a standard-library socket and the peer's name.

    gevent's wrapper and the address tuple, which the handler's greenlet would
    hold for the connection's whole life, go now (about 0.3 KiB per held
    connection). A failure is this client's alone: it never reaches the accept loop.
    """
    client, address = accepted
    try:
        return detach(client), format_address(address)
    except Exception as exc:
        stats.incr("accept_errors")
        event(logging.WARNING, "accepted socket unusable", error=repr(exc))
        return None


class AcceptPause:
    """Out of descriptors: stop watching the listener for a while instead of spinning.

    The pause doubles from the server's ``accept_retry_min`` up to its
    ``accept_retry_max`` while failures go on, and starts again from the
    minimum only once a client is really served (``served``): an accept that
    succeeds while the upstream socket cannot be made is no recovery.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.retry = server.accept_retry_min
        self.timer: Any = None  # at most one pending resume
        self._log = RateLimit(5.0)

    def pause(self, exc: OSError, what: str = "accept failed") -> None:
        suppressed = self._log.allow()
        if suppressed is not None:
            event(
                logging.ERROR,
                f"{what}, pausing",
                error=exc.strerror,
                retry_s=self.retry,
                suppressed=suppressed,
            )
        self.server.stop_accepting()
        if self.timer is not None:
            return  # already paused: a second timer would resume early, losing the back-off
        self.timer = self.server.loop.timer(self.retry)
        self.timer.start(self._resume)
        self.retry = min(self.retry * 2, self.server.accept_retry_max)

    def served(self) -> None:
        self.retry = self.server.accept_retry_min

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None

    def _resume(self) -> None:
        self.cancel()
        if not self.server.closed:
            self.server.start_accepting()


class ProxyServer(StreamServer):
    """The proxy's listener. Tunables are the Config fields and the attributes below.

    gevent's own accept back-off (``min_delay``/``max_delay``) is not used:
    it reports every failure through the hub as a traceback, and restarts
    after any accept, while this one logs one line per 5 s, counts
    ``accept_errors``, also pauses when the upstream socket cannot be made,
    and restarts only once a client is really served.
    """

    #: Bytes read from a socket at once: the most a relay holds per direction.
    buffer_size = 65536
    #: SO_SNDBUF for both sockets of a connection; None leaves the kernel's autotuning.
    send_buffer: int | None = None
    #: Seconds without traffic after which a connection's client side gives its greenlet back.
    park_after = 2.0
    #: How often idle connections are looked at (timeouts are checked at least this often).
    sweep_interval = 1.0
    #: Back-off between accept retries when out of file descriptors (doubles up to max).
    accept_retry_min = 0.05
    accept_retry_max = 1.0

    def __init__(self, listener: socket.socket, config: Config, stats: Stats) -> None:
        listener = gevent.socket.socket(fileno=listener.detach())
        self.handlers = Group()
        super().__init__(listener, spawn=self.handlers.spawn)
        self.config = config
        self.stats = stats
        self.admission = Admission(stats, config.max_connections)
        self.connections = self.admission.connections  # the sweeper's and the drain's view
        self.accept_pause = AcceptPause(self)
        self.dialer = Dialer(config.forward, config.connect_timeout, stats)
        self.sweeper: Sweeper | None = None  # made at start(), from the tunables as set then

    # -- accepting -----------------------------------------------------------

    def do_read(self) -> Any:
        try:
            result = super().do_read()
        except OSError as exc:
            if exc.errno in _CLIENT_ERRNOS:
                return None
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            self.stats.incr("accept_errors")
            self.accept_pause.pause(exc)
            return None
        return _take_over(result, self.stats) if result else result

    # -- one connection ------------------------------------------------------

    def handle(self, client: socket.socket, peer: str) -> None:
        conn = self.admission.admit(peer)
        if conn is None:
            return  # past the limit: the server closes the client socket
        upstream = None
        try:
            tune(client, self.send_buffer)
            upstream = self._dial(conn)
            if upstream is not None:
                self._relay(conn, client, upstream)
        finally:
            try:
                if upstream is not None:
                    upstream.close()
                client.close()
            finally:
                self.admission.release(conn)  # its one close reason

    def _dial(self, conn: Connection) -> socket.socket | None:
        try:
            sock = self.dialer.dial(conn.id, conn.peer, self.send_buffer)
        except OutOfDescriptors as exc:
            # The proxy's own shortage: count it with the accept failures and stop
            # taking clients (which would only be closed in turn) for a while.
            self.stats.incr("accept_errors")
            self.accept_pause.pause(exc.error, "no descriptor for the upstream connection")
            conn.reason = ERROR
            return None
        if sock is None:
            conn.reason = UPSTREAM_UNAVAILABLE
            return None
        self.accept_pause.served()
        return sock

    def _relay(self, conn: Connection, client: socket.socket, upstream: socket.socket) -> None:
        config, stats, hub = self.config, self.stats, gevent.get_hub()
        if config.log_connections:
            event(logging.INFO, "open", conn=conn.id, peer=conn.peer, upstream=str(config.forward))
        conn.reason = conn.run(  # counted by handle(), once the sockets are closed
            hub, client, upstream, stats, config.max_line, self.buffer_size, config.strict
        )
        _log_end(conn, config.log_connections)

    # -- start and stop --------------------------------------------------------

    def start(self) -> None:
        # The resolver is imported and built on first use; under descriptor
        # exhaustion that import itself fails (EMFILE opening its source file).
        gevent.get_hub().resolver  # noqa: B018
        super().start()
        if self.sweeper is None:
            self.sweeper = Sweeper(
                self.connections,
                self.config,
                self.park_after,
                self.sweep_interval,
                finished=lambda: self.closed and not self.connections,
            )
        self.sweeper.start()

    def close(self) -> None:
        """Stop accepting for good, with the pending accept resume.

        The sweeper goes on while connections remain (their timeouts still
        hold during a drain) and ends by itself with the last of them.
        """
        super().close()
        self.accept_pause.cancel()

    def drain(self, timeout: float) -> int:
        """Stop accepting, let connections finish for ``timeout``, then close the rest.

        Returns how many connections had to be closed.
        """
        if not self.closed:
            self.close()
        self.handlers.join(timeout=timeout)
        return self.abort_all()

    def abort_all(self) -> int:
        """Close every connection now; returns how many there were."""
        if not self.closed:
            self.close()
        left = list(self.connections)
        for conn in left:
            conn.abort(SHUTDOWN)
        self.handlers.join(timeout=2.0)
        if self.sweeper is not None:
            self.sweeper.stop()
        return len(left)
