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

from .config import Address
from .logs import event

__all__ = ["make_listener", "open_listener", "raise_fd_limit"]

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
        # create_server makes an IPv6 socket IPv6-only unless asked not to, and an
        # IPv6-only socket cannot bind an IPv4-mapped address such as [::ffff:127.0.0.1].
        mapped = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
        sock = socket.create_server(sockaddr, family=family, backlog=backlog, dualstack_ipv6=mapped)
    elif socket.has_dualstack_ipv6():
        try:
            sock = socket.create_server(
                ("", address.port), family=socket.AF_INET6, backlog=backlog, dualstack_ipv6=True
            )
        except OSError as exc:
            if exc.errno not in _NO_IPV6_ERRNOS:
                raise  # a port in use stays an error: never fall back to IPv4 alone
            sock = socket.create_server(("", address.port), backlog=backlog)
    else:
        sock = socket.create_server(("", address.port), backlog=backlog)
    sock.setblocking(False)
    return sock


def open_listener(address: Address, flag: str = "-listen") -> socket.socket | None:
    """``make_listener``, or None after logging why it failed (a port in use...).

    ``flag`` names the listener in that line: ``-listen`` or ``-admin``.
    """
    try:
        return make_listener(address)
    except OSError as exc:
        event(
            logging.ERROR,
            f"cannot listen on the {flag} address",
            address=str(address),
            error=exc.strerror or str(exc),
        )
        return None


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
    event(logging.INFO, "file descriptor limit", soft_before=soft, soft=now, hard=hard)
    return now
