"""The hot path: copy one direction of a connection and count what passes.

A relay owns nothing: the connection handler creates both sockets, runs one
relay per direction and closes the sockets after both have returned.

Per chunk the relay waits until its source is readable, reads once, and
tries one plain ``send``; only when the kernel takes part of the chunk does
it wait for the destination to become writable. It never reads again before
the chunk is out, so a slow peer stops the reading of the other side
(backpressure) and at most one chunk per direction is held in the process.
The chunk is counted after it is forwarded: counting never delays a byte.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

from .codec import Counts, LineScanner, StrictFilter

if TYPE_CHECKING:
    from gevent.hub import Hub

    from .stats import Stats

__all__ = ["CLIENT_TO_UPSTREAM", "UPSTREAM_TO_CLIENT", "Tally", "relay", "strict_relay"]

CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT = 0, 1

# Why a direction ended, by direction: (source EOF, source error, destination error).
_OUTCOMES = (
    ("client_closed", "client_reset", "upstream_reset"),
    ("upstream_closed", "upstream_reset", "client_reset"),
)
_RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class Tally:
    """What one connection moved, per direction; the idle sweeper watches it."""

    __slots__ = ("bytes", "messages", "violation")

    def __init__(self) -> None:
        self.bytes = [0, 0]
        self.messages = [0, 0]
        self.violation: bytes | None = None  # strict mode: the start of the offending line


def _send_rest(
    hub: Hub, writable: object, send: Callable[..., int], data: bytes, sent: int
) -> None:
    """Finish a partial send, waiting for writability between tries."""
    view = memoryview(data)
    total = len(data)
    while sent < total:
        hub.wait(writable)
        try:
            sent += send(view[sent:])
        except BlockingIOError:
            pass


def relay(
    hub: Hub,
    src: socket.socket,
    dst: socket.socket,
    direction: int,
    stats: Stats,
    tally: Tally,
    max_line: int,
    bufsize: int,
    on_messages: Callable[[int, Counts], None],
    ended: Callable[[str], None],
) -> str:
    """Run one direction; tell ``ended`` why it stopped, whatever happens."""
    outcome = "error"
    try:
        outcome = _copy(hub, src, dst, direction, stats, tally, max_line, bufsize, on_messages)
        return outcome
    finally:
        ended(outcome)


def strict_relay(
    hub: Hub,
    src: socket.socket,
    dst: socket.socket,
    direction: int,
    stats: Stats,
    tally: Tally,
    max_line: int,
    bufsize: int,
    on_messages: Callable[[int, Counts], None],
    ended: Callable[[str], None],
) -> str:
    """``relay`` for the client-to-upstream direction in strict mode."""
    assert direction == CLIENT_TO_UPSTREAM
    outcome = "error"
    try:
        outcome = _copy_strict(hub, src, dst, stats, tally, max_line, bufsize, on_messages)
        return outcome
    finally:
        ended(outcome)


# Both are called with plain positional calls (no partial, no *args): CPython
# then runs them in the caller's C frame, and a parked greenlet saves less stack.


def _copy(
    hub: Hub,
    src: socket.socket,
    dst: socket.socket,
    direction: int,
    stats: Stats,
    tally: Tally,
    max_line: int,
    bufsize: int,
    on_messages: Callable[[int, Counts], None],
) -> str:
    """Copy ``src`` to ``dst`` until EOF or an error; return why it ended.

    On EOF the write side of ``dst`` is shut down, so the peer sees the
    half-close and the other direction carries on. Both sockets must be
    non-blocking.
    """
    eof, src_error, dst_error = _OUTCOMES[direction]
    readable = hub.loop.io(src.fileno(), 1)
    writable = hub.loop.io(dst.fileno(), 2)
    wait = hub.wait
    recv = src.recv
    send = dst.send
    feed = LineScanner(max_line).feed
    record = stats.record
    moved = tally.bytes
    try:
        while True:
            wait(readable)
            try:
                data = recv(bufsize)
            except BlockingIOError:
                continue
            except OSError as exc:
                return src_error if isinstance(exc, _RESETS) else "error"
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return eof
            try:
                sent = send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return dst_error if isinstance(exc, _RESETS) else "error"
            n = len(data)
            if sent < n:
                try:
                    _send_rest(hub, writable, send, data, sent)
                except OSError as exc:
                    return dst_error if isinstance(exc, _RESETS) else "error"
            moved[direction] += n
            counts = feed(data)
            now = record(direction, n, counts)
            if now:  # the chunk completed messages: time them, tally them
                on_messages(now, counts)
                tally.messages[direction] += counts[0] + counts[1] + counts[2]
    finally:
        readable.close()
        writable.close()


def _copy_strict(
    hub: Hub,
    src: socket.socket,
    dst: socket.socket,
    stats: Stats,
    tally: Tally,
    max_line: int,
    bufsize: int,
    on_messages: Callable[[int, Counts], None],
) -> str:
    """The client-to-upstream direction in strict mode.

    Only complete, well-formed REQ lines are forwarded; the first other line
    ends the connection before any of its bytes reach the upstream.
    """
    eof, src_error, dst_error = _OUTCOMES[CLIENT_TO_UPSTREAM]
    readable = hub.loop.io(src.fileno(), 1)
    writable = hub.loop.io(dst.fileno(), 2)
    check = StrictFilter(max_line)
    moved = tally.bytes
    try:
        while True:
            hub.wait(readable)
            try:
                data = src.recv(bufsize)
            except BlockingIOError:
                continue
            except OSError as exc:
                return src_error if isinstance(exc, _RESETS) else "error"
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return eof
            good, counts, violation = check.feed(data)
            if good:
                try:
                    try:
                        sent = dst.send(good)
                    except BlockingIOError:
                        sent = 0
                    _send_rest(hub, writable, dst.send, good, sent)
                except OSError as exc:
                    return dst_error if isinstance(exc, _RESETS) else "error"
                moved[CLIENT_TO_UPSTREAM] += len(good)
                now = stats.record(CLIENT_TO_UPSTREAM, len(good), counts)
                if now:
                    on_messages(now, counts)
                tally.messages[CLIENT_TO_UPSTREAM] += counts.req
            if violation is not None:
                stats.record(CLIENT_TO_UPSTREAM, 0, Counts(invalid=1))
                tally.violation = violation
                return "strict_violation"
    finally:
        readable.close()
        writable.close()
