"""Accept clients, dial the upstream for each, relay both directions, close.

A client's handler owns its two sockets: it opens the upstream, runs the two
copy loops (it runs the upstream-to-client one itself and spawns a greenlet
for the other), joins that greenlet, and closes both sockets only after both
loops have returned. An error on one connection ends that connection alone;
the listener never sees it.
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

from .config import Address, Config
from .connection import Connection
from .logs import LOGGER, RateLimit, escape
from .relay import CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT
from .stats import Stats

__all__ = ["ProxyServer", "format_address", "make_listener", "open_listener"]

log = logging.getLogger(LOGGER)

# accept() failures that mean "out of a resource": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept() failures caused by the one client that gave up: ignore.
_CLIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}


# Binding "::" fails with these where the host has IPv6 switched off.
_NO_IPV6_ERRNOS = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def make_listener(address: Address, backlog: int = 1024) -> socket.socket:
    """Bind and listen. An empty host means every interface, IPv6 and IPv4 together.

    A plain socket, not a gevent one: a supervisor binds before it forks its
    workers, and must not create an event loop to do so.
    """
    if address.host:
        infos = socket.getaddrinfo(
            address.host, address.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        candidates = [(family, sockaddr)]
    else:
        candidates = [(socket.AF_INET6, ("::", address.port)), (socket.AF_INET, ("", address.port))]
    error: OSError | None = None
    for family, sockaddr in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # no IPv6 on this host
            error = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not address.host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in _NO_IPV6_ERRNOS:
                raise  # a port in use stays an error: never fall back to IPv4 alone
            error = exc
    assert error is not None
    raise error


def open_listener(address: Address, flag: str = "-listen") -> socket.socket | None:
    """``make_listener``, or None after logging why it failed (a port in use...).

    ``flag`` names the listener in that line: ``-listen`` or ``-admin``.
    """
    try:
        return make_listener(address)
    except OSError as exc:
        log.error(
            f"cannot listen on the {flag} address",
            extra={"fields": {"address": str(address), "error": exc.strerror or str(exc)}},
        )
        return None


#: TCP keepalive on both sockets of a connection: a peer that vanished without
#: a FIN or RST (a crashed host, a cut cable) is found after about
#: idle + interval * count seconds, here 60 + 10 * 6 = 2 minutes.
KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


def _plain(sock: Any, send_buffer: int | None = None) -> socket.socket:
    """The same connection as a standard-library socket: its methods are C calls."""
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    sock.close()  # releases the gevent wrapper's watchers now, not when it is collected
    raw.setblocking(False)
    if send_buffer:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return raw


def _connect(address: Address, timeout: float | None) -> Any:
    """Dial ``address``, each resolved address in turn, all within one ``timeout``.

    create_connection's own timeout covers each connect() alone; this
    deadline also covers the name lookup (a DNS server that never answers)
    and the sum over several addresses.
    """
    deadline = gevent.Timeout(timeout)
    deadline.start()
    try:
        return gevent.socket.create_connection((address.host, address.port), timeout=timeout)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise TimeoutError("timed out") from None
    finally:
        deadline.close()


def format_address(address: Any) -> str:
    """A socket address as host:port, [v6]:port for IPv6, IPv4-mapped IPv6 as IPv4."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack listener: print it as IPv4
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class ProxyServer(StreamServer):
    """The proxy's listener. Tunables are the Config fields and the attributes below."""

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
        self.connections: set[Connection] = set()
        self._next_id = 0
        self._accept_retry = self.accept_retry_min
        self._resume_timer: Any = None  # at most one pending resume of accepting
        self._accept_log = RateLimit(5.0)
        self._refuse_log = RateLimit(5.0)
        self._upstream_log = RateLimit(1.0)
        self._sweeper: gevent.Greenlet | None = None

    # -- accepting -----------------------------------------------------------

    def do_read(self) -> Any:
        try:
            result = super().do_read()
        except OSError as exc:
            if exc.errno in _CLIENT_ERRNOS:
                return None
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            self.stats.incr("accept_errors")
            self._pause_accepting(exc)
            return None
        return result

    def _pause_accepting(self, exc: OSError, what: str = "accept failed") -> None:
        """Out of descriptors: stop watching the listener for a while instead of spinning."""
        suppressed = self._accept_log.allow()
        if suppressed is not None:
            log.error(
                f"{what}, pausing",
                extra={
                    "fields": {
                        "error": exc.strerror,
                        "retry_s": self._accept_retry,
                        "suppressed": suppressed,
                    }
                },
            )
        self.stop_accepting()
        if self._resume_timer is not None:
            return  # already paused: a second timer would resume early, losing the back-off
        timer = self._resume_timer = self.loop.timer(self._accept_retry)
        timer.start(self._resume_accepting, timer)
        self._accept_retry = min(self._accept_retry * 2, self.accept_retry_max)

    def _resume_accepting(self, timer: Any) -> None:
        timer.close()
        self._resume_timer = None
        if not self.closed:
            self.start_accepting()

    # -- one connection ------------------------------------------------------

    def handle(self, client: Any, address: Any) -> None:
        stats = self.stats
        limit = self.config.max_connections
        if limit and len(self.connections) >= limit:
            stats.incr("connections_refused")
            suppressed = self._refuse_log.allow()
            if suppressed is not None:
                log.warning(
                    "connection refused: limit reached",
                    extra={
                        "fields": {
                            "peer": format_address(address),
                            "max_connections": limit,
                            "suppressed": suppressed,
                        }
                    },
                )
            return  # the server closes the client socket
        self._next_id += 1
        conn = Connection(self._next_id, format_address(address))
        self.connections.add(conn)
        stats.incr("connections_total")
        stats.incr("connections_active")
        client_sock = _plain(client, self.send_buffer)
        upstream = None
        try:
            upstream = self._dial(conn)
            if upstream is not None:
                self._relay(conn, client_sock, upstream)
        finally:
            # Every connection counted in connections_total gets exactly one reason.
            stats.closed(conn.reason or "error")
            if upstream is not None:
                upstream.close()
            client_sock.close()
            self.connections.discard(conn)
            stats.incr("connections_active", -1)

    def _dial(self, conn: Connection) -> socket.socket | None:
        target = self.config.forward
        timeout = self.config.connect_timeout or None
        try:
            sock = _connect(target, timeout)
        except OSError as exc:
            # A lookup error's errno is a resolver code, not an errno: never "out of descriptors".
            if exc.errno in _RESOURCE_ERRNOS and not isinstance(exc, socket.gaierror):
                # No descriptor left for the upstream socket: the proxy's own shortage,
                # not the upstream's fault. Count it with the accept failures and stop
                # taking clients (which would only be closed in turn) for a while.
                self.stats.incr("accept_errors")
                self._pause_accepting(exc, "no descriptor for the upstream connection")
                conn.reason = "error"
                return None
            timed_out = isinstance(exc, TimeoutError)
            self.stats.incr(
                "upstream_connect_timeouts" if timed_out else "upstream_connect_failures"
            )
            conn.reason = "upstream_unavailable"
            suppressed = self._upstream_log.allow()
            if suppressed is not None:
                log.warning(
                    "upstream connect timed out" if timed_out else "upstream connect failed",
                    extra={
                        "fields": {
                            "conn": conn.id,
                            "peer": conn.peer,
                            "upstream": str(target),
                            "error": str(exc) or type(exc).__name__,
                            "suppressed": suppressed,
                        }
                    },
                )
            return None
        # The back-off restarts only once a client is really served: an accept that
        # succeeds while the upstream socket cannot be made is no recovery.
        self._accept_retry = self.accept_retry_min
        return _plain(sock, self.send_buffer)

    def _relay(self, conn: Connection, client: socket.socket, upstream: socket.socket) -> None:
        config, stats, hub = self.config, self.stats, gevent.get_hub()
        if config.log_connections:
            log.info(
                "open",
                extra={
                    "fields": {"conn": conn.id, "peer": conn.peer, "upstream": str(config.forward)}
                },
            )
        reason = conn.run(
            hub, client, upstream, stats, config.max_line, self.buffer_size, config.strict
        )
        conn.reason = reason  # counted by handle(), once the sockets are closed
        if reason == "strict_violation":
            log.warning(
                "client broke strict mode",
                extra={
                    "fields": {
                        "conn": conn.id,
                        "peer": conn.peer,
                        "line": escape(conn.tally.violation or b""),
                    }
                },
            )
        if config.log_connections:
            t = conn.tally
            log.info(
                "close",
                extra={
                    "fields": {
                        "conn": conn.id,
                        "peer": conn.peer,
                        "reason": reason,
                        "duration_s": round(time.monotonic() - conn.started, 3),
                        "bytes_in": t.bytes[CLIENT_TO_UPSTREAM],
                        "bytes_out": t.bytes[UPSTREAM_TO_CLIENT],
                        "msgs_in": t.messages[CLIENT_TO_UPSTREAM],
                        "msgs_out": t.messages[UPSTREAM_TO_CLIENT],
                    }
                },
            )

    # -- timeouts and shutdown ---------------------------------------------------

    def start(self) -> None:
        # The resolver is imported and built on first use; under descriptor
        # exhaustion that import itself fails (EMFILE opening its source file).
        gevent.get_hub().resolver  # noqa: B018
        super().start()
        config = self.config
        timeouts = [t for t in (config.idle_timeout, config.fin_timeout, self.park_after) if t > 0]
        if self._sweeper is None:
            tick = min(self.sweep_interval, max(0.02, min(timeouts, default=1.0) / 4))
            self._sweeper = gevent.spawn(self._sweep_forever, tick)

    def _sweep_forever(self, tick: float) -> None:
        while True:
            gevent.sleep(tick)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Close connections past their idle or half-closed deadline; park idle ones."""
        idle_timeout, fin_timeout = self.config.idle_timeout, self.config.fin_timeout
        for conn in list(self.connections):
            if not conn.sockets:
                continue  # still dialling: --connect-timeout is in charge
            moved = conn.tally.bytes[0] + conn.tally.bytes[1]
            if moved != conn.seen:
                conn.seen, conn.seen_at = moved, now
                continue
            idle = now - conn.seen_at
            if conn.upstream_eof and fin_timeout and idle >= fin_timeout:
                conn.abort("upstream_closed")
            elif idle_timeout and idle >= idle_timeout:
                conn.abort("idle_timeout")
            elif idle >= self.park_after:
                conn.park()

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
            conn.abort("shutdown")
        self.handlers.join(timeout=2.0)
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        return len(left)
