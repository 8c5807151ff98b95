"""Sans-IO scanner for the Foo line protocol.

The scanner is fed the bytes of one direction of a connection, in whatever
chunks the network delivers, and counts the complete messages they contain.
It never touches a socket, so it is tested byte by byte; feeding a stream in
any chunking gives the same counts as feeding it whole.

Well-formed, exactly (this mirrors what the reference server decodes, and is
slightly stricter about Data):

    line  := TYPE SP SEQ [SP DATA] [CR] LF
    TYPE  := "REQ" | "ACK" | "NAK"
    SEQ   := ["+" | "-"] DIGIT+          ASCII digits, value in [-2**63, 2**63 - 1]
    DATA  := zero or more UTF-8 characters, none of them SP, a control
             character (U+0000..U+001F) or DEL (U+007F)

Everything else is invalid: an empty line, a lone CR, two spaces in a row,
a fourth field, lower-case types, non-ASCII digits, a seq outside 64 bits,
invalid UTF-8, NUL bytes, and any line longer than ``max_line`` bytes
(counting its LF). Invalid lines are counted, never raised: the proxy is
transparent and forwards them anyway.

Memory is bounded: at most ``max_line`` bytes of an unfinished line are kept;
a longer line is counted invalid once and skipped up to its LF.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["DEFAULT_MAX_LINE", "Counts", "LineScanner", "StrictFilter", "classify", "count_block"]

DEFAULT_MAX_LINE = 64 * 1024
"""Longest line, LF included, that can be well-formed (the reference server's limit)."""

REQ, ACK, NAK, INVALID = 0, 1, 2, 3
_NOTHING = (0, 0, 0, 0)
#: Bytes of an offending line kept for the log: more than the log shows (64),
#: so that it can mark the line as cut.
_EXCERPT = 80
_TYPES = {b"REQ": REQ, b"ACK": ACK, b"NAK": NAK}
_SEQ_MIN, _SEQ_MAX = -(2**63), 2**63 - 1

# Fast path: a run of lines that are all plainly valid. Seqs of up to 18
# digits always fit in 64 bits; ASCII printable data needs no UTF-8 check.
# Anything this rejects is looked at again line by line by ``classify``.


def _plain(pattern: str) -> re.Pattern[bytes]:
    """Compile with possessive quantifiers where the ``re`` module has them (3.11+).

    None of these patterns needs to backtrack to match, and the possessive
    forms scan a block about a third faster.
    """
    try:
        return re.compile(pattern.replace("%", "+").encode())
    except re.error:
        return re.compile(pattern.replace("%", "").encode())


# The grammar of the module docstring, one named fragment per rule, from which
# every pattern below is built ("%" marks where a quantifier may be possessive).
# The fast path's fragments are narrower than the rules: a seq of at most 18
# digits always fits in 64 bits, and printable ASCII Data needs no UTF-8 check.
_TYPE = r"(?:REQ|ACK|NAK)"
_SP = " "
_PLAIN_SEQ = r"[+-]?%[0-9]{1,18}%"
_UNSIGNED_SEQ = r"[0-9]{1,18}%"
_PLAIN_DATA = r"[\x21-\x7e]*%"
_EOL = r"\r?%\n"
_LINE = rf"{_TYPE}{_SP}{_PLAIN_SEQ}(?:{_SP}{_PLAIN_DATA})?%{_EOL}"
_REQ_LINE = rf"REQ{_SP}{_PLAIN_SEQ}(?:{_SP}{_PLAIN_DATA})?%{_EOL}"
_PLAIN_BLOCK = _plain(rf"(?:{_LINE})*%")
# The shape nearly all traffic has (three fields, no sign, no CR), checked in
# two passes cheaper than one regex. _SHAPE checks each line's type and seq and
# skips its Data with the regex engine's fastest loop (anything but LF). Then
# one ``translate`` deletes every printable byte except N and R: what remains
# of a common line is exactly "[RN]?  [NR]*\n", its two spaces and LF (so no
# third space and nothing unprintable), the initial of a REQ or NAK type (the
# only N or R that a space follows) and the N and R of its Data.
_ANY_DATA = r".*%"  # "." is anything but LF (no DOTALL); it scans faster than [^\n]
_SHAPE = _plain(rf"(?:{_TYPE}{_SP}{_UNSIGNED_SEQ}{_SP}{_ANY_DATA}\n)*%")
_REQ_SHAPE = _plain(rf"(?:REQ{_SP}{_UNSIGNED_SEQ}{_SP}{_ANY_DATA}\n)*%")
_ALL_BUT_NR = bytes(sorted(set(range(0x21, 0x7F)) - set(b"NR")))
# classify(): a seq of any length, its range checked afterwards.
_SEQ = re.compile(rb"[+-]?[0-9]+")
_BAD_DATA_CHARS = re.compile("[\x00-\x20\x7f]")


class Counts(NamedTuple):
    """Messages found in one ``feed``: well-formed by type, and invalid lines.

    The scanner returns plain tuples in this order (building a NamedTuple
    costs more than the rest of a feed); they compare equal to Counts.
    """

    req: int = 0
    ack: int = 0
    nak: int = 0
    invalid: int = 0


def classify(line: bytes) -> int:
    """Return REQ, ACK, NAK or INVALID for one complete line (LF included)."""
    if not line.endswith(b"\n"):
        return INVALID
    body = line[:-1]
    if body.endswith(b"\r"):
        body = body[:-1]
    fields = body.split(b" ")
    if not 2 <= len(fields) <= 3:
        return INVALID
    kind = _TYPES.get(fields[0], INVALID)
    seq = fields[1]
    if kind == INVALID or not _SEQ.fullmatch(seq):
        return INVALID
    # Leading zeros are allowed; past 19 significant digits it cannot fit
    # (and int() of thousands of digits is both slow and refused).
    digits = seq.lstrip(b"+-").lstrip(b"0")
    if len(digits) > 19:
        return INVALID
    value = -int(digits or b"0") if seq[:1] == b"-" else int(digits or b"0")
    if not _SEQ_MIN <= value <= _SEQ_MAX:
        return INVALID
    if len(fields) == 3:
        try:
            data = fields[2].decode("utf-8")
        except UnicodeDecodeError:
            return INVALID
        if _BAD_DATA_CHARS.search(data):
            return INVALID
    return kind


_PLAIN_LINE = _plain(_LINE)
plain_line = _PLAIN_LINE.fullmatch
"""Is this exactly one plainly valid line (a fast check; False proves nothing)?"""
_ONE = {b"REQ ": (1, 0, 0, 0), b"ACK ": (0, 1, 0, 0), b"NAK ": (0, 0, 1, 0)}


def _common_block(block: bytes) -> tuple[int, int, int, int] | None:
    """The counts of ``block`` if all its lines are common ones, else None (nothing proved)."""
    if block.endswith(b"\r\n"):  # CRLF lines (their CR would pass for Data): to _PLAIN_BLOCK
        return None
    reqs_only = _REQ_SHAPE.fullmatch(block) is not None  # a client's pipelined REQs
    if not reqs_only and not _SHAPE.fullmatch(block):
        return None
    marks = block.translate(None, _ALL_BUT_NR)
    if reqs_only:
        lines = len(marks) >> 2
        if marks == b"R  \n" * lines:  # and no N or R in any Data
            return (lines, 0, 0, 0)
    seps = marks.translate(None, b"NR")
    lines = len(seps) // 3
    if seps != b"  \n" * lines:
        return None
    req = marks.count(b"R ")
    nak = marks.count(b"N ")
    return (req, lines - req - nak, nak, 0)


def count_block(block: bytes, max_line: int = DEFAULT_MAX_LINE) -> tuple[int, int, int, int]:
    """Count the messages in ``block``, a run of complete lines (it ends with LF).

    Returns a plain (req, ack, nak, invalid) tuple: it is the hot path.
    """
    if len(block) <= max_line:
        if block.find(b"\n") == len(block) - 1:  # one line, the usual chunk
            if _PLAIN_LINE.fullmatch(block):
                return _ONE[block[:4]]
        elif (counts := _common_block(block)) is not None:
            return counts
        elif _PLAIN_BLOCK.fullmatch(block):  # signs, CRs, two fields
            # Every line is valid, and since Data holds no space, "REQ " and
            # "ACK " can only occur as a line's type.
            lines = block.count(b"\n")
            req = block.count(b"REQ ")
            if req == lines:  # a client's pipelined REQs
                return (req, 0, 0, 0)
            ack = block.count(b"ACK ")
            return (req, ack, lines - req - ack, 0)
    tally = [0, 0, 0, 0]
    start = 0
    find = block.find
    while True:
        end = find(b"\n", start) + 1
        if not end:
            return (tally[0], tally[1], tally[2], tally[3])
        tally[INVALID if end - start > max_line else classify(block[start:end])] += 1
        start = end


class LineScanner:
    """Counts the messages of one byte stream, fed in arbitrary chunks.

    ``feed`` returns the messages that this chunk completes: a line cut by a
    chunk boundary is counted by the feed that delivers its LF, except an
    over-long line, counted invalid as soon as it passes ``max_line``.
    Between feeds it keeps at most ``max_line`` bytes, and it never scans a
    byte twice except the held start of a line, once, when its LF arrives.
    """

    __slots__ = ("max_line", "_held", "_held_len", "_skipping")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 2:
            raise ValueError("max_line must be at least 2")
        self.max_line = max_line
        self._held: list[bytes] = []  # pieces of the unfinished line
        self._held_len = 0
        self._skipping = False  # inside an over-long line, already counted

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held now (never more than ``max_line``)."""
        return self._held_len

    @property
    def mid_line(self) -> bool:
        """Has the stream an unfinished line: held, or over-long and skipped to its LF?"""
        return bool(self._held_len or self._skipping)

    def feed(self, data: bytes) -> tuple[int, int, int, int]:
        """Count the messages this chunk completes, as a (req, ack, nak, invalid) tuple."""
        if data[-1:] == b"\n" and not self._held_len and not self._skipping:
            return count_block(data, self.max_line)  # whole lines, nothing held: the usual case
        last = data.rfind(b"\n")
        if last < 0:
            return (0, 0, 0, self._hold(data))
        if not (self._held or self._skipping):
            counts = count_block(data[: last + 1], self.max_line)
        else:
            first = data.find(b"\n") + 1
            tally = list(count_block(data[first : last + 1], self.max_line))
            if self._skipping:
                self._skipping = False  # already counted when it overflowed
            elif self._held_len + first > self.max_line:
                tally[INVALID] += 1
            else:
                self._held.append(data[:first])
                tally[classify(b"".join(self._held))] += 1
            self._held.clear()
            self._held_len = 0
            counts = (tally[0], tally[1], tally[2], tally[3])
        if last + 1 < len(data) and self._hold(data[last + 1 :]):
            counts = (counts[0], counts[1], counts[2], counts[3] + 1)
        return counts

    def _hold(self, tail: bytes) -> int:
        """Keep the start of an unfinished line; return 1 when it just became too long."""
        if self._skipping:
            return 0
        self._held_len += len(tail)
        if self._held_len > self.max_line:
            self._held.clear()
            self._held_len = 0
            self._skipping = True
            return 1
        self._held.append(tail)
        return 0


_PLAIN_REQS = _plain(rf"(?:{_REQ_LINE})*%")


class StrictFilter:
    """Lets through complete, well-formed REQ lines; stops at the first other line.

    For strict mode on the client side: ``feed`` returns the bytes that may be
    forwarded, the REQs among them, and, once a line breaks the rule, the
    start of that line (for the log). After a violation the filter must not
    be fed again. An unfinished line is held, at most ``max_line`` bytes, in
    pieces joined once when its LF comes (as LineScanner holds them), so a
    line that trickles in byte by byte costs linear time.
    """

    __slots__ = ("max_line", "_held", "_held_len")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._held: list[bytes] = []
        self._held_len = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held now (never forwarded before its LF)."""
        return self._held_len

    def feed(self, data: bytes) -> tuple[bytes, tuple[int, int, int, int], bytes | None]:
        last = data.rfind(b"\n")
        if last < 0:
            self._held.append(data)
            self._held_len += len(data)
            if self._held_len > self.max_line:
                return b"", _NOTHING, self._release()[:_EXCERPT]
            return b"", _NOTHING, None
        if self._held:
            self._held.append(data[: last + 1])
            complete = self._release()
        else:
            complete = data[: last + 1]
        good, reqs, violation = self._check(complete)
        rest = data[last + 1 :]
        if violation is None and rest:
            if len(rest) > self.max_line:
                violation = rest[:_EXCERPT]
            else:
                self._held.append(rest)
                self._held_len = len(rest)
        return good, (reqs, 0, 0, 0), violation

    def _release(self) -> bytes:
        held = b"".join(self._held)
        self._held.clear()
        self._held_len = 0
        return held

    def _check(self, complete: bytes) -> tuple[bytes, int, bytes | None]:
        """The good prefix of complete lines, its REQs, and the start of the first bad line."""
        if len(complete) <= self.max_line and _PLAIN_REQS.fullmatch(complete):
            return complete, complete.count(b"\n"), None
        reqs = start = 0
        while start < len(complete):
            end = complete.find(b"\n", start) + 1
            line = complete[start:end]
            if end - start > self.max_line or classify(line) != REQ:
                return complete[:start], reqs, line[:_EXCERPT]
            reqs += 1
            start = end
        return complete, reqs, None
