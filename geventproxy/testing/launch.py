"""Start the reference server and the proxy as real subprocesses.

Shared by the demo, the benchmark and the integration tests, so that every
one of them runs the programs exactly as a user would: through their command
lines, on loopback, with their own signal handling. Plain threads read the
children's output, so this module works with or without gevent.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["Launched", "start_foo_server", "start_proxy", "run_foo_client", "child_env"]

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a child may take to bind and say so.
STARTUP_TIMEOUT = 15.0
_SERVER_READY = re.compile(r"^listening on \S*:(\d+)")
_PROXY_READY = re.compile(r"\blistening\b.*?address[=\"': ]+\S*:(\d+)")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    if (ROOT / "pyproject.toml").exists():  # running from a checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Launched:
    """A child process, its port, its stderr lines, and the JSON lines of its stdout.

    As a context manager it is stopped (``stop()``) when the block ends.
    """

    def __init__(self, proc: subprocess.Popen[str], ready: re.Pattern[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.port = 0
        self._ready: queue.Queue[int] = queue.Queue()
        self._pattern = ready
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True)]
        if proc.stdout is not None:
            self._readers.append(threading.Thread(target=self._read_stdout, daemon=True))
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            match = self._pattern.search(line)
            if match and not self.port:
                self._ready.put(int(match.group(1)))
        self._ready.put(0)  # EOF: exited, perhaps before binding

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            try:
                self.reports.put(json.loads(line))
            except ValueError:
                self.reports.put({"unparsable": line})

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> int:
        try:
            self.port = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.port = 0
        if not self.port:
            self.stop()
            raise RuntimeError(f"{self.proc.args} did not start:\n{self.log()}")
        return self.port

    def report(self, timeout: float = 5.0) -> dict[str, Any]:
        """Send SIGUSR1 and return the JSON object it prints."""
        while not self.reports.empty():
            self.reports.get_nowait()
        self.proc.send_signal(signal.SIGUSR1)
        return self.reports.get(timeout=timeout)

    def stdout_reports(self) -> list[dict[str, Any]]:
        """Every stdout line so far as a report; fails on any that is not one whole JSON object."""
        reports = []
        for line in self.stdout_lines:
            if not line.endswith("\n"):
                raise AssertionError(f"partial line on stdout: {line!r}")
            report = json.loads(line)
            if not (isinstance(report, dict) and "msg_total" in report):
                raise AssertionError(f"not a statistics line: {line!r}")
            reports.append(report)
        return reports

    def log(self) -> str:
        return "".join(self.stderr_lines)

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        """Wait until a stderr line contains ``text``; return that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr_lines):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line with {text!r}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal, wait (then kill); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.drain_output()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 5.0) -> int:
        """Wait, without a signal, for it to exit and its output to be read; the exit status."""
        code = self.proc.wait(timeout)
        self.drain_output()
        return code

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drain_output(self, timeout: float = 5.0) -> None:
        """After the exit: wait until everything it wrote has been read into the lists."""
        for reader in self._readers:
            reader.join(timeout)


def _spawn(
    argv: list[str],
    ready: re.Pattern[str],
    env: dict[str, str] | None,
    stdout: bool,
    prefix: list[str] | None = None,
    preexec_fn: Callable[[], Any] | None = None,
    wait: bool = True,
    cwd: str | None = None,
) -> Launched:
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, *argv],
        cwd=cwd,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    launched = Launched(proc, ready)
    if wait:
        launched.wait_ready()
    return launched


def start_foo_server(
    *args: str, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None
) -> Launched:
    """The reference server on ``listen`` (a free loopback port by default)."""
    argv = ["-m", "geventproxy.testing.server", f"-listen={listen}", *args]
    return _spawn(argv, _SERVER_READY, env, stdout=False)


def start_proxy(
    forward: str | int,
    *args: str,
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    preexec_fn: Callable[[], Any] | None = None,
    wait: bool = True,
    cwd: str | None = None,
) -> Launched:
    """The proxy on ``listen`` in front of ``forward``; its stdout reports are collected.

    ``forward`` is an address, or a port number on 127.0.0.1.
    ``wait=False`` returns at once, before it listens; ``wait_ready`` then waits.
    ``cwd`` matters to ``python -m``, which imports from there first.
    """
    if isinstance(forward, int):
        forward = f"127.0.0.1:{forward}"
    argv = ["-m", "geventproxy", f"-listen={listen}", f"-forward={forward}", *args]
    return _spawn(argv, _PROXY_READY, env, True, prefix, preexec_fn, wait, cwd)


def run_foo_client(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the reference client to completion; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "geventproxy.testing.client", *args],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
