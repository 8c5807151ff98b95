"""scripts/deploy/geventproxy.service: systemd accepts it, and its settings fit the proxy.

``systemd-analyze verify`` works offline (no systemd as PID 1 needed), but
it only warns, with exit status 0, about a value it cannot parse: the test
therefore fails on any output, and first checks on a broken copy that
verify does report problems here. ExecStart must name an executable that
exists, so the copy under test uses this interpreter.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geventproxy.config import _FLAGS, ENV_PREFIX, Address, load_with_file
from geventproxy.testing.launch import ROOT

UNIT = ROOT / "scripts" / "deploy" / "geventproxy.service"
ENV_FILE = ROOT / "scripts" / "deploy" / "geventproxy.env"
SHIPPED_ENV_FILE = "/etc/geventproxy/geventproxy.env"
SHIPPED_PYTHON = "/opt/geventproxy/venv/bin/python"


def _entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as lists of (key, value); keys like Environment= repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, raw
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _one(entries: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in entries if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|min)?", text)
    assert match, text
    scale = {"ms": 0.001, "s": 1, "m": 60, "min": 60, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def test_unit_settings() -> None:
    text = UNIT.read_text()
    sections = _entries(text)
    assert {"Unit", "Service", "Install"} <= sections.keys()
    service = sections["Service"]
    assert _one(service, "Type") == "exec"
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "LimitNOFILE") == "65536"
    assert _one(service, "KillSignal") == "SIGTERM"
    assert _one(sections["Install"], "WantedBy") == "multi-user.target"
    command = shlex.split(_one(service, "ExecStart"))
    assert command[0] == SHIPPED_PYTHON and command[1:3] == ["-m", "geventproxy"]

    env = dict(value.split("=", 1) for key, value in service if key == "Environment")
    flags = {ENV_PREFIX + name.upper().replace("-", "_") for name, *_ in _FLAGS}
    ours = {name for name in env if name.startswith(ENV_PREFIX)}
    assert ours and ours <= flags, ours - flags
    # The environment the unit sets, with the env file it names, is a valid configuration.
    assert env[ENV_PREFIX + "ENV_FILE"] == SHIPPED_ENV_FILE
    config, _ = load_with_file(command[3:], env, {SHIPPED_ENV_FILE: ENV_FILE.read_text()}.get)
    assert config.forward == Address("localhost", 8001)  # from the env file
    assert _one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert "systemctl reload geventproxy" in text
    assert _one(service, "TimeoutStopSec") and (
        _seconds(_one(service, "TimeoutStopSec")) >= config.drain_timeout + 5
    )
    assert config.state_file is not None and config.state_file.startswith(
        "/var/lib/" + _one(service, "StateDirectory") + "/"
    )
    assert "systemctl kill -s USR1" in text and "journal" in text


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")  # test_unit_settings still runs
    text = UNIT.read_text()
    assert SHIPPED_PYTHON in text

    broken = tmp_path / "broken" / "geventproxy.service"
    broken.parent.mkdir()
    broken.write_text(
        text.replace(SHIPPED_PYTHON, sys.executable).replace("KillMode=mixed", "KillMode=nonsense")
    )
    check = _verify(broken)
    assert "nonsense" in check.stdout + check.stderr, "verify does not report bad values here"

    unit = tmp_path / "geventproxy.service"
    unit.write_text(text.replace(SHIPPED_PYTHON, sys.executable))
    result = _verify(unit)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
