"""A worker's signal handlers, which only hand off.

The callbacks run in the event loop; each one only sets an event. The
drain happens in the worker's main greenlet, which waits for those events.
HUP and INT belong to the parent: a worker ignores them from its first
line (``worker.py``); USR1 from the parent asks for a frozen copy of the
statistics block (``sharedstats``), never for a line of its own.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import gevent

__all__ = ["install"]


def install(
    stop: Callable[[], None],
    force: Callable[[], None],
    retire: Callable[[], None],
    freeze: Callable[[], None],
) -> list[object]:
    """The first TERM asks for a drain, USR2 for a retirement (a drain because a
    reload replaces this worker); a TERM after either forces. USR1 asks for a
    frozen copy of the statistics block, for the parent's report."""
    signals = 0

    def on_term() -> None:
        nonlocal signals
        signals += 1
        (stop if signals == 1 else force)()

    def on_retire() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            retire()

    return [
        gevent.signal_handler(signal.SIGTERM, on_term),
        gevent.signal_handler(signal.SIGUSR2, on_retire),
        gevent.signal_handler(signal.SIGUSR1, freeze),
    ]
