"""The statistics report: one JSON object per line on stdout.

One writer greenlet owns stdout, so two reports never interleave. The
write itself runs in gevent's thread pool: a stdout pipe that nobody reads
then stalls the reporter, never the event loop. Requests that arrive while
a report is being written are coalesced (signals coalesce anyway).
``every`` adds requests on a clock (--report-interval) through the same
writer, so a periodic line and a USR1 line never interleave either.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event

__all__ = ["Reporter", "render", "write_line"]


def render(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, separators=(",", ":")) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_line(fd: int, data: bytes, timeout: float) -> bool:
    """Write ``data`` to ``fd`` unless it stays unwritable for ``timeout`` seconds.

    For the places that cannot use a thread (the last report, the workers'
    parent): a reader that went away or stopped reading costs at most
    ``timeout``, then the line is dropped. A line shorter than PIPE_BUF
    goes into a pipe whole or not at all.
    """
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
            return False
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except OSError:
            return False
    return True


def _write_in_thread(fd: int, data: bytes) -> OSError | None:
    """``_write_all`` for the thread pool: the error returned, not raised (gevent
    would print the traceback of an exception leaving a pool thread)."""
    try:
        _write_all(fd, data)
    except OSError as exc:
        return exc
    return None


class Reporter:
    """Writes ``snapshot()`` to ``fd`` whenever ``request`` is called."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], fd: int = 1) -> None:
        self.snapshot = snapshot
        self.fd = fd
        self._wanted = Event()
        self._idle = Event()
        self._idle.set()
        self._greenlet = gevent.spawn(self._run)
        self._ticker: gevent.Greenlet | None = None

    def every(self, interval: float) -> None:
        """Also request a report every ``interval`` seconds, on a fixed grid of the clock."""
        self._ticker = gevent.spawn(self._tick, interval)

    def _tick(self, interval: float) -> None:
        due = time.monotonic() + interval
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            self.request()
            now = time.monotonic()
            while due <= now:  # a late wake-up skips what it missed instead of bursting
                due += interval

    def request(self) -> None:
        """Ask for a report. Safe from a signal callback: it only sets a flag."""
        self._wanted.set()

    def _run(self) -> None:
        threadpool = gevent.get_hub().threadpool
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._idle.clear()
            try:
                line = render(self.snapshot())  # taken without yielding
                # An error (stdout closed) is returned, not raised: keep serving.
                threadpool.apply(_write_in_thread, (self.fd, line))
            finally:
                self._idle.set()

    def flush(self, timeout: float = 2.0) -> None:
        """Wait for a report in progress, if any."""
        gevent.sleep(0)
        if self._wanted.is_set():
            gevent.sleep(0)
        self._idle.wait(timeout)

    def final(self, timeout: float = 2.0) -> bool:
        """Write one last report: the loop is about to end. False if stdout would not take it."""
        if self._ticker is not None:
            self._ticker.kill(block=False)
        self.flush(timeout)
        self._greenlet.kill(block=False)
        return write_line(self.fd, render(self.snapshot()), timeout)
