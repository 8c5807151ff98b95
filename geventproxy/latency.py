"""Upstream response time: match each ACK/NAK to the REQ it answers.

Replies come back in request order, so a connection needs only a FIFO of
the send times of its unanswered REQs. Times are taken per chunk: the REQs
read together share one send time, and the replies read together one
arrival time, which is as precise as a proxy can see them. The FIFO holds
one entry per chunk, at most ``limit`` entries: a client that pipelines
without end, or a server that never answers, cannot grow it further (the
oldest entries are dropped and counted).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .codec import Counts
    from .stats import Stats

__all__ = ["RequestTimer"]


_EMPTY: deque[int] = deque(maxlen=0)


class RequestTimer:
    """The unanswered REQs of one connection, oldest first."""

    __slots__ = ("stats", "limit", "_queue", "_forgotten")

    #: Most chunks of unanswered REQs remembered per connection.
    default_limit = 1024

    def __init__(self, stats: Stats, limit: int = default_limit) -> None:
        self.stats = stats
        self.limit = limit
        # Flat pairs: sent_ns, requests, sent_ns, requests... (no tuple per chunk).
        # Made on first use: an idle connection never pays for one.
        self._queue: deque[int] = _EMPTY
        self._forgotten = 0  # dropped REQs whose replies are still to come

    def __len__(self) -> int:
        return len(self._queue) // 2

    def sent(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the client was forwarded, holding ``counts[0]`` REQs."""
        self.requests_sent(now_ns, counts[0])

    def answered(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the upstream was forwarded, holding ACKs and NAKs."""
        self.replies_arrived(now_ns, counts[1] + counts[2])

    def requests_sent(self, now_ns: int, n: int) -> None:
        """``n`` REQs were forwarded to the upstream together at ``now_ns``."""
        if n:
            queue = self._queue
            if queue is _EMPTY:
                queue = self._queue = deque()
            queue.append(now_ns)
            queue.append(n)
            if len(queue) > 2 * self.limit:
                queue.popleft()
                dropped = queue.popleft()
                self._forgotten += dropped
                self.stats.incr("latency_dropped", dropped)

    def replies_arrived(self, now_ns: int, n: int) -> None:
        """``n`` replies were forwarded to the client together at ``now_ns``."""
        if self._forgotten:  # the oldest replies answer REQs no longer remembered
            skip = min(n, self._forgotten)
            self._forgotten -= skip
            n -= skip
        queue = self._queue
        while n and queue:
            sent_ns, waiting = queue[0], queue[1]
            if waiting <= n:
                queue.popleft()
                queue.popleft()
                take = waiting
            else:
                queue[1] = waiting - n
                take = n
            self.stats.observe_latency(now_ns, now_ns - sent_ns, take)
            n -= take
        if n:
            self.stats.incr("latency_unmatched", n)
