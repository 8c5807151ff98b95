"""What the integration tests share beyond geventproxy.testing.launch.

launch starts the reference programs and the proxy as real subprocesses (as a
user would); here are the rest: raw sockets, /proc readers, scripted upstreams,
the admin endpoint, and traffic patterns.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from geventproxy.testing.launch import STARTUP_TIMEOUT, Launched, run_foo_client
from geventproxy.testing.protocol import reply_for


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, from /proc (none once it has exited)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
    except OSError:
        pass  # exited meanwhile
    return found


def worker_pids(p: Launched) -> list[int]:
    """The proxy's worker processes: the parent's children, which serve the clients."""
    return children(p.proc.pid)


def worker_pid(p: Launched) -> int:
    """The one worker of a proxy with the default -workers=1: the process whose
    descriptors, memory and CPU time are the relay's (the parent serves no client)."""
    pids = wait_until(lambda: worker_pids(p))
    assert len(pids) == 1, pids
    return pids[0]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (a worker supervisor and its workers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children(current))
    return found


def open_fds(pid: int) -> int:
    """Descriptors held by ``pid`` and its descendants, from /proc/PID/fd."""
    total = 0
    for member in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            pass
    return total


def tree_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants, in KiB."""
    total = 0
    for member in process_tree(pid):
        try:
            total += rss_kib(member)
        except (OSError, RuntimeError):
            pass
    return total


# --- raw sockets, scripted upstreams, process probes ---------------------------------------

#: Seconds any single socket operation in a test may block.
IO_TIMEOUT = 5.0
#: Seconds a busy machine (CI shares its two cores) may add to anything a test
#: expects at once or at a deadline. A timing bound is meaningful only where the
#: wrong behaviour takes clearly longer: a longer timeout set for the purpose, or never.
SLACK = 3.0


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


def round_trip(client: socket.socket, seq: int, data: bytes = b"ping") -> None:
    """One REQ, and its reply checked against the reference server's answer."""
    client.sendall(b"REQ %d %s\n" % (seq, data))
    assert recv_lines(client, 1) == [reply_for("REQ", seq, data)]


def ping_pong_worst_ms(port: int, count: int = 100) -> float:
    """Worst round trip, in ms, of ``count`` one-at-a-time REQs on one connection."""
    worst = 0.0
    with connect(port) as client:
        for seq in range(1, count + 1):
            started = time.perf_counter()
            round_trip(client, seq)
            worst = max(worst, time.perf_counter() - started)
    return worst * 1000


def idle_report(p: Launched, timeout: float = IO_TIMEOUT) -> dict:
    """The first report with no connection left open."""
    return report_when(p, lambda r: r["connections_active"] == 0, timeout)


def report_when(p: Launched, check: Callable[[dict], bool], timeout: float = IO_TIMEOUT) -> dict:
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


def in_process_proxy(upstream_port: int, send_buffer: int | None = None) -> Any:
    """A started ProxyServer on this process's gevent hub, and its Stats.

    For tests that must reach inside the relay (socket buffers, the sweeper);
    everything else runs the proxy as a subprocess. Stop it with abort_all().
    """
    from geventproxy.config import Address, Config
    from geventproxy.server import ProxyServer, make_listener
    from geventproxy.stats import Stats

    config = Config(
        listen=Address("127.0.0.1", 0),
        forward=Address("127.0.0.1", upstream_port),
        log_connections=False,
    )
    stats = Stats()
    server = ProxyServer(make_listener(config.listen), config, stats)
    server.send_buffer = send_buffer
    server.start()
    return server, stats


# --- the admin endpoint -------------------------------------------------------------------


def admin_address(p: Launched, timeout: float = STARTUP_TIMEOUT) -> tuple[str, int]:
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


class Traffic:
    """The reference client through the proxy, one run after another, in a thread, until the
    ``with`` block ends (the run in progress is finished and counted)."""

    def __init__(self, port: int, connections: int = 8, requests: int = 100) -> None:
        self.port = port
        self.connections, self.per_connection = connections, requests
        self.requests = 0  # REQs sent by the runs that passed
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            done = run_foo_client(
                f"-connect=127.0.0.1:{self.port}",
                f"-connections={self.connections}",
                f"-requests={self.per_connection}",
            )
            if done.returncode == 0:
                self.requests += self.connections * self.per_connection
            else:
                self.failures.append(done.stdout + done.stderr)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
