"""The sockets and limits the parent sets up before any worker exists.

Plain standard-library sockets and no gevent: the parent binds once and
hands the same listening socket to every worker it starts (and, on a
reload, to the next generation), so the socket never closes while the
proxy runs.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from typing import Any

from .config import Address
from .logs import LOGGER

__all__ = ["format_address", "make_listener", "open_listener", "raise_fd_limit"]

log = logging.getLogger(LOGGER)

# Binding "::" fails with these where the host has IPv6 switched off.
_NO_IPV6_ERRNOS = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def make_listener(address: Address, backlog: int = 1024) -> socket.socket:
    """Bind and listen. An empty host means every interface, IPv6 and IPv4 together.

    A plain socket: the parent binds it before any worker exists, and has no
    event loop.
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


def format_address(address: Any) -> str:
    """A socket address as host:port, [v6]:port for IPv6, IPv4-mapped IPv6 as IPv4."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack listener: print it as IPv4
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


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
    log.info(
        "file descriptor limit", extra={"fields": {"soft_before": soft, "soft": now, "hard": hard}}
    )
    return now
