"""The reference protocol helpers against the measured behaviour of the originals."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geventproxy.testing.protocol import (
    ALPHABET,
    DEFAULT_REQUESTS,
    DEFAULT_SEED,
    ERRDECODE_REPLY,
    DecodeError,
    decode_line,
    make_requests,
    reply_digest,
    reply_for,
    reply_type,
    split_hostport,
)

HEX32 = re.compile(rb"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "line,expected",
    [
        (b"REQ 1 Hey\n", ("REQ", 1, b"Hey")),
        (b"REQ 1 Hey\r\n", ("REQ", 1, b"Hey")),  # one trailing \r is dropped
        (b"REQ 1 Hey\r\r\n", ("REQ", 1, b"Hey\r")),  # ...but only one
        (b"REQ 1 Hey", ("REQ", 1, b"Hey")),  # terminator optional for the helper
        (b"REQ 1\n", ("REQ", 1, b"")),  # two fields: no Data
        (b"REQ 1 \n", ("REQ", 1, b"")),  # three fields, empty Data
        (b"ACK 3 What\n", ("ACK", 3, b"What")),
        (b"NAK 5 Stop\n", ("NAK", 5, b"Stop")),
        (b"REQ +5 x\n", ("REQ", 5, b"x")),
        (b"REQ -5 x\n", ("REQ", -5, b"x")),
        (b"REQ 0007 x\n", ("REQ", 7, b"x")),
        (b"REQ -0 x\n", ("REQ", 0, b"x")),
        (b"REQ " + b"0" * 5000 + b"5 x\n", ("REQ", 5, b"x")),  # Go allows leading zeros
        (b"REQ 9223372036854775807 x\n", ("REQ", 9223372036854775807, b"x")),
        (b"REQ -9223372036854775808 x\n", ("REQ", -9223372036854775808, b"x")),
        (b"REQ 1 caf\xe9\n", ("REQ", 1, b"caf\xe9")),  # Go does not validate UTF-8
    ],
)
def test_decode_valid(line: bytes, expected: tuple[str, int, bytes]) -> None:
    assert decode_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"\n",
        b"",
        b"\r\n",
        b"garbage\n",
        b"REQ\n",
        b"REQ 1 Hey there\n",  # four fields: Data may not contain spaces
        b"REQ  1 x\n",  # double space gives an empty Seq field
        b"FOO 1 x\n",
        b"req 1 x\n",  # Type is case-sensitive
        b" REQ 1 x\n",
        b"REQ x x\n",
        b"REQ + x\n",
        b"REQ - x\n",
        b"REQ 1_000 x\n",  # ParseInt base 10 rejects underscores
        b"REQ 0x10 x\n",
        b"REQ 1.0 x\n",
        b"REQ 9223372036854775808 x\n",
        b"REQ -9223372036854775809 x\n",
        b"REQ " + b"1" * 5000 + b" x\n",  # beyond Python's int() digit limit too
        "REQ \u0661 x\n".encode(),  # Arabic-Indic digit: int() takes it, Go does not
        b"REQ 1 x\n\n",  # an embedded newline is not a single line
    ],
)
def test_decode_invalid(line: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_line(line)


def test_errdecode_reply() -> None:
    assert ERRDECODE_REPLY == b"NAK 0 ERRDECODE\n"


def test_reply_shape_and_determinism() -> None:
    reply = reply_for("REQ", 5, b"data")
    kind, seq, digest = reply[:-1].split(b" ")
    assert reply.endswith(b"\n") and kind in (b"ACK", b"NAK") and seq == b"5"
    assert HEX32.fullmatch(digest) and digest == reply_digest("REQ", 5, b"data")
    assert reply_for("REQ", 5, "data") == reply  # str and bytes agree
    assert reply_for("REQ", 5, b"data") == reply
    assert reply_for("REQ", 6, b"data") != reply
    assert reply_for("REQ", 5, b"datb") != reply
    assert reply_digest("ACK", 5, b"data") != digest  # Type is part of the digest


def test_canonical_seq_in_reply() -> None:
    assert reply_for(*decode_line(b"REQ +5 x\n")) == reply_for("REQ", 5, b"x")
    assert reply_for(*decode_line(b"REQ 5\n")) == reply_for(*decode_line(b"REQ 5 \n"))
    assert reply_for("REQ", -5, b"x").split(b" ")[1] == b"-5"


@given(seq=st.integers(-(2**63), 2**63 - 1), data=st.binary(max_size=64))
def test_reply_roundtrips_through_decode(seq: int, data: bytes) -> None:
    data = data.replace(b" ", b"_").replace(b"\n", b"_")
    reply = reply_for("REQ", seq, data)
    kind, rseq, digest = decode_line(reply)
    assert kind == reply_type("REQ", seq, data) and rseq == seq
    assert digest == reply_digest("REQ", seq, data)


def test_nak_ratio_about_one_in_eight() -> None:
    requests = make_requests(10_000, seed=12345)
    kinds = Counter(reply_type("REQ", seq, data) for seq, data in requests)
    assert set(kinds) == {"ACK", "NAK"}
    assert 1000 <= kinds["NAK"] <= 1500  # expected 1250, sd ~33


def test_make_requests_shape() -> None:
    requests = make_requests(1000, seed=7)
    assert [seq for seq, _ in requests] == list(range(1, 1001))
    alphabet = set(ALPHABET.encode())
    for _, data in requests:
        assert 4 <= len(data) <= 31 and set(data) <= alphabet
    lengths = {len(data) for _, data in requests}
    assert min(lengths) == 4 and max(lengths) == 31
    assert make_requests(1000, seed=7) == requests
    assert make_requests(1000, seed=8) != requests
    assert make_requests(10, seed=7) == requests[:10]


def test_default_seed_gives_88_ack_12_nak() -> None:
    requests = make_requests()
    assert len(requests) == DEFAULT_REQUESTS == 100
    assert requests == make_requests(100, DEFAULT_SEED)
    kinds = Counter(reply_type("REQ", seq, data) for seq, data in requests)
    assert kinds == {"ACK": 88, "NAK": 12}


@pytest.mark.parametrize(
    "address,expected",
    [
        (":8001", ("", 8001)),
        ("localhost:8001", ("localhost", 8001)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8001", ("::1", 8001)),
        ("[::]:8001", ("::", 8001)),
    ],
)
def test_split_hostport(address: str, expected: tuple[str, int]) -> None:
    assert split_hostport(address) == expected


@pytest.mark.parametrize("address", ["8001", "localhost", "::1:8001", "host:x", "host:70000"])
def test_split_hostport_invalid(address: str) -> None:
    with pytest.raises(ValueError):
        split_hostport(address)
