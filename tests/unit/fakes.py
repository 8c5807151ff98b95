"""Stand-ins the unit tests share."""

from __future__ import annotations

#: One second in the nanoseconds of the clocks below.
S = 1_000_000_000


class FakeClock:
    """A monotonic clock in integer nanoseconds that moves only when a test sets ``now``."""

    def __init__(self, now: int = 1000 * S) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now
