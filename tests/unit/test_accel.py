"""The compiled accelerator against the pure-Python reference, on random and hostile input.

Differential: the same bytes in the same chunks, the same clock, the same
limits; every return value, every held length and the whole statistics
block must be identical. Also: which implementation runs, and when.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geventproxy import accel
from geventproxy.sharedstats import SharedStats
from geventproxy.stats import Stats, new_block, snapshot
from geventproxy.testing.launch import ROOT
from tests.unit.fakes import FakeClock, S
from tests.unit.implementations import COMPILED, IMPLEMENTATIONS, PURE, REFERENCE

needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the extension is not built")

#: scripts/sanitize.sh runs fewer examples: under the sanitizers, with Python's
#: allocator off, generating them is what costs.
_SCALE = float(os.environ.get("FUZZ_EXAMPLES_SCALE", "1"))


def _examples(n: int) -> int:
    return max(25, int(n * _SCALE))


# Pieces that stress the grammar's edges: types, signs, 64-bit limits, UTF-8
# that Python's strict decoder refuses (overlong, surrogates, > U+10FFFF,
# truncated), control bytes, CR in odd places, spaces, and long runs.
_HOSTILE = [
    b"REQ ",
    b"ACK ",
    b"NAK ",
    b"REQ",
    b"req ",
    b" ",
    b"  ",
    b"\r",
    b"\r\n",
    b"\n",
    b"\n",
    b"\n",
    b"+",
    b"-",
    b"0",
    b"7",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"0000000000000000000001",
    b"99999999999999999999",
    b"abc",
    b"\x00",
    b"\x1f",
    b"\x7f",
    b"\x80",
    b"\xc2\x80",  # U+0080, a C1 control: allowed
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\x80",  # overlong
    b"\xe0\xa0\x80",
    b"\xed\xa0\x80",  # surrogate
    b"\xed\x9f\xbf",
    b"\xef\xbf\xbf",
    b"\xf0\x8f\xbf\xbf",  # overlong
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",  # U+10FFFF
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xe2\x82",  # truncated
    b"\xff",
    b"\xc3\xa9",
    b"x" * 300,
]
_piece = st.sampled_from(_HOSTILE)
_text = st.text(st.characters(codec="utf-8", min_codepoint=0x21), max_size=6).map(str.encode)
_edge = st.sampled_from([2**63 - 1, 2**63, 2**64, 10**19, 10**18, 0]).flatmap(
    lambda n: st.sampled_from([n - 1, n, n + 1, -n - 1, -n, -n + 1])
)
# Lines shaped like the grammar (TYPE SP SEQ [SP DATA] [CR] LF): valid parts
# around at most one hostile piece, so that each rule decides some lines.
_line = st.builds(
    lambda kind, seq, data, cr: kind + b" " + seq + data + cr + b"\n",
    st.sampled_from([b"REQ", b"ACK", b"NAK", b"REQ ", b"req", b"RE"]),
    st.one_of(
        (st.integers(-(2**64), 2**64) | _edge).map(lambda n: str(n).encode()),
        st.builds(lambda z, n: z + str(n).encode(), st.sampled_from([b"+", b"0", b"-00"]), _edge),
        _piece,
    ),
    st.just(b"") | st.builds(lambda a, p, b: b" " + a + p + b, _text, _piece | _text, _text),
    st.sampled_from([b"", b"", b"\r", b"\r\r"]),
)
_stream = st.lists(_line | _piece | st.binary(max_size=30), max_size=60).map(b"".join)
_max_line = st.sampled_from([2, 3, 8, 16, 40, 300, 65536])


def _cuts(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=25))))
    pieces, prev = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:
            pieces.append(stream[prev:cut])
        prev = cut
    return pieces


@needs_compiled
@settings(max_examples=_examples(1500), deadline=None)
@given(line=_line, noise=st.binary(max_size=20))
def test_classify_agrees_on_any_line(line: bytes, noise: bytes) -> None:
    for candidate in (line, line[:-1], noise, noise + b"\n", line[:-1] + noise + b"\n"):
        assert COMPILED.classify(candidate) == PURE.classify(candidate), candidate


_EDGES = (0x00, 0x20, 0x21, 0x7E, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2)
_EDGES += (0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF)


@needs_compiled
def test_data_bytes_agree_exhaustively() -> None:
    """Every Data of 1 or 2 bytes, and of 3 or 4 bytes built from the UTF-8 edge values.

    Random input seldom puts exactly one bad sequence in otherwise valid
    Data, so the UTF-8 rules are swept instead of sampled.
    """
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    singles = [bytes([a]) for a in range(256)]
    triples = [bytes([a, b, c]) for a in range(0xC0, 0x100) for b in _EDGES for c in _EDGES]
    quads = [
        bytes([a, b, c, d])
        for a in range(0xF0, 0x100)
        for b in _EDGES
        for c in _EDGES
        for d in (0x80, 0xBF, 0x41)
    ]
    for data in [*singles, *pairs, *triples, *quads]:
        line = b"REQ 1 " + data + b"\n"
        assert COMPILED.classify(line) == PURE.classify(line), line


@needs_compiled
@settings(max_examples=_examples(500), deadline=None)
@given(stream=_stream, data=st.data(), max_line=_max_line)
def test_scanners_agree_chunk_by_chunk(stream: bytes, data: st.DataObject, max_line: int) -> None:
    """Identical counts, invalid lines and held bytes after every chunk."""
    pure, compiled = PURE.LineScanner(max_line), COMPILED.LineScanner(max_line)
    for piece in _cuts(data, stream):
        assert compiled.feed(piece) == pure.feed(piece), piece
        assert compiled.pending == pure.pending <= max_line
    complete = stream[: stream.rfind(b"\n") + 1]
    assert COMPILED.count_block(complete, max_line) == PURE.count_block(complete, max_line)


@needs_compiled
def test_scanner_takes_any_bytes_like() -> None:
    scanner = COMPILED.LineScanner()
    assert scanner.feed(bytearray(b"REQ 1 a\nREQ")) == (1, 0, 0, 0)
    assert scanner.feed(memoryview(b"xx 2 b\nACK 2 c\n")[2:]) == (1, 1, 0, 0)
    with pytest.raises(TypeError):
        scanner.feed("REQ 1 a\n")


_event = st.tuples(
    st.integers(0, 1),  # direction
    st.integers(0, 3 * S),  # clock step before the chunk
    st.integers(0, 6),  # how many pieces of traffic in the chunk
)
_traffic = st.sampled_from(
    [
        b"REQ 1 a\n",
        b"REQ 2 b\nREQ 3 c\n",
        b"ACK 1 x\n",
        b"NAK 2 y\nACK 3 z\n",
        b"ACK 4",
        b" w\n",
        b"REQ 5",
        b"\n",
        b"junk\n",
        b"\xff\n",
        b"x" * 50,
    ]
)


@needs_compiled
@settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_event, max_size=60),
    data=st.data(),
    max_line=_max_line,
    limit=st.sampled_from([0, 1, 2, 5, 1024]),
    shared=st.booleans(),
)
def test_meters_leave_identical_blocks(events, data, max_line, limit, shared) -> None:
    """Both directions of one connection, chunk by chunk, through three Meters: the
    plain composition of scanner, statistics and timer, the pure Meter with its
    fast path, and the compiled one.

    Same chunks, same clock readings, a small timer limit (REQs dropped and
    their replies skipped), a list block or a shared int64 block: the
    returns and held bytes agree after every chunk, and at the end the
    blocks are equal slot for slot (so are their reports).
    """
    clock = FakeClock(1000 * S + 123)
    sides, stores = [], []
    for impl in (REFERENCE, PURE, COMPILED):
        if shared:  # a worker's block, in the shared file
            store = SharedStats.create(2)
            store.give(1, worker=0, generation=1)
            stores.append(store)
            block = store.blocks[1]
        else:
            block = new_block()
        stats = Stats(block, clock)
        timer = impl.timer(stats, limit)
        sides.append((stats, timer, [impl.meter(d, max_line, timer) for d in (0, 1)]))
    for direction, step, count in events:
        clock.now += step
        chunk = b"".join(data.draw(st.lists(_traffic, min_size=count, max_size=count)))
        if not chunk:
            continue
        got = [meters[direction].account(chunk) for _, _, meters in sides]
        assert got[0] == got[1] == got[2], chunk
        assert len({meters[direction].pending for _, _, meters in sides}) == 1
        assert len({meters[direction].mid_line for _, _, meters in sides}) == 1
        assert len({len(timer) for _, timer, _ in sides}) == 1
    blocks = [list(stats.block) for stats, _, _ in sides]
    assert blocks[0] == blocks[1] == blocks[2]
    reports = [snapshot([stats.block], clock.now) for stats, _, _ in sides]
    assert reports[0] == reports[1] == reports[2]


@needs_compiled
@settings(max_examples=_examples(200), deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["record", "observe"]),
            st.integers(0, 1),
            st.integers(-(2 * S), 20 * S),  # clock step (may go back) or a latency
            st.tuples(*[st.integers(0, 5)] * 4),
        ),
        max_size=50,
    )
)
def test_writers_agree_on_any_calls(calls) -> None:
    """Stats.record / observe_latency against the compiled writer, clock going back too."""
    clock = FakeClock(1000 * S + 123)
    stats = [Stats(clock=clock), Stats(clock=clock)]
    for what, direction, value, counts in calls:
        if what == "record":
            clock.now += value
            got = [impl.record(s)(direction, 7, counts) for impl, s in zip((PURE, COMPILED), stats)]
        else:
            got = [
                impl.observe_latency(s)(clock.now, value, counts[0])
                for impl, s in zip((PURE, COMPILED), stats)
            ]
        assert got[0] == got[1]
    assert stats[0].block == stats[1].block


@needs_compiled
def test_writer_refuses_a_block_that_does_not_fit() -> None:
    from geventproxy import _accel
    from geventproxy.stats import LATENCY_BOUNDS_US, layout

    with pytest.raises(ValueError):
        _accel.StatsWriter([0] * 10, None, layout(), LATENCY_BOUNDS_US)
    with pytest.raises(TypeError):
        _accel.StatsWriter(bytearray(8 * layout()["slots"]), None, layout(), LATENCY_BOUNDS_US)
    bad = dict(layout(), stamp=layout()["slots"])
    with pytest.raises(ValueError):
        _accel.StatsWriter(new_block(), None, bad, LATENCY_BOUNDS_US)


@needs_compiled
def test_held_bytes_stay_bounded_under_an_endless_line() -> None:
    """A peer that never sends LF: the held start of the line never passes max_line."""
    stats = Stats(clock=FakeClock(1000 * S + 123))
    meter = COMPILED.meter(0, 1000, COMPILED.timer(stats))
    lines = 0
    for _ in range(2000):
        lines += meter.account(b"A" * 997)
        assert meter.pending <= 1000
    assert lines == 0  # no LF: the line has not ended
    assert meter.mid_line
    # One invalid line, counted when it passed max_line, then skipped.
    assert snapshot([stats.block], 0)["msg_invalid"] == 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_over_long_line_ends_at_its_lf(impl) -> None:
    """account() returns the lines a chunk ended: an over-long line is counted
    invalid when it passes max_line, but ends (for the connection's count of
    replies delivered) only with the chunk that carries its LF."""
    stats = Stats(clock=FakeClock(1000 * S + 123))
    meter = impl.meter(1, 16, impl.timer(stats))
    assert meter.account(b"ACK 1 " + b"a" * 20) == 0  # passes 16: invalid, not ended
    assert meter.mid_line
    assert meter.account(b"a" * 30) == 0
    assert meter.account(b"aa\nACK 2 b\nACK 3 ") == 2  # its LF, and one whole line
    assert meter.mid_line  # "ACK 3 " held
    assert meter.account(b"c\n" + b"x" * 40) == 1  # ACK 3 ends; a new line overflows
    assert meter.account(b"\n\n") == 2
    assert not meter.mid_line
    report = snapshot([stats.block], 0)
    assert (report["msg_ack"], report["msg_invalid"]) == (2, 3)


# -- which implementation runs ----------------------------------------------------


def _version(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "geventproxy", "--version"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pure_env_forces_pure() -> None:
    assert "counting: pure Python (GEVENTPROXY_PURE=1)" in _version({accel.PURE_ENV: "1"})


@needs_compiled
def test_compiled_runs_when_built() -> None:
    assert "counting: compiled accelerator" in _version({accel.PURE_ENV: ""})


def test_a_stale_build_is_not_used(monkeypatch) -> None:
    """An extension built from older sources (no INTERFACE, or another one) is
    passed over for the pure path, and the start line says why."""
    for stale in (SimpleNamespace(), SimpleNamespace(INTERFACE=accel.INTERFACE - 1)):
        monkeypatch.setattr(accel.importlib, "import_module", lambda name, m=stale: m)
        monkeypatch.delenv(accel.PURE_ENV, raising=False)
        native, description = accel._load()
        assert native is None
        assert "stale build" in description and "pip install -e ." in description
    current = SimpleNamespace(INTERFACE=accel.INTERFACE)
    monkeypatch.setattr(accel.importlib, "import_module", lambda name: current)
    assert accel._load() == (current, "compiled accelerator")


def test_the_accelerator_is_built_where_a_compiler_is() -> None:
    """Where cc exists, `pip install -e .` (or setup.py build_ext --inplace) builds it."""
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("no C compiler: the pure-Python code runs")
    assert COMPILED is not None, (
        "geventproxy/_accel did not import; build it: python setup.py build_ext --inplace"
    )
