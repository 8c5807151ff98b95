"""The parent process: the one supervisord or systemd watches; its PID never changes.

Every proxy is this parent and ``--workers`` worker processes (one by
default). The parent binds the listening socket (and --admin's) once and
holds it for its whole life; each worker is a fresh interpreter
(``worker.py``) that inherits it, serves the clients, and writes its own
block of the shared statistics (``sharedstats.py``). The parent never
touches a connection. It owns the signals:

- USR1 (and every --report-interval): one JSON line, the exact sum of
  every block;
- TERM/INT: TERM to every worker (each drains on its own), wait for them,
  write the state file and a final line, exit 0; a second TERM/INT is
  passed on, and the workers then close everything at once;
- HUP: a reload (``handle_hup``): a new generation of workers, from the
  code on disk now and the configuration read again, on the same socket;
- CHLD: a worker that dies is logged and replaced; one whose event loop
  stops (no heartbeat for --worker-timeout) is killed and replaced; one
  that fails at every start stops the proxy, exit status 3.

It also writes the state file and, with --admin, the live page's history
(one sample a second, in the shared file, which worker 0 serves). It
imports no gevent and runs no event loop: like gunicorn's arbiter it is a
select loop, and its signal handlers only queue the signal and wake the
loop through a pipe.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import Config, ConfigError, format_address, load_with_file
from .history import History, Sampler
from .listeners import open_listener, raise_fd_limit
from .logs import event, setup
from .report import render, write_line
from .sharedstats import SharedStats
from .state import StateFile, load_baseline
from .stats import Block, persistent_totals, snapshot
from .workerset import Generation, Worker, WorkerSet

__all__ = ["read_settings", "supervise"]

#: The longest the loop sleeps: how often heartbeats and deadlines are looked at.
TICK = 1.0
#: A worker not ready this long after it started has failed to start.
BOOT_TIMEOUT = 60.0
#: Failed starts in a row of one worker after which the proxy stops (exit status 3).
BOOT_ATTEMPTS = 3
#: The pause before starting a worker again after a failed start.
RESPAWN_DELAY = 1.0
#: Beyond --drain-timeout, how long the parent waits for a worker before SIGKILL.
STOP_GRACE = 5.0
#: How long the parent waits for stdout to take a statistics line before dropping it.
REPORT_TIMEOUT = 1.0
#: How long a report waits for the workers' frozen blocks (a stuck one's is summed as it is).
FREEZE_TIMEOUT = 1.0
#: Generations alive at once (one serving, the rest draining): the shared
#: statistics have room for this many workers per worker slot.
GENERATIONS = 4
#: Exit statuses: a listener cannot be bound (as for a bad flag); workers fail at every start.
EXIT_CANNOT_LISTEN = 2
EXIT_BOOT_FAILED = 3
#: Settings the parent holds itself (sockets, the state file): a reload cannot change them.
RESTART_ONLY = ("listen", "admin", "state_file")

_COUNTED = (signal.SIGTERM, signal.SIGINT)


def read_settings(flags: Sequence[str], environ: Mapping[str, str]) -> tuple[Config, dict]:
    """The configuration, --env-file read now, and the environment a worker gets for it."""
    return load_with_file(flags, environ, lambda path: Path(path).read_text(encoding="utf-8"))


def _coalesce(signals: list[int]) -> list[int]:
    """Keep every TERM/INT, and the first of each other signal, in order."""
    seen: set[int] = set()
    kept = []
    for sig in signals:
        if sig in _COUNTED or sig not in seen:
            kept.append(sig)
            seen.add(sig)
    return kept


def _fields(worker: Worker) -> dict:
    """What every line about a worker says of it."""
    return {"worker": worker.slot, "pid": worker.pid, "generation": worker.generation.number}


def _shared_stats(config: Config) -> tuple[SharedStats, Sampler | None]:
    """The shared statistics file, the saved totals in it, and with --admin the
    sampler of the live page's history into it."""
    shared = SharedStats.create(1 + GENERATIONS * max(config.workers, os.cpu_count() or 1))
    shared.set_serving(1)
    baseline = load_baseline(config.state_file) if config.state_file else None
    if baseline is not None:
        shared.set_baseline(baseline)
    if config.admin is None:
        return shared, None
    sampler = Sampler(History(shared.history), lambda: snapshot(shared.used(), time.monotonic_ns()))
    sampler.start()
    return shared, sampler


class Supervisor:
    """Signals in, workers out: the loop, the signals' work, the state file, the history.

    What becomes of a worker that starts, dies or hangs is ``Restarts``'s
    business; a HUP is ``Reloads``'s; the statistics lines are ``Reports``'.
    """

    def __init__(self, config: Config, env: dict[str, str], flags: Sequence[str]) -> None:
        self.generation = Generation(1, config, env)  # the one serving
        self.flags = list(flags)
        self.stopping = False
        self.status = 0
        self.state = StateFile(config.state_file) if config.state_file else None
        self.state_due = time.monotonic() + config.state_interval
        self.sampler: Sampler | None = None
        self.listeners: list[socket.socket] = []
        self.signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.handlers = {
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGCHLD: self.handle_chld,
            signal.SIGHUP: self.handle_hup,
        }

    # -- signals: queue and wake, nothing else ---------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _install(self) -> None:
        for sig in self.handlers:
            signal.signal(sig, self._on_signal)
        # __main__ blocked HUP until now: one sent during the start is a reload once started.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    # -- start and run -----------------------------------------------------------

    def run(self) -> int:
        config = self.generation.config
        with contextlib.ExitStack() as stack:
            for address, flag in ((config.listen, "-listen"), (config.admin, "-admin")):
                listener = open_listener(address, flag) if address is not None else None
                if address is not None and listener is None:
                    return EXIT_CANNOT_LISTEN
                if listener is not None:
                    stack.callback(listener.close)
                    self.listeners.append(listener)
            raise_fd_limit()  # inherited by every worker
            self.shared, self.sampler = _shared_stats(config)
            admin = self.listeners[1] if config.admin is not None else None
            self.workers = WorkerSet(self.shared, self.listeners[0], admin, self.flags)
            self.restarts, self.reloads, self.reports = Restarts(self), Reloads(self), Reports(self)
            # Unwound in reverse, whatever raised: the totals on disk, then the last line.
            stack.callback(self.reports.final)
            stack.callback(self.save_state)
            self._install()
            for slot in range(config.workers):
                self.restarts.start(self.generation, slot)
            while self.workers or not self.stopping:
                self._turn()
        event(logging.INFO, "exit", status=self.status)
        return self.status

    def _turn(self) -> None:
        """One pass of the loop: sleep until woken or due, then answer what came."""
        due = self.restarts.due() + self.reports.due()
        if self.state is not None and self.generation.config.state_interval:
            due.append(self.state_due)
        if self.sampler is not None:
            due.append(self.sampler.next_tick)
        timeout = max(0.0, min([TICK, *(d - time.monotonic() for d in due)]))
        try:
            select.select([self._wake_r, self.workers.notices_fd], [], [], timeout)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        for worker, kind, text in self.workers.notices():  # before CHLD: it said, then died
            if kind == "ready":
                self.restarts.on_ready(worker, text)
                self.reloads.on_ready(worker, text)
            else:
                self.reports.on_frozen(worker)
        pending, self.signals = self.signals, []  # a swap: the handler loses nothing
        for sig in _coalesce(pending):
            self.handlers[sig]()
        now = time.monotonic()
        self.restarts.tick(now)
        self.reloads.tick()
        self.reports.tick(now)
        interval = self.generation.config.state_interval
        if self.state is not None and interval and not self.stopping and now >= self.state_due:
            self.save_state()
            self.state_due = now + interval
        if self.sampler is not None:
            self.sampler.tick()

    # -- the signals' work -------------------------------------------------------

    def handle_usr1(self) -> None:
        self.reports.ask()

    def handle_chld(self) -> None:
        for worker, status in self.workers.reap():
            self.reports.on_exit(worker)
            self.restarts.on_exit(worker, status)

    def handle_hup(self) -> None:
        if self.stopping:
            event(logging.WARNING, "reload ignored: stopping")
        else:
            self.reloads.wanted = True

    def handle_term(self) -> None:
        if self.stopping:
            event(logging.WARNING, "second signal: workers close every connection now")
            self.workers.send(list(self.workers), signal.SIGTERM)
            return
        self.stopping = True
        for listener in self.listeners:
            listener.close()  # the workers hold their own copies
        drain = self.generation.config.drain_timeout
        serving = [w for w in self.workers if not w.retiring]  # the retiring drain already
        for worker in serving:
            worker.kill_at = time.monotonic() + drain + STOP_GRACE
        fields = {"workers": len(serving), "drain_timeout_s": drain}
        event(logging.INFO, "stopping workers", **fields)
        self.workers.send(serving, signal.SIGTERM)

    def save_state(self) -> None:
        if self.state is not None:
            self.state.save(persistent_totals(self.shared.used()))


class Reports:
    """The statistics lines: on USR1, every --report-interval, and the last at exit.

    A line while workers count must not catch one between two updates: every
    ready worker is asked (USR1) for a frozen copy of its block, made between
    two of its greenlets (``sharedstats``), and the line sums those once all
    have answered, or after FREEZE_TIMEOUT (a stuck worker's block is summed
    as it is). A request while one waits is answered by it, as signals
    coalesce anyway. The line then holds everything a client had seen before
    the request, as a single process's would.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.parent = supervisor
        self.request = 0
        self.waiting: set[int] | None = None  # pids yet to freeze; None: nothing asked
        self.frozen: set[int] = set()  # the blocks frozen for this request
        self.deadline = float("inf")
        self.interval_due = time.monotonic() + supervisor.generation.config.report_interval

    def ask(self) -> None:
        if self.waiting is not None:
            return
        ready = [w for w in self.parent.workers if w.ready and not w.killed]
        self.request += 1
        for worker in ready:
            self.parent.shared.request_freeze(worker.block, self.request)
        self.parent.workers.send(ready, signal.SIGUSR1)
        self.waiting, self.frozen = {w.pid for w in ready}, set()
        self.deadline = time.monotonic() + FREEZE_TIMEOUT

    def on_frozen(self, worker: Worker) -> None:
        if self.waiting is not None and worker.pid in self.waiting:
            self.waiting.discard(worker.pid)
            self.frozen.add(worker.block)

    def on_exit(self, worker: Worker) -> None:
        if self.waiting is not None:
            self.waiting.discard(worker.pid)  # its block changes no more

    def due(self) -> list[float]:
        due = [] if self.waiting is None else [self.deadline]
        if self.parent.generation.config.report_interval:  # during the drain too
            due.append(self.interval_due)
        return due

    def tick(self, now: float) -> None:
        interval = self.parent.generation.config.report_interval
        if interval and now >= self.interval_due:
            self.ask()
            while self.interval_due <= now:  # a late turn skips what it missed, no burst
                self.interval_due += interval
        if self.waiting is not None and (not self.waiting or now >= self.deadline):
            self.waiting = None
            self.write(self.parent.shared.summed(self.frozen))

    def final(self) -> None:
        """At exit: the workers are gone and their blocks change no more."""
        self.write(self.parent.shared.used())

    def write(self, blocks: list[Block]) -> None:
        line = render(snapshot(blocks, time.monotonic_ns()))
        # Never block the parent on a stdout nobody reads: it must keep answering TERM.
        if not write_line(sys.stdout.fileno(), line, REPORT_TIMEOUT):
            event(logging.WARNING, "statistics line dropped: stdout is not being read")


class Restarts:
    """The serving generation's workers: replace the dead, kill the hung, stop on the hopeless."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.parent = supervisor
        self.failures: dict[int, int] = {}  # slot -> failed starts in a row
        self.respawn_at: dict[int, float] = {}  # slot -> when to start it again
        self.announced = False

    def due(self) -> list[float]:
        return [] if self.parent.stopping else list(self.respawn_at.values())

    def start(self, generation: Generation, slot: int) -> Worker | None:
        try:
            worker = self.parent.workers.start(generation, slot, BOOT_TIMEOUT)
        except OSError as exc:
            event(logging.ERROR, "cannot start a worker", worker=slot, error=exc)
            self.failed_start(generation, slot, None)
            return None
        event(logging.INFO, "worker started", **_fields(worker))
        return worker

    def tick(self, now: float) -> None:
        workers = self.parent.workers
        for slot, due in list(self.respawn_at.items()):
            if due <= now and not self.parent.stopping:
                del self.respawn_at[slot]
                self.start(self.parent.generation, slot)
        for worker in workers.hung():
            timeout = worker.generation.config.worker_timeout
            event(logging.ERROR, "worker hung, killing it", **_fields(worker), timeout_s=timeout)
            workers.kill([worker])
        for worker in workers.overdue(now):
            what = "did not stop in time" if worker.ready else "did not start in time"
            event(logging.ERROR, f"worker {what}, killing it", **_fields(worker))
            workers.kill([worker])

    def on_ready(self, worker: Worker, version: str) -> None:
        event(logging.INFO, "worker ready", **_fields(worker), version=version)
        serving = self.parent.generation
        if worker.generation is not serving:
            return
        self.failures.pop(worker.slot, None)
        if not self.announced and all(w.ready for w in self.parent.workers.of(serving)):
            self.announced = True  # the first generation is up: the proxy serves
            fields = {
                "address": format_address(self.parent.listeners[0].getsockname()),
                "forward": str(serving.config.forward),
                "workers": serving.config.workers,
                "version": version,
            }
            event(logging.INFO, "listening", **fields)

    def on_exit(self, worker: Worker, status: int) -> None:
        parent = self.parent
        if parent.stopping or worker.retiring:
            event(logging.INFO, "worker exited", **_fields(worker), status=status)
        elif parent.reloads.on_exit(worker, status):
            pass  # a new worker of a reload: the reload failed
        elif worker.ready:
            event(logging.ERROR, "worker died, restarting", **_fields(worker), status=status)
            self.start(parent.generation, worker.slot)
        else:
            self.failed_start(worker.generation, worker.slot, status)

    def failed_start(self, generation: Generation, slot: int, status: int | None) -> None:
        """Try again after a pause, or stop when it failed BOOT_ATTEMPTS times in a row."""
        parent = self.parent
        if parent.reloads.failed_start(generation, slot, status) or parent.stopping:
            return
        self.failures[slot] = failures = self.failures.get(slot, 0) + 1
        fields = {"worker": slot, "status": status, "attempts": failures}
        if failures < BOOT_ATTEMPTS:
            event(logging.ERROR, "worker failed to start, trying again", **fields)
            self.respawn_at[slot] = time.monotonic() + RESPAWN_DELAY
            return
        event(logging.ERROR, "worker fails at every start, stopping", **fields)
        parent.status = EXIT_BOOT_FAILED
        parent.handle_term()


class Reloads:
    """HUP: a new generation of workers, then the old one retires.

    1. Read the configuration again (--env-file); if it does not validate,
       or changes what only a restart can (RESTART_ONLY), log it and stop:
       the running workers carry on.
    2. Start the new generation, from the code on disk now, on the same
       listening socket; both generations accept meanwhile.
    3. Once every new worker is ready, USR2 to the old ones: they stop
       accepting, drain for their --drain-timeout and exit. If a new worker
       dies or hangs before it is ready, the new ones retire instead.

    A HUP during a reload is done after it. A reload waits while the shared
    statistics have no free block for every new worker (GENERATIONS
    generations still alive).
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.parent = supervisor
        self.wanted = False
        self.pending: Generation | None = None
        self.numbered = supervisor.generation.number  # a failed one keeps its number
        self._waiting_logged = False

    def tick(self) -> None:
        parent = self.parent
        if not self.wanted or self.pending is not None or parent.stopping:
            return
        try:
            config, env = read_settings(parent.flags, os.environ)
        except ConfigError as exc:
            self.wanted = False
            event(logging.ERROR, "reload failed, the running workers carry on", error=str(exc))
            return
        reason = self._needs_restart(config)
        if reason:
            self.wanted = False
            event(logging.ERROR, "reload refused, the running workers carry on", error=reason)
            return
        if parent.workers.free_blocks() < config.workers:
            if not self._waiting_logged:
                event(logging.WARNING, "reload waits for draining workers to exit")
            self._waiting_logged = True
            return
        self.wanted = self._waiting_logged = False
        self.numbered += 1
        self.pending = Generation(self.numbered, config, env)
        event(logging.INFO, "reloading", generation=self.pending.number)
        for slot in range(config.workers):
            if parent.restarts.start(self.pending, slot) is None:
                break

    def _needs_restart(self, config: Config) -> str:
        """Why ``config`` cannot be reloaded into, or an empty string."""
        current = self.parent.generation.config
        changed = [n for n in RESTART_ONLY if getattr(config, n) != getattr(current, n)]
        if changed:
            return f"--{changed[0].replace('_', '-')} changed: that takes a restart"
        most = (self.parent.shared.capacity - 1) // 2  # room for the new and the old
        if config.workers > most:
            return f"--workers above {most} takes a restart"
        return ""

    def on_ready(self, worker: Worker, version: str) -> None:
        new = self.pending
        workers = self.parent.workers
        if worker.generation is not new or not all(w.ready for w in workers.of(new)):
            return
        if self.parent.stopping:
            return
        if len(workers.of(new)) < new.config.workers:
            return
        self.pending = None
        old = [w for w in workers if w.generation is not new and not w.retiring]
        self.retire(old)
        self.parent.generation = new
        self.parent.shared.set_serving(new.number)
        config = new.config
        setup(config.log_level, config.log_format)
        fields = {"workers": config.workers, "version": version, "retiring": len(old)}
        event(logging.INFO, "reloaded", generation=new.number, **fields)

    def on_exit(self, worker: Worker, status: int) -> bool:
        """Whether the exit was a new worker's before it was ready (the reload then fails)."""
        if worker.generation is not self.pending:
            return False
        self.failed_start(worker.generation, worker.slot, status)
        return True

    def failed_start(self, generation: Generation, slot: int, status: int | None) -> bool:
        if generation is not self.pending:
            return False
        self.pending = None
        event(
            logging.ERROR,
            "reload failed: a new worker did not start, the running workers carry on",
            generation=generation.number,
            worker=slot,
            status=status,
        )
        self.retire(self.parent.workers.of(generation))
        return True

    def retire(self, workers: list[Worker]) -> None:
        deadline = time.monotonic() + STOP_GRACE
        for worker in workers:
            worker.retiring = True
            worker.kill_at = deadline + worker.generation.config.drain_timeout
        self.parent.workers.send(workers, signal.SIGUSR2)


def supervise(config: Config, env: dict[str, str], flags: Sequence[str]) -> int:
    setup(config.log_level, config.log_format)
    try:
        return Supervisor(config, env, flags).run()
    finally:
        # The interpreter's exit restores the default actions, which end a process:
        # USR1 and HUP must stay harmless to the very end.
        for sig in (signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
