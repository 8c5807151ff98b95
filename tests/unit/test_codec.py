"""The scanner against the grammar, and chunking independence (no sockets).

Every test runs on both implementations: the pure-Python reference and the
compiled accelerator (tests/unit/implementations.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geventproxy.codec import ACK, INVALID, NAK, REQ, Counts
from tests.unit.implementations import IMPLEMENTATIONS

pytestmark = pytest.mark.parametrize("impl", IMPLEMENTATIONS)


@pytest.mark.parametrize(
    "line,kind",
    [
        (b"REQ 1 Hey\n", REQ),
        (b"ACK 3 What\n", ACK),
        (b"NAK 5 Stop\n", NAK),
        (b"REQ 1\n", REQ),
        (b"REQ 1 \n", REQ),  # empty Data: three fields, as the reference server decodes it
        (b"REQ 1 Hey\r\n", REQ),
        (b"REQ +7 x\n", REQ),
        (b"REQ -7 x\n", REQ),
        (b"REQ 0007 x\n", REQ),
        (b"REQ 9223372036854775807 x\n", REQ),
        (b"REQ -9223372036854775808 x\n", REQ),
        (b"REQ 9223372036854775808 x\n", INVALID),
        (b"REQ -9223372036854775809 x\n", INVALID),
        (b"REQ " + b"1" * 5000 + b" x\n", INVALID),
        (b"REQ 1 caf\xc3\xa9\n", REQ),  # UTF-8 Data
        (b"REQ 1 caf\xe9\n", INVALID),  # not UTF-8
        (b"REQ 1 a\x00b\n", INVALID),
        (b"REQ 1 a\tb\n", INVALID),
        (b"REQ 1 a\rb\n", INVALID),
        (b"REQ 1 Hey\r\r\n", INVALID),
        (b"REQ 1 two words\n", INVALID),
        (b"REQ  1 x\n", INVALID),
        (b"REQ 1 x \n", INVALID),
        (b"req 1 x\n", INVALID),
        (b"FOO 1 x\n", INVALID),
        (b"REQ\n", INVALID),
        (b"REQ x\n", INVALID),
        (b"REQ 1x\n", INVALID),
        (b"REQ \xd9\xa1\n", INVALID),  # ARABIC-INDIC DIGIT ONE is not an ASCII digit
        (b"REQ +\n", INVALID),
        (b"\n", INVALID),
        (b"\r\n", INVALID),
        (b"GET / HTTP/1.1\r\n", INVALID),
        (b"REQ 1 x", INVALID),  # no LF: not a line
        (b"REQ " + b"0" * 5000 + b"1 x\n", REQ),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else str(v),
)
def test_classify(impl, line: bytes, kind: int) -> None:
    assert impl.classify(line) == kind
    if line.endswith(b"\n"):
        # The fast block path and the line-by-line path agree.
        expected = [0, 0, 0, 0]
        expected[kind] = 1
        assert impl.count_block(line) == Counts(*expected)
        assert impl.count_block(line * 3) == Counts(*(3 * n for n in expected))


# Lines the block fast path's first pass (type, seq, then anything up to LF)
# lets through, and its second (the bytes left after deleting all printable
# ones but N and R) must judge: Data with N and R in it, and Data that is not
# printable ASCII, well-formed or not.
_ODD_DATA_LINES = [
    b"REQ 7 NR\n",
    b"ACK 7 RN\n",
    b"NAK 7 N\n",
    b"NAK 7 R\n",
    b"REQ 7 NNNN\n",
    b"REQ 7 caf\xc3\xa9\n",  # UTF-8: well-formed, outside the fast path
    b"REQ 7 caf\xe9\n",
    b"REQ 7 a\x00b\n",
    b"REQ 7 a\x7f\n",
    b"REQ 7 a\rb\n",
    b"REQ 7 ab\r\n",  # CRLF: well-formed, outside the fast path
    b"REQ 7 a\tb\n",
    b"REQ 7 \n",
]


@pytest.mark.parametrize("odd", _ODD_DATA_LINES, ids=repr)
@pytest.mark.parametrize(
    "common",
    [b"REQ 100 abcdefghij\n", b"ACK 100 0123abcd\n", b"NAK 100 0123abcd\n"],
    ids=["req", "ack", "nak"],
)
def test_common_blocks_with_odd_data(impl, common: bytes, odd: bytes) -> None:
    """A block of common lines with one odd one among them counts as line by line."""
    for block in (common * 5 + odd + common * 5, odd + common * 3, common * 3 + odd, odd * 4):
        tally = [0, 0, 0, 0]
        for line in block.split(b"\n")[:-1]:
            tally[impl.classify(line + b"\n")] += 1
        assert impl.count_block(block) == Counts(*tally)


def test_protocol_example_counts(impl) -> None:
    stream = (
        b"REQ 3 Hey\nREQ 4 Hey\nREQ 5 Hey\nACK 3 What\nACK 4 What do you want\n"
        b"REQ 6 Hey\nNAK 5 Stop it\nNAK 6 Stop doing that\n"
    )
    # Data with spaces is not well-formed (the reference server rejects it too).
    assert impl.LineScanner().feed(stream) == Counts(req=4, ack=1, nak=0, invalid=3)


def test_split_message_counts_once(impl) -> None:
    scanner = impl.LineScanner()
    pieces = [b"RE", b"Q 1", b"2 ab", b"c", b"\r", b"\nACK 1", b"2 x\n"]
    got = [scanner.feed(p) for p in pieces]
    assert got[:5] == [Counts()] * 5
    assert got[5] == Counts(req=1)
    assert got[6] == Counts(ack=1)
    assert scanner.pending == 0


def test_long_line_is_bounded_and_skipped(impl) -> None:
    scanner = impl.LineScanner(max_line=16)
    assert not scanner.mid_line
    assert scanner.feed(b"REQ 1 " + b"a" * 9) == Counts()  # 15 bytes held
    assert scanner.pending == 15
    assert scanner.mid_line
    assert scanner.feed(b"aa") == Counts(invalid=1)  # 17 > 16: counted once, dropped
    assert scanner.pending == 0
    for _ in range(1000):
        assert scanner.feed(b"z" * 1000) == Counts()
        assert scanner.pending == 0
        assert scanner.mid_line  # skipped to its LF, not ended
    assert scanner.feed(b"zz\nREQ 2 b\nREQ 3") == Counts(req=1)
    assert scanner.feed(b" c\n") == Counts(req=1)
    assert not scanner.mid_line


def test_line_exactly_at_limit(impl) -> None:
    line = b"REQ 1 " + b"a" * 9 + b"\n"  # 16 bytes with its LF
    assert impl.LineScanner(max_line=16).feed(line) == Counts(req=1)
    assert impl.LineScanner(max_line=15).feed(line) == Counts(invalid=1)
    scanner = impl.LineScanner(max_line=15)
    assert scanner.feed(line[:-1]) == Counts()
    assert scanner.feed(b"\n") == Counts(invalid=1)
    scanner = impl.LineScanner(max_line=16)  # the same line, split: still exactly at the limit
    assert scanner.feed(line[:7]) == Counts()
    assert scanner.feed(line[7:]) == Counts(req=1)
    assert scanner.feed(line[:-1]) == Counts()  # held: 15 bytes
    assert scanner.feed(b"\n" + line) == Counts(req=2)


def test_max_line_below_two_is_refused(impl) -> None:
    with pytest.raises(ValueError):
        impl.LineScanner(max_line=1)


def _whole(impl, stream: bytes, max_line: int) -> Counts:
    return impl.LineScanner(max_line).feed(stream)


def _chunked(impl, stream: bytes, cuts: list[int], max_line: int) -> Counts:
    scanner = impl.LineScanner(max_line)
    tally = [0, 0, 0, 0]
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        for i, n in enumerate(scanner.feed(stream[prev:cut])):
            tally[i] += n
        prev = cut
        assert scanner.pending <= max_line
    return Counts(*tally)


_token = st.sampled_from(
    [
        b"REQ",
        b"ACK",
        b"NAK",
        b"FOO",
        b" ",
        b"  ",
        b"1",
        b"-",
        b"+",
        b"12345678901234567890",
        b"abc",
        b"\xc3\xa9",
        b"\xff",
        b"\x00",
        b"\r",
        b"\n",
        b"\n",
        b"\n",
    ]
)
_line = st.builds(
    lambda t, s, d, cr: t + b" " + s + (b" " + d if d is not None else b"") + cr + b"\n",
    st.sampled_from([b"REQ", b"ACK", b"NAK"]),
    st.integers(-(2**64), 2**64).map(lambda n: str(n).encode()),
    st.none() | st.text(alphabet=st.characters(codec="utf-8"), max_size=30).map(str.encode),
    st.sampled_from([b"", b"\r"]),
)
_stream = st.lists(
    _line | st.lists(_token, max_size=12).map(b"".join) | st.binary(max_size=40), max_size=40
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(stream=_stream, data=st.data(), max_line=st.sampled_from([2, 8, 40, 65536]))
def test_any_chunking_gives_the_same_counts(
    impl, stream: bytes, data: st.DataObject, max_line: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _chunked(impl, stream, cuts, max_line) == _whole(impl, stream, max_line)


@settings(max_examples=200, deadline=None)
@given(stream=_stream)
def test_byte_at_a_time_equals_whole(impl, stream: bytes) -> None:
    assert _chunked(impl, stream, list(range(len(stream))), 65536) == _whole(impl, stream, 65536)


@settings(max_examples=300, deadline=None)
@given(stream=_stream)
def test_block_counts_match_line_oracle(impl, stream: bytes) -> None:
    """The fast path agrees with classifying each complete line on its own."""
    complete = stream[: stream.rfind(b"\n") + 1]
    tally = [0, 0, 0, 0]
    for line in complete.split(b"\n")[:-1]:
        tally[impl.classify(line + b"\n")] += 1
    assert impl.count_block(complete) == Counts(*tally)
