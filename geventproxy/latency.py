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
    """The unanswered REQs of one connection, oldest first.

    The oldest chunk is kept in two attributes and only the later ones in a
    deque: a client that waits for each reply (the usual one) never makes the
    deque, and a connection drops it once everything is answered, so an idle
    connection holds none.
    """

    __slots__ = ("stats", "limit", "_head_ns", "_head_n", "_queue", "_forgotten")

    #: Most chunks of unanswered REQs remembered per connection.
    default_limit = 1024

    def __init__(self, stats: Stats, limit: int = default_limit) -> None:
        self.stats = stats
        self.limit = limit
        self._head_ns = 0  # when the oldest unanswered chunk was sent
        self._head_n = 0  # its REQs still unanswered; 0: nothing is waiting
        # The chunks after it, as flat pairs: sent_ns, requests, sent_ns, requests...
        self._queue: deque[int] = _EMPTY
        self._forgotten = 0  # dropped REQs whose replies are still to come

    def __len__(self) -> int:
        return (1 if self._head_n else 0) + len(self._queue) // 2

    def sent(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the client was forwarded, holding ``counts[0]`` REQs."""
        self.requests_sent(now_ns, counts[0])

    def answered(self, now_ns: int, counts: Counts) -> None:
        """A chunk from the upstream was forwarded, holding ACKs and NAKs."""
        self.replies_arrived(now_ns, counts[1] + counts[2])

    def requests_sent(self, now_ns: int, n: int) -> None:
        """``n`` REQs were forwarded to the upstream together at ``now_ns``."""
        if not n:
            return
        if not self._head_n:  # nothing was waiting
            self._head_ns = now_ns
            self._head_n = n
        else:
            queue = self._queue
            if queue is _EMPTY:
                queue = self._queue = deque()
            queue.append(now_ns)
            queue.append(n)
        if len(self._queue) >= 2 * self.limit:  # one chunk more than the limit
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        """Drop the oldest chunk: its replies, when they come, are skipped, not timed."""
        dropped = self._head_n
        self._forgotten += dropped
        self.stats.incr("latency_dropped", dropped)
        self._next()

    def _next(self) -> None:
        """The chunk after the oldest becomes the oldest; with none, the deque goes."""
        queue = self._queue
        if queue:
            self._head_ns = queue.popleft()
            self._head_n = queue.popleft()
        else:
            self._head_n = 0
            self._queue = _EMPTY

    def replies_arrived(self, now_ns: int, n: int) -> None:
        """``n`` replies were forwarded to the client together at ``now_ns``."""
        if self._forgotten:  # the oldest replies answer REQs no longer remembered
            skip = min(n, self._forgotten)
            self._forgotten -= skip
            n -= skip
        observe = self.stats.observe_latency
        while n and self._head_n:
            sent_ns, waiting = self._head_ns, self._head_n
            if waiting <= n:
                take = waiting
                self._next()
            else:
                take = n
                self._head_n = waiting - n
            observe(now_ns, now_ns - sent_ns, take)
            n -= take
        if n:
            self.stats.incr("latency_unmatched", n)
