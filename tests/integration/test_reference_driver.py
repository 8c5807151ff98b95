"""The reference server and client as subprocesses, against each other and raw sockets."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from geventproxy.testing.launch import run_foo_client, start_foo_server
from geventproxy.testing.protocol import (
    ERRDECODE_REPLY,
    MAX_LINE,
    decode_line,
    reply_for,
)
from tests.helpers import IO_TIMEOUT, connect, recv_lines


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset), False if data arrives."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
            if b"\n" in chunk:
                return False
    except ConnectionResetError:
        return True


# --- reference client against reference server ----------------------------------------


def test_default_run_prints_exact_output(foo_port: int) -> None:
    proc = run_foo_client(f"-connect=127.0.0.1:{foo_port}")
    assert (proc.stdout, proc.returncode) == ("..........OK!\n", 0), proc.stderr


def test_localhost_and_space_separated_flags(foo_port: int) -> None:
    # The server binds 127.0.0.1 only: the client must fall back if localhost is ::1 first.
    proc = run_foo_client("-connect", f"localhost:{foo_port}", "-requests", "20")
    assert (proc.stdout, proc.returncode) == ("..OK!\n", 0), proc.stderr


def test_twenty_connections(foo_port: int) -> None:
    proc = run_foo_client(f"-connect=127.0.0.1:{foo_port}", "-connections=20")
    assert (proc.stdout, proc.returncode) == ("." * 200 + "OK!\n", 0), proc.stderr


def test_pipelined_window(foo_port: int) -> None:
    proc = run_foo_client(
        f"--connect=127.0.0.1:{foo_port}", "-window=50", "-requests=1000", "-connections=4"
    )
    assert (proc.stdout, proc.returncode) == ("." * 400 + "OK!\n", 0), proc.stderr


def test_fast_mode_server() -> None:
    with start_foo_server("--fast") as server:
        proc = run_foo_client(f"-connect=127.0.0.1:{server.port}", "-window=50", "-seed=99")
    assert (proc.stdout, proc.returncode) == ("..........OK!\n", 0), proc.stderr


def test_dual_stack_listen_accepts_ipv4_and_ipv6() -> None:
    with start_foo_server(listen=":0") as server:
        port = server.port
        proc = run_foo_client(f"-connect=127.0.0.1:{port}", "-requests=10")
        assert (proc.stdout, proc.returncode) == (".OK!\n", 0), proc.stderr
        if socket.has_ipv6:
            try:
                connect(port, "::1").close()
            except OSError:
                return  # no IPv6 loopback in this sandbox
            proc = run_foo_client(f"-connect=[::1]:{port}", "-requests=10")
            assert (proc.stdout, proc.returncode) == (".OK!\n", 0), proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_exits_zero_on_signal(sig: int) -> None:
    server = start_foo_server()
    with connect(server.port):  # an open connection must not keep it alive
        assert server.stop(sig) == 0
    assert any("listening on 127.0.0.1:" in line for line in server.stderr_lines)


# --- reference server against a raw socket -----------------------------------------------


def test_garbage_gets_errdecode_and_connection_stays_open(foo_port: int) -> None:
    with connect(foo_port) as sock:
        sock.sendall(b"garbage\n")
        assert recv_lines(sock, 1) == [ERRDECODE_REPLY]
        sock.sendall(b"REQ 1 Hey\n")
        assert recv_lines(sock, 1) == [reply_for("REQ", 1, b"Hey")]


def test_pipelined_lines_answered_in_order(foo_port: int) -> None:
    lines = [b"REQ 3 Hey\n", b"REQ 4 Hey\r\n", b"ACK 9 x\n", b"REQ 1 two words\n", b"REQ +5\n"]
    with connect(foo_port) as sock:
        sock.sendall(b"".join(lines))
        replies = recv_lines(sock, len(lines))
    assert replies == [
        reply_for("REQ", 3, b"Hey"),
        reply_for("REQ", 4, b"Hey"),
        reply_for("ACK", 9, b"x"),  # ACK-typed lines are answered too
        ERRDECODE_REPLY,
        reply_for("REQ", 5, b""),
    ]


def test_request_split_across_writes(foo_port: int) -> None:
    with connect(foo_port) as sock:
        for byte in b"REQ 7 split\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        assert recv_lines(sock, 1) == [reply_for("REQ", 7, b"split")]


def test_server_writes_reply_in_pieces(foo_port: int) -> None:
    """With Nagle off, the three writes of a reply usually reach us as separate reads."""
    with connect(foo_port) as sock:
        for _ in range(50):
            sock.sendall(b"REQ 1 x\n")
            first = sock.recv(65536)
            if not first.endswith(b"\n"):
                rest = recv_lines(sock, 1)[0]
                assert first + rest == reply_for("REQ", 1, b"x")
                return
            assert first == reply_for("REQ", 1, b"x")
    pytest.skip("the kernel coalesced every reply into one read")


def test_longest_line_is_answered(foo_port: int) -> None:
    data = b"a" * (MAX_LINE - len(b"REQ 1 \n"))
    with connect(foo_port) as sock:
        sock.sendall(b"REQ 1 " + data + b"\n")
        assert recv_lines(sock, 1) == [reply_for("REQ", 1, data)]


@pytest.mark.parametrize("terminated", [True, False])
def test_over_64k_line_closes_connection(foo_port: int, terminated: bool) -> None:
    data = b"a" * (MAX_LINE - len(b"REQ 1 \n") + 1)
    with connect(foo_port) as sock:
        sock.sendall(b"REQ 2 ok\n")
        assert recv_lines(sock, 1) == [reply_for("REQ", 2, b"ok")]
        sock.sendall(b"REQ 1 " + data + (b"\n" if terminated else b""))
        assert _closed_by_peer(sock)


# --- reference client against a scripted fake server -------------------------------------


def _fake_server(
    mangle: Callable[[bytes], bytes], piece_sizes: tuple[int, ...]
) -> tuple[int, threading.Thread]:
    """Answer one client connection with mangled replies, cut into odd-sized writes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(IO_TIMEOUT)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(IO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            cut = 0
            while chunk := conn.recv(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                out = b"".join(mangle(reply_for(*decode_line(line))) for line in lines)
                while out:  # pieces straddle line boundaries when several are pending
                    size = piece_sizes[cut % len(piece_sizes)]
                    cut += 1
                    conn.sendall(out[:size])
                    out = out[size:]
                    time.sleep(0.0005)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _corrupt_digest(reply: bytes) -> bytes:
    return reply[:-2] + (b"0" if reply[-2:-1] != b"0" else b"1") + b"\n"


def _flip_type(reply: bytes) -> bytes:
    return (b"NAK" if reply.startswith(b"ACK") else b"ACK") + reply[3:]


def _bump_seq(reply: bytes) -> bytes:
    kind, seq, digest = reply.split(b" ")
    return b"%s %d %s" % (kind, int(seq) + 1, digest)


@pytest.mark.parametrize("window", [1, 7])
def test_client_handles_replies_split_across_writes(window: int) -> None:
    port, thread = _fake_server(lambda reply: reply, piece_sizes=(1, 3, 7, 2, 13, 5))
    proc = run_foo_client(f"-connect=127.0.0.1:{port}", f"-window={window}")
    thread.join(IO_TIMEOUT)
    assert (proc.stdout, proc.returncode) == ("..........OK!\n", 0), proc.stderr


@pytest.mark.parametrize(
    "mangle,error",
    [
        (_corrupt_digest, "corrupted data"),
        (_flip_type, "unexpected response type"),
        (_bump_seq, "unexpected seq no"),
        (lambda reply: b"garbage\n", "decoding response"),
    ],
)
def test_client_reports_mismatches(mangle: Callable[[bytes], bytes], error: str) -> None:
    port, thread = _fake_server(mangle, piece_sizes=(4096,))
    proc = run_foo_client(f"-connect=127.0.0.1:{port}", "-requests=20")
    thread.join(IO_TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == f"..FAILED!\nErrors:\n  - {error}\n"


def test_client_reports_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    proc = run_foo_client(f"-connect=127.0.0.1:{port}", "-timeout=2")
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED!\nErrors:\n"), proc.stdout
