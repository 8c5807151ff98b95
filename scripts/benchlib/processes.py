"""Child processes of a benchmark run: started, tracked, and always stopped.

``Children`` is a context manager: whatever was started inside the ``with``
is stopped when it ends, normally or by an exception (Ctrl-C included).
Nothing here keeps module-level state.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Callable

from geventproxy.testing.launch import Launched, start_proxy

__all__ = [
    "Children",
    "Pinning",
    "Tools",
    "build_tools",
    "children_of",
    "cpu_ticks",
    "fd_prefix",
    "haproxy_config",
    "pinning",
    "rss_kib",
]

ROOT = Path(__file__).resolve().parents[2]
#: Environment of a proxy that must run the compiled accelerator, or the pure path.
ACCELERATED_ENV = {"GEVENTPROXY_PURE": ""}
PURE_ENV = {"GEVENTPROXY_PURE": "1"}


@dataclasses.dataclass(frozen=True)
class Tools:
    """The C instruments of scripts/bench/, built for this run."""

    loadgen: str
    stub: str
    directory: str


def build_tools() -> Tools:
    """Compile loadgen and stub with the machine's compiler (scripts/bench/build.sh)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bench" / "build.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Tools(loadgen=str(Path(out) / "loadgen"), stub=str(Path(out) / "stub"), directory=out)


@dataclasses.dataclass(frozen=True)
class Pinning:
    """taskset prefixes: the load side on one CPU, the relay under test on another."""

    load: list[str]
    relay: list[str]
    relay_cpu: int | None
    note: str


def pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if not shutil.which("taskset"):
        return Pinning([], [], None, "no CPU pinning: taskset not found")
    if len(cpus) < 2:
        return Pinning([], [], None, "no CPU pinning: only one CPU")
    return Pinning(
        ["taskset", "-c", str(cpus[0])],
        ["taskset", "-c", str(cpus[1])],
        cpus[1],
        f"stub and loadgen pinned to CPU {cpus[0]}, proxy / HAProxy to CPU {cpus[1]}",
    )


def fd_prefix(needed: int) -> tuple[list[str] | None, int]:
    """A command prefix that lets a child open ``needed`` descriptors, and the hard limit.

    The hard limit may be below what 10,000 proxied connections take (two
    sockets each). prlimit(1) raises it for the child where that is allowed
    (root with CAP_SYS_RESOURCE); None means it cannot be raised here.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return [], hard
    prefix = ["prlimit", f"--nofile={needed}:{needed}"]
    if shutil.which("prlimit"):
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        if done.returncode == 0:
            return prefix, hard
    return None, hard


class Children:
    """Every process a run starts; stops all of them when the ``with`` block ends."""

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self._popens: list[subprocess.Popen[Any]] = []
        self._proxies: list[Launched] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for launched in reversed(self._proxies):
            try:
                launched.stop(timeout=5)
            except Exception:  # already gone, or cannot be signalled: nothing left to do
                pass
        for proc in reversed(self._popens):
            _stop(proc)
        self._proxies.clear()
        self._popens.clear()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self._popens.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        _stop(proc)
        if proc in self._popens:
            self._popens.remove(proc)

    def proxy(self, upstream: int, *args: str, prefix: list[str], env: dict[str, str]) -> Launched:
        """``python -m geventproxy`` in front of 127.0.0.1:``upstream``, started and ready."""
        launched = start_proxy(
            f"127.0.0.1:{upstream}", "-log-connections=false", *args, prefix=prefix, env=env
        )
        self._proxies.append(launched)
        return launched

    def stop_proxy(self, launched: Launched) -> None:
        launched.stop(timeout=5)
        if launched in self._proxies:
            self._proxies.remove(launched)

    def listener(
        self, argv_for_port: Callable[[int], list[str]], prefix: list[str], what: str
    ) -> tuple[subprocess.Popen[Any], int]:
        """Start a child that listens on a port chosen here; retry if it was taken."""
        for _ in range(3):
            port = _free_port()
            proc = self.popen([*prefix, *argv_for_port(port)], stdout=self.log, stderr=self.log)
            if _wait_port(port, proc):
                return proc, port
            self.stop(proc)
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} did not start; its output:\n{tail}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


HAPROXY_CFG = """\
global
    maxconn {maxconn}
    nbthread 1
    log stdout format raw local0 emerg
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{upstream}
"""


def haproxy_config(port: int, upstream: int, maxconn: int = 8000) -> str:
    """HAProxy in plain TCP mode, one thread: the relay to compare with."""
    return HAPROXY_CFG.format(port=port, upstream=upstream, maxconn=maxconn)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_ticks(cpu: int | None) -> tuple[int, int] | None:
    """(busy, total) jiffies of one CPU from /proc/stat; steal counts as busy."""
    if cpu is None:
        return None
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                idle = v[3] + v[4]
                return sum(v) - idle, sum(v)
    return None


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
