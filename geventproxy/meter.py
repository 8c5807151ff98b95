"""One direction's accounting of a forwarded chunk, in one call.

The copy loop calls ``Meter.account(chunk)`` once per chunk: it scans the
chunk (``codec.LineScanner``), adds its bytes and messages to the counters
and windows (``stats.Stats``) and times the REQs and their replies
(``latency.RequestTimer``). This is the pure-Python definition; the
compiled ``_accel.Meter`` does the same in one C call, and the tests hold
the two to identical results (and this one to the plain composition of
scanner, statistics and timer).
"""

from __future__ import annotations

from .codec import ACK, NAK, REQ, LineScanner, plain_line
from .latency import RequestTimer

__all__ = ["Meter"]

_KIND = {ord("R"): REQ, ord("A"): ACK, ord("N"): NAK}


class Meter(LineScanner):
    """Scans, counts and times one direction of a connection."""

    __slots__ = ("_direction", "_record", "_record_message", "_timed", "_timed_kinds")

    def __init__(self, direction: int, max_line: int, timer: RequestTimer) -> None:
        if direction not in (0, 1):
            raise ValueError("direction must be 0 or 1")
        super().__init__(max_line)
        self._direction = direction
        self._record = timer.stats.record
        self._record_message = timer.stats.record_message
        # Client side: REQs are timed; upstream side: replies are.
        self._timed = timer.replies_arrived if direction else timer.requests_sent
        # Which kinds of a plain line are timed, by kind (REQ, ACK, NAK).
        self._timed_kinds = (False, True, True) if direction else (True, False, False)

    def account(self, data: bytes) -> int:
        """Account one forwarded chunk; return the lines it ended (its LFs), well-formed or not.

        (A Foo server answers every line: the connection counts lines to know
        when a client that has half-closed has every reply it is owed. A line
        ends at its LF: an over-long one, counted invalid as soon as it passes
        ``max_line``, still has its rest to come until then.)
        """
        n = len(data)
        # The usual chunk: one plain line and nothing held. No counts tuple, three calls.
        if not self._held_len and not self._skipping and plain_line(data) and n <= self.max_line:
            kind = _KIND[data[0]]
            now = self._record_message(self._direction, n, kind)
            if self._timed_kinds[kind]:
                self._timed(now, 1)
            return 1
        skipping = self._skipping
        counts = self.feed(data)
        now = self._record(self._direction, n, counts)
        if now:
            if self._direction:
                self._timed(now, counts[1] + counts[2])
            else:
                self._timed(now, counts[0])
        if skipping or self._skipping:  # an over-long line was counted before its LF
            return data.count(b"\n")
        return counts[0] + counts[1] + counts[2] + counts[3]
