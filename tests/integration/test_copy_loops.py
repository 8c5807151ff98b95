"""The copy loop in Python (relay._copy) and compiled (_accel.copy), on real loopback sockets.

In-process: one direction is run through relay.relay() between two TCP
connections on 127.0.0.1, the test's ends being gevent sockets. Each test
runs with either loop and asserts the same bytes, the same counts and the
same way of ending.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest
from gevent import get_hub

from geventproxy import accel, relay
from geventproxy.relay import (
    ANSWERED,
    CLIENT_TO_UPSTREAM,
    PARKED,
    UPSTREAM_TO_CLIENT,
    Direction,
    Park,
    Tally,
)
from geventproxy.stats import Stats, snapshot

LOOPS = [
    pytest.param(None, id="python-loop"),
    pytest.param(
        accel.copy_loop,
        id="compiled-loop",
        marks=pytest.mark.skipif(accel.copy_loop is None, reason="the extension is not in use"),
    ),
]


def _tcp_pair() -> tuple[socket.socket, gevent.socket.socket]:
    """(the relay's end: a plain non-blocking socket, the test's end: a gevent socket)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = gevent.socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, peer


class Run:
    """relay.relay() copying one direction: ``client`` writes, ``upstream`` reads.

    (With ``direction=UPSTREAM_TO_CLIENT`` the roles are the other way round in
    the proxy; here only the meter's direction and the outcomes change.)
    """

    def __init__(
        self,
        loop,
        monkeypatch: pytest.MonkeyPatch,
        small_buffers: bool = False,
        direction: int = CLIENT_TO_UPSTREAM,
    ):
        monkeypatch.setattr(relay, "copy_loop", loop)
        self.src, self.client = _tcp_pair()
        self.dst, self.upstream = _tcp_pair()
        if small_buffers:
            self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            self.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.stats = Stats()
        timer = accel.new_timer(self.stats)
        meter = accel.new_meter(direction, 65536, timer)
        hub = get_hub()
        on_messages = timer.answered if direction else timer.sent
        self.direction = Direction(hub, direction, self.src, self.dst, meter, on_messages)
        self.tally = Tally()
        self.ended: list[str] = []
        self.greenlet = gevent.spawn(
            relay.relay, hub, self.direction, self.stats, self.tally, 65536, self.ended.append
        )

    def outcome(self, timeout: float = 10.0) -> str:
        return self.greenlet.get(timeout=timeout)

    def close(self) -> None:
        self.greenlet.kill()
        self.direction.close()
        for sock in (self.src, self.dst, self.client, self.upstream):
            sock.close()


@pytest.fixture()
def run(request, monkeypatch) -> Iterator[Run]:
    r = Run(request.param, monkeypatch)
    yield r
    r.close()


def _read_to_eof(sock: gevent.socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until EOF; fails (gevent.Timeout) if no EOF comes."""
    got = bytearray()
    with gevent.Timeout(timeout):
        while chunk := sock.recv(65536):
            got += chunk
    return bytes(got)


@pytest.mark.parametrize("run", LOOPS, indirect=True)
def test_copies_counts_and_half_closes(run: Run) -> None:
    """1. The client sends lines in pieces (one cut mid-line, one invalid), then EOF.
    2. The upstream reads every byte in order, then EOF: the half-close was passed on.
    3. The outcome is client_closed; bytes, messages and statistics are exact."""
    pieces = [b"REQ 1 a\nREQ 2 b\nRE", b"Q 3 c\n", b"junk\n", b"ACK 4 d\n" * 50]
    for piece in pieces:
        run.client.sendall(piece)
        gevent.sleep(0.01)
    run.client.shutdown(socket.SHUT_WR)
    data = b"".join(pieces)
    assert _read_to_eof(run.upstream) == data
    assert run.outcome() == "client_closed" and run.ended == ["client_closed"]
    assert run.tally.bytes == [len(data), 0]
    assert run.tally.lines == [54, 0]  # the invalid line too: it is answered
    report = snapshot([run.stats.block], 0)
    assert (report["msg_req"], report["msg_ack"], report["msg_invalid"]) == (3, 50, 1)
    assert report["bytes_client_to_upstream"] == len(data)


def _numbered(kind: bytes, count: int) -> bytes:
    """``count`` lines that differ from each other, so a slice of them is found in one place."""
    return b"".join(b"%s %08d payload-%08d\n" % (kind, i, i) for i in range(count))


class PartialSends(Run):
    """A Run with small socket buffers that records each call of Direction.finish_send.

    Each record is (bytes counted, lines counted, the chunk, bytes already sent)
    as they stood when the loop handed the rest of a chunk over.
    """

    def __init__(self, loop, monkeypatch: pytest.MonkeyPatch, direction: int = CLIENT_TO_UPSTREAM):
        self.calls: list[tuple[int, int, bytes, int]] = []
        finish_send = relay.Direction.finish_send

        def recorded(d: Direction, data: bytes, sent: int) -> None:
            i = d.index
            self.calls.append((self.tally.bytes[i], self.tally.lines[i], bytes(data), sent))
            return finish_send(d, data, sent)

        monkeypatch.setattr(relay.Direction, "finish_send", recorded)
        super().__init__(loop, monkeypatch, small_buffers=True, direction=direction)

    def stuck(self, data: bytes, then_eof: bool = True) -> gevent.Greenlet:
        """Send ``data`` while nobody reads it: the relay ends up inside a partial send."""
        writer = gevent.spawn(
            lambda: (self.client.sendall(data), then_eof and self.client.shutdown(socket.SHUT_WR))
        )
        gevent.sleep(0.3)
        assert self.calls, "no send was partial: the test would not test backpressure"
        assert not self.greenlet.ready()
        return writer


@pytest.mark.parametrize("loop", LOOPS)
def test_backpressure_counts_each_chunk_before_its_rest_is_sent(loop, monkeypatch) -> None:
    """1. Small socket buffers; the client sends ~800 KiB of REQs while the upstream
       does not read: the relay's sends are partial and it waits for writability.
    2. The upstream then reads everything: every byte arrives, in order, counted once.
    3. Each chunk was counted before the rest of it was sent (replies to its first
       part may come meanwhile and must find their REQs timed)."""
    run = PartialSends(loop, monkeypatch)
    try:
        data = _numbered(b"REQ", 30000)
        writer = run.stuck(data)
        assert _read_to_eof(run.upstream) == data
        writer.get(timeout=10)
        assert run.outcome() == "client_closed"
        assert run.tally.lines[0] == data.count(b"\n")
        assert snapshot([run.stats.block], 0)["msg_req"] == data.count(b"\n")
        for counted, lines, chunk, _ in run.calls:
            assert data[counted - len(chunk) : counted] == chunk
            assert lines == data[:counted].count(b"\n")
    finally:
        run.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_destination_reset_during_a_partial_send(loop, monkeypatch) -> None:
    """1. The relay is inside a partial send. 2. The upstream resets: upstream_reset."""
    run = PartialSends(loop, monkeypatch)
    try:
        writer = run.stuck(_numbered(b"REQ", 30000), then_eof=False)
        _reset(run.upstream)
        assert run.outcome() == "upstream_reset" and run.ended == ["upstream_reset"]
        writer.kill()
    finally:
        run.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_park_during_a_partial_send_is_ignored(loop, monkeypatch) -> None:
    """1. The relay is inside a partial send. 2. Park is thrown in: it goes on.
    3. Every byte arrives, then the half-close."""
    run = PartialSends(loop, monkeypatch)
    try:
        data = _numbered(b"REQ", 30000)
        run.stuck(data)
        run.greenlet.kill(Park, block=False)
        gevent.sleep(0.05)
        assert not run.greenlet.ready()
        assert _read_to_eof(run.upstream) == data
        assert run.outcome() == "client_closed"
    finally:
        run.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_killed_during_a_partial_send_or_a_wait(loop, monkeypatch) -> None:
    """A greenlet killed inside a partial send, or while waiting for its source,
    ends with 'error' and leaves its readability watcher stopped."""
    run = PartialSends(loop, monkeypatch)
    idle = Run(loop, monkeypatch)
    try:
        writer = run.stuck(_numbered(b"REQ", 30000), then_eof=False)
        gevent.sleep(0.05)
        for r in (run, idle):
            r.greenlet.kill(block=True, timeout=5)
            assert r.greenlet.dead and r.ended == ["error"]
            assert not r.direction.readable.active
        writer.kill()
    finally:
        run.close()
        idle.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_answered_after_a_partial_send(loop, monkeypatch) -> None:
    """1. The client has half-closed and is owed 30,000 replies; they come in one burst
    that the client does not read at first. 2. Once it reads them all: ANSWERED."""
    run = PartialSends(loop, monkeypatch, direction=UPSTREAM_TO_CLIENT)
    try:
        data = _numbered(b"ACK", 30000)
        run.tally.owed = 30000
        run.stuck(data, then_eof=False)
        got = bytearray()
        while len(got) < len(data):
            got += run.upstream.recv(65536)
        assert bytes(got) == data
        assert run.outcome() == ANSWERED and run.ended == [ANSWERED]
        assert run.tally.lines == [0, 30000]
    finally:
        run.close()


def _reset(sock: gevent.socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("run", LOOPS, indirect=True)
def test_source_reset(run: Run) -> None:
    run.client.sendall(b"REQ 1 a\n")
    assert run.upstream.recv(100) == b"REQ 1 a\n"
    _reset(run.client)
    assert run.outcome() == "client_reset"


@pytest.mark.parametrize("run", LOOPS, indirect=True)
def test_destination_reset(run: Run) -> None:
    """The upstream resets; the next chunks from the client cannot be sent."""
    _reset(run.upstream)
    gevent.sleep(0.05)
    for _ in range(50):  # the first send may still be taken by the kernel
        if run.greenlet.ready():
            break
        run.client.sendall(b"REQ 1 a\n")
        gevent.sleep(0.01)
    assert run.outcome() == "upstream_reset"


@pytest.mark.parametrize("run", LOOPS, indirect=True)
def test_park_while_waiting(run: Run) -> None:
    """Park thrown into a loop that waits for its source: it returns PARKED, ends nothing."""
    run.client.sendall(b"REQ 1 a\n")
    assert run.upstream.recv(100) == b"REQ 1 a\n"
    gevent.sleep(0.01)
    run.greenlet.kill(Park, block=False)
    assert run.outcome() == PARKED and run.ended == []
    assert run.tally.lines == [1, 0]


@pytest.mark.parametrize("loop", LOOPS)
def test_answered_once_the_owed_replies_are_out(loop, monkeypatch) -> None:
    """The upstream-to-client direction after the client's half-close.

    1. The client is owed 3 replies; the upstream sends 2 in one chunk: the loop goes on.
    2. It sends the third and an invalid line's start: ANSWERED once the third is out,
       with no half-close passed on (the proxy ends the connection itself)."""
    run = Run(loop, monkeypatch, direction=UPSTREAM_TO_CLIENT)
    try:
        run.tally.owed = 3
        run.client.sendall(b"ACK 1 a\nNAK 2 b\n")
        assert run.upstream.recv(100) == b"ACK 1 a\nNAK 2 b\n"
        gevent.sleep(0.05)
        assert not run.greenlet.ready()
        run.client.sendall(b"ACK 3 c\nAC")
        assert run.outcome() == ANSWERED and run.ended == [ANSWERED]
        assert run.tally.lines == [0, 3] and run.tally.bytes == [0, 26]
        report = snapshot([run.stats.block], 0)
        assert (report["msg_ack"], report["msg_nak"]) == (2, 1)
        run.upstream.settimeout(0.2)
        assert run.upstream.recv(100) == b"ACK 3 c\nAC"
        with pytest.raises(socket.timeout):
            run.upstream.recv(100)  # no EOF: the loop did not half-close
    finally:
        run.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_owed_while_the_client_sends(loop, monkeypatch) -> None:
    """While the client may still send (owed is CLIENT_SENDING), replies never end the loop."""
    run = Run(loop, monkeypatch, direction=UPSTREAM_TO_CLIENT)
    try:
        for seq in range(200):
            run.client.sendall(b"ACK %d x\n" % seq)
        got = b""
        while got.count(b"\n") < 200:
            got += run.upstream.recv(65536)
        assert not run.greenlet.ready() and run.tally.lines == [0, 200]
        run.client.shutdown(socket.SHUT_WR)
        assert run.outcome() == "upstream_closed"
    finally:
        run.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_error_that_is_not_a_reset(loop, monkeypatch) -> None:
    """recv on a socket that was never connected (ENOTCONN) ends the loop with 'error'."""
    run = Run(loop, monkeypatch)
    unconnected = socket.socket()
    unconnected.setblocking(False)
    hub = get_hub()
    d = Direction(hub, CLIENT_TO_UPSTREAM, unconnected, run.dst, run.direction.scanner, print)
    ended: list[str] = []
    try:
        greenlet = gevent.spawn(relay.relay, hub, d, run.stats, Tally(), 65536, ended.append)
        assert greenlet.get(timeout=10) == "error" and ended == ["error"]
    finally:
        d.close()
        unconnected.close()
        run.close()
