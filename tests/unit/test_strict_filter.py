"""StrictFilter on its own, and the codec's grammar against the reference server's decoder.

No sockets: bytes in, (bytes to forward, REQs, violation) out.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from geventproxy.codec import INVALID, REQ, StrictFilter, classify
from geventproxy.testing.protocol import DecodeError, decode_line
from tests.unit.test_codec import _stream

_TYPES = {"REQ": 0, "ACK": 1, "NAK": 2}


def _oracle(stream: bytes, max_line: int) -> tuple[bytes, int, bool]:
    """Line by line: the good prefix, its REQs, and whether some line broke the rule."""
    good, reqs, start = b"", 0, 0
    while True:
        end = stream.find(b"\n", start) + 1
        if not end:
            # An unfinished line longer than max_line breaks the rule before its LF.
            return good, reqs, len(stream) - start > max_line
        line = stream[start:end]
        if len(line) > max_line or classify(line) != REQ:
            return good, reqs, True
        good, reqs, start = good + line, reqs + 1, end


def _feed_in_pieces(stream: bytes, cuts: list[int], max_line: int) -> tuple[bytes, int, bool]:
    strict = StrictFilter(max_line)
    good, reqs, prev = b"", 0, 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        passed, counts, violation = strict.feed(stream[prev:cut])
        good, reqs = good + passed, reqs + counts[0]
        assert strict.pending <= max_line
        if violation is not None:
            return good, reqs, True  # the filter is not fed after a violation
        prev = cut
    return good, reqs, False


@settings(max_examples=300, deadline=None)
@given(stream=_stream, data=st.data(), max_line=st.sampled_from([2, 8, 40, 65536]))
def test_any_chunking_lets_through_what_the_line_oracle_does(
    stream: bytes, data: st.DataObject, max_line: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _feed_in_pieces(stream, cuts, max_line) == _oracle(stream, max_line)


@settings(max_examples=100, deadline=None)
@given(stream=_stream)
def test_byte_at_a_time_equals_whole(stream: bytes) -> None:
    cuts = list(range(len(stream)))
    assert _feed_in_pieces(stream, cuts, 65536) == _feed_in_pieces(stream, [], 65536)


def test_violation_excerpt_and_what_passed_before_it() -> None:
    strict = StrictFilter()
    assert strict.feed(b"REQ 1 a\nREQ 2") == (b"REQ 1 a\n", (1, 0, 0, 0), None)
    passed, counts, violation = strict.feed(b" b\nACK 1 x" + b"y" * 200 + b"\nREQ 3 c\n")
    assert (passed, counts) == (b"REQ 2 b\n", (1, 0, 0, 0))
    assert violation is not None and violation.startswith(b"ACK 1 xyy") and len(violation) == 80


def test_unfinished_line_over_the_limit_is_a_violation_before_its_lf() -> None:
    strict = StrictFilter(max_line=16)
    assert strict.feed(b"REQ 1 " + b"a" * 10) == (b"", (0, 0, 0, 0), None)
    passed, _, violation = strict.feed(b"a")
    assert passed == b"" and violation == b"REQ 1 " + b"a" * 11


@settings(max_examples=500, deadline=None)
@given(stream=_stream)
def test_classify_agrees_with_the_reference_servers_decoder(stream: bytes) -> None:
    """Well-formed for the proxy means decoded, with the same type, by the server.

    (classify is stricter about Data: it also requires UTF-8 without control
    characters, where the original server takes any bytes.)
    """
    for line in stream.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            continue
        kind = classify(line)
        try:
            decoded = decode_line(line)
        except DecodeError:
            assert kind == INVALID, line
            continue
        if kind != INVALID:
            assert kind == _TYPES[decoded[0]], line
        else:
            data = decoded[2]
            # The only lines the server takes and classify refuses: their Data.
            assert not _plain_data(data), line


def _plain_data(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 0x21 or ord(c) == 0x7F for c in text)
