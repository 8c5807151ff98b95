"""The totals across restarts: a small JSON file, written atomically.

At start the saved totals become a baseline block (``stats.new_baseline``)
that every report sums in; the workers' blocks start from zero as always, so
rates and uptime describe this run only. While running, the summed
totals are written every ``--state-interval`` seconds and once more at
shutdown, after the drain. A file that is missing or unreadable is logged
in one line and ignored; a corrupt one is also kept aside (``PATH.corrupt``)
so that the next write does not destroy what someone may want to look at:
losing history must never stop the proxy. A path that can never be written
(its directory is missing, or it is a directory) is refused at start by
``check_path``, before anything is bound.
Whatever happened after the last write is lost if the process is killed
(SIGKILL, power loss); a graceful stop loses nothing.

A write is a temporary file in the same directory, fsync, ``os.replace``,
then an fsync of the directory: a reader (or the next start) sees the old
file or the new one, never a torn one. The parent process writes it, so a
slow disk stalls the parent's loop, never a worker serving clients.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

from .logs import event
from .stats import Block, new_baseline

__all__ = [
    "FORMAT",
    "CORRUPT_SUFFIX",
    "StateFile",
    "check_path",
    "decode",
    "encode",
    "load_baseline",
    "write_atomically",
]


FORMAT = "geventproxy-state"
VERSION = 1
#: A corrupt state file is renamed to its path plus this, replacing an older one.
CORRUPT_SUFFIX = ".corrupt"


def check_path(path: str) -> str | None:
    """Why ``path`` can never be a state file, or None: checked once, at start."""
    if os.path.isdir(path):
        return f"{path} is a directory"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        return f"the directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    # Each write creates a temporary file next to the state file, then renames it.
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable"
    return None


def encode(totals: dict[str, Any], now: float | None = None) -> bytes:
    """The file's content: the totals in an envelope that says what they are."""
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": round(time.time() if now is None else now, 3),
        "totals": totals,
    }
    return (json.dumps(envelope, separators=(",", ":")) + "\n").encode()


def decode(data: bytes) -> dict[str, Any]:
    """The totals from a file's content; ValueError when it is not a state file."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError("not a geventproxy state file")
    if obj.get("version") != VERSION:
        raise ValueError(f"unknown state file version {obj.get('version')!r}")
    totals = obj.get("totals")
    if not isinstance(totals, dict):
        raise ValueError("no totals in the state file")
    return totals


def load_baseline(path: str) -> Block | None:
    """The saved totals as a baseline block, or None (logged once) if there are none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        event(logging.INFO, "state file not found, totals start from zero", path=path)
        return None
    except OSError as exc:
        event(
            logging.WARNING,
            "state file unreadable, ignored",
            path=path,
            error=exc.strerror or str(exc),
        )
        return None
    try:
        baseline = new_baseline(decode(data))
    except (ValueError, UnicodeDecodeError) as exc:
        fields = {"path": path, "error": str(exc)}
        try:
            os.replace(path, path + CORRUPT_SUFFIX)
            fields["kept_as"] = path + CORRUPT_SUFFIX
        except OSError as move:
            fields["not_kept"] = move.strerror or str(move)
        event(logging.WARNING, "state file corrupt, ignored", **fields)
        return None
    event(logging.INFO, "state file loaded", path=path)
    return baseline


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data is safe anyway
    finally:
        os.close(dir_fd)


class StateFile:
    """--state-file as the parent keeps it: one write now and then, and one at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._failing = False

    def save(self, totals: dict[str, Any]) -> bool:
        """Write ``totals`` now; a failure is logged (once until the next success) and returned."""
        try:
            write_atomically(self.path, encode(totals))
        except OSError as exc:
            if not self._failing:
                error = exc.strerror or str(exc)
                event(logging.ERROR, "cannot write the state file", path=self.path, error=error)
            self._failing = True
            return False
        if self._failing:
            event(logging.INFO, "state file written again", path=self.path)
        self._failing = False
        return True
