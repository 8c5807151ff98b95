"""Reference Foo server, behaving like the original ``server`` test driver.

It answers every decodable line with a deterministic ACK/NAK (see
:mod:`geventproxy.testing.protocol`) and writes each reply in three separate
sends with Nagle disabled, so messages are routinely split across TCP segments:
exactly the traffic shape a proxy has to cope with. ``fast=True`` batches the
replies of one read into one send instead, for benchmarks where the server must
not be the bottleneck.

Like the original, it never closes a connection on purpose: after the
client's EOF it answers what it had read and then leaves its socket open
(in CLOSE-WAIT) for as long as it runs. ``close_on_eof=True``
(``-close-on-eof``) closes it instead, for a test that wants the kinder peer.

Usage::

    python -m geventproxy.testing.server -listen=:8001 [--fast] [--close-on-eof]
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from collections.abc import Sequence
from typing import Any

import gevent
from gevent import socket
from gevent.server import StreamServer

from geventproxy.config import format_address
from geventproxy.testing.protocol import (
    ERRDECODE_REPLY,
    MAX_LINE,
    DecodeError,
    decode_line,
    reply_for,
    split_hostport,
)

__all__ = ["FooServer", "answer", "main", "make_listener"]

log = logging.getLogger("geventproxy.testing.server")

RECV_SIZE = 64 * 1024


def answer(line: bytes) -> bytes:
    """The full reply line the original server sends for one received line."""
    try:
        type_, seq, data = decode_line(line)
    except DecodeError:
        return ERRDECODE_REPLY
    return reply_for(type_, seq, data)


def _three_parts(reply: bytes) -> tuple[bytes, bytes, bytes]:
    """Split ``Type Seq Data\\n`` into ``Type Seq``, `` Data``, ``\\n`` like the original."""
    cut = reply.rindex(b" ")
    return reply[:cut], reply[cut:-1], reply[-1:]


class FooServer(StreamServer):
    """The reference server: one greenlet per connection, replies in request order."""

    def __init__(
        self, listener: Any, *, fast: bool = False, close_on_eof: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(listener, **kwargs)
        self.fast = fast
        self.close_on_eof = close_on_eof
        #: Sockets whose client has gone, kept open as the original keeps them.
        self.abandoned: list[socket.socket] = []

    def handle(self, sock: socket.socket, address: Any) -> None:
        """Serve one connection; after the client's EOF leave the socket open."""
        peer = format_address(address)
        log.debug("connection from %s", peer)
        keep = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep = self._serve(sock, peer) and not self.close_on_eof
        except OSError as exc:
            log.debug("connection from %s failed: %s", peer, exc)
        finally:
            if keep:
                # The server closes what a handler returns with: keep the descriptor
                # in a socket of its own, which nothing closes.
                self.abandoned.append(
                    socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
                )
                log.debug("connection from %s: client done, socket left open", peer)
            else:
                sock.close()
                log.debug("connection from %s closed", peer)

    def _serve(self, sock: socket.socket, peer: str) -> bool:
        """Answer lines until the client's EOF (True) or an over-long line (False)."""
        buf = bytearray()
        while True:
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                # Like bufio.Scanner at EOF: a final unterminated line still counts.
                if buf:
                    self._reply(sock, [answer(bytes(buf))])
                return True
            scan_from = len(buf)
            buf += chunk
            replies = []
            start = 0
            too_long = False
            while True:
                newline = buf.find(b"\n", max(start, scan_from))
                if newline < 0:
                    break
                if newline + 1 - start > MAX_LINE:
                    too_long = True
                    break
                replies.append(answer(bytes(buf[start : newline + 1])))
                start = newline + 1
            del buf[:start]
            # Lines before the over-long one are still answered, as the Scanner does.
            self._reply(sock, replies)
            if too_long or len(buf) >= MAX_LINE:
                log.warning("line longer than %d bytes from %s; closing", MAX_LINE, peer)
                return False

    def _reply(self, sock: socket.socket, replies: list[bytes]) -> None:
        if not replies:
            return
        if self.fast:
            sock.sendall(b"".join(replies))
            return
        for reply in replies:
            for part in _three_parts(reply):
                sock.sendall(part)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def make_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind a listening socket the way Go's ``net.Listen("tcp", addr)`` would.

    An empty host means every interface: a dual-stack ``::`` socket, or
    ``0.0.0.0`` where IPv6 is unavailable.
    """
    if host in ("", "::"):
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
        if host == "::":
            candidates = candidates[:1]
    else:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        candidates = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    last_error: OSError | None = None
    for family, sockaddr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        return sock
    raise last_error or OSError(f"cannot listen on {host!r}:{port}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m geventproxy.testing.server",
        description="Reference Foo server (behaves like the original test driver).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-listen",
        "--listen",
        default=":8001",
        metavar="ADDR",
        help="address to listen on: ':8001' (all interfaces), 'host:port', '[::1]:8001'",
    )
    parser.add_argument(
        "-fast",
        "--fast",
        action="store_true",
        help="send all replies to one read in a single write (benchmark stub)",
    )
    parser.add_argument(
        "-close-on-eof",
        "--close-on-eof",
        action="store_true",
        help="close a connection at the client's EOF (the original never does)",
    )
    parser.add_argument(
        "-verbose", "--verbose", "-v", action="store_true", help="log every connection"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT, then return 0."""
    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s server %(levelname)s %(message)s",
    )
    try:
        host, port = split_hostport(args.listen)
        listener = make_listener(host, port)
    except (ValueError, OSError) as exc:
        print(f"server: cannot listen on {args.listen}: {exc}", file=sys.stderr, flush=True)
        return 1
    _raise_fd_limit()  # sockets left open add up over a long run
    server = FooServer(listener, fast=args.fast, close_on_eof=args.close_on_eof)

    def _stop(signum: int) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        server.close()

    # Installed before announcing the port, so a signal sent right after the
    # "listening on" line is already handled (exit 0, not death by signal).
    handlers = [
        gevent.signal_handler(signum, _stop, signum) for signum in (signal.SIGTERM, signal.SIGINT)
    ]
    server.start()
    print(f"listening on {format_address(listener.getsockname())}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        for handler in handlers:
            handler.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
