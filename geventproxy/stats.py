"""Counters and moving windows, kept in one flat block of 64-bit integers.

Pure logic: the clock is injected (integer nanoseconds of a monotonic clock)
and nothing here does I/O. The block is a flat array of integers: a list,
or a ``memoryview`` of signed 64-bit integers in shared memory, where each
worker process writes its own block and a report sums the blocks
(``snapshot``). One process and one event loop write a block, so no locks.

A moving window of W seconds counts the messages seen in (now - W, now]. The
block keeps a ring of 1 ms buckets covering the longest window; each bucket
is stamped with the absolute millisecond it holds, so a stale bucket is
recognised on read and recycled on write, and nothing ever has to sweep the
ring. An update costs the same at any message rate; a read sums the buckets
whose stamp lies inside the window. The result undercounts by at most the
messages of one bucket, the millisecond that straddles now - W: at steady
traffic that is 0.1% of the 1 s rate and 0.01% of the 10 s rate. Once no
message has been seen for W the window is exactly zero.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

from .codec import Counts

__all__ = [
    "BUCKET_NS",
    "CLIENT_CLOSED",
    "CLIENT_FIN_TIMEOUT",
    "CLIENT_RESET",
    "CLOSE_REASONS",
    "ERROR",
    "IDLE_TIMEOUT",
    "SHUTDOWN",
    "STRICT_VIOLATION",
    "UPSTREAM_CLOSED",
    "UPSTREAM_RESET",
    "UPSTREAM_UNAVAILABLE",
    "COUNTERS",
    "DIRECTIONS",
    "GAUGES",
    "LATENCY_BOUNDS_US",
    "RING",
    "Stats",
    "latency_histogram",
    "new_baseline",
    "layout",
    "new_block",
    "reset_gauges",
    "persistent_totals",
    "set_pid",
    "snapshot",
    "worker_figures",
]

BUCKET_NS = 1_000_000  # 1 ms
RING = 10_000  # buckets: 10 s, the longest window
WINDOWS_S = (1, 10)
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
MSG_KINDS = ("req", "ack", "nak", "invalid")  # the codec's Counts order
# Why a connection ended: each is a slot in the block and a label value on
# /metrics. Code names them by these constants, never by a bare string.
CLIENT_CLOSED = "client_closed"  # the client half-closed and had every reply it was owed
UPSTREAM_CLOSED = "upstream_closed"  # the upstream ended first; the client was then closed
CLIENT_RESET = "client_reset"
UPSTREAM_RESET = "upstream_reset"
IDLE_TIMEOUT = "idle_timeout"
CLIENT_FIN_TIMEOUT = "client_fin_timeout"  # the client half-closed; owed replies never came
STRICT_VIOLATION = "strict_violation"
SHUTDOWN = "shutdown"  # closed by the drain deadline or a forced exit
UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # the upstream could not be dialled
ERROR = "error"  # any other socket error, or no descriptor left for the upstream
CLOSE_REASONS = (
    CLIENT_CLOSED,
    UPSTREAM_CLOSED,
    CLIENT_RESET,
    UPSTREAM_RESET,
    IDLE_TIMEOUT,
    CLIENT_FIN_TIMEOUT,
    STRICT_VIOLATION,
    SHUTDOWN,
    UPSTREAM_UNAVAILABLE,
    ERROR,
)

# Plain counters and gauges, one slot each, in report order.
COUNTERS = (
    "connections_total",  # accepted and handled (not counting refused ones)
    "connections_active",  # gauge
    "connections_refused",  # closed at once because --max-connections was reached
    "upstream_connect_failures",  # refused, unreachable, or the name did not resolve
    "upstream_connect_timeouts",  # no answer within --connect-timeout
    "accept_errors",  # accept() failed (e.g. out of file descriptors)
    "latency_unmatched",  # responses that arrived with no REQ waiting for them
    "latency_dropped",  # REQs forgotten because a connection had too many unanswered
)
# The COUNTERS that describe the present, not a history: never persisted.
GAUGES = ("connections_active",)

# Upstream response time histogram: upper bounds in microseconds, seven per
# decade from 10 us to 10 s, plus +Inf. Fixed, so every block and every
# scrape agree on them; interpolating inside a bucket keeps a quantile within
# about 25% of the truth.
LATENCY_BOUNDS_US = tuple(
    int(m * 10**e) for e in range(1, 7) for m in (1, 1.5, 2, 3, 4, 5, 7.5)
) + (10_000_000,)
_NB = len(LATENCY_BOUNDS_US) + 1  # the last bucket is +Inf
LATENCY_WINDOW_S = 10

# Layout of a block: counters, per-direction message and byte counts, close
# reasons, start time, then the ring (stamp, req, resp per bucket).
_C = {name: i for i, name in enumerate(COUNTERS)}
_MSG = len(COUNTERS)  # DIRECTIONS x MSG_KINDS
_BYTES = _MSG + len(DIRECTIONS) * len(MSG_KINDS)  # per direction
_CLOSE = _BYTES + len(DIRECTIONS)
_STARTED = _CLOSE + len(CLOSE_REASONS)
_LCOUNT = _STARTED + 1  # cumulative latency histogram, _NB buckets
_LSUM = _LCOUNT + _NB  # sum of latencies, microseconds
_LSTAMP = _LSUM + 1  # ring of LATENCY_WINDOW_S one-second histograms: stamps
_LRING = _LSTAMP + LATENCY_WINDOW_S  # ... and their buckets
_STAMP = _LRING + LATENCY_WINDOW_S * _NB
_WREQ = _STAMP + RING
_WRESP = _WREQ + RING
_PID = _WRESP + RING  # the process writing the block (a worker's pid), 0 if none
BLOCK_SLOTS = _PID + 1


Block = Union[list[int], memoryview]


def layout() -> dict[str, int]:
    """Where ``Stats.record`` and ``observe_latency`` write, for the compiled writer.

    The compiled code takes every offset from here (and checks each against
    the block's length), so the layout is defined once, in this module.
    """
    return {
        "bytes": _BYTES,
        "msg": _MSG,
        "stamp": _STAMP,
        "wreq": _WREQ,
        "wresp": _WRESP,
        "ring": RING,
        "lcount": _LCOUNT,
        "lsum": _LSUM,
        "lstamp": _LSTAMP,
        "lring": _LRING,
        "nb": _NB,
        "lwindow": LATENCY_WINDOW_S,
        "dropped": _C["latency_dropped"],
        "unmatched": _C["latency_unmatched"],
        "bucket_ns": BUCKET_NS,
        "slots": BLOCK_SLOTS,
    }


def new_block() -> Block:
    """A zeroed block: a plain list (``sharedstats`` puts blocks in shared memory)."""
    block: Block = [0] * BLOCK_SLOTS
    for i in range(_STAMP, _WREQ):
        block[i] = -1  # no bucket holds millisecond -1
    for i in range(_LSTAMP, _LRING):
        block[i] = -1
    return block


def reset_gauges(block: Block) -> None:
    """Zero what describes a live process (its open connections), keep the totals."""
    block[_C["connections_active"]] = 0


def set_pid(block: Block, pid: int) -> None:
    """Say which process writes ``block``: a worker's admin endpoint reads its siblings' figures."""
    block[_PID] = pid


def worker_figures(block: Block) -> dict[str, int]:
    """What one worker's block says of that worker alone: cheap, no pass over the ring."""
    return {
        "pid": block[_PID],
        "connections_active": block[_C["connections_active"]],
        "connections_total": block[_C["connections_total"]],
        "requests": block[_MSG],  # REQs forwarded client to upstream
    }


class Stats:
    """The writer of one block: the only object the relays touch."""

    __slots__ = ("block", "clock", "writer")

    def __init__(
        self,
        block: Block | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        mark_start: bool = True,
    ) -> None:
        self.block = new_block() if block is None else block
        self.clock = clock
        self.writer: Any = None  # the compiled writer of this block, made by accel on first use
        if mark_start:  # a restarted worker keeps its slot's start time
            self.block[_STARTED] = clock()

    def incr(self, counter: str, n: int = 1) -> None:
        self.block[_C[counter]] += n

    def closed(self, reason: str) -> None:
        self.block[_CLOSE + CLOSE_REASONS.index(reason)] += 1

    def record(self, direction: int, nbytes: int, counts: Counts) -> int:
        """Account one forwarded chunk: its bytes and the messages it completed.

        ``direction`` indexes DIRECTIONS. Called once per chunk on the hot
        path: a few integer additions, and one clock read when the chunk
        completed any message. Returns that clock reading, or 0 when the
        chunk completed no message.
        """
        b = self.block
        b[_BYTES + direction] += nbytes
        req, ack, nak, invalid = counts
        base = _MSG + direction * 4
        if invalid:
            b[base + 3] += invalid
        # Most chunks carry one message: skip the additions of zero.
        if req:
            b[base] += req
        elif not (ack or nak):
            return 0
        if ack:
            b[base + 1] += ack
        if nak:
            b[base + 2] += nak
        now = self.clock()
        k = now // BUCKET_NS
        i = k % RING
        if b[_STAMP + i] == k:
            if req:
                b[_WREQ + i] += req
            if ack or nak:
                b[_WRESP + i] += ack + nak
        else:
            # Counts first, stamp last: a concurrent reader in another process
            # then sees either the old stamp (and skips the bucket) or the new counts.
            b[_WREQ + i] = req
            b[_WRESP + i] = ack + nak
            b[_STAMP + i] = k
        return now

    def record_message(self, direction: int, nbytes: int, kind: int) -> int:
        """``record`` for a chunk that completed exactly one message, of ``kind``
        (0 REQ, 1 ACK, 2 NAK): the usual chunk, with no counts tuple to build.
        Returns the clock reading."""
        b = self.block
        b[_BYTES + direction] += nbytes
        b[_MSG + direction * 4 + kind] += 1
        now = self.clock()
        k = now // BUCKET_NS
        i = k % RING
        if b[_STAMP + i] == k:
            b[(_WRESP if kind else _WREQ) + i] += 1
        else:  # counts first, stamp last, as in record
            b[_WREQ + i] = 0 if kind else 1
            b[_WRESP + i] = 1 if kind else 0
            b[_STAMP + i] = k
        return now

    def observe_latency(self, now_ns: int, latency_ns: int, n: int = 1) -> None:
        """Record ``n`` responses that took ``latency_ns`` each."""
        b = self.block
        us = latency_ns // 1000
        i = bisect_left(LATENCY_BOUNDS_US, us)
        b[_LCOUNT + i] += n
        b[_LSUM] += us * n
        second = now_ns // 1_000_000_000
        slot = second % LATENCY_WINDOW_S
        base = _LRING + slot * _NB
        if b[_LSTAMP + slot] != second:
            for j in range(base, base + _NB):
                b[j] = 0
            b[_LSTAMP + slot] = second
        b[base + i] += n


def _window_sums(block: Block, now_ns: int) -> dict[int, tuple[int, int]]:
    """Requests and responses in (now - W, now] for each window W, for one block."""
    kn = now_ns // BUCKET_NS
    short, long_ = kn - WINDOWS_S[0] * 1000, kn - WINDOWS_S[1] * 1000
    sums = [0, 0, 0, 0]  # short req, short resp, long req, long resp
    for stamp, req, resp in zip(
        list(block[_STAMP:_WREQ]), list(block[_WREQ:_WRESP]), list(block[_WRESP:])
    ):
        # Buckets strictly newer than now - W are inside; newer than now, not yet.
        if long_ < stamp <= kn:
            sums[2] += req
            sums[3] += resp
            if stamp > short:
                sums[0] += req
                sums[1] += resp
    return {WINDOWS_S[0]: (sums[0], sums[1]), WINDOWS_S[1]: (sums[2], sums[3])}


def snapshot(blocks: Sequence[Block] | Iterable[Block], now_ns: int) -> dict[str, Any]:
    """The report: the sum over ``blocks`` at ``now_ns``, as a JSON-ready dict."""
    blocks = list(blocks)
    total = [0] * _STAMP
    windows = {w: [0, 0] for w in WINDOWS_S}
    started = min(b[_STARTED] for b in blocks)
    for b in blocks:
        for i, v in enumerate(list(b[:_STAMP])):
            total[i] += v
        for w, (req, resp) in _window_sums(b, now_ns).items():
            windows[w][0] += req
            windows[w][1] += resp
    per_kind = [
        sum(total[_MSG + d * len(MSG_KINDS) + k] for d in range(len(DIRECTIONS)))
        for k in range(len(MSG_KINDS))
    ]
    req, ack, nak, invalid = per_kind
    report: dict[str, Any] = {
        "msg_total": req + ack + nak,
        "msg_req": req,
        "msg_ack": ack,
        "msg_nak": nak,
        "msg_invalid": invalid,
        "request_rate_1s": windows[1][0] / 1.0,
        "request_rate_10s": windows[10][0] / 10.0,
        "response_rate_1s": windows[1][1] / 1.0,
        "response_rate_10s": windows[10][1] / 10.0,
        "uptime_s": round((now_ns - started) / 1e9, 3),
    }
    for name in COUNTERS:
        report[name] = total[_C[name]]
    for d, direction in enumerate(DIRECTIONS):
        report[f"bytes_{direction}"] = total[_BYTES + d]
    for d, direction in enumerate(DIRECTIONS):
        for k, kind in enumerate(MSG_KINDS):
            report[f"msg_{kind}_{direction}"] = total[_MSG + d * len(MSG_KINDS) + k]
    recent = _recent_latency(blocks, now_ns)
    for q in (50, 90, 99):
        value = _quantile(recent, q / 100)
        report[f"latency_p{q}_ms"] = None if value is None else round(value / 1000, 3)
    report["latency_count"] = sum(total[_LCOUNT : _LCOUNT + _NB])
    report["connections_closed"] = {
        reason: total[_CLOSE + i] for i, reason in enumerate(CLOSE_REASONS)
    }
    return report


def _recent_latency(blocks: list[Block], now_ns: int) -> list[int]:
    """Per-bucket latency counts of the last LATENCY_WINDOW_S whole seconds and this one."""
    second = now_ns // 1_000_000_000
    counts = [0] * _NB
    for b in blocks:
        for slot in range(LATENCY_WINDOW_S):
            if second - LATENCY_WINDOW_S < b[_LSTAMP + slot] <= second:
                base = _LRING + slot * _NB
                for i, n in enumerate(list(b[base : base + _NB])):
                    counts[i] += n
    return counts


def _quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile in microseconds, interpolated inside its histogram bucket."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = LATENCY_BOUNDS_US[i - 1] if i else 0
            if i == len(LATENCY_BOUNDS_US):
                return float(low)  # +Inf bucket: the best we can say is its floor
            high = LATENCY_BOUNDS_US[i]
            return low + (high - low) * (rank - seen) / n
        seen += n
    return float(LATENCY_BOUNDS_US[-1])


def latency_histogram(blocks: Iterable[Block]) -> tuple[list[int], int]:
    """Cumulative-since-start bucket counts (len(LATENCY_BOUNDS_US) + 1) and sum in us."""
    counts = [0] * _NB
    total_us = 0
    for b in blocks:
        for i, n in enumerate(list(b[_LCOUNT : _LCOUNT + _NB])):
            counts[i] += n
        total_us += b[_LSUM]
    return counts, total_us


# A baseline block's start time: later than any real one, so ``snapshot``'s
# min() over the blocks' start times (the uptime) never picks it.
_NEVER = 2**63 - 1


def persistent_totals(blocks: Iterable[Block]) -> dict[str, Any]:
    """The counters that should survive a restart, summed over ``blocks``, by name.

    Gauges, the rate windows, the recent-latency ring and the start time are
    left out: they describe this process, not the history. Names rather than
    slot numbers, so that a saved file outlives a change of the block layout.
    """
    total = [0] * _STAMP
    for b in blocks:
        for i, v in enumerate(list(b[:_STAMP])):
            total[i] += v
    totals: dict[str, Any] = {name: total[_C[name]] for name in COUNTERS if name not in GAUGES}
    for d, direction in enumerate(DIRECTIONS):
        totals[f"bytes_{direction}"] = total[_BYTES + d]
        for k, kind in enumerate(MSG_KINDS):
            totals[f"msg_{kind}_{direction}"] = total[_MSG + d * len(MSG_KINDS) + k]
    totals["connections_closed"] = {
        reason: total[_CLOSE + i] for i, reason in enumerate(CLOSE_REASONS)
    }
    totals["latency_bounds_us"] = list(LATENCY_BOUNDS_US)
    totals["latency_buckets"] = total[_LCOUNT : _LCOUNT + _NB]
    totals["latency_sum_us"] = total[_LSUM]
    return totals


def _count(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name}: {value!r} is not a count")
    return value


def new_baseline(totals: dict[str, Any]) -> Block:
    """A block that holds ``totals`` (from ``persistent_totals``) and nothing else.

    ``snapshot`` sums it in with the live blocks: the totals carry on, the
    rates stay those of the live blocks (the baseline's windows are empty)
    and so does the uptime. Missing names count as zero and unknown ones are
    ignored; a value that is not a count raises ValueError. Latency buckets
    saved with other bounds than ``LATENCY_BOUNDS_US`` are dropped: they
    would land in the wrong buckets.
    """
    if not isinstance(totals, dict):
        raise ValueError("the totals are not an object")
    block = new_block()
    block[_STARTED] = _NEVER
    for name in COUNTERS:
        if name not in GAUGES and name in totals:
            block[_C[name]] = _count(totals[name], name)
    for d, direction in enumerate(DIRECTIONS):
        name = f"bytes_{direction}"
        block[_BYTES + d] = _count(totals.get(name, 0), name)
        for k, kind in enumerate(MSG_KINDS):
            name = f"msg_{kind}_{direction}"
            block[_MSG + d * len(MSG_KINDS) + k] = _count(totals.get(name, 0), name)
    closed = totals.get("connections_closed", {})
    if not isinstance(closed, dict):
        raise ValueError("connections_closed is not an object")
    for i, reason in enumerate(CLOSE_REASONS):
        block[_CLOSE + i] = _count(closed.get(reason, 0), f"connections_closed.{reason}")
    buckets = totals.get("latency_buckets")
    if buckets is not None and totals.get("latency_bounds_us") == list(LATENCY_BOUNDS_US):
        if not isinstance(buckets, list) or len(buckets) != _NB:
            raise ValueError("latency_buckets does not match the bounds")
        for i, n in enumerate(buckets):
            block[_LCOUNT + i] = _count(n, "latency_buckets")
        block[_LSUM] = _count(totals.get("latency_sum_us", 0), "latency_sum_us")
    return block
