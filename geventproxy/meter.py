"""One direction's accounting of a forwarded chunk, in one call.

The copy loop calls ``Meter.account(chunk)`` once per chunk: it scans the
chunk (``codec.LineScanner``), adds its bytes and messages to the counters
and windows (``stats.Stats.record``) and times the REQs and their replies
(``latency.RequestTimer``). This is the pure-Python definition; the
compiled ``_accel.Meter`` does the same in one C call, and the tests hold
the two to identical results.
"""

from __future__ import annotations

from .codec import LineScanner
from .latency import RequestTimer

__all__ = ["Meter"]


class Meter:
    """Scans, counts and times one direction of a connection."""

    __slots__ = ("_scanner", "_feed", "_record", "_direction", "_on_messages")

    def __init__(self, direction: int, max_line: int, timer: RequestTimer) -> None:
        if direction not in (0, 1):
            raise ValueError("direction must be 0 or 1")
        self._scanner = LineScanner(max_line)
        self._feed = self._scanner.feed
        self._record = timer.stats.record
        self._direction = direction
        self._on_messages = timer.answered if direction else timer.sent

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held now."""
        return self._scanner.pending

    def account(self, data: bytes) -> int:
        """Account one forwarded chunk; return the well-formed messages it completed."""
        counts = self._feed(data)
        now = self._record(self._direction, len(data), counts)
        if now:
            self._on_messages(now, counts)
            return counts[0] + counts[1] + counts[2]
        return 0
