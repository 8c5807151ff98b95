"""``--workers N``: N proxy processes on one listening socket, one small parent.

The parent binds the socket and maps one statistics block per worker in
shared memory, then forks the workers before any event loop exists. Each
worker is a full proxy writing only its own block; the parent never touches
a connection. It owns the signals:

- USR1 (and every --report-interval): one JSON line, the exact sum of every
  worker's block (counters add up; each window is the sum of the workers'
  windows at the same instant);
- TERM/INT: TERM to every worker (each drains on its own), wait for them,
  print a final line, exit 0; a second TERM/INT is passed on, and the
  workers then close everything at once;
- a worker that dies is logged and replaced in the same slot: its block,
  and so every message it counted, stays in the sums.

The parent is plain Python, no gevent: like gunicorn's arbiter its signal
handlers only queue the signal and wake the main loop through a pipe.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import time

from .config import Config
from .history import HistoryBlock, new_history_block
from .logs import LOGGER, setup
from .report import render, write_line
from .runner import EXIT_CANNOT_LISTEN, load_baseline_blocks, open_listeners, raise_fd_limit
from .server import format_address
from .state import encode, write_atomically
from .stats import Block, Stats, new_block, persistent_totals, reset_gauges, snapshot

__all__ = ["supervise"]

log = logging.getLogger(LOGGER)

#: A slot whose worker dies sooner than this after starting waits this long before it restarts.
RESPAWN_DELAY = 1.0
#: Beyond --drain-timeout, how long the parent waits for workers before SIGKILL.
STOP_GRACE = 5.0
#: How long the parent waits for stdout to take a statistics line before dropping it.
REPORT_TIMEOUT = 1.0


_COUNTED = (signal.SIGTERM, signal.SIGINT)


def _coalesce(signals: list[int]) -> list[int]:
    """Keep every TERM/INT, and the first of each other signal, in order."""
    seen: set[int] = set()
    kept = []
    for sig in signals:
        if sig in _COUNTED or sig not in seen:
            kept.append(sig)
            seen.add(sig)
    return kept


class _Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.blocks: list[Block] = [new_block(shared=True) for _ in range(config.workers)]
        self.admin: socket.socket | None = None  # bound here, served by worker 0
        # The live page's history, kept by worker 0; here, it outlives a restart of worker 0.
        self.history: HistoryBlock | None = None
        self.report_due = time.monotonic() + config.report_interval
        self.state_due = time.monotonic() + config.state_interval
        self.pids: dict[int, int] = {}  # pid -> slot
        self.started_at: dict[int, float] = {}  # slot -> when its worker started
        self.respawn_at: dict[int, float] = {}  # slot -> when to start its next worker
        self.signals: list[int] = []
        self.stopping = False
        for block in self.blocks[: config.workers]:
            Stats(block)  # stamps the start time once; restarted workers keep it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- signals: queue and wake, nothing else -----------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    # -- workers ---------------------------------------------------------------

    def _spawn(self, slot: int, listener: object) -> None:
        reset_gauges(self.blocks[slot])  # the previous worker's connections are gone
        # TERM stays blocked in the child until its own handler is in place (runner.run
        # unblocks it): a TERM sent meanwhile waits instead of being lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            status = 1
            try:
                os.close(self._wake_r)
                os.close(self._wake_w)
                admin = self.admin if slot == 0 else None
                if self.admin is not None and admin is None:
                    self.admin.close()
                history = self.history if slot == 0 else None
                status = _worker_main(self.config, listener, self.blocks, slot, admin, history)
            except BaseException:  # noqa: BLE001 - the child must never return into the parent
                logging.getLogger(LOGGER).exception("worker crashed")
            finally:
                os._exit(status)
        self.pids[pid] = slot
        self.started_at[slot] = time.monotonic()
        log.info("worker started", extra={"fields": {"worker": slot, "pid": pid}})

    def _reap(self, listener: object) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.pids.pop(pid, None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info(
                    "worker exited", extra={"fields": {"worker": slot, "pid": pid, "status": code}}
                )
                continue
            log.error(
                "worker died, restarting",
                extra={"fields": {"worker": slot, "pid": pid, "status": code}},
            )
            # A worker that dies at start is restarted after a pause, not in a loop;
            # the main loop starts it when due and keeps answering signals meanwhile.
            self.respawn_at[slot] = self.started_at.get(slot, 0.0) + RESPAWN_DELAY

    def _respawn_due(self, listener: object) -> None:
        now = time.monotonic()
        for slot, due in list(self.respawn_at.items()):
            if due <= now:
                del self.respawn_at[slot]
                self._spawn(slot, listener)

    def _stop(self, sig: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def save_state(self) -> None:
        """Write the summed totals to --state-file (the parent owns it)."""
        if self.config.state_file is None:
            return
        try:
            write_atomically(self.config.state_file, encode(persistent_totals(self.blocks)))
        except OSError as exc:
            log.warning(
                "state file not written",
                extra={
                    "fields": {"path": self.config.state_file, "error": exc.strerror or str(exc)}
                },
            )

    def report(self) -> None:
        line = render(snapshot(self.blocks, time.monotonic_ns()))
        # Never block the parent on a stdout nobody reads: it must keep answering TERM.
        if not write_line(sys.stdout.fileno(), line, REPORT_TIMEOUT):
            log.warning("statistics line dropped: stdout is not being read")

    def _report_due(self) -> None:
        """--report-interval: a line when due, on a fixed grid (missed turns are skipped)."""
        now = time.monotonic()
        if self.config.report_interval and now >= self.report_due:
            self.report()
            while self.report_due <= now:
                self.report_due += self.config.report_interval

    # -- the main loop ---------------------------------------------------------

    def run(self) -> int:
        config = self.config
        opened = open_listeners(config)
        if opened is None:
            return EXIT_CANNOT_LISTEN
        listener, self.admin = opened
        raise_fd_limit()
        # The state file's totals, summed into every report like a worker's block.
        self.blocks += load_baseline_blocks(config)
        if config.admin is not None:
            self.history = new_history_block(shared=True)
        self._install()
        log.info(
            "listening",
            extra={
                "fields": {
                    "address": format_address(listener.getsockname()),
                    "forward": str(config.forward),
                    "workers": config.workers,
                }
            },
        )
        for slot in range(config.workers):
            self._spawn(slot, listener)
        deadline = None
        while self.pids or self.respawn_at:
            wake = [1.0]
            if deadline is not None:
                wake.append(deadline - time.monotonic())
            if self.respawn_at:
                wake.append(min(self.respawn_at.values()) - time.monotonic())
            if config.report_interval:  # during the drain too: it shows the connections going
                wake.append(self.report_due - time.monotonic())
            timeout = max(0.0, min(wake))
            try:
                select.select([self._wake_r], [], [], timeout)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            # Several USR1 (or CHLD) since the last turn make one report (one reap),
            # as the kernel coalesces them anyway; each TERM/INT counts.
            pending, self.signals = self.signals, []  # a swap: the handler loses nothing
            for sig in _coalesce(pending):
                if sig == signal.SIGUSR1:
                    self.report()
                elif sig in (signal.SIGTERM, signal.SIGINT):
                    if not self.stopping:
                        self.stopping = True
                        self.respawn_at.clear()
                        listener.close()  # the workers hold their own copies
                        deadline = time.monotonic() + config.drain_timeout + STOP_GRACE
                        log.info(
                            "stopping workers",
                            extra={
                                "fields": {
                                    "workers": len(self.pids),
                                    "drain_timeout_s": config.drain_timeout,
                                }
                            },
                        )
                        self._stop(signal.SIGTERM)
                    else:
                        log.warning("second signal: workers close every connection now")
                        self._stop(signal.SIGTERM)
                elif sig == signal.SIGCHLD:
                    self._reap(listener)
            if not self.stopping:
                self._respawn_due(listener)
            self._report_due()
            if (
                config.state_file
                and config.state_interval
                and not self.stopping
                and time.monotonic() >= self.state_due
            ):
                self.save_state()
                self.state_due = time.monotonic() + config.state_interval
            if deadline is not None and time.monotonic() >= deadline and self.pids:
                log.error("workers did not stop in time, killing them")
                self._stop(signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE
        self.save_state()
        self.report()
        log.info("exit")
        return 0


def _worker_main(
    config: Config,
    listener: object,
    blocks: list[Block],
    slot: int,
    admin: object,
    history: HistoryBlock | None = None,
) -> int:
    """In the child: a full proxy on the shared socket, writing its own block."""
    from .runner import run

    # The parent answers USR1 and INT (a terminal's Ctrl-C reaches the whole
    # group; the parent passes it on as TERM). CHLD is the parent's business.
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return run(
        config,
        listener=listener,
        stats=Stats(blocks[slot], mark_start=False),
        worker=slot,
        all_blocks=blocks,
        admin_listener=admin,
        history_block=history,
    )


def supervise(config: Config) -> int:
    setup(config.log_level, config.log_format)
    return _Supervisor(config).run()
