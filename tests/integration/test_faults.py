"""Network faults between client, proxy and upstream, over loopback.

Half-closes in both directions, an upstream that refuses, does not resolve,
black-holes the connect or dies mid-stream, a client that resets or vanishes,
and slow peers on either side (backpressure, bounded memory, no byte lost).
Each test runs the real proxy as a subprocess.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from geventproxy.testing.launch import Launched, run_foo_client, start_foo_server, start_proxy
from geventproxy.testing.protocol import reply_for
from tests.helpers import (
    IO_TIMEOUT,
    SLACK,
    closed_port,
    connect,
    idle_report,
    pattern,
    pattern_digest,
    recv_all,
    recv_lines,
    rss_kib,
    scripted_upstream,
    wait_closed,
    worker_pid,
)


def _no_traceback(p: Launched) -> None:
    """No traceback in the log, and nothing but whole JSON reports on stdout."""
    assert "Traceback" not in p.log(), p.log()
    p.stdout_reports()


# --- 1. half-close ------------------------------------------------------------------------


def test_client_half_close_still_gets_every_reply() -> None:
    """A client that shuts its write side still receives every reply.

    1. A scripted upstream reads until EOF and only then answers every line it
       got, so a reply can reach the client only if the proxy passed the
       client's half-close on and kept the other direction open.
    2. The client pipelines 50 REQs in one write and calls shutdown(SHUT_WR).
    3. The client reads to EOF: exactly the 50 replies, in order.
    4. The upstream saw EOF (its handler returned the 50 lines it read).
    5. The report counts one connection closed as client_closed, none active,
       50 REQs and 50 ACK/NAKs.
    """
    requests = [b"REQ %d data%d\n" % (seq, seq) for seq in range(1, 51)]

    def answer_after_eof(sock: socket.socket) -> list[bytes]:
        received = recv_all(sock)  # returns only at EOF
        lines = received.splitlines(keepends=True)
        sock.sendall(b"".join(reply_for("REQ", seq, b"data%d" % seq) for seq in range(1, 51)))
        sock.close()
        return lines

    with scripted_upstream(answer_after_eof) as upstream, start_proxy(upstream.port) as p:
        with connect(p.port) as client:
            client.sendall(b"".join(requests))
            client.shutdown(socket.SHUT_WR)
            replies = recv_all(client).splitlines(keepends=True)
        assert upstream.result() == requests
        assert replies == [reply_for("REQ", seq, b"data%d" % seq) for seq in range(1, 51)]
        report = idle_report(p)
        assert report["connections_closed"]["client_closed"] == 1
        assert report["msg_req"] == 50
        assert report["msg_ack"] + report["msg_nak"] == 50
        _no_traceback(p)


def test_upstream_half_close_client_can_still_send() -> None:
    """The upstream shuts its write side; the client may still send for --fin-timeout.

    1. Start the proxy with --fin-timeout=10 in front of a scripted upstream.
    2. The client sends a REQ; the upstream reads it, answers, and calls
       shutdown(SHUT_WR).
    3. The client reads the answer, then EOF.
    4. 0.3 s later the client sends another REQ: the upstream receives it.
    5. The connection is still open (connections_active 1): one direction is
       still going.
    6. The client shuts its write side: the upstream sees EOF and the
       connection is closed at once (well before the fin timeout), counted as
       upstream_closed, since the upstream finished first.
    """
    with scripted_upstream() as upstream, start_proxy(upstream.port, "--fin-timeout=10") as p:
        with connect(p.port) as client:
            client.sendall(b"REQ 1 first\n")
            up = upstream.accept()
            assert recv_lines(up, 1) == [b"REQ 1 first\n"]
            up.sendall(b"ACK 1 bye\n")
            up.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"ACK 1 bye\n"

            time.sleep(0.3)
            client.sendall(b"REQ 2 late\n")
            assert recv_lines(up, 1) == [b"REQ 2 late\n"]
            assert p.report()["connections_active"] == 1

            closed_at = time.monotonic()
            client.shutdown(socket.SHUT_WR)
            assert recv_all(up) == b""
            report = idle_report(p)
            assert time.monotonic() - closed_at < SLACK
        assert report["connections_closed"]["upstream_closed"] == 1
        assert report["connections_closed"]["client_closed"] == 0
        assert report["msg_req"] == 2 and report["msg_ack"] == 1
        _no_traceback(p)


def test_upstream_half_close_then_silent_client_closed_after_fin_timeout() -> None:
    """After the upstream's half-close, a client that goes quiet is closed after --fin-timeout.

    1. Start the proxy with --fin-timeout=0.5 in front of a scripted upstream.
    2. The client sends a REQ; the upstream answers and shuts its write side.
    3. The client reads the answer and EOF, then says nothing more.
    4. The upstream sees EOF 0.5 s (give or take one sweep) after its own
       half-close: the proxy closed the connection, reason upstream_closed.
    """
    with scripted_upstream() as upstream, start_proxy(upstream.port, "--fin-timeout=0.5") as p:
        with connect(p.port) as client:
            client.sendall(b"REQ 1 x\n")
            up = upstream.accept()
            recv_lines(up, 1)
            up.sendall(b"ACK 1 y\n")
            up.shutdown(socket.SHUT_WR)
            half_closed = time.monotonic()
            assert recv_all(client) == b"ACK 1 y\n"
            assert recv_all(up) == b""
            waited = time.monotonic() - half_closed
            assert 0.4 <= waited <= 0.5 + SLACK, waited
            report = idle_report(p)
        assert report["connections_closed"]["upstream_closed"] == 1


# --- 2. and 3. the upstream cannot be reached ----------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["closed-port", "no-such-host.invalid:8001"],
    ids=["refused", "unresolvable"],
)
def test_unreachable_upstream_closes_client_promptly(target: str) -> None:
    """An upstream that refuses or does not resolve: the client is closed promptly.

    1. Start the proxy with --forward at a closed loopback port, or at a name
       that cannot resolve.
    2. Three clients connect one after the other: each sees its connection
       closed within a second.
    3. upstream_connect_failures is 3, no timeout is counted, nothing stays open.
    4. The proxy is still up and answers SIGUSR1.
    5. The log has exactly one "upstream connect failed" line (rate-limited)
       and no traceback.
    """
    forward = f"127.0.0.1:{closed_port()}" if target == "closed-port" else target
    with start_proxy(forward) as p:
        for _ in range(3):
            with connect(p.port) as client:
                assert wait_closed(client) < SLACK
        report = idle_report(p)
        assert report["upstream_connect_failures"] == 3
        assert report["upstream_connect_timeouts"] == 0
        assert report["connections_total"] == 3
        assert report["connections_closed"]["upstream_unavailable"] == 3
        assert sum(report["connections_closed"].values()) == 3
        assert p.proc.poll() is None
        # stderr is read by a thread of its own: the line may come after the report.
        p.wait_log("upstream connect failed")
        failures = [line for line in p.stderr_lines if "upstream connect failed" in line]
        assert len(failures) == 1, p.log()
        assert forward in failures[0]
        _no_traceback(p)


def _black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: further SYNs are dropped.

    listen(0) leaves room for one connection that is never accepted; the
    kernel then drops new SYNs (net.ipv4.tcp_abort_on_overflow=0, the
    default), so a connect hangs until its timeout.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    port = listener.getsockname()[1]
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except (socket.timeout, BlockingIOError):
            probe.close()
            return listener, fillers  # this connect hung: the hole is ready
        fillers.append(probe)
    raise AssertionError("cannot make a connect hang on loopback")


def test_black_holed_upstream_times_out() -> None:
    """An upstream whose connect never completes: the client is closed after --connect-timeout.

    1. Make a loopback listener whose accept queue is full, so connects to it hang.
    2. Start the proxy with --connect-timeout=0.5 in front of it.
    3. A client connects: its connection is closed 0.5 s later (not at the
       default 5 s, and not at once).
    4. upstream_connect_timeouts is 1, upstream_connect_failures 0.
    5. The log says "upstream connect timed out", with no traceback.
    """
    listener, fillers = _black_hole()
    try:
        port = listener.getsockname()[1]
        with start_proxy(port, "--connect-timeout=0.5") as p:
            with connect(p.port) as client:
                waited = wait_closed(client)
            assert 0.4 <= waited <= 0.5 + SLACK, waited
            report = idle_report(p)
            assert report["upstream_connect_timeouts"] == 1
            assert report["upstream_connect_failures"] == 0
            assert report["connections_closed"]["upstream_unavailable"] == 1
            p.wait_log("upstream connect timed out")
            _no_traceback(p)
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_unanswered_name_lookup_is_bounded_by_connect_timeout() -> None:
    """A DNS server that never answers: the client is closed after --connect-timeout too.

    The proxy runs with gevent's c-ares resolver pointed at a loopback UDP
    socket that reads queries and never answers (the only way to make a
    lookup hang on loopback without touching the system's resolver setup).

    1. Start the proxy with --connect-timeout=0.5 and --forward at a name.
    2. A client connects: its connection is closed about 0.5 s later (not
       after the resolver's own, much longer, timeout).
    3. The DNS socket got the query: the lookup really was pending.
    4. upstream_connect_timeouts is 1; the log says "upstream connect timed out".
    """
    pytest.importorskip("gevent.resolver.cares", reason="gevent built without c-ares")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        dns.bind(("127.0.0.1", 0))
        dns.settimeout(IO_TIMEOUT)
        port = str(dns.getsockname()[1])
        env = {
            "GEVENT_RESOLVER": "ares",
            "GEVENTARES_SERVERS": "127.0.0.1",
            "GEVENTARES_UDP_PORT": port,
            "GEVENTARES_TCP_PORT": port,
            "GEVENTARES_TIMEOUT": "30",
            "GEVENTARES_TRIES": "1",
        }
        flags = ("--connect-timeout=0.5",)
        with start_proxy("upstream.example.test:8001", *flags, env=env) as p:
            with connect(p.port) as client:
                waited = wait_closed(client)
            assert 0.4 <= waited <= 0.5 + SLACK, waited
            assert dns.recv(512)
            report = idle_report(p)
            assert report["upstream_connect_timeouts"] == 1
            assert report["upstream_connect_failures"] == 0
            p.wait_log("upstream connect timed out")
            _no_traceback(p)


# --- 4. the upstream dies ----------------------------------------------------------------------


def test_upstream_killed_mid_stream_then_restarted() -> None:
    """The upstream process is killed with clients connected; it comes back on the same port.

    1. Start a reference server and the proxy in front of it.
    2. Five clients connect and each completes a request.
    3. SIGKILL the server.
    4. Every client sees its connection end (EOF or reset) within a second.
    5. connections_active returns to 0, though the clients keep their
       sockets open (the proxy closes them after --fin-timeout), and the five
       are counted as upstream_closed or upstream_reset.
    6. Start a new reference server on the same port: a reference client
       through the same proxy prints OK at once.
    """
    server = start_foo_server()
    port = server.port
    try:
        with start_proxy(port) as p:
            clients = [connect(p.port) for _ in range(5)]
            try:
                for seq, client in enumerate(clients, 1):
                    client.sendall(b"REQ %d hi\n" % seq)
                    assert recv_lines(client, 1) == [reply_for("REQ", seq, b"hi")]
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(IO_TIMEOUT)
                for client in clients:
                    assert wait_closed(client) < SLACK
                report = idle_report(p)
            finally:
                for client in clients:
                    client.close()
            closed = report["connections_closed"]
            assert closed["upstream_closed"] + closed["upstream_reset"] == 5, closed

            server = start_foo_server(listen=f"127.0.0.1:{port}")
            started = time.monotonic()
            result = run_foo_client(f"-connect=127.0.0.1:{p.port}")
            assert (result.stdout, result.returncode) == ("..........OK!\n", 0), result.stderr
            assert time.monotonic() - started < 3.0 + SLACK
            assert p.proc.poll() is None
            _no_traceback(p)
    finally:
        server.stop()


# --- 5. the client resets or vanishes -----------------------------------------------------------


def test_client_reset_closes_upstream() -> None:
    """A client that resets its connection: the upstream side is closed too.

    1. The client sends a REQ; the scripted upstream reads it.
    2. The client sets SO_LINGER to 0 and closes: the kernel sends a reset.
    3. The upstream sees EOF or a reset within a second.
    4. connections_active is 0 and connections_closed.client_reset is 1.
    """
    with scripted_upstream() as upstream, start_proxy(upstream.port) as p:
        client = connect(p.port)
        client.sendall(b"REQ 1 x\n")
        up = upstream.accept()
        assert recv_lines(up, 1) == [b"REQ 1 x\n"]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert wait_closed(up) < SLACK
        report = idle_report(p)
        assert report["connections_closed"]["client_reset"] == 1
        _no_traceback(p)


def test_client_vanishes_while_upstream_streams() -> None:
    """A client disappears while the upstream is sending to it.

    1. The scripted upstream sends to its connection without pause.
    2. The client reads a little, then closes with unread data waiting, as
       the kernel does when a process dies: that is a reset, not a FIN.
    3. The upstream's next sends fail (the proxy closed its side) within a second.
    4. connections_active is 0 and the close is counted as client_reset.
    """

    def stream(sock: socket.socket) -> float:
        chunk = b"ACK 1 " + b"z" * 4000 + b"\n"
        try:
            while True:
                sock.sendall(chunk)
        except OSError:
            return time.monotonic()

    with scripted_upstream(stream) as upstream, start_proxy(upstream.port) as p:
        client = connect(p.port)
        assert client.recv(65536)
        time.sleep(0.1)  # let unread data pile up in the client's receive buffer
        vanished = time.monotonic()
        client.close()
        assert upstream.result() - vanished < SLACK
        report = idle_report(p)
        assert report["connections_closed"]["client_reset"] == 1
        _no_traceback(p)


def test_parked_client_sides_wake_for_data_reset_and_half_close() -> None:
    """Connections idle long enough to be parked still carry every byte and every close.

    The proxy gives back the client side's greenlet of a connection idle for
    ProxyServer.park_after seconds; the client's next byte, EOF or reset must
    still be seen.

    1. Three clients each complete a request through a scripted upstream.
    2. Everyone stays silent for longer than the park delay.
    3. Client A sends 8 MiB of a numbered pattern: the upstream gets all of it, in order.
    4. Client B resets: the upstream sees its connection end within a second.
    5. Client C half-closes with nothing owed: the upstream sees EOF, and C
       gets EOF without the upstream closing.
    6. Nothing is left open: client_reset 1, client_closed 2.
    """
    from geventproxy.server import ProxyServer

    with scripted_upstream() as upstream, start_proxy(upstream.port) as p:
        clients, ups = [], []
        for name in (b"a", b"b", b"c"):
            client = connect(p.port)
            client.sendall(b"REQ 1 %s\n" % name)
            up = upstream.accept()
            assert recv_lines(up, 1) == [b"REQ 1 %s\n" % name]
            up.sendall(b"ACK 1 %s\n" % name)
            assert recv_lines(client, 1) == [b"ACK 1 %s\n" % name]
            clients.append(client)
            ups.append(up)
        a, b, c = clients
        up_a, up_b, up_c = ups
        time.sleep(ProxyServer.park_after + 0.6)

        chunks = 128  # 8 MiB
        sender = threading.Thread(
            target=lambda: [a.sendall(pattern(i)) for i in range(chunks)], daemon=True
        )
        sender.start()
        digest, total = hashlib.sha256(), 0
        while total < chunks * 65536:
            data = up_a.recv(1 << 20)
            assert data
            digest.update(data)
            total += len(data)
        sender.join(IO_TIMEOUT)
        assert (total, digest.hexdigest()) == (chunks * 65536, pattern_digest(chunks))

        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()
        assert wait_closed(up_b) < SLACK

        c.shutdown(socket.SHUT_WR)
        assert recv_all(up_c) == b""
        assert recv_all(c) == b""

        a.close()
        assert wait_closed(up_a) < SLACK
        up_a.close()
        c.close()
        report = idle_report(p)
        assert report["connections_closed"]["client_reset"] == 1
        assert report["connections_closed"]["client_closed"] == 2
        _no_traceback(p)


# --- 6. slow peers ---------------------------------------------------------------------------

PUSH_CHUNKS = 1024  # 64 KiB each: 64 MiB in all
RSS_GROWTH_LIMIT_KIB = 20 * 1024


def _watch_rss(p: Launched, progress: list[int]) -> int:
    """Sample the worker's RSS until the writer has stalled; return the peak, in KiB."""
    pid = worker_pid(p)
    peak = rss_kib(pid)
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        if progress[0] != last:
            last, still_since = progress[0], time.monotonic()
        elif time.monotonic() - still_since > 0.5:
            return peak  # no progress for 0.5 s: backpressure holds the writer
        time.sleep(0.02)
    raise AssertionError(f"the writer never stalled: {progress[0]} bytes sent")


def _send_pattern(sock: socket.socket, progress: list[int]) -> None:
    for i in range(PUSH_CHUNKS):
        sock.sendall(pattern(i))
        progress[0] += 65536
    sock.shutdown(socket.SHUT_WR)


def _read_digest(sock: socket.socket) -> tuple[int, str]:
    digest, total = hashlib.sha256(), 0
    sock.settimeout(IO_TIMEOUT)
    while chunk := sock.recv(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    return total, digest.hexdigest()


def _assert_held_back(
    record_property, name: str, rss: tuple[int, int], stalled: int, received: tuple[int, str]
) -> None:
    """The sender stalled, the proxy's RSS (baseline, peak) stayed bounded, all arrived in order."""
    baseline, peak = rss
    record_property(f"{name.replace(' ', '_')}_rss_kib", (baseline, peak, stalled))
    print(f"{name}: RSS {baseline} -> {peak} KiB, stalled at {stalled} B")
    assert stalled < PUSH_CHUNKS * 65536
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB
    assert received == (PUSH_CHUNKS * 65536, pattern_digest(PUSH_CHUNKS))


def test_slow_reader_backpressure_bounded_memory(record_property) -> None:
    """An upstream pushes 64 MiB to a client that does not read.

    1. The scripted upstream sends 64 MiB of a numbered pattern, then closes.
    2. The client reads nothing: the upstream's send stalls well before 64 MiB
       (the proxy stopped reading it) and the proxy's RSS grows by less than
       20 MiB over its baseline.
    3. The client then reads everything: 64 MiB, every chunk in order (same
       SHA-256 as the pattern).
    """
    progress = [0]
    push = scripted_upstream(lambda sock: _send_pattern(sock, progress))
    with push as upstream, start_proxy(upstream.port) as p:
        baseline = rss_kib(worker_pid(p))
        with connect(p.port, timeout=20) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            peak = _watch_rss(p, progress)
            stalled = progress[0]
            received = _read_digest(client)
        upstream.result()
        _assert_held_back(record_property, "slow reader", (baseline, peak), stalled, received)
        assert idle_report(p)["bytes_upstream_to_client"] == received[0]


def test_slow_upstream_backpressure_bounded_memory(record_property) -> None:
    """A client pushes 64 MiB to an upstream that does not read.

    1. The client sends 64 MiB of a numbered pattern from a thread.
    2. The scripted upstream accepts but reads nothing: the client's send
       stalls well before 64 MiB and the proxy's RSS grows by less than 20 MiB.
    3. The upstream then reads everything: 64 MiB, in order.
    """
    progress = [0]
    with scripted_upstream() as upstream, start_proxy(upstream.port) as p:
        baseline = rss_kib(worker_pid(p))
        with connect(p.port, timeout=20) as client:
            up = upstream.accept()
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            writer = threading.Thread(target=_send_pattern, args=(client, progress), daemon=True)
            writer.start()
            peak = _watch_rss(p, progress)
            stalled = progress[0]
            received = _read_digest(up)
            up.close()
            writer.join(IO_TIMEOUT)
        _assert_held_back(record_property, "slow upstream", (baseline, peak), stalled, received)


def test_tcp_keepalive_is_on_for_both_sockets() -> None:
    """1. A client connects through the proxy and sends one request.
    2. The kernel shows a keepalive timer on the proxy's client-side socket and on its
       upstream socket (``ss -o``), so a peer that vanished without a FIN is found."""
    ss = shutil.which("ss")
    assert ss, "ss (iproute2) is needed to read the sockets' timers"
    with (
        start_foo_server() as upstream,
        start_proxy(upstream.port) as p,
        connect(p.port) as client,
    ):
        client.sendall(b"REQ 1 x\n")
        recv_lines(client, 1)
        # The proxy's side of the client connection (source port: the proxy's) and of
        # the upstream connection (destination port: the server's).
        query = f"( sport = :{p.port} or dport = :{upstream.port} )"
        mine = subprocess.run(
            [ss, "-tnoH", "state", "established", query],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert len(mine) == 2, mine
        assert all("keepalive" in line for line in mine), mine
