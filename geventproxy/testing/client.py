"""Reference Foo client, behaving like the original ``client`` test driver.

Every connection sends the same seeded requests (seq 1..N) and checks each
reply against :func:`~geventproxy.testing.protocol.reply_for`, so anything a
proxy in between drops, reorders or corrupts shows up as a named error.

Usage::

    python -m geventproxy.testing.client -connect=localhost:8001 \\
        [-requests=100] [-connections=1] [-window=1] [-seed=N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gevent
from gevent import socket

from geventproxy.testing.protocol import (
    DEFAULT_REQUESTS,
    DEFAULT_SEED,
    MAX_LINE,
    DecodeError,
    decode_line,
    make_requests,
    reply_for,
    split_hostport,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ERR_CORRUPTED",
    "ERR_DECODING",
    "ERR_SEQ",
    "ERR_TYPE",
    "Result",
    "main",
    "run",
]

#: Error names, exactly as the original client prints them.
ERR_SEQ = "unexpected seq no"
ERR_TYPE = "unexpected response type"
ERR_CORRUPTED = "corrupted data"
ERR_DECODING = "decoding response"

#: Seconds any single connect/send/receive may block before the connection fails.
DEFAULT_TIMEOUT = 10.0

RECV_SIZE = 64 * 1024


@dataclass
class Result:
    """Outcome of a :func:`run`; ``errors`` holds distinct error names in first-seen order."""

    requests: int = 0
    replies: int = 0
    acks: int = 0
    naks: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def add_error(self, error: str) -> None:
        if error not in self.errors:
            self.errors.append(error)


class _ConnectionFailed(Exception):
    """Ends one connection early; the message is recorded as its error."""


class _LineReader:
    """Reads ``\\n``-terminated lines from a socket, bounded like the server."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def readline(self) -> bytes:
        scan_from = 0
        while True:
            newline = self._buf.find(b"\n", scan_from)
            if newline >= 0:
                line = bytes(self._buf[: newline + 1])
                del self._buf[: newline + 1]
                return line
            if len(self._buf) >= MAX_LINE:
                raise _ConnectionFailed(ERR_DECODING)
            scan_from = len(self._buf)
            chunk = self._sock.recv(RECV_SIZE)
            if not chunk:
                raise _ConnectionFailed("connection closed by server")
            self._buf += chunk


def _send_request(sock: socket.socket, seq: int, data: bytes) -> None:
    """Write one REQ in up to three pieces, like the original client."""
    sock.sendall(b"REQ %d" % seq)
    if data:
        sock.sendall(b" " + data)
    sock.sendall(b"\n")


def _check_reply(line: bytes, expected: bytes, result: Result) -> None:
    """Record the first mismatch between a reply and the one the server must send."""
    try:
        type_, seq, data = decode_line(line)
    except DecodeError:
        result.add_error(ERR_DECODING)
        return
    exp_type, exp_seq, exp_data = expected[:-1].split(b" ")
    if seq != int(exp_seq):
        result.add_error(ERR_SEQ)
    elif type_.encode() != exp_type:
        result.add_error(ERR_TYPE)
    elif data != exp_data:
        result.add_error(ERR_CORRUPTED)
    elif type_ == "ACK":
        result.acks += 1
    else:
        result.naks += 1


def _connection(
    host: str,
    port: int,
    requests: list[tuple[int, bytes]],
    window: int,
    timeout: float,
    result: Result,
    on_reply: Callable[[], None] | None,
) -> None:
    expected = [reply_for("REQ", seq, data) for seq, data in requests]
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        result.add_error(f"connecting to {host}:{port}: {exc}")
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = _LineReader(sock)
        sent = 0
        for received in range(len(requests)):
            # Keep up to `window` requests in flight; window=1 is strict ping-pong.
            while sent < len(requests) and sent - received < window:
                _send_request(sock, *requests[sent])
                sent += 1
                result.requests += 1
            line = reader.readline()
            result.replies += 1
            _check_reply(line, expected[received], result)
            if on_reply is not None:
                on_reply()
    except _ConnectionFailed as exc:
        result.add_error(str(exc))
    except socket.timeout:
        result.add_error(f"timeout after {timeout:g}s waiting for the server")
    except OSError as exc:
        result.add_error(f"connection error: {exc}")
    finally:
        sock.close()


def run(
    host: str,
    port: int,
    requests: int = DEFAULT_REQUESTS,
    connections: int = 1,
    window: int = 1,
    seed: int = DEFAULT_SEED,
    timeout: float = DEFAULT_TIMEOUT,
    on_reply: Callable[[], None] | None = None,
    rounds: int = 1,
) -> Result:
    """Run ``connections`` concurrent connections of ``requests`` checked REQs each.

    Each of the ``connections`` opens ``rounds`` connections one after
    another. ``on_reply`` is called once per reply received (the CLI draws
    its dots with it).
    """
    if requests < 0 or connections < 1 or window < 1 or rounds < 1:
        raise ValueError("requests must be >= 0, connections, window and rounds >= 1")
    request_set = make_requests(requests, seed)
    result = Result()
    started = time.perf_counter()

    def one_after_another() -> None:
        for _ in range(rounds):
            _connection(host, port, request_set, window, timeout, result, on_reply)

    greenlets = [gevent.spawn(one_after_another) for _ in range(connections)]
    gevent.joinall(greenlets, raise_error=True)
    result.elapsed = time.perf_counter() - started
    return result


# Long but flat: one argument declaration after another.
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m geventproxy.testing.client",
        description="Reference Foo client (behaves like the original test driver).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-connect",
        "--connect",
        default="localhost:8001",
        metavar="ADDR",
        help="server address: 'localhost:8001', '127.0.0.1:8001', '[::1]:8001'",
    )
    parser.add_argument(
        "-requests",
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help="requests per connection (default %(default)s)",
    )
    parser.add_argument(
        "-connections",
        "--connections",
        type=int,
        default=1,
        help="concurrent connections, each with its own seq 1..N (default %(default)s)",
    )
    parser.add_argument(
        "-window",
        "--window",
        type=int,
        default=1,
        help="requests in flight per connection; >1 pipelines (default %(default)s)",
    )
    parser.add_argument(
        "-rounds",
        "--rounds",
        type=int,
        default=1,
        help="connections each of the concurrent ones opens in turn (default %(default)s)",
    )
    parser.add_argument(
        "-seed",
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="random seed of the request set (default %(default)s)",
    )
    parser.add_argument(
        "-timeout",
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds any single network operation may block (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.requests < 0 or args.connections < 1 or args.window < 1 or args.rounds < 1:
        parser.error("-requests must be >= 0, -connections, -window and -rounds >= 1")
    try:
        args.host, args.port = split_hostport(args.connect)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.host:
        args.host = "localhost"  # Go dials ":8001" on the local system
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print a dot per 10 replies, then ``OK!`` (exit 0) or ``FAILED!`` and errors (exit 1)."""
    args = _parse_args(argv)
    out = sys.stdout
    done = 0

    def progress() -> None:
        nonlocal done
        done += 1
        if done % 10 == 0:
            out.write(".")
            out.flush()

    result = run(
        args.host,
        args.port,
        requests=args.requests,
        connections=args.connections,
        window=args.window,
        seed=args.seed,
        timeout=args.timeout,
        on_reply=progress,
        rounds=args.rounds,
    )
    if result.ok:
        out.write("OK!\n")
        out.flush()
        return 0
    out.write("FAILED!\nErrors:\n")
    for error in result.errors:
        out.write(f"  - {error}\n")
    out.flush()
    return 1


if __name__ == "__main__":
    sys.exit(main())
