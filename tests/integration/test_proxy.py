"""The real proxy, as a subprocess, in front of the reference server on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from geventproxy.testing.protocol import make_requests, reply_for

REQUIRED = {
    "msg_total": int,
    "msg_req": int,
    "msg_ack": int,
    "msg_nak": int,
    "request_rate_1s": float,
    "request_rate_10s": float,
    "response_rate_1s": float,
    "response_rate_10s": float,
}


@pytest.fixture()
def px(foo_port: int) -> Iterator[Launched]:
    with start_proxy(foo_port) as p:
        yield p


def _exchange(port: int, payload: bytes, expect_lines: int, host: str = "127.0.0.1") -> bytes:
    """Send ``payload`` and read until ``expect_lines`` newlines came back."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(payload)
        got = b""
        while got.count(b"\n") < expect_lines:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_reference_client_prints_ok_through_the_proxy(px: Launched) -> None:
    """1. One client, as in the task: the exact output of a direct run."""
    result = run_foo_client(f"-connect=127.0.0.1:{px.port}")
    assert (result.returncode, result.stdout) == (0, "..........OK!\n"), result.stderr


def test_fifty_clients_at_once_and_exact_counts(px: Launched) -> None:
    """1. 50 connections run the fixed request set at once through the proxy.
    2. Every one passes, and the counters are exactly 50 x (100 REQ, 88 ACK, 12 NAK).
    """
    result = run_foo_client(f"-connect=127.0.0.1:{px.port}", "-connections=50", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("OK!\n")
    report = px.report()
    assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (5000, 4400, 600)
    assert report["msg_total"] == 10000
    assert report["msg_invalid"] == 0
    assert report["connections_total"] == 50
    assert report["connections_active"] == 0
    assert report["connections_closed"]["client_closed"] == 50
    assert sum(report["connections_closed"].values()) == 50
    assert report["latency_count"] == 5000
    assert report["latency_unmatched"] == 0


def test_pipelined_clients(px: Launched) -> None:
    """1. 5 clients each keep 50 REQs in flight. 2. All replies check out and are counted."""
    result = run_foo_client(
        f"-connect=127.0.0.1:{px.port}", "-connections=5", "-window=50", "-requests=400"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = px.report()
    assert report["msg_req"] == 2000
    assert report["msg_ack"] + report["msg_nak"] == 2000


def test_report_is_one_json_line_with_required_fields(px: Launched) -> None:
    """1. SIGUSR1 three times. 2. Three lines on stdout, each one JSON object with every
    required field of the right type. 3. The proxy keeps serving."""
    reports = [px.report() for _ in range(3)]
    for report in reports:
        for field, kind in REQUIRED.items():
            assert type(report[field]) is kind, (field, report[field])
    assert len(px.stdout_lines) == 3
    assert all(line.endswith("}\n") and line.count("\n") == 1 for line in px.stdout_lines)
    assert run_foo_client(f"-connect=127.0.0.1:{px.port}").returncode == 0


def test_protocol_example_is_forwarded_byte_exact(px: Launched, foo_port: int) -> None:
    """1. A pipelined burst, including lines the grammar rejects, sent direct and via the proxy.
    2. Both transcripts are identical. 3. The invalid lines are counted, not dropped."""
    payload = (
        b"REQ 3 Hey\nREQ 4 Hey\nREQ 5 Hey\nREQ 6 Hey\r\n"
        b"garbage\nREQ 7 two words\n\nREQ 99999999999999999999 x\n"
    )
    direct = _exchange(foo_port, payload, 8)
    via = _exchange(px.port, payload, 8)
    assert via == direct
    assert via.count(b"ERRDECODE") == 4
    report = px.report()
    assert report["msg_req"] == 4
    # Four digest replies, and four "NAK 0 ERRDECODE": well-formed NAKs themselves.
    assert report["msg_ack"] + report["msg_nak"] == 8
    assert report["msg_nak"] >= 4
    assert report["msg_invalid"] == 4
    assert report["msg_invalid_client_to_upstream"] == 4


def test_message_split_into_single_bytes(px: Launched) -> None:
    """1. A REQ sent one byte per write, Nagle off. 2. Its reply is right; it counts once."""
    seq, data = make_requests(1)[0]
    line = b"REQ %d %s\n" % (seq, data)
    with socket.create_connection(("127.0.0.1", px.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(line)):
            sock.sendall(line[i : i + 1])
            time.sleep(0.002)
        got = b""
        while not got.endswith(b"\n"):
            got += sock.recv(100)
    assert got == reply_for("REQ", seq, data)
    report = px.report()
    assert report["msg_req"] == 1 and report["msg_ack"] + report["msg_nak"] == 1


def test_rates_after_a_burst_and_after_idling(px: Launched) -> None:
    """1. 3 clients x 100 REQs, as fast as they go (well under a second).
    2. At once: the 1 s window holds at most all 300, the 10 s window exactly 300 / 10.
    3. After 1 s of silence the 1 s rates are exactly 0.0; the 10 s rates stay at 30.0.
    """
    result = run_foo_client(f"-connect=127.0.0.1:{px.port}", "-connections=3")
    assert result.returncode == 0
    first = px.report()
    assert first["request_rate_10s"] == 30.0 and first["response_rate_10s"] == 30.0
    assert 0.0 < first["request_rate_1s"] <= 300.0
    time.sleep(1.05)
    later = px.report()
    assert later["request_rate_1s"] == 0.0 and later["response_rate_1s"] == 0.0
    assert later["request_rate_10s"] == 30.0 and later["response_rate_10s"] == 30.0


def test_rates_under_paced_traffic(px: Launched) -> None:
    """1. One connection sends 100 REQ per second for 2.5 s, paced by the test.
    2. The 1 s rate is about 100 (the test's own pacing jitter is the tolerance).
    3. The 10 s rate is exactly what was sent so far over 10.
    """
    requests = make_requests(250)
    with socket.create_connection(("127.0.0.1", px.port), timeout=5) as sock:
        start = time.monotonic()
        for i, (seq, data) in enumerate(requests):
            delay = start + i / 100 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock.sendall(b"REQ %d %s\n" % (seq, data))
        report = px.report()
        assert 80.0 <= report["request_rate_1s"] <= 120.0, report
        assert report["request_rate_10s"] == 25.0
        got = b""
        while got.count(b"\n") < 250:
            got += sock.recv(65536)


def test_ipv6_and_any_address(foo_port: int) -> None:
    """1. `-listen=:0` (every interface) answers on 127.0.0.1 and ::1.
    2. `-listen=[::1]:0` works.  3. `-forward=localhost:P` reaches a server bound to
    127.0.0.1 only, whichever address localhost resolves to first."""
    with start_proxy(f"localhost:{foo_port}", "-listen=:0") as p:
        for host in ("127.0.0.1", "::1"):
            result = run_foo_client(f"-connect={'[::1]' if host == '::1' else host}:{p.port}")
            assert result.returncode == 0, result.stdout + result.stderr
        assert p.report()["msg_req"] == 200
    with start_proxy(foo_port, "-listen=[::1]:0") as p:
        assert run_foo_client(f"-connect=[::1]:{p.port}").returncode == 0


def test_two_hundred_clients_at_once(px: Launched) -> None:
    """1. 200 connections of the fixed request set at once (hundreds, as the task asks).
    2. Every reply checks out and the counts are exact."""
    result = run_foo_client(f"-connect=127.0.0.1:{px.port}", "-connections=200", timeout=120)
    assert result.returncode == 0, result.stdout[-200:] + result.stderr
    report = px.report()
    assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (20000, 17600, 2400)
    assert report["connections_total"] == 200 and report["connections_active"] == 0
