"""The statistics report: one JSON object per line on stdout.

Only the parent process writes reports, one at a time from its loop (on
USR1, every --report-interval, and at exit), so two never interleave, and a
stdout that nobody reads stalls the parent for at most a timeout, never a
worker serving clients.
"""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any

__all__ = ["render", "write_line"]


def render(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, separators=(",", ":")) + "\n").encode()


def write_line(fd: int, data: bytes, timeout: float) -> bool:
    """Write ``data`` to ``fd`` unless it stays unwritable for ``timeout`` seconds.

    A reader that went away or stopped reading costs at most ``timeout``,
    then the line is dropped. A line shorter than PIPE_BUF goes into a pipe
    whole or not at all.
    """
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
            return False
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except OSError:
            return False
    return True
