"""``geventproxy top`` in a real terminal (tmux), against a real proxy with traffic."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from geventproxy.testing.launch import child_env, start_proxy
from tests.helpers import SLACK, Traffic, closed_port, http_request, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"
)

_servers = itertools.count()


class Tmux:
    """A tmux server of our own (its own socket, no user configuration) with one pane."""

    def __init__(self, status_file: str) -> None:
        self.socket = f"geventproxy-test-{os.getpid()}-{next(_servers)}"
        self.env = child_env() | {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        # curses takes COLUMNS and LINES over the terminal's own size, and a test
        # runner may set them (pytest-xdist's workers have 80 x 24): the pane decides.
        for name in ("COLUMNS", "LINES"):
            self.env.pop(name, None)
        self.socket_path = ""
        self.status_file = status_file

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def start(self, command: str, width: int, height: int) -> None:
        # The pane's shell writes the exit status to a file: tmux may take seconds to
        # notice that its child has exited (seen under load: a zombie nobody reaps).
        command = f"{command}; echo $? > {self.status_file}"
        self.run("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command)
        self.run("set-option", "-t", "top", "remain-on-exit", "on")
        self.socket_path = self.run("display-message", "-p", "#{socket_path}").strip()

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def wait_screen(self, predicate, timeout: float = 10.0) -> str:
        """The pane's text once ``predicate`` holds for it."""
        last = [""]

        def check() -> bool:
            last[0] = self.screen()
            return predicate(last[0])

        try:
            wait_until(check, timeout=timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(f"the terminal never showed it; last screen:\n{last[0]}") from None
        return last[0]

    def exit_status(self) -> int | None:
        """The exit status of the pane's program once it has ended, else None."""
        try:
            with open(self.status_file) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return int(text) if text.endswith("\n") else None

    def kill(self) -> None:
        command = ["tmux", "-L", self.socket, "kill-server"]
        subprocess.run(command, env=self.env, capture_output=True, timeout=10)
        if self.socket_path:  # tmux leaves its socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


@pytest.fixture()
def tmux(tmp_path) -> Iterator[Tmux]:
    terminal = Tmux(str(tmp_path / "exit-status"))
    try:
        yield terminal
    finally:
        terminal.kill()


def _line(screen: str, start: str) -> str:
    return next((line for line in screen.splitlines() if line.startswith(start)), "")


def _totals(screen: str) -> list[int]:
    """The "total" row of the messages table: REQ, ACK, NAK, invalid."""
    return [int(n.replace(",", "")) for n in _line(screen, "  total").split()[1:]]


def _spark(line: str) -> str:
    """The sparkline of a row: the block characters after the current value."""
    match = re.search(r"[▁▂▃▄▅▆▇█ ]*[▁▂▃▄▅▆▇█] max", line)
    return match.group(0)[:-4].strip() if match else ""


@pytest.mark.parametrize("workers", [1, 2])
def test_top_in_tmux(foo_port: int, workers: int, tmux: Tmux) -> None:
    """1. `geventproxy top` starts first, on an admin address nothing listens on yet:
       it says it cannot reach the proxy.
    2. The proxy starts there (-workers=N) and the reference client runs through it:
       top picks it up by itself and shows the rates as sparklines.
    3. The traffic ends: top's message totals equal /stats.
    4. The terminal shrinks to 60 x 20: the view is redrawn to fit, sparklines shorter.
    5. The proxy stops: top says so, and keeps the last figures on screen.
    6. q: top exits with status 0.
    """
    admin_port = closed_port()
    admin = ("127.0.0.1", admin_port)
    tmux.start(f"{sys.executable} -m geventproxy top 127.0.0.1:{admin_port}", 110, 36)
    tmux.wait_screen(lambda s: "CANNOT REACH THE PROXY" in s and "Connection refused" in s)

    args = (f"-admin=127.0.0.1:{admin_port}", f"-workers={workers}", "-log-connections=false")
    with start_proxy(foo_port, *args) as p:
        with Traffic(p.port) as traffic:
            screen = tmux.wait_screen(
                lambda s: (
                    "CANNOT REACH" not in s
                    and len(_spark(_line(s, "requests/s")).replace("▁", "").strip()) >= 2
                )
            )
            assert "health: ok" in _line(screen, "geventproxy")
        assert not traffic.failures and traffic.requests > 0
        _, _, body = http_request(admin, "/stats")
        stats = json.loads(body)
        assert stats["msg_req"] == traffic.requests
        expected = [stats["msg_req"], stats["msg_ack"], stats["msg_nak"], stats["msg_invalid"]]
        screen = tmux.wait_screen(lambda s: _totals(s) == expected)
        wide = _line(screen, "requests/s").index(" max")  # where the sparkline ends
        assert _line(screen, "responses/s") and _line(screen, "latency p99 ms")
        assert f"total {stats['connections_total']:,}" in screen
        assert f"client_closed {stats['connections_closed']['client_closed']:,}" in screen

        tmux.run("resize-window", "-t", "top", "-x", "60", "-y", "20")
        screen = tmux.wait_screen(
            lambda s: (
                0 < _line(s, "requests/s").find(" max") < wide
                and s.rstrip().splitlines()[-1].startswith("q quits")
            )
        )
        assert all(len(line) <= 60 for line in screen.splitlines())
        assert _line(screen, "geventproxy")

    screen = tmux.wait_screen(lambda s: "CANNOT REACH THE PROXY" in s)
    assert _line(screen, "requests/s"), "the last figures are gone"
    tmux.run("send-keys", "-t", "top", "q")
    wait_until(lambda: tmux.exit_status() is not None, timeout=SLACK)
    assert tmux.exit_status() == 0
