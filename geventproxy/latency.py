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


_EMPTY: deque[list[int]] = deque(maxlen=0)


class RequestTimer:
    """The unanswered REQs of one connection, oldest first."""

    __slots__ = ("stats", "limit", "_queue")

    #: Most chunks of unanswered REQs remembered per connection.
    default_limit = 1024

    def __init__(self, stats: Stats, limit: int = default_limit) -> None:
        self.stats = stats
        self.limit = limit
        self._queue: deque[list[int]] = _EMPTY  # [sent_ns, requests]; made on first use

    def __len__(self) -> int:
        return len(self._queue)

    def sent(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the client was forwarded, holding ``counts.req`` REQs."""
        if counts[0]:
            if self._queue is _EMPTY:
                self._queue = deque()  # an idle connection never pays for one
            self._queue.append([now_ns, counts[0]])
            if len(self._queue) > self.limit:
                self.stats.incr("latency_dropped", self._queue.popleft()[1])

    def answered(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the upstream was forwarded, holding ACKs and NAKs."""
        n = counts[1] + counts[2]
        queue = self._queue
        observe = self.stats.observe_latency
        while n and queue:
            entry = queue[0]
            sent_ns, waiting = entry
            take = waiting if waiting <= n else n
            observe(now_ns, now_ns - sent_ns, take)
            n -= take
            if take == waiting:
                queue.popleft()
            else:
                entry[1] = waiting - take
        if n:
            self.stats.incr("latency_unmatched", n)
