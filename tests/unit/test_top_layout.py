"""The terminal view's layout: a pure function of the data and the terminal's size."""

from __future__ import annotations

import pytest

from geventproxy.history import History, sample_row
from geventproxy.stats import Stats, snapshot
from geventproxy.top import BLOCKS, View, main, render, sparkline


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 4, 8], 5) == "▁▂▃▅█"
    assert sparkline([None, 0, 0], 3) == " ▁▁"
    assert sparkline([], 4) == "    "
    assert sparkline(list(range(100)), 10)[-1] == BLOCKS[-1]  # the last `width` values
    assert sparkline([1, 6], 2, "_#") == "_#"


def _view(samples: int = 70) -> View:
    stats = Stats()
    stats.record(0, 50, (5, 0, 0, 1))
    stats.record(1, 80, (0, 4, 1, 0))
    report = snapshot([stats.block], stats.clock())
    history = History()
    for n in range(samples):
        report = dict(report, msg_req=report["msg_req"] + n)
        history.append(sample_row(n, 1000.0 + n, float(n), report, (n - 1.0, 0, 0, 0, 0)))
    view = View("127.0.0.1:9102")
    view.merge(history.document(-1, "1.2.3"))
    view.stats, view.health = report, (True, "ok")
    return view


@pytest.mark.parametrize("width,height", [(120, 40), (80, 24), (50, 15), (30, 8), (10, 3)])
def test_the_screen_fits_the_terminal(width: int, height: int) -> None:
    lines = render(_view(), width, height, 2000.0)
    assert len(lines) == height
    assert all(len(text) <= width for text, _ in lines)
    assert lines[-1][0].startswith("q quits"[:width])


def test_what_the_screen_shows() -> None:
    view = _view()
    text = "\n".join(t for t, _ in render(view, 120, 40, 2000.0))
    assert "geventproxy 1.2.3 · 127.0.0.1:9102 · health: ok · up " in text
    requests = next(t for t, _ in render(view, 120, 40, 2000.0) if t.startswith("requests/s"))
    # The last minute: 60 columns of the 70 samples, the newest at the right.
    spark = requests.split("  ")[-1].split(" max")[0]
    assert len(spark) == 60 and set(spark) <= set(BLOCKS)
    assert "REQ" in text and "client→upstream" in text and "client_closed" in text
    assert len(view.samples) == 60
    narrow = render(view, 60, 30, 2000.0)
    spark = next(t for t, _ in narrow if t.startswith("requests/s")).split("  ")[-1]
    assert len(spark.split(" max")[0]) < 60  # narrower terminal, shorter sparklines
    plain = "\n".join(t for t, _ in render(view, 120, 40, 2000.0, unicode=False))
    assert plain.isascii() and "client->upstream" in plain


def test_unreachable_says_so_and_keeps_the_last_figures() -> None:
    view = _view()
    view.error, view.failing_since, view.last_ok = "[Errno 111] Connection refused", 1990.0, 1989.0
    lines = render(view, 60, 30, 2000.0)
    alert = " ".join(t for t, style in lines if style == "alert")
    assert alert.startswith("CANNOT REACH THE PROXY at 127.0.0.1:9102")
    assert "Connection refused" in alert and "Retrying every second" in alert
    assert any(t.startswith("requests/s") for t, _ in lines)
    assert all(len(t) <= 60 for t, _ in lines)


def test_a_restarted_proxy_starts_the_view_over() -> None:
    view = _view()
    fresh = History()
    fresh.block[0] += 1  # another instance
    fresh.append(sample_row(0, 5000.0, 1.0, view.stats, None))
    view.merge(fresh.document(-1, "1.2.3"))
    assert [s["seq"] for s in view.samples] == [0] and view.last_seq == 0


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-port-here"]) == 2
    assert "geventproxy top: error" in capsys.readouterr().err
    assert main(["127.0.0.1:9102"]) == 2  # not a terminal under pytest
    assert "needs a terminal" in capsys.readouterr().err
