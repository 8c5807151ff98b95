"""Dialling the upstream for one client, and preparing a connection's sockets.

A failure to dial is one of three things, and each is told apart because
each calls for a different answer: the upstream is unreachable (refused, no
such name: count it, blame the upstream), it did not answer in time (count
it as a timeout), or this process has no descriptor left for the socket
(the proxy's own shortage: the listener must stop taking clients for a
while, and the upstream is not to blame).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

import gevent
import gevent.socket

from .config import Address
from .logs import RateLimit, event
from .stats import Stats

__all__ = [
    "KEEPALIVE",
    "RESOURCE_ERRNOS",
    "Dialer",
    "OutOfDescriptors",
    "detach",
    "tune",
]


#: Failures that mean "out of a resource" (accept or socket): back off, don't spin.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: TCP keepalive on both sockets of a connection: a peer that vanished without
#: a FIN or RST (a crashed host, a cut cable) is found after about
#: idle + interval * count seconds, here 60 + 10 * 6 = 2 minutes.
KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))


class OutOfDescriptors(Exception):
    """No descriptor was left for the upstream socket; ``error`` is the OSError."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


def detach(sock: Any) -> socket.socket:
    """The same connection as a standard-library socket: its methods are C calls."""
    family, type_, proto = sock.family, sock.type, sock.proto
    fd = sock.detach()
    sock.close()  # releases the gevent wrapper's watchers now, not when it is collected
    try:
        return socket.socket(family, type_, proto, fileno=fd)
    except BaseException:
        os.close(fd)  # nothing else owns it now
        raise


def tune(raw: socket.socket, send_buffer: int | None = None) -> socket.socket:
    """Make a connection's socket ready to relay: non-blocking, no Nagle, keepalive."""
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


class Dialer:
    """Opens the upstream socket for each client, counting and logging what fails."""

    def __init__(self, target: Address, timeout: float, stats: Stats) -> None:
        self.target = target
        self.timeout = timeout or None
        self.stats = stats
        self._log = RateLimit(1.0)

    def dial(self, conn_id: int, peer: str, send_buffer: int | None = None) -> socket.socket | None:
        """The upstream socket, or None (counted and logged) if the upstream failed.

        Raises OutOfDescriptors when the failure is this process's own.
        """
        try:
            sock = _connect(self.target, self.timeout)
        except OSError as exc:
            # A lookup error's errno is a resolver code, not an errno: never "out of descriptors".
            if exc.errno in RESOURCE_ERRNOS and not isinstance(exc, socket.gaierror):
                raise OutOfDescriptors(exc) from None
            self._failed(exc, conn_id, peer)
            return None
        return tune(detach(sock), send_buffer)

    def _failed(self, exc: OSError, conn_id: int, peer: str) -> None:
        timed_out = isinstance(exc, TimeoutError)
        self.stats.incr("upstream_connect_timeouts" if timed_out else "upstream_connect_failures")
        suppressed = self._log.allow()
        if suppressed is not None:
            event(
                logging.WARNING,
                "upstream connect timed out" if timed_out else "upstream connect failed",
                conn=conn_id,
                peer=peer,
                upstream=str(self.target),
                error=str(exc) or type(exc).__name__,
                suppressed=suppressed,
            )
