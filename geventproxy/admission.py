"""Who gets in: the ``-max-connections`` limit and the book of open connections.

Every client admitted is numbered and counted in ``connections_total`` and
``connections_active``; ``release`` gives it exactly one close reason, so that
``connections_total`` is always ``connections_active`` plus the closed ones.
A client past the limit is counted in ``connections_refused`` and logged at
most once per 5 s. No I/O but that log line: the server closes the sockets.
"""

from __future__ import annotations

import logging

from .connection import Connection
from .logs import RateLimit, event
from .stats import ERROR, Stats

__all__ = ["Admission"]


class Admission:
    """The open connections of one server, and whether another may join them."""

    def __init__(self, stats: Stats, limit: int) -> None:
        self.stats = stats
        #: Clients served at once; 0 is no limit.
        self.limit = limit
        self.connections: set[Connection] = set()
        self._next_id = 0
        self._refuse_log = RateLimit(5.0)

    def admit(self, peer: str) -> Connection | None:
        """A new, counted connection for the client ``peer`` ("host:port"); None past the limit."""
        if self.limit and len(self.connections) >= self.limit:
            self._refuse(peer)
            return None
        self._next_id += 1
        conn = Connection(self._next_id, peer)
        self.connections.add(conn)
        self.stats.incr("connections_total")
        self.stats.incr("connections_active")
        return conn

    def release(self, conn: Connection) -> None:
        """The connection has ended and its sockets are closed: count its one reason."""
        self.stats.closed(conn.reason or ERROR)
        self.connections.discard(conn)
        self.stats.incr("connections_active", -1)

    def _refuse(self, peer: str) -> None:
        self.stats.incr("connections_refused")
        suppressed = self._refuse_log.allow()
        if suppressed is not None:
            event(
                logging.WARNING,
                "connection refused: limit reached",
                peer=peer,
                max_connections=self.limit,
                suppressed=suppressed,
            )
