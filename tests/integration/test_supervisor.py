"""The parent process: its unwind (run in this process, no worker started), its imports."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventproxy.config import load
from geventproxy.stats import Stats
from geventproxy.testing.launch import start_proxy
from geventproxy.workers import Restarts, Supervisor
from geventproxy.workerset import WorkerSet
from tests.helpers import worker_pid

PARENT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)


@pytest.fixture()
def signals_restored() -> Iterator[None]:
    """The supervisor installs its handlers in this process: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in PARENT_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_an_error_while_stopping_still_writes_the_state_file_and_the_last_report(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    signals_restored: None,
) -> None:
    """1. A supervisor with --state-file whose workers are never started.
    2. In its loop a worker's block counts a connection, then TERM arrives,
       and passing it on to the workers raises.
    3. run() raises that error, and yet the state file holds the count and
       the last line on stdout is the final report with it.
    """
    state = tmp_path / "state.json"
    config = load(["-listen=127.0.0.1:0", f"-state-file={state}"], {})
    supervisor = Supervisor(config, {}, [])
    monkeypatch.setattr(Restarts, "start", lambda self, generation, slot: None)

    def turn() -> None:
        supervisor.shared.give(1, worker=0, generation=1)
        Stats(supervisor.shared.blocks[1], mark_start=False).incr("connections_total")
        supervisor.handle_term()

    def send(self: WorkerSet, workers: list, sig: int) -> None:
        raise OSError("the stop went wrong")

    monkeypatch.setattr(supervisor, "_turn", turn)
    monkeypatch.setattr(WorkerSet, "send", send)
    with pytest.raises(OSError, match="the stop went wrong"):
        supervisor.run()
    assert json.loads(state.read_text())["totals"]["connections_total"] == 1
    last = capfd.readouterr().out.splitlines()[-1]
    assert json.loads(last)["connections_total"] == 1


def test_the_parent_loads_no_gevent(foo_port: int) -> None:
    """The parent is a plain select loop: no gevent or greenlet extension is mapped
    in it, while its worker, which serves, has them (so the check can see them)."""

    def mapped(pid: int) -> str:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()

    with start_proxy(foo_port) as p:
        assert "/gevent/" in mapped(worker_pid(p)) and "greenlet" in mapped(worker_pid(p))
        parent = mapped(p.proc.pid)
        assert "/gevent/" not in parent and "greenlet" not in parent
