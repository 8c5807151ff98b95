"""scripts/deploy/geventproxy.supervisord.conf under a real supervisord.

The program section is used as shipped except for what must differ in a
test, changed by plain string replacement (each original must be present,
so an edit of the deploy file cannot silently leave the test behind):
the interpreter, the addresses (loopback, free ports), the state, log and
env file paths (a temporary directory, with a copy of the shipped env file
whose upstream is the test's), and ``user=`` (no such user here).
supervisord itself gets a minimal configuration around it, with its control
socket a unix socket in the same temporary directory.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import supervisor  # noqa: F401 - the test needs supervisord; without it, fail, do not skip

from geventproxy.config import load_with_file
from geventproxy.testing.launch import ROOT, child_env, run_foo_client, start_foo_server
from tests.helpers import wait_until

DEPLOY = ROOT / "scripts" / "deploy" / "geventproxy.supervisord.conf"
ENV_FILE = ROOT / "scripts" / "deploy" / "geventproxy.env"
SHIPPED_ENV_FILE = "/etc/geventproxy/geventproxy.env"
CTL_TIMEOUT = 20.0


def _program_section() -> str:
    text = DEPLOY.read_text()
    start = text.index("[program:geventproxy]")
    return text[start:]


def _setting(section: str, key: str) -> str:
    match = re.search(rf"^{key}=(.*)$", section, re.M)
    assert match, f"{key}= missing in {DEPLOY}"
    return match.group(1).strip()


def _env_file(tmp: Path, upstream_port: int, *extra: str) -> Path:
    """The shipped env file, in ``tmp``, with the test's upstream and ``extra`` lines."""
    old = "GEVENTPROXY_FORWARD=localhost:8001\n"
    text = ENV_FILE.read_text()
    assert old in text, f"{old!r} is no longer in {ENV_FILE}: update this test"
    path = tmp / "geventproxy.env"
    path.write_text(
        text.replace(old, f"GEVENTPROXY_FORWARD=127.0.0.1:{upstream_port}\n") + "".join(extra)
    )
    return path


def _adapted(section: str, tmp: Path) -> str:
    replacements = {
        "/opt/geventproxy/venv/bin/python": sys.executable,
        "-listen=:8002": "-listen=127.0.0.1:0",
        SHIPPED_ENV_FILE: str(tmp / "geventproxy.env"),
        # Not 127.0.0.1:0: the configuration refuses it as equal to -listen.
        "-admin=127.0.0.1:9102": "-admin=localhost:0",
        "/var/lib/geventproxy": str(tmp),
        "/var/log/geventproxy": str(tmp),
        "user=geventproxy\n": "",
    }
    for old, new in replacements.items():
        assert old in section, f"{old!r} is no longer in {DEPLOY}: update this test"
        section = section.replace(old, new)
    return section


def _supervisord_conf(tmp: Path, program: str) -> str:
    return f"""\
[unix_http_server]
file={tmp}/supervisor.sock
chmod=0700

[supervisord]
logfile={tmp}/supervisord.log
pidfile={tmp}/supervisord.pid
childlogdir={tmp}
nodaemon=true
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp}/supervisor.sock

{program}
"""


def _ctl(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
    )


@pytest.fixture()
def tmp() -> Iterator[Path]:
    # Short: a unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="gp-sv-") as name:
        yield Path(name)


def test_deploy_file_is_consistent() -> None:
    section = _program_section()
    command = shlex.split(_setting(section, "command"))
    assert command[1:3] == ["-m", "geventproxy"]
    # Every flag on the command line is valid, and so is the env file it names.
    config, _ = load_with_file(command[3:], {}, {SHIPPED_ENV_FILE: ENV_FILE.read_text()}.get)
    assert config.env_file == SHIPPED_ENV_FILE
    assert "-forward" not in _setting(section, "command")  # the env file's, changed by reload
    assert config.admin is not None and config.state_file is not None
    assert _setting(section, "stopsignal") == "TERM"
    assert int(_setting(section, "stopwaitsecs")) >= config.drain_timeout + 5
    assert _setting(section, "exitcodes") == "0"
    assert _setting(section, "autorestart") == "true"
    assert _setting(section, "redirect_stderr") == "false"
    assert _setting(section, "stdout_logfile") != _setting(section, "stderr_logfile")
    assert "minfds=" in DEPLOY.read_text()


def test_under_supervisord(tmp: Path) -> None:
    section = _program_section()
    stopwaitsecs = int(_setting(section, "stopwaitsecs"))
    stats_log = Path(_setting(section, "stdout_logfile").replace("/var/log/geventproxy", str(tmp)))
    proxy_log = Path(_setting(section, "stderr_logfile").replace("/var/log/geventproxy", str(tmp)))
    with start_foo_server() as upstream:
        conf = tmp / "supervisord.conf"
        _env_file(tmp, upstream.port)
        conf.write_text(_supervisord_conf(tmp, _adapted(section, tmp)))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy_pid = None
        try:
            line = wait_until(
                lambda: (
                    proxy_log.exists()
                    and re.search(r" listening address=127\.0\.0\.1:(\d+)", proxy_log.read_text())
                ),
                timeout=15,
            )
            port = int(line.group(1))
            status = wait_until(
                lambda: "RUNNING" in (r := _ctl(conf, "status", "geventproxy")).stdout and r,
                timeout=15,
                interval=0.2,
            )
            proxy_pid = int(re.search(r"pid (\d+)", status.stdout).group(1))

            done = run_foo_client(f"-connect=127.0.0.1:{port}")
            assert (done.stdout, done.returncode) == ("..........OK!\n", 0), done.stderr

            ctl = _ctl(conf, "signal", "USR1", "geventproxy")
            assert ctl.returncode == 0, ctl.stdout + ctl.stderr
            report = json.loads(
                wait_until(lambda: stats_log.exists() and stats_log.read_text(), timeout=5)
            )
            assert (report["msg_req"], report["msg_ack"], report["msg_nak"]) == (100, 88, 12)
            assert report["msg_total"] == 200

            # A reload with a changed setting: same PID, new worker, nothing lost.
            _env_file(tmp, upstream.port, "GEVENTPROXY_MAX_CONNECTIONS=777\n")
            ctl = _ctl(conf, "signal", "HUP", "geventproxy")
            assert ctl.returncode == 0, ctl.stdout + ctl.stderr
            wait_until(lambda: " reloaded generation=2 " in proxy_log.read_text(), timeout=20)
            assert re.search(r" serving .*max_connections=777", proxy_log.read_text())
            status = _ctl(conf, "status", "geventproxy")
            assert "RUNNING" in status.stdout and f"pid {proxy_pid}," in status.stdout, status
            done = run_foo_client(f"-connect=127.0.0.1:{port}")
            assert (done.stdout, done.returncode) == ("..........OK!\n", 0), done.stderr

            started = time.monotonic()
            ctl = _ctl(conf, "stop", "geventproxy")
            took = time.monotonic() - started
            assert ctl.returncode == 0 and "stopped" in ctl.stdout, ctl.stdout + ctl.stderr
            assert took < stopwaitsecs, took

            daemon_log = (tmp / "supervisord.log").read_text()
            assert "stopped: geventproxy (exit status 0)" in daemon_log, daemon_log
            assert "SIGKILL" not in daemon_log and "killed" not in daemon_log, daemon_log
            # The final report after the drain, and the state file written on the way out.
            lines = stats_log.read_text().splitlines()
            assert len(lines) == 2 and json.loads(lines[-1])["msg_req"] == 200
            assert (
                json.loads((tmp / "state.json").read_text())["totals"]["msg_req_client_to_upstream"]
                == 200
            )
        finally:
            _stop_supervisord(conf, daemon, proxy_pid)


def _stop_supervisord(conf: Path, daemon: subprocess.Popen, proxy_pid: int | None) -> None:
    """Always: ask supervisord to shut down, then make sure it and the proxy are gone."""
    import os
    import signal

    try:
        _ctl(conf, "shutdown")
    except subprocess.TimeoutExpired:
        pass
    try:
        daemon.wait(timeout=CTL_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(timeout=5)
    if proxy_pid is not None:
        try:
            os.kill(proxy_pid, signal.SIGKILL)  # only if supervisord left it behind
        except ProcessLookupError:
            pass
