"""--workers: several processes on one port, one parent that reports exact sums."""

from __future__ import annotations

import json
import os
import signal
import time

from geventproxy.testing.launch import Launched, run_foo_client, start_proxy
from tests.helpers import admin_address, http_request, worker_pids


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _worker_served(p: Launched) -> set[str]:
    """Which worker pids logged a connection close (json logs carry the pid)."""
    return {
        line.split('"pid": ')[1].split(",")[0].split("}")[0]
        for line in p.stderr_lines
        if '"msg": "close"' in line
    }


def _until_both_served(p: Launched, batch: int = 10, batches: int = 5) -> int:
    """Clients in batches until both workers have served one; how many clients it took.

    The kernel may hand a whole burst of connections to one worker (the other being
    off the CPU on a busy machine): more traffic, never a retry of the same, makes
    the other worker's share show. 0 if both had served already. Each reference
    client sends 100 REQs and gets 88 ACKs and 12 NAKs.
    """
    ran = 0
    while True:
        try:  # the close lines may reach the test a moment after the clients exit
            _wait_for(lambda: len(_worker_served(p)) == 2, timeout=2)
            return ran
        except AssertionError:
            assert ran < batch * batches, f"the kernel gave every client to one worker:\n{p.log()}"
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}", f"-connections={batch}")
        assert result.returncode == 0, result.stdout + result.stderr
        ran += batch


def test_two_workers_report_exact_sums_and_survive_a_worker_death(foo_port: int) -> None:
    """1. Start with -workers=2: the parent forks two workers on one listening socket.
    2. 40 clients x 100 REQ through it: the parent's USR1 line has the exact totals,
       the 10 s rates are exactly total / 10; then both workers have served some
       clients (more batches of 10 if the kernel gave them all to one).
    3. SIGKILL one worker: the parent logs it and starts another in its slot; the dead
       worker's counts stay in the sums.
    4. 10 more clients: the totals grow by exactly their traffic.
    5. SIGTERM the parent: the workers drain, the parent prints a final line, exits 0.
    """
    with start_proxy(foo_port, "-workers=2", "-log-format=json") as p:
        _wait_for(lambda: len(worker_pids(p)) == 2)
        first = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=40", timeout=60)
        assert first.returncode == 0, first.stdout + first.stderr
        report = p.report()
        assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (4000, 3520, 480)
        assert report["request_rate_10s"] == 400.0 and report["response_rate_10s"] == 400.0
        assert report["connections_total"] == 40 and report["connections_active"] == 0
        clients = 40 + _until_both_served(p)

        victim = worker_pids(p)[0]
        os.kill(victim, signal.SIGKILL)
        p.wait_log("worker died, restarting")
        _wait_for(lambda: len(worker_pids(p)) == 2 and victim not in worker_pids(p))
        assert p.report()["msg_req"] == 100 * clients

        second = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=10")
        assert second.returncode == 0, second.stdout + second.stderr
        clients += 10
        report = p.report()
        assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (
            100 * clients,
            88 * clients,
            12 * clients,
        )
        assert report["msg_total"] == 200 * clients

        workers = worker_pids(p)
        lines_before = len(p.stdout_lines)
        assert p.stop() == 0
        for pid in workers:  # reaped by the parent before it exited
            assert not os.path.exists(f"/proc/{pid}")
        _wait_for(lambda: len(p.stdout_lines) == lines_before + 1)
        final = p.reports.get(timeout=2)
        while not p.reports.empty():
            final = p.reports.get_nowait()
        assert final["msg_req"] == 100 * clients


def test_workers_ignore_usr1_and_int_sent_to_the_whole_group(foo_port: int) -> None:
    """1. USR1 to every process (as `systemctl kill` does): exactly one line, the
       parent's (none more a second after it).
    2. The workers are still there afterwards.
    3. INT to every process (Ctrl-C in a terminal): the parent drains and exits 0, and
       each worker exits 0 when the parent stops it, not killed by the INT."""
    with start_proxy(foo_port, "-workers=2", "-log-format=json") as p:
        _wait_for(lambda: len(worker_pids(p)) == 2)
        workers = worker_pids(p)
        for pid in [p.proc.pid, *workers]:
            os.kill(pid, signal.SIGUSR1)
        _wait_for(lambda: p.stdout_lines, timeout=10)
        time.sleep(1)
        assert len(p.stdout_lines) == 1
        assert worker_pids(p) == workers

        for pid in [p.proc.pid, *workers]:
            os.kill(pid, signal.SIGINT)
        assert p.proc.wait(timeout=30) == 0
        exits = [json.loads(line) for line in p.stderr_lines if '"msg": "worker exited"' in line]
        assert sorted(e["pid"] for e in exits) == sorted(workers), p.log()
        assert [e["status"] for e in exits] == [0, 0], p.log()


def test_workers_serve_admin_and_keep_the_state_file(foo_port: int, tmp_path) -> None:
    """1. -workers=2 with --admin and --state-file: 20 clients (more batches of 10 until
       both workers have served some); /stats (served by worker 0) shows the sums over
       both workers, equal to the parent's USR1 line.
    2. SIGTERM: the parent writes the state file with the summed totals.
    3. A new -workers=2 proxy on the same state file continues from those totals,
       with rates at zero."""
    state = tmp_path / "totals.json"
    args = ("-workers=2", "-admin=localhost:0", f"-state-file={state}", "-log-format=json")
    with start_proxy(foo_port, *args) as p:
        admin = admin_address(p)
        result = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=20")
        assert result.returncode == 0, result.stdout + result.stderr
        clients = 20 + _until_both_served(p)
        status, _, body = http_request(admin, "/stats")
        via_admin = json.loads(body)
        via_signal = p.report()
        assert status == 200
        for key in ("msg_req", "msg_ack", "msg_nak", "msg_total", "connections_total"):
            assert via_admin[key] == via_signal[key]
        assert via_signal["msg_req"] == 100 * clients
        assert via_signal["connections_total"] == clients
        assert p.stop() == 0
    saved = json.loads(state.read_text())["totals"]
    assert saved["msg_req_client_to_upstream"] == 100 * clients
    with start_proxy(foo_port, *args) as p:
        report = p.report()
        assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (
            100 * clients,
            88 * clients,
            12 * clients,
        )
        assert report["request_rate_1s"] == 0.0 and report["request_rate_10s"] == 0.0
        assert run_foo_client(f"-connect=127.0.0.1:{p.port}").returncode == 0
        assert p.report()["msg_req"] == 100 * clients + 100


def test_workers_exit_when_the_parent_is_killed(foo_port: int) -> None:
    """1. -workers=2, then SIGKILL to the parent (as the OOM killer would).
    2. The orphaned workers notice, drain and exit by themselves within a few seconds,
       instead of holding the port for ever."""
    with start_proxy(foo_port, "-workers=2", "-drain-timeout=1") as p:
        _wait_for(lambda: len(worker_pids(p)) == 2)
        workers = worker_pids(p)
        p.proc.kill()
        p.proc.wait(timeout=5)
        _wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10)
        assert any("parent process gone" in line for line in p.stderr_lines), p.log()
