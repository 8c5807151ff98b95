"""The parent's table of worker processes: start, signal, reap, readiness, heartbeats.

Mechanics only; what to do when a worker starts, stops or hangs is the
supervisor's (``workers.py``). A worker is started with ``posix_spawn`` as
``python -m geventproxy.worker`` (a fresh interpreter, so the code on disk
now) with the signals of ``HANDED_OVER`` blocked, and inherits the
listening socket, the admin socket (worker 0 only), the shared statistics
and the write end of a pipe on which it says ``ready``, and ``frozen`` when
it has frozen its block for a report.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

from .config import Config
from .sharedstats import SharedStats

__all__ = ["HANDED_OVER", "Generation", "Worker", "WorkerSet"]

#: Blocked in a new worker until it has its own dispositions in place (``worker.py``,
#: ``runner.py``): one sent meanwhile waits instead of ending the fresh interpreter.
HANDED_OVER = frozenset(
    {signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT}
)


@dataclasses.dataclass(eq=False)
class Generation:
    """One configuration, and the environment its workers get."""

    number: int
    config: Config
    env: dict[str, str]


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    slot: int
    block: int
    generation: Generation
    ready: bool = False
    retiring: bool = False
    killed: bool = False
    #: When the parent stops waiting for it (to become ready, or to exit) and kills it.
    kill_at: float = float("inf")


class WorkerSet:
    """The live workers, by pid."""

    def __init__(
        self,
        shared: SharedStats,
        listener: socket.socket,
        admin: socket.socket | None,
        flags: list[str],
    ) -> None:
        self.shared = shared
        self.flags = flags
        self._listener = listener
        self._admin = admin
        self._workers: dict[int, Worker] = {}
        self.notices_fd, self._notify = os.pipe()
        os.set_blocking(self.notices_fd, False)
        for fd in (listener.fileno(), shared.fd, self._notify):
            os.set_inheritable(fd, True)
        if admin is not None:
            os.set_inheritable(admin.fileno(), True)
        self._pending = b""

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def of(self, generation: Generation) -> list[Worker]:
        return [w for w in self._workers.values() if w.generation is generation]

    def free_blocks(self) -> int:
        return len(self.shared.free({w.block for w in self._workers.values()}))

    def start(self, generation: Generation, slot: int, boot_timeout: float) -> Worker:
        """Start a worker in ``slot``; OSError if it cannot be (no block, no process)."""
        free = self.shared.free({w.block for w in self._workers.values()})
        if not free:
            raise OSError("no free statistics block")
        block = free[0]
        self.shared.give(block, slot, generation.number)
        handoff = {
            "listen-fd": self._listener.fileno(),
            "admin-fd": self._admin.fileno() if self._admin is not None and slot == 0 else -1,
            "stats-fd": self.shared.fd,
            "notify-fd": self._notify,
            "block": block,
            "worker": slot,
        }
        argv = [sys.executable, "-m", "geventproxy.worker"]
        argv += [f"--{name}={value}" for name, value in handoff.items()]
        argv += ["--", *self.flags]
        closed = []
        if self._admin is not None and slot != 0:
            closed.append((os.POSIX_SPAWN_CLOSE, self._admin.fileno()))
        pid = os.posix_spawn(
            sys.executable, argv, generation.env, file_actions=closed, setsigmask=HANDED_OVER
        )
        worker = Worker(pid, slot, block, generation, kill_at=time.monotonic() + boot_timeout)
        self._workers[pid] = worker
        return worker

    def send(self, workers: list[Worker], sig: int) -> None:
        for worker in workers:
            try:
                os.kill(worker.pid, sig)
            except ProcessLookupError:
                pass  # exited: its SIGCHLD is on the way

    def reap(self) -> list[tuple[Worker, int]]:
        """The workers that exited, with their exit status (negative: the signal)."""
        gone = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self._workers.pop(pid, None)
            if worker is not None:
                self.shared.release(worker.block)
                gone.append((worker, os.waitstatus_to_exitcode(status)))
        return gone

    def notices(self) -> list[tuple[Worker, str, str]]:
        """What workers said since the last call: (worker, "ready", its version) once
        it accepts, (worker, "frozen", "") when it has frozen its block for a report."""
        try:
            while chunk := os.read(self.notices_fd, 4096):
                self._pending += chunk
        except BlockingIOError:
            pass
        *lines, self._pending = self._pending.split(b"\n")
        found = []
        for line in lines:
            kind, _, rest = line.decode(errors="replace").partition(" ")
            pid, _, text = rest.partition(" ")
            worker = self._workers.get(int(pid)) if pid.isdigit() else None
            if worker is None or kind not in ("ready", "frozen"):
                continue  # gone since, or not from a worker of this version
            if kind == "ready":
                if worker.ready:
                    continue
                worker.ready, worker.kill_at = True, float("inf")
            found.append((worker, kind, text))
        return found

    def hung(self) -> list[Worker]:
        """Ready workers whose heartbeat is older than their generation's --worker-timeout."""
        now = time.monotonic_ns()
        return [
            w
            for w in self._workers.values()
            if w.ready
            and not w.killed
            and w.generation.config.worker_timeout
            and now - self.shared.heartbeat(w.block) > w.generation.config.worker_timeout * 1e9
        ]

    def overdue(self, now: float) -> list[Worker]:
        """Workers not ready, or not gone, by their deadline."""
        return [w for w in self._workers.values() if not w.killed and now >= w.kill_at]

    def kill(self, workers: list[Worker]) -> None:
        """SIGKILL, once; their reaping follows."""
        for worker in workers:
            worker.killed = True
        self.send(workers, signal.SIGKILL)
