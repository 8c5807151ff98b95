"""A bounded soak: mixed clients for a while, statistics asked for twice a second.

About 20 s by default; set GEVENTPROXY_SOAK_SECONDS for a longer run. The
upstream is the reference server in its default mode (it never closes).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from geventproxy.testing.protocol import ALPHABET, ERRDECODE_REPLY, reply_for
from tests.helpers import (
    connect,
    open_fds,
    recv_all,
    recv_lines,
    report_when,
    tree_rss_kib,
    wait_until,
)

SOAK_SECONDS = float(os.environ.get("GEVENTPROXY_SOAK_SECONDS", "20"))
WARM_UP_SECONDS = min(4.0, SOAK_SECONDS / 4)
CLIENT_THREADS = 6
#: RSS the proxy may gain between the end of the warm-up and the end, idle again.
RSS_GROWTH_LIMIT_KIB = 8 * 1024


class Load:
    """What the clients sent and saw, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reqs = 0
        self.garbage_lines = 0
        self.connections = 0
        self.errors: list[str] = []

    def add(self, reqs: int = 0, garbage: int = 0) -> None:
        with self.lock:
            self.reqs += reqs
            self.garbage_lines += garbage
            self.connections += 1


def _requests(rng: random.Random, count: int) -> list[tuple[int, bytes]]:
    return [
        (seq, "".join(rng.choices(ALPHABET, k=rng.randint(4, 31))).encode())
        for seq in range(1, count + 1)
    ]


def serial(port: int, rng: random.Random, load: Load) -> None:
    """One REQ at a time; then a full close or a half-close that must end in EOF."""
    requests = _requests(rng, rng.randint(1, 40))
    with connect(port) as sock:
        for seq, data in requests:
            sock.sendall(b"REQ %d %s\n" % (seq, data))
            if recv_lines(sock, 1) != [reply_for("REQ", seq, data)]:
                load.errors.append(f"serial: wrong reply to {seq}")
        if rng.random() < 0.5:
            sock.shutdown(socket.SHUT_WR)
            if recv_all(sock) != b"":
                load.errors.append("serial: bytes after the last reply")
    load.add(reqs=len(requests))


def pipelined(port: int, rng: random.Random, load: Load) -> None:
    """Every REQ at once, then a half-close: all replies, in order, then EOF."""
    requests = _requests(rng, rng.randint(10, 300))
    with connect(port) as sock:
        sock.sendall(b"".join(b"REQ %d %s\n" % (seq, data) for seq, data in requests))
        sock.shutdown(socket.SHUT_WR)
        expected = b"".join(reply_for("REQ", seq, data) for seq, data in requests)
        if recv_all(sock) != expected:
            load.errors.append(f"pipelined: replies to {len(requests)} REQs lost or reordered")
    load.add(reqs=len(requests))


def garbage(port: int, rng: random.Random, load: Load) -> None:
    """Lines of random bytes (never a Foo message), maybe an unfinished one, half-close.

    The server answers every line, the unfinished one too, with ERRDECODE.
    """
    count = rng.randint(1, 30)
    lines = [
        b"#" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))).replace(b"\n", b"")
        for _ in range(count)
    ]
    tail = b"#unfinished \x00\xff" if rng.random() < 0.3 else b""
    with connect(port) as sock:
        sock.sendall(b"\n".join(lines) + b"\n" + tail)
        sock.shutdown(socket.SHUT_WR)
        answers = count + (1 if tail else 0)
        if recv_all(sock) != ERRDECODE_REPLY * answers:
            load.errors.append("garbage: not one ERRDECODE per line")
    load.add(garbage=count)


def resetting(port: int, rng: random.Random, load: Load) -> None:
    """Several REQs in one segment, some replies read, then a reset mid-stream."""
    requests = _requests(rng, rng.randint(2, 20))
    sock = connect(port)
    try:
        sock.sendall(b"".join(b"REQ %d %s\n" % (seq, data) for seq, data in requests))
        read = rng.randint(1, len(requests) - 1)
        got = b""
        wanted = b"".join(reply_for("REQ", seq, data) for seq, data in requests[:read])
        while len(got) < len(wanted):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        if not got.startswith(wanted):
            load.errors.append("resetting: wrong replies before the reset")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    # The replies to the first REQ prove the proxy read the segment holding them all.
    load.add(reqs=len(requests))


KINDS = (serial, serial, pipelined, garbage, resetting)


def _client_loop(port: int, seed: int, deadline: float, load: Load) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choice(KINDS)
        try:
            kind(port, rng, load)
        except Exception as exc:  # a failure to report, not to stop the soak
            load.errors.append(f"{kind.__name__}: {exc!r}")


def _signal_loop(p: Launched, stop: threading.Event, sent: list[int]) -> None:
    while not stop.wait(0.5):
        p.proc.send_signal(signal.SIGUSR1)
        sent[0] += 1


def test_soak_mixed_clients_with_reports(foo_port: int) -> None:
    """1. Start the proxy; one reference client warms it up; note its descriptors.
    2. For SOAK_SECONDS, 6 threads run serial and pipelined good clients of
       random lengths, garbage senders and clients that reset mid-stream,
       while SIGUSR1 arrives every 0.5 s.
    3. No reply is lost or reordered; each signal gave exactly one JSON line,
       and in each report connections_total = active + sum(closed).
    4. msg_req equals the REQs sent; invalid lines equal the garbage lines sent.
    5. connections_active and the descriptors return to where they were, and
       RSS grew by less than 8 MiB after the warm-up.
    """
    with start_proxy(foo_port, "-log-connections=false") as p:
        warm = run_foo_client(f"-connect=127.0.0.1:{p.port}")
        assert warm.returncode == 0
        report_when(p, lambda r: r["connections_active"] == 0)
        fds = open_fds(p.pid)
        p.stdout_lines.clear()

        load, stop, signals = Load(), threading.Event(), [0]
        started = time.monotonic()
        deadline = started + SOAK_SECONDS
        clients = [
            threading.Thread(target=_client_loop, args=(p.port, seed, deadline, load))
            for seed in range(CLIENT_THREADS)
        ]
        signaller = threading.Thread(target=_signal_loop, args=(p, stop, signals))
        for thread in [*clients, signaller]:
            thread.start()
        time.sleep(WARM_UP_SECONDS)
        warm_rss = tree_rss_kib(p.pid)
        for thread in clients:
            thread.join(SOAK_SECONDS + 60)
        stop.set()
        signaller.join()

        assert not load.errors, load.errors[:10]
        try:
            wait_until(lambda: len(p.stdout_lines) >= signals[0], timeout=15)
        except AssertionError:
            raise AssertionError(f"{signals[0]} signals, {len(p.stdout_lines)} lines") from None
        time.sleep(0.3)  # a late extra line would show up now
        reports = p.stdout_reports()
        assert len(reports) == signals[0]
        for report in reports:
            closed = sum(report["connections_closed"].values())
            assert report["connections_total"] == report["connections_active"] + closed

        final = report_when(p, lambda r: r["connections_active"] == 0, timeout=15)
        assert final["msg_req"] == 100 + load.reqs
        assert final["msg_invalid_client_to_upstream"] == load.garbage_lines
        assert final["msg_invalid_upstream_to_client"] == 0
        assert final["connections_total"] == 1 + load.connections
        try:
            wait_until(lambda: open_fds(p.pid) == fds, timeout=15)
        except AssertionError:
            raise AssertionError(f"descriptors: {fds} before, {open_fds(p.pid)} now") from None
        growth = tree_rss_kib(p.pid) - warm_rss
        print(
            f"soak {SOAK_SECONDS:g} s: {load.connections} connections, {load.reqs} REQs, "
            f"{signals[0]} reports, RSS {growth:+d} KiB after warm-up, "
            f"closed {final['connections_closed']}"
        )
        assert growth < RSS_GROWTH_LIMIT_KIB
