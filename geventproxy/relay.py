"""The hot path: copy one direction of a connection and count what passes.

A relay owns nothing: the connection creates both sockets and the watchers,
runs one relay per direction and closes everything after both have ended.

Per chunk, as measured to matter on a 2-core machine:

- The relay's readability watcher stays started, with the relay greenlet's
  own ``switch`` as its callback: the event loop resumes the relay directly,
  with no Waiter object and no watcher start/stop per chunk.
- It reads once per wake-up (a read that would block costs a syscall), and
  tries one plain ``send``; only when the kernel takes part of the chunk does
  it stop reading and wait for the destination to become writable. It never
  reads again before the chunk is out, so a slow peer stops the reading of
  the other side (backpressure) and at most one chunk per direction is held.
- The chunk is counted right after its first send: counting never delays a
  byte that the kernel would take, and the REQs of a chunk are timed before
  the loop waits to send the rest of it (their replies may come meanwhile).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Callable

from greenlet import getcurrent

from .codec import Counts, StrictFilter

if TYPE_CHECKING:
    from gevent.hub import Hub

    from .meter import Meter
    from .stats import Stats

__all__ = [
    "CLIENT_TO_UPSTREAM",
    "PARKED",
    "UPSTREAM_TO_CLIENT",
    "Direction",
    "Park",
    "Tally",
    "relay",
]

CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT = 0, 1
PARKED = "parked"

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


class Park(Exception):
    """Thrown into a copy loop that waits for its source, to give its greenlet back.

    Honoured only at the wait for readability, where the loop holds nothing;
    at the wait for writability it is ignored.
    """


class Direction:
    """One direction of a connection: what its copy loop needs, kept across parking."""

    __slots__ = ("index", "src", "dst", "readable", "writable", "scanner", "on_messages")

    def __init__(
        self,
        hub: Hub,
        index: int,
        src: socket.socket,
        dst: socket.socket,
        scanner: Meter | StrictFilter,
        on_messages: Callable[[int, Counts], None],
    ) -> None:
        self.index = index
        self.src = src
        self.dst = dst
        self.readable = hub.loop.io(src.fileno(), 1)
        self.writable = hub.loop.io(dst.fileno(), 2)
        self.scanner = scanner
        self.on_messages = on_messages

    def close(self) -> None:
        self.readable.close()
        self.writable.close()


def relay(
    hub: Hub, d: Direction, stats: Stats, tally: Tally, bufsize: int, ended: Callable[[str], None]
) -> str:
    """Run one direction until it ends or is parked; tell ``ended`` when it ends."""
    outcome = "error"
    readable = d.readable
    readable.start(getcurrent().switch)  # the loop resumes this greenlet when src is readable
    try:
        if isinstance(d.scanner, StrictFilter):
            outcome = _copy_strict(hub, d, stats, tally, bufsize)
        else:
            # A plain positional call: CPython runs it in this C frame, so a parked
            # greenlet saves less stack.
            outcome = _copy(
                hub,
                d.index,
                d.src,
                d.dst,
                readable,
                d.writable,
                d.scanner.account,
                tally,
                bufsize,
            )
        return outcome
    finally:
        readable.stop()
        if outcome != PARKED:
            ended(outcome)


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _send_rest(
    hub: Hub, readable: Any, writable: Any, send: Callable[..., int], data: bytes, sent: int
) -> None:
    """Finish a partial send: stop reading, wait for writability between tries."""
    readable.stop()
    view = memoryview(data)
    total = len(data)
    try:
        while sent < total:
            try:
                hub.wait(writable)
            except Park:
                continue  # a chunk is in flight: not a place to park
            try:
                sent += send(view[sent:])
            except BlockingIOError:
                pass
    finally:
        readable.start(getcurrent().switch)


def _copy(
    hub: Hub,
    direction: int,
    src: socket.socket,
    dst: socket.socket,
    readable: Any,
    writable: Any,
    account: Callable[[bytes], int],
    tally: Tally,
    bufsize: int,
) -> str:
    """Copy ``src`` to ``dst`` until EOF, an error or a Park; return which.

    On EOF the write side of ``dst`` is shut down, so the peer sees the
    half-close and the other direction carries on.
    """
    eof, src_error, dst_error = _OUTCOMES[direction]
    wait_readable = hub.switch  # returns when ``readable`` fires (see relay())
    recv = src.recv
    send = dst.send
    moved = tally.bytes
    messages = tally.messages
    while True:
        try:
            wait_readable()
        except Park:
            return PARKED
        try:
            data = recv(bufsize)
        except BlockingIOError:
            continue
        except OSError as exc:
            return src_error if isinstance(exc, _RESETS) else "error"
        if not data:
            _half_close(dst)
            return eof
        # Forward first, at once.
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return dst_error if isinstance(exc, _RESETS) else "error"
        # Then count: one call scans, counts and times the chunk (meter.py, or the
        # compiled accelerator). Before finishing a partial send: replies to the
        # part already sent may be relayed while this loop waits, and must find
        # their REQs timed.
        n = len(data)
        moved[direction] += n
        completed = account(data)
        if completed:
            messages[direction] += completed
        # Wait for writability only if the kernel took less than the chunk.
        if sent < n:
            try:
                _send_rest(hub, readable, writable, send, data, sent)
            except OSError as exc:
                return dst_error if isinstance(exc, _RESETS) else "error"


def _copy_strict(hub: Hub, d: Direction, stats: Stats, tally: Tally, bufsize: int) -> str:
    """The client-to-upstream direction in strict mode.

    Only complete, well-formed REQ lines are forwarded; the first other line
    ends the connection before any of its bytes reach the upstream.
    """
    eof, src_error, dst_error = _OUTCOMES[CLIENT_TO_UPSTREAM]
    check = d.scanner
    assert isinstance(check, StrictFilter)
    while True:
        try:
            hub.switch()
        except Park:
            return PARKED
        try:
            data = d.src.recv(bufsize)
        except BlockingIOError:
            continue
        except OSError as exc:
            return src_error if isinstance(exc, _RESETS) else "error"
        if not data:
            _half_close(d.dst)
            return eof
        good, counts, violation = check.feed(data)
        if good:
            try:
                sent = d.dst.send(good)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return dst_error if isinstance(exc, _RESETS) else "error"
            tally.bytes[CLIENT_TO_UPSTREAM] += len(good)
            now = stats.record(CLIENT_TO_UPSTREAM, len(good), counts)
            if now:  # counted before the rest is sent, as in _copy
                d.on_messages(now, counts)
            tally.messages[CLIENT_TO_UPSTREAM] += counts[0]
            if sent < len(good):
                try:
                    _send_rest(hub, d.readable, d.writable, d.dst.send, good, sent)
                except OSError as exc:
                    return dst_error if isinstance(exc, _RESETS) else "error"
        if violation is not None:
            stats.record(CLIENT_TO_UPSTREAM, 0, (0, 0, 0, 1))
            tally.violation = violation
            return "strict_violation"
