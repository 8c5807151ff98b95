"""Subprocess helpers shared by integration tests (reference server, client CLI).

The reference programs run as real subprocesses, exactly as in the task's usage,
so tests exercise their CLIs, signal handling and sockets and never need gevent
monkey-patching in the pytest process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

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


# --- raw sockets, scripted upstreams, process probes ---------------------------------------

#: Seconds any single socket operation in a test may block.
IO_TIMEOUT = 5.0


def connect(port: int, host: str = "127.0.0.1", timeout: float = IO_TIMEOUT) -> socket.socket:
    """A blocking client socket with Nagle off and a timeout on every operation."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_lines(sock: socket.socket, count: int) -> list[bytes]:
    """Read exactly ``count`` lines (fails if the peer closes first)."""
    buf = b""
    while buf.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    lines = buf.splitlines(keepends=True)
    assert len(lines) == count, lines
    return lines


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset counts as the end."""
    parts = []
    try:
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(parts)


def wait_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> float:
    """Seconds until the peer closes (EOF or reset), discarding data; fails on timeout."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"still open after {timeout} s") from None
    return time.monotonic() - started


def wait_until(predicate: Callable[[], Any], timeout: float = IO_TIMEOUT, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true; return that; fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def report_when(p: Proxy, check: Callable[[dict], bool], timeout: float = IO_TIMEOUT) -> dict:
    """Ask for reports until one satisfies ``check``; return it (fails with the last one)."""
    deadline = time.monotonic() + timeout
    while True:
        report = p.report()
        if check(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"no report within {timeout} s satisfied the check: {report}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pattern(index: int, size: int = 65536) -> bytes:
    """Chunk ``index`` of a stream where any lost, repeated or reordered chunk shows."""
    return index.to_bytes(8, "big") * (size // 8)


def pattern_digest(chunks: int, size: int = 65536) -> str:
    digest = hashlib.sha256()
    for i in range(chunks):
        digest.update(pattern(i, size))
    return digest.hexdigest()


class ScriptedUpstream:
    """A TCP server on 127.0.0.1 that a test scripts, in a thread of the test process.

    Without ``handler`` every accepted socket is queued for the test to take with
    :meth:`accept`. With one, each connection runs ``handler(sock)`` in its own
    thread; its return value (or exception) is queued in ``results``.
    """

    def __init__(self, handler: Callable[[socket.socket], Any] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.accepted: queue.Queue[socket.socket] = queue.Queue()
        self.results: queue.Queue[Any] = queue.Queue()
        self.sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            sock.settimeout(IO_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets.append(sock)
            if self.handler is None:
                self.accepted.put(sock)
            else:
                threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            result = self.handler(sock)  # type: ignore[misc]
        except Exception as exc:  # handed to the test
            result = exc
        self.results.put(result)

    def accept(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        """The next connection the proxy opened (only without a handler)."""
        return self.accepted.get(timeout=timeout)

    def result(self, timeout: float = IO_TIMEOUT) -> Any:
        """The next handler outcome; an exception raised by the handler is re-raised."""
        value = self.results.get(timeout=timeout)
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        self._thread.join(IO_TIMEOUT)


@contextlib.contextmanager
def scripted_upstream(
    handler: Callable[[socket.socket], Any] | None = None,
) -> Iterator[ScriptedUpstream]:
    """:class:`ScriptedUpstream` as a context manager that always closes it."""
    upstream = ScriptedUpstream(handler)
    try:
        yield upstream
    finally:
        upstream.close()


def closed_port() -> int:
    """A loopback port that nothing listens on (just bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the admin endpoint -------------------------------------------------------------------


def admin_address(p: Proxy, timeout: float = STARTUP_TIMEOUT) -> tuple[str, int]:
    """Host and port of the proxy's admin endpoint, from its "admin started" log line."""
    line = p.wait_log("admin started", timeout=timeout)
    match = re.search(r"address=\[?([^\s\]]*)\]?:(\d+)", line) or re.search(
        r'"address": "\[?([^"\]]*)\]?:(\d+)"', line
    )
    assert match, line
    return match.group(1), int(match.group(2))


def http_request(
    address: tuple[str, int], path: str, method: str = "GET", timeout: float = IO_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection: (status, headers with lower-case names, body)."""
    import http.client

    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, body
    finally:
        conn.close()


def spawn_proxy(
    forward_port: int, *args: str, preexec_fn: Callable[[], Any] | None = None
) -> tuple[Proxy, queue.Queue[str]]:
    """Start the proxy and return at once, before it listens (``port`` is 0 until then).

    The queue gets the "listening" log line (or "" if the process exits first);
    pass both to :func:`proxy_listening`.
    """
    cmd = [
        sys.executable,
        "-m",
        "geventproxy",
        "-listen=127.0.0.1:0",
        f"-forward=127.0.0.1:{forward_port}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_drain_proxy, args=(proc.stderr, lines, ready), daemon=True).start()
    return Proxy(proc, 0, lines), ready


def proxy_listening(p: Proxy, ready: queue.Queue[str], timeout: float = STARTUP_TIMEOUT) -> Proxy:
    """Wait for a :func:`spawn_proxy` proxy to listen; fill in its port."""
    try:
        line = ready.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line:
        raise AssertionError(f"proxy did not start (exit {p.proc.poll()}):\n{p.log()}")
    match = re.search(r"address=\S*:(\d+)", line) or re.search(r'"address": "\S*:(\d+)"', line)
    assert match, line
    p.port = int(match.group(1))
    return p


def wait_exit(p: Proxy, timeout: float = IO_TIMEOUT) -> int:
    """Wait for the proxy to exit and for its stdout to be read to the end; its exit status."""
    code = p.proc.wait(timeout)
    seen, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 0.1:
        if len(p.stdout_lines) != seen:
            seen, still_since = len(p.stdout_lines), time.monotonic()
        time.sleep(0.01)
    return code


def stdout_reports(p: Proxy) -> list[dict]:
    """Every stdout line as a report; fails on anything that is not one whole JSON object."""
    reports = []
    for line in p.stdout_lines:
        assert line.endswith("\n"), f"partial line on stdout: {line!r}"
        report = json.loads(line)
        assert isinstance(report, dict) and "msg_total" in report, line
        reports.append(report)
    return reports
