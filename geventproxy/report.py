"""The statistics report: one JSON object per line on stdout.

One writer greenlet owns stdout, so two reports never interleave. The
write itself runs in gevent's thread pool: a stdout pipe that nobody reads
then stalls the reporter, never the event loop. Requests that arrive while
a report is being written are coalesced (signals coalesce anyway).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event

__all__ = ["Reporter", "render"]


def render(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, separators=(",", ":")) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
        self.written = 0
        self._wanted = Event()
        self._idle = Event()
        self._idle.set()
        self._greenlet = gevent.spawn(self._run)

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
                if threadpool.apply(_write_in_thread, (self.fd, line)) is None:
                    self.written += 1
                # else stdout is closed: nothing to report to, keep serving
            finally:
                self._idle.set()

    def flush(self, timeout: float = 2.0) -> None:
        """Wait for a report in progress, if any."""
        gevent.sleep(0)
        if self._wanted.is_set():
            gevent.sleep(0)
        self._idle.wait(timeout)

    def final(self) -> None:
        """Write one last report directly: the loop is about to end."""
        self.flush()
        self._greenlet.kill(block=False)
        try:
            _write_all(self.fd, render(self.snapshot()))
        except OSError:
            pass
