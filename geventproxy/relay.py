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

from .accel import copy_loop
from .codec import Counts, StrictFilter
from .stats import (
    CLIENT_CLOSED,
    CLIENT_RESET,
    ERROR,
    STRICT_VIOLATION,
    UPSTREAM_CLOSED,
    UPSTREAM_RESET,
)

if TYPE_CHECKING:
    from gevent.hub import Hub

    from .meter import Meter
    from .stats import Stats

__all__ = [
    "ANSWERED",
    "CLIENT_SENDING",
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
#: The upstream-to-client loop's outcome once every reply the client is owed is delivered.
ANSWERED = "answered"

# Why a direction ended, by direction: (source EOF, source error, destination error).
_OUTCOMES = (
    (CLIENT_CLOSED, CLIENT_RESET, UPSTREAM_RESET),
    (UPSTREAM_CLOSED, UPSTREAM_RESET, CLIENT_RESET),
)
#: The same, then every other outcome, in the order _accel.copy() takes them.
_COMPILED_OUTCOMES = tuple((*o, ERROR, PARKED, ANSWERED) for o in _OUTCOMES)
_RESETS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def _failed(exc: OSError, reset: str) -> str:
    """The close reason for a socket error: the peer's ``reset``, or ERROR for anything else."""
    return reset if isinstance(exc, _RESETS) else ERROR


#: ``Tally.owed`` while the client may still send: more replies than any connection sees.
CLIENT_SENDING = 1 << 62


class Tally:
    """What one connection moved, per direction; the idle sweeper watches it.

    ``lines`` counts ended lines (LFs), well-formed or not: a Foo server answers
    every line it reads with one line, so once the client has half-closed,
    the connection is done when ``lines[UPSTREAM_TO_CLIENT]`` reaches
    ``owed``, the number of replies its requests call for.
    """

    __slots__ = ("bytes", "lines", "owed", "violation")

    def __init__(self) -> None:
        self.bytes = [0, 0]
        self.lines = [0, 0]
        self.owed = CLIENT_SENDING
        self.violation: bytes | None = None  # strict mode: the start of the offending line


class Park(Exception):
    """Thrown into a copy loop that waits for its source, to give its greenlet back.

    Honoured only at the wait for readability, where the loop holds nothing;
    at the wait for writability it is ignored.
    """


class Direction:
    """One direction of a connection: what its copy loop needs, kept across parking.

    Its ``writable`` watcher is made on first use, by ``finish_send``: most
    connections never see a partial send, and an idle one so holds one
    watcher per direction, not two.
    """

    __slots__ = ("index", "src", "dst", "readable", "scanner", "on_messages", "_hub", "_writable")

    def __init__(
        self,
        hub: Hub,
        index: int,
        src: socket.socket,
        dst: socket.socket,
        scanner: Meter | StrictFilter,
        on_messages: Callable[[int, Counts], None] | None = None,
    ) -> None:
        self.index = index
        self.src = src
        self.dst = dst
        self.readable = hub.loop.io(src.fileno(), 1)
        self.scanner = scanner
        self.on_messages = on_messages
        self._hub = hub
        self._writable: Any = None

    def finish_send(self, data: bytes, sent: int) -> None:
        """Finish a partial send: stop reading, wait for writability between tries.

        The copy loop calls it only when the kernel took less than the chunk;
        raises what ``send`` raises.
        """
        readable, send, hub = self.readable, self.dst.send, self._hub
        writable = self._writable
        if writable is None:  # made on first use: most connections never see a partial send
            writable = self._writable = hub.loop.io(self.dst.fileno(), 2)
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

    def close(self) -> None:
        self.readable.close()
        if self._writable is not None:
            self._writable.close()


def relay(
    hub: Hub, d: Direction, stats: Stats, tally: Tally, bufsize: int, ended: Callable[[str], None]
) -> str:
    """Run one direction until it ends or is parked; tell ``ended`` when it ends.

    The sockets must stay open until this returns: the compiled loop reads
    their descriptors once (the connection closes them after both loops end).
    """
    outcome = ERROR
    readable = d.readable
    readable.start(getcurrent().switch)  # the loop resumes this greenlet when src is readable
    try:
        if isinstance(d.scanner, StrictFilter):
            outcome = _copy_strict(hub, d, stats, tally, bufsize)
        elif copy_loop is not None:  # _copy compiled: the same steps and outcomes
            outcome = copy_loop(
                hub.switch,
                d.src.fileno(),
                d.dst.fileno(),
                d.scanner,
                tally,
                d.index,
                bufsize,
                d.finish_send,
                Park,
                _COMPILED_OUTCOMES[d.index],
            )
        else:
            outcome = _copy(hub, d, tally, bufsize)
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


# Long by design: the hot path, kept in one frame so that every name it uses is a
# local (a helper call per chunk would cost more than some of the steps it holds).
def _copy(hub: Hub, d: Direction, tally: Tally, bufsize: int) -> str:
    """Copy ``d.src`` to ``d.dst`` until EOF, an error, a Park or ANSWERED; return which.

    On EOF the write side of ``dst`` is shut down, so the peer sees the
    half-close and the other direction carries on. ANSWERED ends the
    upstream-to-client loop once the client has half-closed and the last
    reply it is owed has been sent in full (the client-to-upstream loop has
    returned by then, so the check never fires there).

    ``copy()`` in ``_accel.c`` is this loop compiled, used when the
    accelerator is: a change to these steps must be made there too
    (tests/integration/test_copy_loops.py runs both on the same sockets).
    """
    direction, dst = d.index, d.dst
    eof, src_error, dst_error = _OUTCOMES[direction]
    wait_readable = hub.switch  # returns when ``readable`` fires (see relay())
    recv = d.src.recv
    send = dst.send
    account = d.scanner.account
    moved = tally.bytes
    lines = tally.lines
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
            return _failed(exc, src_error)
        if not data:
            _half_close(dst)
            return eof
        # Forward first, at once.
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return _failed(exc, dst_error)
        # Then count: one call scans, counts and times the chunk (meter.py, or the
        # compiled accelerator) and says how many lines it ended (its LFs). Before
        # finishing a partial send: replies to the part already sent may be
        # relayed while this loop waits, and must find their REQs timed.
        n = len(data)
        moved[direction] += n
        lines[direction] += account(data)
        # Wait for writability only if the kernel took less than the chunk.
        if sent < n:
            try:
                d.finish_send(data, sent)
            except OSError as exc:
                return _failed(exc, dst_error)
        if lines[1] >= tally.owed:  # UPSTREAM_TO_CLIENT; see the docstring
            return ANSWERED


def _copy_strict(hub: Hub, d: Direction, stats: Stats, tally: Tally, bufsize: int) -> str:
    """The client-to-upstream direction in strict mode.

    Only complete, well-formed REQ lines are forwarded; the first other line
    ends the connection before any of its bytes reach the upstream.
    """
    eof, src_error, dst_error = _OUTCOMES[CLIENT_TO_UPSTREAM]
    check, on_messages = d.scanner, d.on_messages
    assert isinstance(check, StrictFilter) and on_messages is not None
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
            return _failed(exc, src_error)
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
                return _failed(exc, dst_error)
            tally.bytes[CLIENT_TO_UPSTREAM] += len(good)
            now = stats.record(CLIENT_TO_UPSTREAM, len(good), counts)
            if now:  # counted before the rest is sent, as in _copy
                on_messages(now, counts)
            tally.lines[CLIENT_TO_UPSTREAM] += counts[0]
            if sent < len(good):
                try:
                    d.finish_send(good, sent)
                except OSError as exc:
                    return _failed(exc, dst_error)
        if violation is not None:
            stats.record(CLIENT_TO_UPSTREAM, 0, (0, 0, 0, 1))
            tally.violation = violation
            return STRICT_VIOLATION
