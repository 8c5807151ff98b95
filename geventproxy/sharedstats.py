"""Every worker's statistics block, in one shared-memory file that outlives exec.

The parent creates it (a memfd) once, before its first worker, and every
worker it ever starts inherits the descriptor and maps the same pages: a
worker is a fresh interpreter (exec), so an anonymous mapping would not
reach it. The file holds a header, one row per block (whether it was ever
used, which worker of which generation writes it, its heartbeat),
``capacity`` statistics blocks as ``stats.py`` lays them out, and the live
page's history ring (``history.py``), which the parent writes and worker 0
serves. Block 0 holds the totals of the state file (zeros without one),
and the parent's start time.

One process writes a block at a time. When a worker exits, its block keeps
what it counted, and the next worker given that block counts on from
there. A block is marked used when it is first given out and stays used,
so a sum over the used blocks never goes back: totals only grow, and the
moving windows (rates, recent latency) carry on across workers and
generations, since each bucket is stamped with its time on the system-wide
monotonic clock. Reports sum the used blocks: the parent's (USR1, the
state file) and worker 0's (the admin endpoint) alike.

A worker updates its block in several steps (a connection's close reason,
then the active count; a chunk is sent, then counted), each done without
yielding to another greenlet. A report of the parent must not catch it
between two: so for USR1 the parent asks every worker for a frozen copy of
its block, which the worker makes from its event loop, between greenlets,
and sums those (``request_freeze``, ``freeze``, ``summed``). The report
then holds everything any client had seen before the signal, and
``connections_total`` equals ``connections_active`` plus the closed ones.

A worker started from newer code on disk checks the layout fingerprint in
the header first: a version that lays the file out differently cannot add
into it, and refuses to start (the reload then fails and the running
workers carry on).
"""

from __future__ import annotations

import array
import mmap
import os
import time
import zlib

from . import history, stats
from .stats import (
    BLOCK_SLOTS,
    ERROR,
    Block,
    Stats,
    new_block,
    reset_gauges,
    set_pid,
    worker_figures,
)

__all__ = ["BASELINE", "IncompatibleLayout", "SharedStats", "fingerprint"]

_MAGIC = int.from_bytes(b"gpstats1", "little")
_HEADER = 4  # the fields below
_MAGIC_AT, _FINGERPRINT, _CAPACITY, _SERVING = range(_HEADER)
_ROW = 6  # per block: the fields below
USED, WORKER, GENERATION, HEARTBEAT, REQUESTED, FROZEN = range(_ROW)
#: The block that holds the state file's totals; never given to a worker.
BASELINE = 0


class IncompatibleLayout(Exception):
    """The shared memory was laid out by another version of the code."""


def fingerprint() -> int:
    """A checksum of everything that decides where a figure lives in the file."""
    shape = (
        _HEADER,
        _ROW,
        BLOCK_SLOTS,
        stats.COUNTERS,
        stats.DIRECTIONS,
        stats.MSG_KINDS,
        stats.CLOSE_REASONS,
        stats.LATENCY_BOUNDS_US,
        stats.RING,
        stats.WINDOWS_S,
        stats.LATENCY_WINDOW_S,
        sorted(stats.layout().items()),
        history.SLOTS,
        history.FIELDS,
    )
    return zlib.crc32(repr(shape).encode())


def _words(capacity: int) -> int:
    """The int64 words: header, rows, blocks, and a frozen copy of each block."""
    return _HEADER + capacity * (_ROW + 2 * BLOCK_SLOTS)


def _size(capacity: int) -> int:
    return (_words(capacity) + history.SLOTS) * 8


class SharedStats:
    """The mapped file: rows and blocks by index, and the history ring."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self._map = mmap.mmap(fd, _size(capacity))
        words = memoryview(self._map).cast("q")
        self._header = words[:_HEADER]
        rows_end = _HEADER + capacity * _ROW
        self._rows = [words[i : i + _ROW] for i in range(_HEADER, rows_end, _ROW)]
        blocks_end = rows_end + capacity * BLOCK_SLOTS
        self.blocks: list[Block] = [
            words[i : i + BLOCK_SLOTS] for i in range(rows_end, blocks_end, BLOCK_SLOTS)
        ]
        self._frozen: list[Block] = [
            words[i : i + BLOCK_SLOTS] for i in range(blocks_end, _words(capacity), BLOCK_SLOTS)
        ]
        self.history = memoryview(self._map)[_words(capacity) * 8 :].cast("d")

    @classmethod
    def create(cls, capacity: int) -> SharedStats:
        """In the parent: a new file with room for ``capacity`` blocks, block 0 the baseline."""
        fd = os.memfd_create("geventproxy-stats")
        os.ftruncate(fd, _size(capacity))
        shared = cls(fd, capacity)
        shared.set_baseline(new_block())  # nothing saved (yet): zeros
        shared.history[:] = array.array("d", history.new_history_block())
        header = shared._header
        header[_MAGIC_AT], header[_FINGERPRINT], header[_CAPACITY] = _MAGIC, fingerprint(), capacity
        return shared

    @classmethod
    def attach(cls, fd: int) -> SharedStats:
        """In a worker: map the parent's file, if this code lays it out the same way."""
        with mmap.mmap(fd, _HEADER * 8, access=mmap.ACCESS_READ) as head:
            magic, printed, capacity, _ = memoryview(head).cast("q").tolist()
        if magic != _MAGIC or printed != fingerprint() or os.fstat(fd).st_size != _size(capacity):
            raise IncompatibleLayout(
                "the statistics in shared memory are laid out by another version: "
                "restart the proxy (a reload cannot switch to this version)"
            )
        return cls(fd, capacity)

    def used(self) -> list[Block]:
        """The blocks a report sums."""
        return [block for row, block in zip(self._rows, self.blocks) if row[USED]]

    def set_baseline(self, totals: Block) -> None:
        """Put the state file's totals (``stats.new_baseline``) into block 0.

        Block 0 is always summed, and stamped with the parent's start: the
        uptime is the parent's, whatever workers came and went.
        """
        block = self.blocks[BASELINE]
        block[:] = array.array("q", totals)
        Stats(block)
        self._rows[BASELINE][USED] = 1

    def free(self, held: set[int]) -> list[int]:
        """Blocks no live process holds, the used ones first (fewer blocks to sum)."""
        free = [i for i in range(1, self.capacity) if i not in held]
        return sorted(free, key=lambda i: (not self._rows[i][USED], i))

    def give(self, index: int, worker: int, generation: int) -> None:
        """Hand a free block to a worker about to start; a new block is cleared first."""
        row = self._rows[index]
        if not row[USED]:
            block = self.blocks[index]
            block[:] = array.array("q", new_block())
            Stats(block)  # stamps its start; block 0's is older: the uptime is the parent's
            row[USED] = 1  # last: a reader never sums a block still being cleared
        row[WORKER], row[GENERATION] = worker, generation
        row[HEARTBEAT] = time.monotonic_ns()

    def release(self, index: int) -> None:
        """Its worker has exited: what it counted stays, what it had open is gone.

        A worker that exits normally has closed every connection; one that died
        (killed, crashed) leaves some open, which the kernel then resets: they
        are closed as ``error``, so that every connection keeps one reason.
        """
        block = self.blocks[index]
        stats = Stats(block, mark_start=False)
        for _ in range(worker_figures(block)["connections_active"]):
            stats.closed(ERROR)
        reset_gauges(block)
        set_pid(block, 0)

    def beat(self, index: int) -> None:
        """In a worker: its event loop is running."""
        self._rows[index][HEARTBEAT] = time.monotonic_ns()

    def heartbeat(self, index: int) -> int:
        return self._rows[index][HEARTBEAT]

    # -- a report's consistent view of a live worker ---------------------------

    def request_freeze(self, index: int, request: int) -> None:
        """In the parent: ask the worker writing ``index`` for a copy of its block."""
        self._rows[index][REQUESTED] = request

    def freeze(self, index: int) -> bool:
        """In a worker, from its event loop (so between two updates, never inside
        one): copy its block for the request pending, if any; whether it did."""
        row = self._rows[index]
        if row[REQUESTED] == row[FROZEN]:
            return False
        self._frozen[index][:] = self.blocks[index]
        row[FROZEN] = row[REQUESTED]
        return True

    def summed(self, frozen: set[int]) -> list[Block]:
        """The blocks of a report: the frozen copy of those in ``frozen``, else the block."""
        return [
            self._frozen[i] if i in frozen else block
            for i, (row, block) in enumerate(zip(self._rows, self.blocks))
            if row[USED]
        ]

    # -- the per-worker figures -----------------------------------------------

    def set_serving(self, generation: int) -> None:
        """The generation whose workers the per-worker figures show."""
        self._header[_SERVING] = generation

    def serving(self) -> list[tuple[int, Block]]:
        """(worker, block) of each running worker of the serving generation, by worker."""
        generation = self._header[_SERVING]
        running = [
            (row[WORKER], block)
            for row, block in zip(self._rows, self.blocks)
            if row[USED] and row[GENERATION] == generation and worker_figures(block)["pid"]
        ]
        return sorted(running, key=lambda pair: pair[0])
