"""--state-file: totals carry on across a restart; a bad file never stops the proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geventproxy.testing.launch import child_env, run_foo_client, start_foo_server, start_proxy
from tests.helpers import wait_until

RATES = ("request_rate_1s", "request_rate_10s", "response_rate_1s", "response_rate_10s")


def _traffic(port: int) -> None:
    done = run_foo_client(f"-connect=127.0.0.1:{port}")
    assert (done.stdout, done.returncode) == ("..........OK!\n", 0), done.stderr


def _totals(path: Path) -> dict:
    saved = json.loads(path.read_text())
    assert saved["format"] == "geventproxy-state" and saved["version"] == 1
    return saved["totals"]


def _state_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "state file" in line]


def test_totals_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    flag = f"-state-file={path}"
    with start_foo_server() as upstream:
        with start_proxy(upstream.port, flag) as first:
            _traffic(first.port)
            assert first.stop() == 0
        totals = _totals(path)
        assert totals["msg_req_client_to_upstream"] == 100
        assert totals["msg_ack_upstream_to_client"] == 88
        assert totals["msg_nak_upstream_to_client"] == 12
        assert totals["connections_total"] == 1
        assert "connections_active" not in totals
        assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind

        with start_proxy(upstream.port, flag) as second:
            second.wait_log("state file loaded")
            report = second.report()
            assert (report["msg_total"], report["msg_req"], report["msg_ack"]) == (200, 100, 88)
            assert report["msg_nak"] == 12
            assert report["connections_total"] == 1
            assert report["connections_closed"]["client_closed"] == 1
            assert report["latency_count"] == 100
            assert report["connections_active"] == 0
            assert all(report[rate] == 0.0 for rate in RATES), report
            assert report["uptime_s"] < 10  # this process's uptime, not the first one's
            _traffic(second.port)
            report = second.report()
            assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (200, 176, 24)
            assert report["request_rate_10s"] == 10.0  # only this process's 100 REQs
            assert second.stop() == 0
        assert _totals(path)["msg_req_client_to_upstream"] == 200


def test_written_periodically_while_running(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    with (
        start_foo_server() as upstream,
        start_proxy(upstream.port, f"-state-file={path}", "-state-interval=0.2") as p,
    ):
        _traffic(p.port)
        wait_until(
            lambda: path.exists() and _totals(path)["msg_req_client_to_upstream"] == 100,
            timeout=3,
        )
        assert p.proc.poll() is None


def test_corrupt_file_is_logged_once_kept_aside_and_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    corrupt = b'{"format": "geventproxy-state", "version": 1, "totals": {"msg_req_cl'
    path.write_bytes(corrupt)
    with start_foo_server() as upstream, start_proxy(upstream.port, f"-state-file={path}") as p:
        _traffic(p.port)
        report = p.report()
        assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (100, 88, 12)
        lines = _state_lines(p.log())
        assert len(lines) == 1 and "state file corrupt, ignored" in lines[0], lines
        assert f"kept_as={path}.corrupt" in lines[0]
        assert p.stop() == 0
    assert _totals(path)["msg_req_client_to_upstream"] == 100  # replaced by a good one
    assert (tmp_path / "state.json.corrupt").read_bytes() == corrupt  # and the bad one kept


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_a_path_that_can_never_be_written_is_refused_at_start(tmp_path: Path, where: str) -> None:
    path = tmp_path / "no-such-dir" / "state.json" if where == "missing-dir" else tmp_path
    done = subprocess.run(
        [sys.executable, "-m", "geventproxy", "-listen=127.0.0.1:0", f"-state-file={path}"],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2 and done.stdout == "", done
    (line,) = done.stderr.splitlines()
    assert line.startswith("geventproxy: error: -state-file: "), line
    assert ("does not exist" if where == "missing-dir" else "is a directory") in line


def test_a_directory_gone_while_running_is_logged_and_not_fatal(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "state.json"
    with start_foo_server() as upstream, start_proxy(upstream.port, f"-state-file={path}") as p:
        _traffic(p.port)
        directory.rmdir()
        assert p.stop() == 0
        p.wait_log("cannot write the state file")
        lines = _state_lines(p.log())
        assert len(lines) == 2, lines  # "not found" at start, "cannot write" at exit
        assert "Traceback" not in p.log()
        assert "msg_total" in json.loads(p.stdout_lines[-1])  # the final report still came
