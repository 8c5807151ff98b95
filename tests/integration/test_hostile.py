"""Hostile and malformed bytes through the proxy, and --strict.

In the default, transparent mode every byte is forwarded untouched, whatever
it is; what is not well-formed Foo is only counted (msg_invalid). The proxy
must not crash, slow other connections down, or hold more than a line's
worth of memory. With --strict a client that sends anything but well-formed
REQs is disconnected before the offending line reaches the upstream.
"""

from __future__ import annotations

import hashlib
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from geventproxy.testing.protocol import ERRDECODE_REPLY, MAX_LINE, DecodeError, decode_line
from geventproxy.testing.protocol import reply_for as _reply_for
from tests.helpers import (
    IO_TIMEOUT,
    SLACK,
    ScriptedUpstream,
    connect,
    ping_pong_worst_ms,
    recv_all,
    recv_lines,
    report_when,
    rss_kib,
    scripted_upstream,
    wait_closed,
    worker_pid,
)

MIB = 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 20 * 1024


def _answer(line: bytes) -> bytes:
    """What the reference server answers to one line."""
    try:
        return _reply_for(*decode_line(line))
    except DecodeError:
        return ERRDECODE_REPLY


def _answerable_lines(payload: bytes) -> list[bytes]:
    """The complete lines of ``payload`` short enough for the reference server to answer."""
    lines = payload.split(b"\n")[:-1]  # the last piece has no LF
    return [line + b"\n" for line in lines if len(line) + 1 <= MAX_LINE]


def _foo_sink(sock: socket.socket) -> tuple[int, str]:
    """A scripted upstream that answers like the reference server and fingerprints its input.

    It answers every complete line of at most 64 KiB (so the reference client
    works through it), skips longer lines without holding them, and returns
    the length and SHA-256 of everything it received once the proxy closes.
    """
    digest, total, pending, skipping = hashlib.sha256(), 0, b"", False
    with sock:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
            replies, start = [], 0
            while (newline := chunk.find(b"\n", start)) >= 0:
                line, pending = pending + chunk[start : newline + 1], b""
                if skipping:
                    skipping = False
                elif len(line) <= MAX_LINE:
                    replies.append(_answer(line))
                start = newline + 1
            if not skipping:
                pending += chunk[start:]
                if len(pending) > MAX_LINE:
                    pending, skipping = b"", True
            if replies:
                sock.sendall(b"".join(replies))
    return total, digest.hexdigest()


class Sink:
    """The sink's results, found by fingerprint whatever order connections end in."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.port = upstream.port
        self.seen: list[tuple[int, str]] = []

    def wait_for(self, payload: bytes, timeout: float = IO_TIMEOUT) -> None:
        """Wait until one connection delivered exactly ``payload`` to the upstream."""
        wanted = (len(payload), hashlib.sha256(payload).hexdigest())
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            assert time.monotonic() < deadline, f"the upstream never received {wanted}"
            try:
                self.seen.append(self.upstream.result(timeout=0.05))
            except queue.Empty:
                pass
        self.seen.remove(wanted)


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with scripted_upstream(_foo_sink) as upstream:
        yield Sink(upstream)


@pytest.fixture(scope="module")
def hostile_proxy(sink: Sink) -> Iterator[Launched]:
    """One transparent proxy in front of the sink, shared by the module."""
    with start_proxy(sink.port) as p:
        yield p


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` from a thread, half-close, and return all that came back."""
    with connect(port, timeout=20) as client:

        def send() -> None:
            view = memoryview(payload)
            for offset in range(0, len(view), MIB):
                client.sendall(view[offset : offset + MIB])
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        replies = recv_all(client)
        sender.join(IO_TIMEOUT)
    return replies


# --- the hostile inputs: (payload, lines the proxy must count invalid) ----------------------


def _random_binary() -> tuple[bytes, int]:
    data = random.Random(1).randbytes(1 * MIB)
    return data, data.count(b"\n")


def _tls_client_hello() -> tuple[bytes, int]:
    """A TLS 1.2 ClientHello record as a browser sends it first (random, session, suites)."""
    rng = random.Random(2)
    body = (
        b"\x03\x03"
        + rng.randbytes(32)
        + b"\x20"
        + rng.randbytes(32)
        + b"\x00\x20"
        + rng.randbytes(32)
        + b"\x01\x00"
        + b"\x00\x93"
        + b"\x00\x00\x00\x10\x00\x0e\x00\x00\x0bexample.com"
        + rng.randbytes(0x93 - 20)
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake
    return record, record.count(b"\n")


HOSTILE: dict[str, Callable[[], tuple[bytes, int]]] = {
    "random_binary_1MiB": _random_binary,
    "nul_flood_4MiB_no_newline": lambda: (b"\0" * (4 * MIB), 1),
    "nul_in_data": lambda: (b"REQ 1 a\0b\n" * 1000, 1000),
    "nul_lines": lambda: (b"\0\n" * 1000, 1000),
    "invalid_utf8": lambda: (b"REQ 1 \xff\xfe\xc3\x28\n" * 1000, 1000),
    "line_100MiB_no_newline": lambda: (b"REQ 1 " + b"A" * (100 * MIB), 1),
    "seq_5000_digits": lambda: (b"REQ " + b"9" * 5000 + b" x\n", 1),
    "seq_non_ascii_digits": lambda: ("REQ ١٢٣ x\nREQ １２ y\nACK ߁ z\n".encode(), 3),
    "http_request": lambda: (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n",
        5,
    ),
    "tls_client_hello": _tls_client_hello,
    "control_and_escape_sequences": lambda: (b"REQ 1 \x1b[2J\x07\x08\x7f\n" * 100, 100),
}


class RssWatch:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(IO_TIMEOUT)
        return self.peak - self.baseline


def _delta(after: dict, before: dict, key: str) -> int:
    return after[key] - before[key]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_forwarded_untouched(
    name: str, sink: Sink, hostile_proxy: Launched, record_property
) -> None:
    """Hostile bytes are forwarded byte for byte, counted invalid, in bounded memory.

    1. Take a report, and start sampling the proxy's RSS.
    2. A client sends the hostile payload, half-closes, and reads to EOF.
    3. The upstream received exactly the payload (length and SHA-256).
    4. The client received exactly what the upstream answered.
    5. The payload's lines are counted in msg_invalid (client to upstream),
       none as REQ, ACK or NAK, and every byte in bytes_client_to_upstream.
    6. The proxy is alive, logged no traceback, and its RSS grew by less than
       20 MiB (the 100 MiB line included).
    """
    payload, invalid = HOSTILE[name]()
    p = hostile_proxy
    before = p.report()
    watch = RssWatch(worker_pid(p))
    try:
        replies = _exchange(p.port, payload)
        sink.wait_for(payload)
    finally:
        growth = watch.stop()
    record_property("rss_growth_kib", growth)
    print(f"{name}: RSS {watch.baseline} KiB, grew {growth} KiB")
    assert replies == b"".join(_answer(line) for line in _answerable_lines(payload))
    key = "msg_invalid_client_to_upstream"
    after = report_when(
        p, lambda r: r["connections_active"] == 0 and _delta(r, before, key) >= invalid
    )
    assert _delta(after, before, key) == invalid
    for kind in ("req", "ack", "nak"):
        assert _delta(after, before, f"msg_{kind}_client_to_upstream") == 0
    assert _delta(after, before, "bytes_client_to_upstream") == len(payload)
    assert p.proc.poll() is None
    assert "Traceback" not in p.log()
    p.stdout_reports()  # none of the hostile bytes leaked onto stdout
    assert growth < RSS_GROWTH_LIMIT_KIB, growth


def test_hostile_traffic_does_not_disturb_a_well_formed_client(
    sink: Sink, hostile_proxy: Launched
) -> None:
    """Other connections go on at full speed while hostile traffic flows.

    1. Measure the worst round trip of 100 ping-pong REQs on a quiet proxy.
    2. Start senders that push every hostile payload, over and over.
    3. While they run: the reference client through the proxy prints OK, and
       100 ping-pong REQs have no round trip above ten times the quiet worst
       case plus SLACK.
    4. Stop the senders: the proxy is alive and every byte it was sent was
       forwarded (the upstream fingerprints match).
    """
    p = hostile_proxy
    quiet = ping_pong_worst_ms(p.port)
    payloads = [HOSTILE[name]()[0] for name in HOSTILE]
    stop, sent, errors = threading.Event(), [], []

    def hammer(batch: list[bytes]) -> None:
        while not stop.is_set():
            for payload in batch:
                try:
                    _exchange(p.port, payload)
                except Exception as exc:  # reported by the test below
                    errors.append(exc)
                sent.append(payload)

    senders = [
        threading.Thread(target=hammer, args=(payloads[i::3],), daemon=True) for i in range(3)
    ]
    for sender in senders:
        sender.start()
    try:
        time.sleep(0.2)
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=4")
        loaded = ping_pong_worst_ms(p.port)
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
    print(f"worst ping-pong round trip: quiet {quiet:.2f} ms, under hostile load {loaded:.2f} ms")
    assert (result.stdout, result.returncode) == ("." * 40 + "OK!\n", 0), result.stderr
    # Starvation (a relay stuck scanning hostile bytes) costs seconds; a busy
    # machine costs tens of milliseconds, now and then SLACK.
    assert loaded < 10 * quiet + 1000 * SLACK
    assert not errors
    for payload in sent:
        sink.wait_for(payload)
    assert p.proc.poll() is None
    assert "Traceback" not in p.log()


# --- fuzzing: random bytes in random chunks, both directions --------------------------------


def _echo(sock: socket.socket) -> None:
    with sock:
        while chunk := sock.recv(65536):
            sock.sendall(chunk)


@pytest.fixture(scope="module")
def echo_proxy() -> Iterator[Launched]:
    """One proxy in front of a scripted echo upstream, for every fuzz example."""
    with scripted_upstream(_echo) as upstream, start_proxy(upstream.port, "--max-line=512") as p:
        yield p


_TOKENS = st.sampled_from(
    [b"REQ ", b"ACK ", b"NAK ", b"1", b"-9", b"+0", b" ", b"\n", b"\r\n", b"\r", b"\0", b"\xff"]
)
_CHUNK = st.one_of(
    st.binary(max_size=2048),
    st.lists(_TOKENS, max_size=40).map(b"".join),
    st.integers(1, 3000).map(lambda n: b"x" * n),  # longer than --max-line
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=st.lists(_CHUNK, max_size=30))
def test_fuzz_random_chunks_arrive_byte_exact(echo_proxy: Launched, chunks: list[bytes]) -> None:
    """Random bytes in random chunks come back through an echo upstream byte for byte.

    1. A client sends the chunks one by one (Nagle off), then half-closes.
    2. A scripted upstream echoes everything back and closes at EOF.
    3. The client reads exactly what it sent, in both directions unchanged.
    4. The proxy counted the same messages (REQ, ACK, NAK, invalid) in both
       directions: the same bytes, differently chunked, count the same.
    """
    p = echo_proxy
    payload = b"".join(chunks)
    before = p.report()
    with connect(p.port) as client:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_all(client)), daemon=True)
        reader.start()
        for chunk in chunks:
            if chunk:
                client.sendall(chunk)
        client.shutdown(socket.SHUT_WR)
        reader.join(IO_TIMEOUT)
    assert received == [payload]

    def counted(r: dict) -> list[int]:
        return [
            _delta(r, before, f"msg_{kind}_{direction}")
            for direction in ("client_to_upstream", "upstream_to_client")
            for kind in ("req", "ack", "nak", "invalid")
        ]

    after = report_when(
        p,
        lambda r: (
            r["connections_active"] == 0
            and _delta(r, before, "bytes_upstream_to_client") == len(payload)
        ),
    )
    up, down = counted(after)[:4], counted(after)[4:]
    assert up == down
    assert p.proc.poll() is None


# --- strict mode ---------------------------------------------------------------------------------

GOOD = b"REQ 1 first\nREQ 2 second\n"
BAD_LINES = {
    "malformed": b"REQ two x\n",
    "ack": b"ACK 3 x\n",
    "nak": b"NAK 3 x\n",
    "data_with_space": b"REQ 3 a b\n",
    "over_max_line": b"REQ 3 " + b"x" * 200 + b"\n",
}


@pytest.mark.parametrize("split", [False, True], ids=["one_write", "separate_writes"])
@pytest.mark.parametrize("bad", list(BAD_LINES))
def test_strict_disconnects_before_the_bad_line(bad: str, split: bool) -> None:
    """--strict: the first line that is not a well-formed REQ ends the connection.

    1. Start the proxy with --strict --max-line=100 in front of a scripted upstream.
    2. The client sends two good REQs, then the bad line and one more good REQ
       (in one write, or the bad line after the upstream got the good ones).
    3. The client's connection is closed.
    4. The upstream received exactly the two good REQs, nothing of the bad
       line or what followed, then EOF.
    5. connections_closed.strict_violation is 1 and msg_invalid is 1.
    6. The same bytes through a default (transparent) proxy reach the upstream
       whole; there the ACK and NAK lines are well-formed and the others invalid.
    """
    tail = BAD_LINES[bad] + b"REQ 4 after\n"
    with scripted_upstream() as upstream:
        with (
            start_proxy(upstream.port, "--strict", "--max-line=100") as p,
            connect(p.port) as client,
        ):
            if split:
                client.sendall(GOOD)
                up = upstream.accept()
                assert b"".join(recv_lines(up, 2)) == GOOD
                client.sendall(tail)
                got = GOOD + recv_all(up)
            else:
                client.sendall(GOOD + tail)
                up = upstream.accept()
                got = recv_all(up)
            assert wait_closed(client) < SLACK
            report = report_when(p, lambda r: r["connections_active"] == 0)
            up.close()
        assert got == GOOD
        assert report["connections_closed"]["strict_violation"] == 1
        assert report["msg_invalid"] == 1
        assert report["msg_req"] == 2

        with start_proxy(upstream.port, "--max-line=100") as p, connect(p.port) as client:
            client.sendall(GOOD + tail)
            client.shutdown(socket.SHUT_WR)
            up = upstream.accept()
            assert recv_all(up) == GOOD + tail
            up.close()
            assert recv_all(client) == b""
            report = report_when(p, lambda r: r["connections_active"] == 0)
        assert report["connections_closed"]["strict_violation"] == 0
        well_formed = bad in ("ack", "nak")  # well-formed, just not a REQ
        assert report["msg_invalid"] == (0 if well_formed else 1)
        assert report["msg_req"] == 3
