"""Byte ranges of a plain .jsonl file that start at line starts: how one big file is split between prep
tasks. A range is read as the whole file reads those lines (same line breaks, same line and record
numbers), so the tasks' documents, ids and error messages are those of one reading of the file.

The line and record numbers at each cut come from one pass of byte counting over the file (line breaks
as Python's text reading finds them: ``\\n``, ``\\r\\n`` and a lone ``\\r``; a record is a line that is not
blank after ``str.strip``). A compressed file (.jsonl.gz, .jsonl.zst) cannot be entered in the middle, so it
is never split: it stays one task's. The one difference from reading the whole file: the check that
a file is text (mostly UTF-8) looks at each range on its own.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

CHUNK = 1 << 24  # bytes counted at a time
# Bytes that may begin a blank line: one that starts a whitespace character in UTF-8 (ASCII ones,
# U+0085/U+00A0, U+1680, U+2000-U+205F, U+3000) or a line break. Lines that begin with one are decoded
# and checked, so this only has to find every blank line.
_MAYBE_BLANK = np.zeros(256, bool)
_MAYBE_BLANK[list(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \xc2\xe1\xe2\xe3")] = True
_REST_OF_LINE = re.compile(rb"[^\r\n]*")


@dataclass(frozen=True)
class LineRange:
    """The lines of a plain .jsonl file from byte ``start`` (a line start) to byte ``end`` (a line start or the
    file's end); the first of them is line ``line`` (1-based) and record ``record`` (0-based) of the file."""

    path: str
    start: int
    end: int
    line: int = 1
    record: int = 0


def open_range(part: LineRange) -> io.TextIOWrapper:
    """The range as text, read as the whole file is (UTF-8, undecodable bytes as surrogate escapes,
    universal newlines)."""
    raw = open(part.path, "rb")  # noqa: SIM115  (closed with the wrapper)
    raw.seek(part.start)
    return io.TextIOWrapper(io.BufferedReader(_Window(raw, part.end - part.start)), encoding="utf-8",
                            errors="surrogateescape")


class _Window(io.RawIOBase):
    """At most ``size`` bytes of a binary file, from where it stands."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.f.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def split_lines(path: str, size: int, cuts: list[int]) -> list[LineRange]:
    """The file cut at the first line start at or after each offset of ``cuts``, as consecutive ranges
    that cover it; cuts that fall together give one range, and none is empty."""
    with open(path, "rb") as f:
        starts = sorted({0, *(_line_start(f, cut, size) for cut in cuts)} - {size})
        parts = [LineRange(path, 0, starts[1] if len(starts) > 1 else size)]
        for start, end in zip(starts[1:], [*starts[2:], size]):
            lines, records = count_lines(f, parts[-1].start, parts[-1].end)
            parts.append(LineRange(path, start, end, parts[-1].line + lines, parts[-1].record + records))
    return parts


def _line_start(f: BinaryIO, offset: int, size: int) -> int:
    """The first line start at or after ``offset`` (``size`` when there is none)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def count_lines(f: BinaryIO, start: int, end: int, chunk_bytes: int = CHUNK) -> tuple[int, int]:
    """(lines, records) of bytes ``start`` to ``end`` of ``f``, which start at a line start and end after a
    ``\\n`` (or at the file's end): what reading them as text counts (a last line without a line break
    counts too)."""
    f.seek(start)
    lines = records = 0
    left, carry = end - start, b""
    while left or carry:
        data = f.read(min(chunk_bytes, left))
        left = left - len(data) if data else 0  # a file cut short since: its end is the range's
        chunk = carry + data
        cut = chunk.rfind(b"\n") + 1 if left else len(chunk)  # whole lines only; a \r\n is never cut apart
        body, carry = chunk[:cut], chunk[cut:]
        counted = _count_whole_lines(body)
        lines, records = lines + counted[0], records + counted[1]
    return lines, records


def _count_whole_lines(body: bytes) -> tuple[int, int]:
    """(lines, records) of ``body``, which starts at a line start and ends at one or at the file's end."""
    data = np.frombuffer(body, np.uint8)
    if not len(data):
        return 0, 0
    breaks = data == ord("\n")
    if b"\r" in body:  # a lone \r breaks a line too, a \r\n once
        alone = data == ord("\r")
        alone[:-1] &= ~breaks[1:]
        breaks |= alone
    ends = np.flatnonzero(breaks)
    lines = len(ends) + int(not breaks[-1])
    starts = np.concatenate([[0], ends + 1])
    starts = starts[starts < len(data)]
    blank = sum(not _REST_OF_LINE.match(body, at).group().decode("utf-8", "surrogateescape").strip()
                for at in starts[_MAYBE_BLANK[data[starts]]].tolist())
    return lines, lines - blank
