"""A connection ends when its client is done, in front of a server that never closes.

The reference server runs in its default mode, like the original: after a
client's EOF it answers what it read and leaves its socket open for ever.
So every test here fails if the proxy waits for the upstream to close
first. After the clients leave, the proxy's connections, descriptors
(/proc/PID/fd) and memory return to where they were.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from geventproxy.testing.protocol import reply_for
from tests.helpers import (
    IO_TIMEOUT,
    connect,
    idle_report,
    open_fds,
    recv_all,
    recv_lines,
    report_when,
    scripted_upstream,
    tree_rss_kib,
    wait_until,
)

#: Seconds the proxy may take to notice that the last client left (wide: CI is busy).
SETTLE_TIMEOUT = 15.0
#: RSS a second round of 2,000 short clients may add after a first one warmed up.
RSS_SLACK_KIB = 4 * 1024


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def workers(request: pytest.FixtureRequest) -> int:
    return request.param


@contextlib.contextmanager
def settled_proxy(foo_port: int, *args: str) -> Iterator[tuple[Launched, int]]:
    """A proxy that has served one reference client and let it go; its descriptor count."""
    with start_proxy(foo_port, *args) as p:
        warm = run_foo_client(f"-connect=127.0.0.1:{p.port}")
        assert warm.returncode == 0, warm.stdout + warm.stderr
        settle(p)
        yield p, open_fds(p.pid)


def settle(p: Launched) -> dict:
    return idle_report(p, SETTLE_TIMEOUT)


def assert_back_to(p: Launched, fds: int) -> dict:
    """No connection open, and the descriptor count back at ``fds``; the report."""
    report = settle(p)
    wait_until(lambda: open_fds(p.pid) == fds, timeout=SETTLE_TIMEOUT)
    assert report["connections_total"] == report["connections_active"] + sum(
        report["connections_closed"].values()
    )
    return report


def short_client(port: int, seq: int) -> None:
    """Connect, one REQ, read the reply, close."""
    with connect(port) as client:
        client.sendall(b"REQ %d short\n" % seq)
        assert recv_lines(client, 1) == [reply_for("REQ", seq, b"short")]


def in_threads(count: int, job: Callable[[int], None], threads: int = 8) -> None:
    """Run ``job(i)`` for i in range(count) on a few threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def worker(start: int) -> None:
        for i in range(start, count, threads):
            try:
                job(i)
            except BaseException as exc:  # handed to the test
                errors.append(exc)
                return

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    if errors:
        raise errors[0]


def test_sequential_clients_leave_nothing_open(foo_port: int, workers: int) -> None:
    """1. One reference client warms the proxy up; note its descriptors.
    2. 100 reference clients run one after another (100 REQs each): all OK.
    3. connections_active is 0 and the descriptors are back where they were,
       every connection closed as client_closed.
    """
    with settled_proxy(foo_port, f"-workers={workers}") as (p, fds):
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-rounds=100", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        report = assert_back_to(p, fds)
        assert report["connections_closed"]["client_closed"] == 101
        assert report["msg_req"] == 101 * 100


def test_fifty_at_once_leave_nothing_open(foo_port: int, workers: int) -> None:
    """1. Warm up; note the descriptors.
    2. 50 reference clients at once, 100 REQs each: all OK.
    3. connections_active 0, descriptors back, msg_req exact.
    """
    with settled_proxy(foo_port, f"-workers={workers}") as (p, fds):
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=50", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        report = assert_back_to(p, fds)
        assert report["msg_req"] == 51 * 100
        assert report["msg_ack"] + report["msg_nak"] == 51 * 100


def test_probes_with_fin_and_with_reset_leave_nothing_open(foo_port: int, workers: int) -> None:
    """1. Warm up; note the descriptors.
    2. 300 probes connect and close without a byte (FIN).
    3. 300 probes connect and reset (SO_LINGER 0).
    4. connections_active 0, descriptors back; every probe has one close reason.
    """
    linger_zero = struct.pack("ii", 1, 0)

    def probe(reset: bool) -> Callable[[int], None]:
        def job(_: int) -> None:
            sock = connect(p.port)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
            sock.close()

        return job

    with settled_proxy(foo_port, f"-workers={workers}") as (p, fds):
        in_threads(300, probe(reset=False))
        in_threads(300, probe(reset=True))
        report = report_when(p, lambda r: r["connections_total"] == 601, timeout=SETTLE_TIMEOUT)
        report = assert_back_to(p, fds)
        closed = report["connections_closed"]
        # A reset that arrives before the proxy reads anything may show as an EOF.
        assert closed["client_closed"] + closed["client_reset"] == 601
        assert closed["client_closed"] >= 301


def test_half_close_after_five_requests_gets_all_five_replies(foo_port: int) -> None:
    """1. Warm up; note the descriptors.
    2. A client sends 5 REQs at once and half-closes (shutdown SHUT_WR).
    3. It receives exactly the 5 replies, in order, then EOF.
    4. The proxy holds no socket for it any more: descriptors back, active 0.
    """
    with settled_proxy(foo_port) as (p, fds):
        client = connect(p.port)
        client.sendall(b"".join(b"REQ %d five\n" % seq for seq in range(1, 6)))
        client.shutdown(socket.SHUT_WR)
        expected = b"".join(reply_for("REQ", seq, b"five") for seq in range(1, 6))
        assert recv_all(client) == expected
        client.close()
        report = assert_back_to(p, fds)
        assert report["connections_closed"]["client_closed"] == 2
        assert report["msg_req"] == 105


@pytest.mark.parametrize("cut", [b"cut", b"c" * 100], ids=["held", "over-long"])
def test_unfinished_last_line_is_answered_before_the_end(foo_port: int, cut: bytes) -> None:
    """1. A client sends one whole REQ and one without its LF, then half-closes
       (with -max-line=64, so the 100-byte variant is over-long and skipped,
       not held).
    2. The server answers both (it reads the last line at EOF): the client
       gets both replies, then EOF.
    """
    with settled_proxy(foo_port, "-max-line=64") as (p, fds):
        client = connect(p.port)
        client.sendall(b"REQ 1 whole\nREQ 2 " + cut)
        client.shutdown(socket.SHUT_WR)
        reply = recv_all(client)
        client.close()
        assert reply == reply_for("REQ", 1, b"whole") + reply_for("REQ", 2, cut)
        assert_back_to(p, fds)


def test_two_thousand_short_clients_return_descriptors_and_memory(
    foo_port: int, workers: int
) -> None:
    """1. Warm up with 2,000 short clients (connect, one REQ, reply, close).
    2. Note descriptors and RSS (of every process of the proxy).
    3. 2,000 more short clients.
    4. connections_active 0, descriptors exactly back, RSS within 4 MiB of
       step 2 (held connections would cost about 25 MiB).
    """
    with settled_proxy(foo_port, f"-workers={workers}") as (p, _):
        in_threads(2000, lambda i: short_client(p.port, i + 1))
        settle(p)
        fds, rss = open_fds(p.pid), tree_rss_kib(p.pid)
        in_threads(2000, lambda i: short_client(p.port, i + 1))
        report = assert_back_to(p, fds)
        growth = tree_rss_kib(p.pid) - rss
        print(f"2,000 short clients, workers={workers}: RSS {growth:+d} KiB")
        assert growth < RSS_SLACK_KIB
        assert report["connections_total"] == 4001
        assert report["msg_req"] == 100 + 4000


# --- replies owed after the client's EOF ----------------------------------------------------


def test_owed_reply_delivered_then_connection_ends() -> None:
    """1. A scripted upstream receives a REQ and the client's half-close.
    2. It answers 0.5 s later, in three pieces, and never closes.
    3. The client gets the whole reply, then EOF; the reason is client_closed.
    4. The upstream sees the proxy end the connection.
    """

    def slow(sock: socket.socket) -> bytes:
        got = recv_all(sock)  # up to the client's EOF, passed on by the proxy
        time.sleep(0.5)
        for piece in (b"ACK 1", b" late", b"\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        sock.settimeout(IO_TIMEOUT)
        assert recv_all(sock) == b""  # the proxy closed: EOF or reset, not a timeout
        return got

    with scripted_upstream(slow) as upstream, start_proxy(upstream.port) as p:
        client = connect(p.port)
        client.sendall(b"REQ 1 x\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ACK 1 late\n"
        client.close()
        assert upstream.result() == b"REQ 1 x\n"
        report = settle(p)
        assert report["connections_closed"]["client_closed"] == 1


def test_an_owed_reply_longer_than_max_line_arrives_whole() -> None:
    """1. Proxy with -max-line=64; a client sends a REQ and half-closes.
    2. A scripted upstream answers with a 300-byte line, in three pieces
       0.05 s apart (the first two pass -max-line without its LF), and never closes.
    3. The client gets the whole line, its LF included, then EOF
       (client_closed): the proxy counts an over-long line invalid as soon
       as it passes -max-line, but the reply is delivered only at its LF.
    """
    reply = b"ACK 1 " + b"x" * 293 + b"\n"
    pieces = (reply[:100], reply[100:299], reply[299:])

    def long_reply(sock: socket.socket) -> None:
        recv_all(sock)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        sock.settimeout(IO_TIMEOUT)
        recv_all(sock)

    with scripted_upstream(long_reply) as upstream, start_proxy(upstream.port, "-max-line=64") as p:
        client = connect(p.port)
        client.sendall(b"REQ 1 x\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == reply
        client.close()
        upstream.result()
        report = settle(p)
        assert report["connections_closed"]["client_closed"] == 1
        assert report["msg_invalid"] == 1


def test_owed_reply_that_never_comes_ends_after_client_fin_timeout() -> None:
    """1. Proxy with -client-fin-timeout=0.5 before an upstream that never answers.
    2. A client sends 2 REQs and half-closes.
    3. The client gets EOF after the timeout; the reason is client_fin_timeout,
       so an operator sees replies that never came.
    """
    with (
        scripted_upstream() as upstream,
        start_proxy(upstream.port, "-client-fin-timeout=0.5") as p,
    ):
        client = connect(p.port)
        client.sendall(b"REQ 1 x\nREQ 2 y\n")
        client.shutdown(socket.SHUT_WR)
        up = upstream.accept()
        assert recv_all(up) == b"REQ 1 x\nREQ 2 y\n"
        started = time.monotonic()
        assert recv_all(client) == b""
        waited = time.monotonic() - started
        client.close()
        report = settle(p)
        assert report["connections_closed"]["client_fin_timeout"] == 1
        assert report["connections_closed"]["client_closed"] == 0
        assert waited >= 0.4


def test_client_fin_timeout_restarts_with_every_upstream_byte() -> None:
    """1. -client-fin-timeout=0.6; a client sends 3 REQs and half-closes.
    2. The upstream answers one every 0.4 s (each gap under the timeout,
       the whole over it).
    3. The client gets all 3 replies, then EOF, reason client_closed.
    """

    def paced(sock: socket.socket) -> None:
        recv_all(sock)
        for seq in (1, 2, 3):
            time.sleep(0.4)
            sock.sendall(b"ACK %d ok\n" % seq)
        recv_all(sock)

    with (
        scripted_upstream(paced) as upstream,
        start_proxy(upstream.port, "-client-fin-timeout=0.6") as p,
    ):
        client = connect(p.port)
        client.sendall(b"REQ 1 a\nREQ 2 b\nREQ 3 c\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"ACK 1 ok\nACK 2 ok\nACK 3 ok\n"
        client.close()
        upstream.result()
        report = settle(p)
        assert report["connections_closed"]["client_closed"] == 1


# --- descriptor exhaustion and drain ---------------------------------------------------------

NOFILE = 64


def test_descriptor_exhaustion_recovers_once_clients_are_gone(foo_port: int) -> None:
    """1. The proxy runs under prlimit --nofile=64:64.
    2. 100 clients at once each send a REQ and close (more than it has descriptors).
    3. Once the last is gone (connections_active 0, every one counted), a new
       client is served within two seconds.
    4. The reference client prints OK; nothing is left open.
    """
    with start_proxy(
        foo_port, "-log-connections=false", prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}"]
    ) as p:
        clients = []
        for seq in range(1, 101):
            client = connect(p.port)
            client.sendall(b"REQ %d x\n" % seq)
            clients.append(client)
        for client in clients:
            client.close()
        report = report_when(
            p,
            lambda r: r["connections_active"] == 0 and r["connections_total"] == 100,
            timeout=30,
        )
        assert report["accept_errors"] >= 1, report  # it did run out
        started = time.monotonic()
        short_client(p.port, 1)
        took = time.monotonic() - started
        print(f"after exhaustion, a new client was served in {took:.3f} s")
        assert took < 2.0
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}")
        assert (result.stdout, result.returncode) == ("..........OK!\n", 0), result.stderr
        settle(p)


def test_drain_ends_when_the_last_client_leaves(foo_port: int, workers: int) -> None:
    """1. A proxy with -drain-timeout=60 has one client mid-conversation.
    2. SIGTERM: the proxy stops accepting and keeps serving that client.
    3. The client sends one more REQ (answered) and closes.
    4. The proxy exits 0 within a few seconds, far before the drain deadline,
       with a final report counting the connection as client_closed.
    """
    with start_proxy(foo_port, "-drain-timeout=60", f"-workers={workers}") as p:
        client = connect(p.port)
        client.sendall(b"REQ 1 before\n")
        assert recv_lines(client, 1) == [reply_for("REQ", 1, b"before")]
        p.proc.send_signal(signal.SIGTERM)
        p.wait_log("draining", timeout=10)
        client.sendall(b"REQ 2 during\n")
        assert recv_lines(client, 1) == [reply_for("REQ", 2, b"during")]
        assert p.proc.poll() is None
        started = time.monotonic()
        client.close()
        assert p.wait_exit(timeout=20) == 0
        took = time.monotonic() - started
        print(f"exited {took:.2f} s after its last client left (deadline 60 s)")
        final = p.stdout_reports()[-1]
        assert final["connections_closed"]["client_closed"] == 1
        assert final["connections_closed"]["shutdown"] == 0
        assert final["connections_active"] == 0
