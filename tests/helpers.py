"""Subprocess helpers shared by integration tests (reference server, client CLI).

The reference programs run as real subprocesses, exactly as in the task's usage,
so tests exercise their CLIs, signal handling and sockets and never need gevent
monkey-patching in the pytest process.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Seconds to wait for a subprocess to bind its socket and say so.
STARTUP_TIMEOUT = 15.0


def subprocess_env() -> dict[str, str]:
    """Environment that lets ``python -m geventproxy...`` import the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _drain(stream: IO[str], lines: list[str], ready: queue.Queue[str]) -> None:
    """Keep reading stderr so a chatty child never blocks on a full pipe."""
    for line in stream:
        lines.append(line)
        if line.startswith("listening on "):
            ready.put(line)
    ready.put("")  # EOF: the child exited (possibly before binding)


def start_foo_server(*extra_args: str) -> tuple[subprocess.Popen[str], int]:
    """Start the reference server on 127.0.0.1, a free port; return (process, port).

    ``extra_args`` are appended to the command line (a later ``-listen=...``
    overrides the default). The process's stderr lines collect in
    ``proc.stderr_lines``. Stop it with :func:`stop_process`.
    """
    cmd = [
        sys.executable,
        "-m",
        "geventproxy.testing.server",
        "-listen=127.0.0.1:0",
        *extra_args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_drain, args=(proc.stderr, lines, ready), daemon=True).start()
    proc.stderr_lines = lines  # type: ignore[attr-defined]
    try:
        line = ready.get(timeout=STARTUP_TIMEOUT)
    except queue.Empty:
        line = ""
    if not line:
        stop_process(proc)
        raise RuntimeError(f"server did not start: {cmd}\n{''.join(lines)}")
    port = int(line.strip().rpartition(":")[2])
    return proc, port


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Signal the process, wait briefly (killing it if needed); return its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


@contextlib.contextmanager
def foo_server(*extra_args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """:func:`start_foo_server` as a context manager that always stops it."""
    proc, port = start_foo_server(*extra_args)
    try:
        yield proc, port
    finally:
        stop_process(proc)


def run_foo_client(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run the reference client CLI to completion; stdout/stderr are captured."""
    return subprocess.run(
        [sys.executable, "-m", "geventproxy.testing.client", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Proxy:
    """The real proxy as a subprocess: its port, its logs, and its JSON reports."""

    def __init__(self, proc: subprocess.Popen[str], port: int, stderr_lines: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.stderr_lines = stderr_lines
        self.reports: queue.Queue[dict] = queue.Queue()
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            try:
                self.reports.put(json.loads(line))
            except ValueError:
                self.reports.put({"unparsable": line})

    def report(self, timeout: float = 5.0) -> dict:
        """Send SIGUSR1 and return the JSON object it prints."""
        while not self.reports.empty():
            self.reports.get_nowait()
        self.proc.send_signal(signal.SIGUSR1)
        return self.reports.get(timeout=timeout)

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

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.proc, sig)


def _drain_proxy(stream: IO[str], lines: list[str], ready: queue.Queue[str]) -> None:
    for line in stream:
        lines.append(line)
        if " listening " in line or line.startswith("{") and '"listening"' in line:
            ready.put(line)
    ready.put("")


def start_proxy(
    forward_port: int | None,
    *args: str,
    forward: str | None = None,
    env: dict[str, str] | None = None,
    preexec: list[str] | None = None,
) -> Proxy:
    """Start ``python -m geventproxy`` on 127.0.0.1, a free port, in front of ``forward_port``."""
    target = forward or f"127.0.0.1:{forward_port}"
    cmd = [
        *(preexec or []),
        sys.executable,
        "-m",
        "geventproxy",
        "-listen=127.0.0.1:0",
        f"-forward={target}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**subprocess_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_drain_proxy, args=(proc.stderr, lines, ready), daemon=True).start()
    try:
        line = ready.get(timeout=STARTUP_TIMEOUT)
    except queue.Empty:
        line = ""
    if not line:
        stop_process(proc)
        raise RuntimeError(f"proxy did not start: {cmd}\n{''.join(lines)}")
    match = re.search(r"address=\S*:(\d+)", line) or re.search(r'"address": "\S*:(\d+)"', line)
    assert match, line
    return Proxy(proc, int(match.group(1)), lines)


@contextlib.contextmanager
def proxy(forward_port: int | None, *args: str, **kwargs) -> Iterator[Proxy]:
    """:func:`start_proxy` as a context manager that always stops it."""
    p = start_proxy(forward_port, *args, **kwargs)
    try:
        yield p
    finally:
        p.stop()


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
