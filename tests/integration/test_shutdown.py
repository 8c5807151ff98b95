"""Signals and logs: a graceful drain, a forced exit, report bursts, and what is written where.

stdout carries only the JSON reports, one whole object per line; stderr
carries the logs, as text or one JSON object per line.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from geventproxy.testing.launch import (
    ROOT,
    STARTUP_TIMEOUT,
    Launched,
    child_env,
    run_foo_client,
    start_proxy,
)
from tests.helpers import (
    IO_TIMEOUT,
    SLACK,
    connect,
    recv_lines,
    report_when,
    round_trip,
    scripted_upstream,
    wait_closed,
    wait_until,
)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def _final(p: Launched) -> dict:
    """The last stdout line: the report written at exit."""
    reports = p.stdout_reports()
    assert reports, "no final report on stdout"
    return reports[-1]


# --- 11. signals ------------------------------------------------------------------------------


def test_sigterm_drains_an_open_conversation_then_exits_zero(foo_port: int) -> None:
    """SIGTERM: stop accepting at once, let the open conversation finish, exit 0.

    1. Start the proxy with --drain-timeout=5; a client completes a request.
    2. SIGTERM: within 0.5 s a new connect is refused (the listener is closed).
    3. The open client goes on: four more requests are answered.
    4. The client closes: the proxy exits 0 at once (not after the 30 s drain
       timeout), having written a final JSON report as its last stdout line,
       with the five REQs and the connection closed by the client.
    """
    p = start_proxy(foo_port, "--drain-timeout=30")
    try:
        with connect(p.port) as client:
            round_trip(client, 1)
            p.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _refused(p.port), timeout=0.5)
            for seq in range(2, 6):
                round_trip(client, seq)
            assert p.proc.poll() is None
            closed_at = time.monotonic()
        assert p.wait_exit() == 0
        assert time.monotonic() - closed_at < SLACK
        final = _final(p)
        assert final["msg_req"] == 5 and final["connections_active"] == 0
        # A probe that got in before the listener closed is a client_closed of its own.
        assert final["connections_closed"]["client_closed"] >= 1
        assert final["connections_closed"]["shutdown"] == 0
        assert "Traceback" not in p.log()
    finally:
        p.stop(signal.SIGKILL)


def test_drain_timeout_closes_a_lingering_connection(foo_port: int) -> None:
    """A connection still open at --drain-timeout is closed; the exit is still 0.

    1. Start the proxy with --drain-timeout=1; a client completes a request and stays.
    2. SIGTERM.
    3. The client's connection is closed about 1 s later.
    4. The proxy exits 0; its final report counts the connection as shutdown.
    """
    p = start_proxy(foo_port, "--drain-timeout=1")
    try:
        with connect(p.port) as client:
            round_trip(client, 1)
            p.proc.send_signal(signal.SIGTERM)
            waited = wait_closed(client, timeout=IO_TIMEOUT + SLACK)
        assert 0.8 <= waited <= 1.0 + SLACK, waited
        assert p.wait_exit() == 0
        final = _final(p)
        assert final["connections_closed"]["shutdown"] == 1
        assert final["connections_active"] == 0
        p.wait_log("closed connections at shutdown")
    finally:
        p.stop(signal.SIGKILL)


def test_second_sigterm_exits_at_once(foo_port: int) -> None:
    """A second SIGTERM during the drain closes everything and exits at once.

    1. Start the proxy with --drain-timeout=30; a client completes a request and stays.
    2. SIGTERM, and wait for the "draining" log line.
    3. SIGTERM again: the proxy exits 0 within a second, with a final report
       counting the connection as shutdown; the client sees its connection end.
    """
    p = start_proxy(foo_port, "--drain-timeout=30")
    try:
        with connect(p.port) as client:
            round_trip(client, 1)
            p.proc.send_signal(signal.SIGTERM)
            p.wait_log("draining")
            forced_at = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            assert p.wait_exit() == 0
            assert time.monotonic() - forced_at < SLACK
            assert wait_closed(client, timeout=SLACK) < SLACK
        assert _final(p)["connections_closed"]["shutdown"] == 1
    finally:
        p.stop(signal.SIGKILL)


def test_sigusr1_burst_while_clients_run(foo_port: int) -> None:
    """200 SIGUSR1 as fast as possible while ten clients run: no death, only whole JSON lines.

    1. Start the proxy; start the reference client with 10 connections.
    2. Send 200 SIGUSR1 back to back while it runs.
    3. The reference client prints OK; the proxy is alive and answers one more report.
    4. SIGTERM: exit 0; every stdout line is one whole JSON report, at least
       two of them (bursts are coalesced, never interleaved).
    """
    p = start_proxy(foo_port)
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "geventproxy.testing.client", f"-connect=127.0.0.1:{p.port}"]
            + ["-connections=10"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(200):
            p.proc.send_signal(signal.SIGUSR1)
        out, _ = client.communicate(timeout=20)
        assert (out, client.returncode) == ("." * 100 + "OK!\n", 0)
        assert p.proc.poll() is None
        assert report_when(p, lambda r: r["msg_req"] == 1000)
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait_exit() == 0
        reports = p.stdout_reports()
        assert len(reports) >= 2
        assert reports[-1]["msg_req"] == 1000
    finally:
        p.stop(signal.SIGKILL)


def _usr1_disposition_set(pid: int) -> bool:
    """Whether the process ignores or catches SIGUSR1 (its default action is to die)."""
    bit = 1 << (signal.SIGUSR1 - 1)
    with open(f"/proc/{pid}/status") as f:
        masks = dict(line.split(":\t", 1) for line in f if line.startswith(("SigIgn", "SigCgt")))
    return bool((int(masks["SigIgn"], 16) | int(masks["SigCgt"], 16)) & bit)


def _blast_usr1(p: Launched, until: threading.Event, sent: list[float]) -> None:
    while not until.is_set() and p.proc.poll() is None:
        try:
            p.proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            return
        sent.append(time.monotonic())
        time.sleep(0.0005)


def test_sigusr1_during_startup_never_kills(foo_port: int) -> None:
    """SIGUSR1 from the moment the program runs until it listens never kills it.

    1. Spawn the proxy; poll /proc/PID/status until it has taken SIGUSR1 off
       its default action (ignored or caught). That must happen long before
       it listens: at the top of its entry point, before the slow imports.
    2. From then on send SIGUSR1 every half millisecond until it listens, and
       for 0.2 s after.
    3. It is alive, and at least 20 of the signals arrived before it listened.
    4. A report asked for now is written, and stdout holds only whole JSON lines.
    """
    p = start_proxy(foo_port, wait=False)
    try:
        wait_until(
            lambda: p.proc.poll() is not None or _usr1_disposition_set(p.proc.pid),
            interval=0.0005,
        )
        done, sent = threading.Event(), []
        blaster = threading.Thread(target=_blast_usr1, args=(p, done, sent), daemon=True)
        blaster.start()
        try:
            p.wait_ready()
            listening_at = time.monotonic()
            time.sleep(0.2)
        finally:
            done.set()
            blaster.join(5)
        early = sum(1 for at in sent if at < listening_at)
        assert p.proc.poll() is None, f"killed after {len(sent)} signals:\n{p.log()}"
        assert early >= 20, early
        assert p.report()["msg_total"] == 0
        p.stdout_reports()
    finally:
        p.stop()


def test_sigusr1_ignored_by_the_launcher_still_reports(foo_port: int) -> None:
    """Started with SIGUSR1 ignored (as a supervisor can, so no start-up window exists).

    The few milliseconds between exec and the interpreter running the
    proxy's first line cannot be covered from inside the program; a launcher
    that ignores SIGUSR1 before exec closes that window, since an ignored
    disposition survives exec.

    1. Spawn the proxy with SIGUSR1 ignored in the child before exec.
    2. Send SIGUSR1 every half millisecond from the moment the spawn returns
       until it listens.
    3. It is alive, and SIGUSR1 now produces reports: the proxy installed
       its own handler over the inherited "ignore".
    """

    def ignore_usr1() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    p = start_proxy(foo_port, preexec_fn=ignore_usr1, wait=False)
    try:
        done, sent = threading.Event(), []
        blaster = threading.Thread(target=_blast_usr1, args=(p, done, sent), daemon=True)
        blaster.start()
        try:
            p.wait_ready()
        finally:
            done.set()
            blaster.join(5)
        assert p.proc.poll() is None
        assert len(sent) >= 20
        assert p.report()["connections_total"] == 0
    finally:
        p.stop()


def test_sigusr1_during_drain_and_exit_never_kills(foo_port: int) -> None:
    """SIGUSR1 during the drain and the exit that follows never kills the proxy.

    1. Start the proxy with --drain-timeout=1; a client completes a request and stays.
    2. SIGTERM, then SIGUSR1 every half millisecond until the process is gone.
    3. The exit status is 0 (not death by SIGUSR1), and stdout holds only
       whole JSON reports, the last with the connection counted as shutdown.
    """
    p = start_proxy(foo_port, "--drain-timeout=1")
    try:
        with connect(p.port) as client:
            round_trip(client, 1)
            done, sent = threading.Event(), []
            p.proc.send_signal(signal.SIGTERM)
            blaster = threading.Thread(target=_blast_usr1, args=(p, done, sent), daemon=True)
            blaster.start()
            try:
                code = p.wait_exit()
            finally:
                done.set()
                blaster.join(5)
        assert code == 0, f"exit {code} after {len(sent)} SIGUSR1:\n{p.log()}"
        assert len(sent) > 100
        reports = p.stdout_reports()
        assert reports[-1]["connections_closed"]["shutdown"] == 1
    finally:
        p.stop(signal.SIGKILL)


# --- 12. logging --------------------------------------------------------------------------------


def _json_lines(p: Launched) -> list[dict]:
    records = []
    for line in p.stderr_lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"ts", "level", "msg"} <= record.keys(), line
        records.append(record)
    return records


def test_json_logs_one_object_per_line(foo_port: int) -> None:
    """--log-format=json: every stderr line is one JSON object; connections are described.

    1. Start the proxy with --log-format=json in front of a scripted upstream;
       a client sends a REQ, gets an ACK, half-closes, and the upstream closes.
    2. Another client connects and resets, so an abnormal close is logged too.
    3. SIGTERM; the proxy exits 0.
    4. Every stderr line parses as a JSON object with ts, level and msg.
    5. The open line carries the peer; each close line carries peer,
       duration_s, bytes_in, bytes_out and reason (client_closed, client_reset).
    6. stdout holds only JSON reports, the last one written at exit.
    """
    with scripted_upstream() as upstream:
        p = start_proxy(upstream.port, "--log-format=json")
        try:
            with connect(p.port) as client:
                client.sendall(b"REQ 1 a\n")
                up = upstream.accept()
                assert recv_lines(up, 1) == [b"REQ 1 a\n"]
                up.sendall(b"ACK 1 b\n")
                assert recv_lines(client, 1) == [b"ACK 1 b\n"]
                client.shutdown(socket.SHUT_WR)
                assert up.recv(10) == b""
                up.close()
            reset = connect(p.port)
            reset.sendall(b"REQ 1 a\n")
            upstream.accept()
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            reset.close()
            report_when(p, lambda r: r["connections_active"] == 0)
            p.proc.send_signal(signal.SIGTERM)
            assert p.wait_exit() == 0
        finally:
            p.stop(signal.SIGKILL)
    records = _json_lines(p)
    opens = [r for r in records if r["msg"] == "open"]
    closes = [r for r in records if r["msg"] == "close"]
    assert len(opens) == 2 and all(r["peer"].startswith("127.0.0.1:") for r in opens)
    assert len(closes) == 2
    for record in closes:
        assert {"peer", "duration_s", "bytes_in", "bytes_out", "reason"} <= record.keys()
        assert isinstance(record["duration_s"], (int, float))
    assert [r["reason"] for r in closes] == ["client_closed", "client_reset"]
    assert (closes[0]["bytes_in"], closes[0]["bytes_out"]) == (8, 8)
    assert p.stdout_reports()[-1]["connections_closed"]["client_reset"] == 1


def test_log_connections_false_drops_open_and_close_lines(foo_port: int) -> None:
    """--log-connections=false: no open/close lines, the rest of the log stays.

    1. Start the proxy with --log-connections=false; a client completes a request.
    2. SIGTERM; exit 0.
    3. The log has the listening, draining and exit lines but no open or close line.
    """
    p = start_proxy(foo_port, "--log-connections=false")
    try:
        with connect(p.port) as client:
            round_trip(client, 1)
        report_when(p, lambda r: r["connections_active"] == 0)
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait_exit() == 0
    finally:
        p.stop(signal.SIGKILL)
    messages = [line.split()[2] for line in p.stderr_lines]
    assert {"listening", "draining", "exit"} <= set(messages), p.log()
    assert "open" not in messages and "close" not in messages, p.log()


EVIL_LINE = b"REQ 1 \x1b[31mred\x07\x00\xff\xfe" + b"\r" * 3 + b"A" * 300 + b"\n"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_strict_violation_log_escapes_and_truncates_peer_bytes(fmt: str) -> None:
    """The strict-mode violation line shows the peer's bytes escaped and cut short.

    1. Start the proxy with --strict in front of a scripted upstream.
    2. A client sends a 300-byte line full of escape sequences, a bell, a
       NUL, invalid UTF-8 and carriage returns: it is disconnected.
    3. The "client broke strict mode" log line is a single line of printable
       ASCII (no raw control byte reaches the log), and shows at most
       64 bytes of the line, escaped, marked as cut with "...".
    """
    with (
        scripted_upstream() as upstream,
        start_proxy(upstream.port, "--strict", f"--log-format={fmt}") as p,
    ):
        with connect(p.port) as client:
            client.sendall(EVIL_LINE)
            assert wait_closed(client) < SLACK
        line = p.wait_log("client broke strict mode")
        report_when(p, lambda r: r["connections_closed"]["strict_violation"] == 1)
    assert line.endswith("\n") and line.count("\n") == 1
    text = line[:-1]
    assert text.isascii() and text.isprintable(), repr(text)
    if fmt == "json":
        shown = json.loads(text)["line"]
    else:
        shown = text.split(" line=", 1)[1]
        shown = json.loads(shown) if shown.startswith('"') else shown
    assert shown.isascii() and shown.isprintable(), repr(shown)
    assert "\\x1b[31mred\\x07\\x00\\xff\\xfe" in shown
    assert shown.endswith("...")
    assert shown.count("A") < 64


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stdout_nobody_reads_never_blocks_shutdown(foo_port: int, tmp_path, workers: str) -> None:
    """1. The proxy's stdout is a pipe that nobody reads; its log goes to a file.
    2. 100 SIGUSR1: the reports fill the pipe (64 KiB) and the rest cannot be written.
    3. A reference client is still served.
    4. SIGTERM: the proxy still drains and exits 0 within a few seconds, dropping the
       lines stdout will not take (and saying so in the log)."""
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geventproxy",
                "-listen=127.0.0.1:0",
                f"-forward=127.0.0.1:{foo_port}",
                f"-workers={workers}",
                "-drain-timeout=1",
            ],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "listening" not in log_path.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.05)
        port = int(re.search(r"listening address=\S*:(\d+)", log_path.read_text()).group(1))
        for _ in range(100):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.01)
        result = run_foo_client(f"-connect=127.0.0.1:{port}")
        assert result.returncode == 0, result.stdout + result.stderr
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log_path.read_text()
        assert "dropped" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
