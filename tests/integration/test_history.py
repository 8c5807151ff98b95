"""/history over HTTP: one sample a second, and with -workers it outlives worker 0."""

from __future__ import annotations

import json
import os
import signal

from geventproxy.testing.launch import run_foo_client, start_proxy
from tests.helpers import admin_address, http_request, wait_until


def _history(admin: tuple[str, int], after: int = -1) -> dict:
    status, headers, body = http_request(admin, f"/history?after={after}")
    assert (status, headers["content-type"]) == (200, "application/json")
    return json.loads(body)


def _worker_pid(p, slot: int, after: int = 0) -> int:
    """The pid of the worker started in ``slot`` (the last one, past ``after`` log lines),
    or 0 while its line has not come (a poll: the test's reader may be a line behind)."""
    for line in reversed(p.stderr_lines[after:]):
        if '"msg": "worker started"' in line:
            fields = json.loads(line)
            if fields["worker"] == slot:
                return fields["pid"]
    return 0


def test_history_outlives_a_restart_of_the_worker_that_keeps_it(foo_port: int) -> None:
    """1. -workers=2 with -admin: /history grows by one sample a second, its counts are /stats'.
    2. SIGKILL worker 0 (it serves -admin and keeps the history): the parent restarts it.
    3. /history is the same history (same instance), its sequence carries on, and the first
       new sample's interval starts at the last old one, so no REQ is lost from the charts.
    """
    with start_proxy(foo_port, "-workers=2", "-admin=localhost:0", "-log-format=json") as p:
        admin = admin_address(p)
        done = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=4")
        assert done.returncode == 0, done.stdout + done.stderr
        first = wait_until(
            lambda: (h := _history(admin))["samples"] and h["samples"][-1]["msg_req"] == 400 and h
        )
        assert first["capacity"] == 300 and first["interval_s"] == 1.0
        seqs = [s["seq"] for s in first["samples"]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert _history(admin, after=seqs[-1])["samples"] == []

        lines = len(p.stderr_lines)
        os.kill(wait_until(lambda: _worker_pid(p, 0)), signal.SIGKILL)
        p.wait_log("worker died, restarting")
        wait_until(lambda: _worker_pid(p, 0, lines), timeout=10)
        done = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=2")
        assert done.returncode == 0, done.stdout + done.stderr
        # The new worker 0 serves -admin again once it has started.
        after = wait_until(
            lambda: (h := _safe_history(admin)) and h["samples"][-1]["msg_req"] == 600 and h,
            timeout=15,
        )
        assert after["instance"] == first["instance"]
        samples = after["samples"]
        assert [s["seq"] for s in samples] == list(range(samples[0]["seq"], samples[-1]["seq"] + 1))
        # The history began before the traffic: its rates add up to every REQ, across the restart.
        total = sum(s["requests_per_s"] * s["dt"] for s in samples)
        assert round(total, 6) == 600


def _safe_history(admin: tuple[str, int]) -> dict | None:
    try:
        return _history(admin)
    except OSError:  # worker 0 still starting
        return None
