"""SIGHUP: new workers from the configuration and code of now, not one client refused.

Every test reads the proxy's JSON log, whose lines carry the pid of the
process that wrote them: the parent's lines say which worker belongs to
which generation, the workers' ``close`` lines which worker served whom.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from geventproxy.testing.launch import ROOT, Launched, run_foo_client, start_proxy
from tests.helpers import (
    admin_address,
    connect,
    http_request,
    recv_lines,
    report_when,
    wait_until,
    worker_pids,
)

RELOAD_FAILED = "reload failed, the running workers carry on"
RELOAD_REFUSED = "reload refused, the running workers carry on"
NEW_WORKER_FAILED = "reload failed: a new worker did not start, the running workers carry on"
#: Generous: a new worker is a fresh interpreter importing gevent, on a busy machine.
RELOAD_TIMEOUT = 20.0
CONNECTIONS = 3  # per reference client run, 100 REQs each: 88 ACK and 12 NAK


def _events(p: Launched, msg: str, **fields: Any) -> list[dict]:
    found = []
    for line in list(p.stderr_lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg") == msg and all(event.get(k) == v for k, v in fields.items()):
            found.append(event)
    return found


def _wait_event(p: Launched, msg: str, timeout: float = RELOAD_TIMEOUT, **fields: Any) -> dict:
    return wait_until(lambda: _events(p, msg, **fields), timeout=timeout)[0]


def _pids(p: Launched, generation: int) -> set[int]:
    return {e["pid"] for e in _events(p, "worker started", generation=generation)}


def _served_by(p: Launched, pids: set[int]) -> int:
    return sum(1 for e in _events(p, "close") if e["pid"] in pids)


def _client_ok(port: int) -> None:
    done = run_foo_client(f"-connect=127.0.0.1:{port}")
    assert (done.stdout, done.returncode) == ("..........OK!\n", 0), done.stdout + done.stderr


def _reload(p: Launched, generation: int) -> dict:
    """SIGHUP; the parent's "reloaded" line once every new worker is ready."""
    p.proc.send_signal(signal.SIGHUP)
    return _wait_event(p, "reloaded", generation=generation)


class ClientLoop:
    """Reference clients run back to back, in threads, until stopped."""

    def __init__(self, port: int, threads: int = 2) -> None:
        self.port = port
        self.runs: list[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.runs.append(
                run_foo_client(
                    f"-connect=127.0.0.1:{self.port}", f"-connections={CONNECTIONS}", timeout=60
                )
            )

    def stop(self) -> list[Any]:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        return self.runs


def test_reloads_under_load_refuse_no_client(foo_port: int, tmp_path: Path) -> None:
    """Six reloads while reference clients run without pause; one changes a flag.

    1. Start the proxy with an -env-file (only a comment in it) and JSON logs.
    2. Two threads run the reference client back to back (3 connections x
       100 REQs each run) until step 5; the first worker serves a client
       before the first reload.
    3. Reload with SIGHUP six times. Each time: the parent says "reloaded"
       once the new worker is ready, the new worker serves a client, the
       old one exits, and the parent is still the same process. Before the
       third reload -env-file gets GEVENTPROXY_MAX_CONNECTIONS=777, which
       the workers of that generation and the later ones serve with.
    4. Every generation's worker served clients; seven workers in all.
    5. Stop the clients: every run printed OK (none failed, none refused).
    6. The counts are exact over the whole run: REQ, ACK, NAK, connections;
       nothing refused, no accept error, nothing still open.
    7. SIGTERM: exit 0.
    """
    env_file = tmp_path / "geventproxy.env"
    env_file.write_text("# set on reload\n")
    with start_proxy(foo_port, f"-env-file={env_file}", "-log-format=json") as p:
        loop = ClientLoop(p.port)
        try:
            wait_until(lambda: _served_by(p, _pids(p, 1)), timeout=RELOAD_TIMEOUT)
            for generation in range(2, 8):
                if generation == 4:
                    env_file.write_text("GEVENTPROXY_MAX_CONNECTIONS=777\n")
                reloaded = _reload(p, generation)
                assert p.proc.poll() is None
                new = _pids(p, generation)
                serving = [e for e in _events(p, "serving") if e["pid"] in new]
                assert serving and serving[0]["max_connections"] == (
                    777 if generation >= 4 else 10000
                ), serving
                assert reloaded["retiring"] == 1
                wait_until(lambda: _served_by(p, new), timeout=RELOAD_TIMEOUT)  # noqa: B023
                _wait_event(p, "worker exited", generation=generation - 1)
        finally:
            runs = loop.stop()
        failed = [r.stdout + r.stderr for r in runs if r.returncode != 0]
        assert not failed, failed[:3]
        assert all(r.stdout.endswith("OK!\n") for r in runs)
        for generation in range(1, 8):
            assert _served_by(p, _pids(p, generation)), f"generation {generation} served nobody"
        assert worker_pids(p) == sorted(_pids(p, 7))

        connections = CONNECTIONS * len(runs)
        report = report_when(p, lambda r: r["connections_active"] == 0)
        assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (
            100 * connections,
            88 * connections,
            12 * connections,
        )
        assert report["msg_invalid"] == 0
        assert report["connections_total"] == connections
        assert sum(report["connections_closed"].values()) == connections
        assert report["connections_closed"]["client_closed"] == connections
        assert report["connections_refused"] == 0 and report["accept_errors"] == 0
        assert report["latency_count"] == 100 * connections
        assert p.stop() == 0
    print(f"6 reloads under load: {len(runs)} client runs, {connections} connections, all OK")


def test_statistics_carry_on_across_a_reload(foo_port: int) -> None:
    """Totals, rates, latency and open connections of the old workers stay in the sums.

    1. A client completes 100 REQs; another connects, is answered, stays open.
    2. SIGHUP: the new worker is ready; the old one drains the open connection.
    3. A report counts both generations: the 100 REQs and their rates and
       latency, and connections_active 2 once a third client is connected
       to the new worker.
    4. The open client leaves: the old worker exits; the totals stay, and
       so do the 10 s rate and the latency window.
    """
    with start_proxy(foo_port, "-log-format=json") as p:
        started = time.monotonic()
        _client_ok(p.port)
        with connect(p.port) as lingering:
            lingering.sendall(b"REQ 1 stay\n")
            recv_lines(lingering, 1)
            _reload(p, 2)
            assert p.proc.poll() is None
            assert not _events(p, "worker exited")  # still draining its connection
            with connect(p.port) as fresh:
                fresh.sendall(b"REQ 1 new\n")
                recv_lines(fresh, 1)
                both = p.report()
                assert both["connections_active"] == 2
                assert both["msg_req"] == 102 and both["connections_total"] == 3
        _wait_event(p, "worker exited", generation=1)
        after = report_when(p, lambda r: r["connections_active"] == 0)
        assert (after["msg_req"], after["connections_total"], after["latency_count"]) == (
            102,
            3,
            102,
        )
        # The retired worker's window still counts, as long as its REQs are under 10 s old
        # (a few seconds on any machine that is not overloaded).
        elapsed = time.monotonic() - started
        print(f"statistics across a reload: report {elapsed:.1f} s after the first REQ")
        if elapsed < 9.0:
            assert both["request_rate_10s"] == after["request_rate_10s"] == 10.2
            assert after["latency_p50_ms"] is not None
        else:
            assert 0.0 < after["request_rate_10s"] <= 10.2
        assert after["uptime_s"] >= both["uptime_s"]


def test_bad_configuration_on_reload_keeps_the_workers_serving(
    foo_port: int, tmp_path: Path
) -> None:
    """A reload that cannot be carried out changes nothing.

    1. Start with an -env-file holding a valid setting.
    2. The file gets a value that does not validate: SIGHUP logs "reload
       failed" naming the variable; no worker is started or stopped; a client
       is served.
    3. The file sets what only a restart can change (the state file, more
       workers than the shared statistics hold): "reload refused"; then the
       file is removed: "reload failed".
    4. The file is made valid again: SIGHUP reloads, the new worker serves
       with the new value.
    5. The counts cover every client; SIGTERM exits 0.
    """
    env_file = tmp_path / "env"
    env_file.write_text("GEVENTPROXY_MAX_CONNECTIONS=100\n")
    with start_proxy(foo_port, f"-env-file={env_file}", "-log-format=json") as p:
        first = worker_pids(p)
        env_file.write_text("GEVENTPROXY_MAX_CONNECTIONS=lots\n")
        p.proc.send_signal(signal.SIGHUP)
        failed = _wait_event(p, RELOAD_FAILED)
        assert "GEVENTPROXY_MAX_CONNECTIONS" in failed["error"] and "lots" in failed["error"]
        _client_ok(p.port)

        env_file.write_text(f"GEVENTPROXY_STATE_FILE={tmp_path / 'state.json'}\n")
        p.proc.send_signal(signal.SIGHUP)
        refused = _wait_event(p, RELOAD_REFUSED)
        assert "--state-file changed" in refused["error"]
        env_file.write_text("GEVENTPROXY_WORKERS=1000\n")  # more than the shared file holds
        p.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(_events(p, RELOAD_REFUSED)) == 2)
        assert "--workers above" in _events(p, RELOAD_REFUSED)[1]["error"]
        env_file.unlink()
        p.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(_events(p, "reload failed, the running workers carry on")) == 2)
        assert (
            "No such file" in _events(p, "reload failed, the running workers carry on")[1]["error"]
        )
        assert worker_pids(p) == first and len(_events(p, "worker started")) == 1
        _client_ok(p.port)

        env_file.write_text("GEVENTPROXY_MAX_CONNECTIONS=200\n")
        _reload(p, 2)
        new = _pids(p, 2)
        assert [e["max_connections"] for e in _events(p, "serving") if e["pid"] in new] == [200]
        _client_ok(p.port)
        report = p.report()
        assert (report["msg_req"], report["connections_total"]) == (300, 3)
        assert p.stop() == 0


def _package_copy(tmp_path: Path) -> Path:
    """A copy of the package to upgrade in place; the proxy runs from it."""
    root = tmp_path / "site"
    shutil.copytree(
        ROOT / "geventproxy",
        root / "geventproxy",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


def _set_version(root: Path, version: str) -> None:
    init = root / "geventproxy" / "__init__.py"
    lines = [
        f'__version__ = "{version}"' if line.startswith("__version__") else line
        for line in init.read_text().splitlines()
    ]
    init.write_text("\n".join(lines) + "\n")


def _from_copy(root: Path) -> dict[str, str]:
    # No bytecode caches: an edit within the same second must still be seen.
    return {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}


def test_upgrade_in_place_runs_the_new_code(foo_port: int, tmp_path: Path) -> None:
    """The package on disk changes between reloads: each reload runs what is there.

    1. Start the proxy from a copy of the package (version 0.0.1 there).
    2. The copy becomes 0.0.2; SIGHUP: the new worker runs 0.0.2 (its own
       "serving" line and the parent's "reloaded" line say so); a client is
       served; the parent's PID is unchanged.
    3. The copy is broken (runner.py raises on import); SIGHUP: the new
       worker dies at start, "reload failed", the 0.0.2 worker keeps serving.
    4. The copy is repaired as 0.0.3; SIGHUP: 0.0.3 serves.
    5. The counts cover every client across the three versions.
    """
    root = _package_copy(tmp_path)
    _set_version(root, "0.0.1")
    env = _from_copy(root)
    with start_proxy(foo_port, "-log-format=json", env=env, cwd=str(root)) as p:
        assert _wait_event(p, "listening")["version"] == "0.0.1"
        _client_ok(p.port)
        _set_version(root, "0.0.2")
        assert _reload(p, 2)["version"] == "0.0.2"
        assert [e["version"] for e in _events(p, "serving") if e["pid"] in _pids(p, 2)] == ["0.0.2"]
        _client_ok(p.port)

        runner = root / "geventproxy" / "runner.py"
        source = runner.read_text()
        runner.write_text(source + '\nraise RuntimeError("a broken upgrade")\n')
        p.proc.send_signal(signal.SIGHUP)
        failed = _wait_event(
            p, "reload failed: a new worker did not start, the running workers carry on"
        )
        assert failed["generation"] == 3 and failed["status"] == 1
        assert "a broken upgrade" in p.log()
        assert worker_pids(p) == sorted(_pids(p, 2))
        _client_ok(p.port)

        runner.write_text(source)
        _set_version(root, "0.0.3")
        assert _reload(p, 4)["version"] == "0.0.3"
        _client_ok(p.port)
        assert p.report()["msg_req"] == 400
        assert p.stop() == 0


def test_hung_worker_is_killed_and_replaced(foo_port: int) -> None:
    """A worker whose event loop stops is found by its heartbeat.

    1. Start with -worker-timeout=2; a client is served.
    2. SIGSTOP the worker (its loop stops as if stuck in a long computation).
    3. Within a few seconds the parent logs "worker hung", kills it, and
       starts another in its place, which serves the next client.
    4. What the stopped worker counted stays in the sums.
    """
    with start_proxy(foo_port, "-worker-timeout=2", "-log-format=json") as p:
        _client_ok(p.port)
        stuck = worker_pids(p)[0]
        p.proc.send_signal(signal.SIGUSR1)  # a report: the parent is not the one stuck
        p.reports.get(timeout=5)
        os.kill(stuck, signal.SIGSTOP)
        hung = _wait_event(p, "worker hung, killing it", timeout=15)
        assert hung["pid"] == stuck
        wait_until(lambda: len(_events(p, "worker ready")) == 2, timeout=RELOAD_TIMEOUT)
        assert _events(p, "worker died, restarting")[0]["pid"] == stuck
        assert stuck not in worker_pids(p)
        _client_ok(p.port)
        report = p.report()
        assert (report["msg_req"], report["connections_total"]) == (200, 2)
        assert p.stop() == 0


def test_worker_failing_at_every_start_stops_the_proxy(foo_port: int, tmp_path: Path) -> None:
    """No restart loop: three failed starts in a row, then exit status 3.

    1. Start the proxy from a copy of the package whose worker exits at once.
    2. The parent tries three times, a second apart, logging each failure,
       then stops: a final report on stdout and exit status 3.
    """
    root = _package_copy(tmp_path)
    worker = root / "geventproxy" / "worker.py"
    future = "from __future__ import annotations\n"
    worker.write_text(
        worker.read_text().replace(future, future + 'raise SystemExit("cannot start")\n')
    )
    p = start_proxy(
        foo_port,
        "-log-format=json",
        env=_from_copy(root),
        cwd=str(root),
        wait=False,
    )
    try:
        assert p.wait_exit(timeout=30) == 3
        tries = _events(p, "worker failed to start, trying again")
        assert [t["attempts"] for t in tries] == [1, 2]
        assert _events(p, "worker fails at every start, stopping")[0]["attempts"] == 3
        assert "cannot start" in p.log()
        assert "msg_total" in json.loads(p.stdout_lines[-1])
    finally:
        p.stop(signal.SIGKILL)


def test_the_admin_endpoint_answers_throughout_reloads(foo_port: int) -> None:
    """Load balancers and scrapers see no blip.

    1. Start with -admin; a thread asks /healthz without pause.
    2. Three reloads (each waits for the old worker to exit).
    3. Every answer was 200 ok: no refused connection, no 503 from a new worker
       that has not checked the upstream yet, none from an old one draining.
    4. /history is the same history (same instance), its sequence unbroken.
    """
    with start_proxy(foo_port, "-admin=localhost:0", "-log-format=json") as p:
        admin = admin_address(p)
        first = json.loads(http_request(admin, "/history")[2])
        answers: list[Any] = []
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                try:
                    status, _, body = http_request(admin, "/healthz")
                    answers.append((status, body))
                except OSError as exc:
                    answers.append(exc)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        try:
            for generation in (2, 3, 4):
                _reload(p, generation)
                _wait_event(p, "worker exited", generation=generation - 1)
        finally:
            stop.set()
            asker.join(10)
        bad = [a for a in answers if a != (200, b"ok\n")]
        assert len(answers) > 10 and not bad, (len(answers), bad[:5])
        samples_then = len(json.loads(http_request(admin, "/history")[2])["samples"])
        later = wait_until(  # one more sample, by a worker 0 of the last generation
            lambda: (
                len((h := json.loads(http_request(admin, "/history")[2]))["samples"]) > samples_then
                and h
            ),
            timeout=RELOAD_TIMEOUT,
        )
        assert later["instance"] == first["instance"]
        seqs = [s["seq"] for s in later["samples"]]
        assert seqs == list(range(0, len(seqs))), seqs  # from the start, unbroken
        print(f"/healthz through 3 reloads: {len(answers)} answers, all 200")
