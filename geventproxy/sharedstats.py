"""Every worker's statistics block, in one shared-memory file that outlives exec.

The parent creates it (a memfd) once, before its first worker, and every
worker it ever starts inherits the descriptor and maps the same pages: a
worker is a fresh interpreter (exec), so an anonymous mapping would not
reach it. The file holds a header, one row per block (whether it was ever
used, its writer's heartbeat), and ``capacity`` statistics blocks as
``stats.py`` lays them out. Block 0 holds the totals of the state file.

One process writes a block at a time. When a worker exits, its block keeps
what it counted, and the next worker given that block counts on from
there. A block is marked used when it is first given out and stays used,
so a sum over the used blocks never goes back: totals only grow, and the
moving windows (rates, recent latency) carry on across workers and
generations, since each bucket is stamped with its time on the system-wide
monotonic clock. Reports sum the used blocks: the parent's (USR1, the
state file) and worker 0's (the admin endpoint) alike.

A worker started from newer code on disk checks the layout fingerprint in
the header first: a version that lays the blocks out differently cannot
add into them, and refuses to start (the reload then fails and the running
workers carry on).
"""

from __future__ import annotations

import array
import mmap
import os
import time
import zlib

from . import stats
from .stats import BLOCK_SLOTS, Block, Stats, new_block, reset_gauges

__all__ = ["BASELINE", "IncompatibleLayout", "SharedStats", "fingerprint"]

_MAGIC = int.from_bytes(b"gpstats1", "little")
_HEADER = 4  # magic, fingerprint, capacity, spare
_ROW = 2  # per block: the fields below
USED, HEARTBEAT = range(_ROW)
#: The block that holds the state file's totals; never given to a worker.
BASELINE = 0


class IncompatibleLayout(Exception):
    """The shared memory was laid out by another version of the code."""


def fingerprint() -> int:
    """A checksum of everything that decides where a count lives in a block."""
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
    )
    return zlib.crc32(repr(shape).encode())


def _size(capacity: int) -> int:
    return (_HEADER + capacity * (_ROW + BLOCK_SLOTS)) * 8


class SharedStats:
    """The mapped file: rows and blocks by index."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self._map = mmap.mmap(fd, _size(capacity))
        words = memoryview(self._map).cast("q")
        self._header = words[:_HEADER]
        rows_end = _HEADER + capacity * _ROW
        self._rows = [words[i : i + _ROW] for i in range(_HEADER, rows_end, _ROW)]
        self.blocks: list[Block] = [
            words[i : i + BLOCK_SLOTS] for i in range(rows_end, len(words), BLOCK_SLOTS)
        ]

    @classmethod
    def create(cls, capacity: int) -> SharedStats:
        """In the parent: a new file with room for ``capacity`` blocks, block 0 the baseline."""
        fd = os.memfd_create("geventproxy-stats")
        os.ftruncate(fd, _size(capacity))
        shared = cls(fd, capacity)
        shared._header[0], shared._header[1], shared._header[2] = _MAGIC, fingerprint(), capacity
        return shared

    @classmethod
    def attach(cls, fd: int) -> SharedStats:
        """In a worker: map the parent's file, if this code lays blocks out the same way."""
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
        """Put the state file's totals (``stats.new_baseline``) into block 0."""
        self.blocks[BASELINE][:] = array.array("q", totals)
        self._rows[BASELINE][USED] = 1

    def free(self, held: set[int]) -> list[int]:
        """Blocks no live process holds, the used ones first (fewer blocks to sum)."""
        free = [i for i in range(1, self.capacity) if i not in held]
        return sorted(free, key=lambda i: (not self._rows[i][USED], i))

    def give(self, index: int) -> None:
        """Hand a free block to a worker about to start; a new block is cleared first."""
        row = self._rows[index]
        if not row[USED]:
            block = self.blocks[index]
            block[:] = array.array("q", new_block())
            Stats(block)  # stamps the start: uptime is the oldest block's
            row[USED] = 1  # last: a reader never sums a block still being cleared
        reset_gauges(self.blocks[index])  # the previous writer's connections are gone
        row[HEARTBEAT] = time.monotonic_ns()

    def release(self, index: int) -> None:
        """Its worker has exited: what it counted stays, what it had open is gone."""
        reset_gauges(self.blocks[index])

    def beat(self, index: int) -> None:
        """In a worker: its event loop is running."""
        self._rows[index][HEARTBEAT] = time.monotonic_ns()

    def heartbeat(self, index: int) -> int:
        return self._rows[index][HEARTBEAT]
