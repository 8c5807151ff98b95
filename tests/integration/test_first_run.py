"""What a first-time operator meets: start-up errors, warnings, log lines, process names."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventproxy.testing.launch import child_env, run_foo_client, start_proxy
from tests.helpers import children, connect, recv_lines, wait_until

# An address of TEST-NET-1 (RFC 5737): on no host.
NOT_HERE = "192.0.2.1"


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The proxy's command line, run until it exits (these runs never get to serve)."""
    return subprocess.run(
        [sys.executable, "-m", "geventproxy", "-forward=127.0.0.1:1", *args],
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("workers", ["-workers=1", "-workers=2"])
@pytest.mark.parametrize("case", ["listen-in-use", "listen-not-here", "admin-in-use"])
def test_an_address_that_cannot_be_bound_exits_2_with_one_line(
    case: str, workers: str, tmp_path: Path
) -> None:
    """Whatever else is configured (a state file too), one line naming the flag, exit 2."""
    with _taken_port() as taken:
        listen, admin = "127.0.0.1:0", "localhost:0"
        if case == "listen-in-use":
            listen = f"127.0.0.1:{taken}"
        elif case == "listen-not-here":
            listen = f"{NOT_HERE}:8002"
        else:
            admin = f"127.0.0.1:{taken}"
        done = _start(
            f"-listen={listen}", f"-admin={admin}", workers, f"-state-file={tmp_path}/s.json"
        )
    assert done.returncode == 2 and done.stdout == "", done
    (line,) = done.stderr.splitlines()
    flag = "-admin" if case == "admin-in-use" else "-listen"
    assert f" error cannot listen on the {flag} address " in line, line
    reason = "Cannot assign requested address" if case == "listen-not-here" else "in use"
    assert reason in line, line
    assert not (tmp_path / "s.json").exists()


def test_an_unknown_geventproxy_variable_is_warned_about() -> None:
    with _taken_port() as taken:
        done = _start(
            f"-listen=127.0.0.1:{taken}",
            env={"GEVENTPROXY_IDLE_TIMOUT": "5", "GEVENTPROXY_FORWARD": "127.0.0.1:1"},
        )
    warning, error = done.stderr.splitlines()
    assert "warning unknown environment variable, ignored" in warning
    assert "variable=GEVENTPROXY_IDLE_TIMOUT did_you_mean=GEVENTPROXY_IDLE_TIMEOUT" in warning
    assert "GEVENTPROXY_FORWARD" not in warning and "cannot listen" in error


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_workers_name_themselves_in_ps_and_in_every_log_line(foo_port: int) -> None:
    """1. -workers=2: `ps -o comm` shows geventproxy for the parent, geventproxy wN each worker.
    2. Each worker's lines carry worker=N: serving, the connections, draining, exit.
    3. No line anywhere says worker=None."""
    with start_proxy(foo_port, "-workers=2") as p:
        assert _comm(p.pid) == "geventproxy"
        # Each worker names itself as it starts, a moment after the fork.
        wait_until(
            lambda: (
                sorted(_comm(pid) for pid in children(p.pid))
                == ["geventproxy w0", "geventproxy w1"]
            ),
            timeout=15,
        )
        done = run_foo_client(f"-connect=127.0.0.1:{p.port}", "-connections=6")
        assert done.returncode == 0, done.stdout + done.stderr
        assert p.stop() == 0
    log = p.log()
    for slot in (0, 1):
        for event in ("serving", "draining", "exit"):
            assert any(f" info {event} worker={slot}" in line for line in p.stderr_lines), (
                f"no {event} line of worker {slot}:\n{log}"
            )
    closes = [line for line in p.stderr_lines if " info close " in line]
    assert len(closes) == 6 and all(" close worker=" in line for line in closes), log
    assert "None" not in log


def test_the_default_parent_and_worker_name_themselves_and_log_ipv4_peers_as_ipv4(
    foo_port: int,
) -> None:
    """1. The default, one worker: `ps -o comm` shows geventproxy and geventproxy w0;
       the worker's lines carry worker=0, the parent's no worker field.
    2. An IPv4 client of an IPv6 socket (as on the default dual-stack listener) is
       logged as 127.0.0.1:PORT, not [::ffff:127.0.0.1]:PORT."""
    with start_proxy(foo_port, "-log-format=json", "-listen=[::ffff:127.0.0.1]:0") as p:
        assert _comm(p.pid) == "geventproxy"
        (worker,) = children(p.pid)
        wait_until(lambda: _comm(worker) == "geventproxy w0")
        client = connect(p.port)
        with client:
            client.sendall(b"REQ 1 hello\n")
            recv_lines(client, 1)
            local_port = client.getsockname()[1]
        p.wait_log('"msg": "close"')
        p.proc.send_signal(signal.SIGTERM)
        assert p.wait_exit() == 0
    records = [json.loads(line) for line in p.stderr_lines]
    (opened,) = [r for r in records if r["msg"] == "open"]
    assert opened["peer"] == f"127.0.0.1:{local_port}"
    assert all(r.get("worker") == 0 for r in records if r["pid"] == worker), p.log()
    assert all("worker" not in r for r in records if r["pid"] == p.pid), p.log()
