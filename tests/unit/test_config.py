"""Flags in the Go and GNU styles, GEVENTPROXY_* variables, and the CLI's exits."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from geventproxy import __version__, accel
from geventproxy.config import (
    _FLAGS,
    ENV_PREFIX,
    Address,
    Config,
    ConfigError,
    load,
    load_with_file,
    parse_env_file,
    unknown_environment,
)
from geventproxy.stats import Stats, snapshot
from geventproxy.testing.launch import ROOT, child_env

# flag -> (text, the Config value it gives). Every flag must be here.
SAMPLES: dict[str, tuple[str, Any]] = {
    "listen": ("127.0.0.1:9000", Address("127.0.0.1", 9000)),
    "forward": ("db1.example:8001", Address("db1.example", 8001)),
    "max-connections": ("5", 5),
    "connect-timeout": ("500ms", 0.5),
    "idle-timeout": ("2m", 120.0),
    "fin-timeout": ("3", 3.0),
    "client-fin-timeout": ("2s", 2.0),
    "drain-timeout": ("1.5s", 1.5),
    "max-line": ("1024", 1024),
    "strict": ("yes", True),
    "log-level": ("DEBUG", "debug"),
    "log-format": ("json", "json"),
    "log-connections": ("off", False),
    "workers": ("4", 4),
    "admin": ("[::1]:9102", Address("::1", 9102)),
    "state-file": ("/var/lib/geventproxy/state.json", "/var/lib/geventproxy/state.json"),
    "state-interval": ("10s", 10.0),
    "health-interval": ("250ms", 0.25),
    "report-interval": ("30s", 30.0),
    "worker-timeout": ("2s", 2.0),
    "env-file": ("/etc/geventproxy/env", "/etc/geventproxy/env"),
}
REQUIRED_FIELDS = (
    "msg_total",
    "msg_req",
    "msg_ack",
    "msg_nak",
    "request_rate_1s",
    "request_rate_10s",
    "response_rate_1s",
    "response_rate_10s",
)


def _field(flag: str) -> str:
    return flag.replace("-", "_")


def _env(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geventproxy", *args],
        cwd=ROOT,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_samples_cover_every_flag() -> None:
    assert set(SAMPLES) == {name for name, *_ in _FLAGS}


def test_defaults() -> None:
    assert load([], {}) == Config()
    assert load([], None).admin is None and load([], None).state_file is None


@pytest.mark.parametrize("flag", sorted(SAMPLES))
@pytest.mark.parametrize("style", ["-{f}={v}", "-{f} {v}", "--{f}={v}", "--{f} {v}"])
def test_go_and_gnu_styles(flag: str, style: str) -> None:
    text, value = SAMPLES[flag]
    argv = style.format(f=flag, v=text).split(" ", 1)
    assert getattr(load(argv, {}), _field(flag)) == value


@pytest.mark.parametrize("flag", sorted(SAMPLES))
def test_every_flag_has_an_environment_variable(flag: str) -> None:
    text, value = SAMPLES[flag]
    assert getattr(load([], {_env(flag): text}), _field(flag)) == value


def test_command_line_wins_over_environment() -> None:
    env = {"GEVENTPROXY_FORWARD": "envhost:1", "GEVENTPROXY_IDLE_TIMEOUT": "300"}
    config = load(["--forward=cli:2"], env)
    assert config.forward == Address("cli", 2)
    assert config.idle_timeout == 300.0  # not on the command line: the environment's
    assert load([], {"OTHER_FORWARD": "x:1"}).forward == Config().forward


def test_booleans_alone_or_with_a_value() -> None:
    assert load(["-strict"], {}).strict is True
    assert load(["--strict", "--listen=:1"], {}).strict is True
    assert load(["-strict=false"], {}).strict is False
    assert load(["-strict=false"], {"GEVENTPROXY_STRICT": "true"}).strict is False
    assert load(["-log-connections=0"], {}).log_connections is False


def test_addresses() -> None:
    assert load(["-listen=:8002"], {}).listen == Address("", 8002)
    assert load(["-listen=[::]:8002"], {}).listen == Address("::", 8002)
    assert load(["-admin=off"], {}).admin is None
    assert str(Address("::1", 80)) == "[::1]:80"


def test_command_line_can_turn_the_admin_endpoint_off() -> None:
    assert load(["-admin=off"], {"GEVENTPROXY_ADMIN": "127.0.0.1:9"}).admin is None


def test_admin_and_listen_may_both_take_a_free_port() -> None:
    config = load(["-listen=127.0.0.1:0", "-admin=127.0.0.1:0"], {})
    assert config.admin == config.listen == Address("127.0.0.1", 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["-listen=bad"],
        ["-listen=:70000"],
        ["-listen=::1:80"],
        ["-forward=:8001"],  # the upstream needs a host
        ["-forward=localhost:0"],
        ["-max-connections=-1"],
        ["-max-connections=many"],
        ["-connect-timeout=-1"],
        ["-idle-timeout=soon"],
        ["-drain-timeout=inf"],
        ["-max-line=1"],
        ["-strict=maybe"],
        ["-log-level=loud"],
        ["-log-format=xml"],
        ["-workers=0"],
        ["-admin=:8002"],  # the same as the default -listen
        ["-report-interval=10ms"],  # a line every 10 ms is a flood, not a report
        ["-report-interval=-1s"],
        ["-no-such-flag"],
        ["-listen"],
        ["stray"],
    ],
)
def test_bad_values_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        load(argv, {})


def test_env_file_syntax() -> None:
    text = (
        "# comment\n"
        "; also a comment\n"
        "\n"
        "GEVENTPROXY_FORWARD = db2:8001\n"
        "GEVENTPROXY_IDLE_TIMEOUT='300'\n"
        'GEVENTPROXY_LOG_LEVEL="debug"\n'
        "GEVENTPROXY_ADMIN=\n"
    )
    assert parse_env_file(text, "f") == {
        "GEVENTPROXY_FORWARD": "db2:8001",
        "GEVENTPROXY_IDLE_TIMEOUT": "300",
        "GEVENTPROXY_LOG_LEVEL": "debug",
        "GEVENTPROXY_ADMIN": "",
    }


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("GEVENTPROXY_FORWARD db2:8001\n", "f, line 1: not NAME=VALUE"),
        ("\n=3\n", "f, line 2: not NAME=VALUE"),
        ("GEVENTPROXY_IDLE_TIMOUT=5\n", "GEVENTPROXY_IDLE_TIMOUT is not"),
        ("PATH=/bin\n", "PATH is not"),
        ("GEVENTPROXY_ENV_FILE=/etc/other\n", "cannot name another"),
    ],
)
def test_env_file_errors_say_where(text: str, mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        parse_env_file(text, "f")


def test_env_file_wins_over_the_environment_and_loses_to_the_command_line() -> None:
    files = {"/etc/gp.env": "GEVENTPROXY_IDLE_TIMEOUT=7\nGEVENTPROXY_MAX_CONNECTIONS=9\n"}
    env = {"GEVENTPROXY_ENV_FILE": "/etc/gp.env", "GEVENTPROXY_IDLE_TIMEOUT": "300", "HOME": "/"}
    config, worker_env = load_with_file(["-max-connections=5"], env, files.__getitem__)
    assert (config.idle_timeout, config.max_connections) == (7.0, 5)
    # A worker given that environment and the same flags gets the same Config, file unread.
    assert load(["-max-connections=5"], worker_env) == config
    assert worker_env["HOME"] == "/"


def test_env_file_problems_are_config_errors() -> None:
    def missing(path: str) -> str:
        raise FileNotFoundError(2, "No such file or directory", path)

    with pytest.raises(ConfigError, match="/nope: No such file"):
        load_with_file(["-env-file=/nope"], {}, missing)
    bad = {"/f": "GEVENTPROXY_MAX_CONNECTIONS=lots\n"}
    with pytest.raises(ConfigError, match="GEVENTPROXY_MAX_CONNECTIONS"):
        load_with_file(["-env-file=/f"], {}, bad.__getitem__)
    assert load_with_file([], {}, missing) == (Config(), {})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GEVENTPROXY_MAX_CONNECTIONS"):
        load([], {"GEVENTPROXY_MAX_CONNECTIONS": "lots"})


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["-listen=bad"], {}, "bad"),
        (["--forward", "nohost"], {}, "nohost"),
        (["-nope=1"], {}, "-nope"),
        ([], {"GEVENTPROXY_MAX_CONNECTIONS": "lots"}, "GEVENTPROXY_MAX_CONNECTIONS"),
    ],
)
def test_cli_bad_value_exits_2_with_one_line(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    done = _cli(*args, env=env)
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("geventproxy: error: ") and mentions in lines[0]


def test_cli_help_names_every_flag_signal_and_statistic() -> None:
    done = _cli("--help")
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    for name, *_ in _FLAGS:
        assert f"-{name}" in text and f"--{name}" in text, name
    for signal_name in ("USR1", "TERM", "INT", "HUP"):
        assert signal_name in text
    for field in REQUIRED_FIELDS:
        assert field in text, field
    # Every field of the report, the per-direction ones by their pattern.
    for field in snapshot([Stats().block], 0):
        if not re.fullmatch(r"msg_\w+_(client_to_upstream|upstream_to_client)", field):
            assert field in text, field
    assert "msg_<type>_<direction>" in text
    assert ENV_PREFIX in text
    assert _cli("-h").stdout == text
    go_style = _cli("-help")  # as the Go-style binaries of the task accept it
    assert (go_style.returncode, go_style.stdout, go_style.stderr) == (0, text, "")


def test_unknown_environment_variables_are_named_with_the_likely_one() -> None:
    env = {
        "GEVENTPROXY_IDLE_TIMOUT": "5",
        "GEVENTPROXY_FORWARD": "db:1",
        "GEVENTPROXY_COLOUR": "blue",
        "PATH": "/bin",
    }
    assert unknown_environment(env) == [
        ("GEVENTPROXY_COLOUR", None),
        ("GEVENTPROXY_IDLE_TIMOUT", "GEVENTPROXY_IDLE_TIMEOUT"),
    ]
    assert unknown_environment({_env(flag): "x" for flag in SAMPLES}) == []


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_cli_version(flag: str) -> None:
    """The version line also says which counting implementation runs."""
    done = _cli(flag)
    expected = f"geventproxy {__version__} (counting: {accel.DESCRIPTION})\n"
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")


def test_the_pure_switch_is_a_known_variable() -> None:
    assert accel.PURE_ENV == ENV_PREFIX + "PURE"
    assert unknown_environment({accel.PURE_ENV: "1"}) == []
    assert unknown_environment({ENV_PREFIX + "PUER": "1"}) == [
        (ENV_PREFIX + "PUER", accel.PURE_ENV)
    ]
