"""Line ranges of a .jsonl file read as the whole file reads: the same lines, numbered the same."""

from __future__ import annotations

import json
import random

import pytest

from common.errors import UserError
from data.line_ranges import count_lines, open_range, split_lines
from data.readers import iter_documents

# Lines that stress what a text reading calls a line and a blank one: Unicode spaces (blank after strip),
# U+2028 (not a line break when reading a file), bytes that are not UTF-8, form feeds.
PIECES = ['{"text": "a b"}', "", "  ", "\t", "\u3000", "\u00a0 ", "\u2028", '{"x": 1}  ', "\x0c", "\x1c", "é"]
BREAKS = ["\n", "\r\n", "\r", "\n", "\n"]


def random_file(rng: random.Random) -> bytes:
    lines = (rng.choice(PIECES).encode() + (b"\xff" if rng.random() < 0.05 else b"") + rng.choice(BREAKS).encode()
             for _ in range(rng.randint(0, 60)))
    return b"".join(lines) + (rng.choice(PIECES).encode() if rng.random() < 0.5 else b"")


def test_ranges_read_the_lines_of_the_whole_file_with_its_numbers(tmp_path):
    """Random files of \\n, \\r\\n and lone \\r line breaks, blank lines of Unicode spaces and bytes that
    are not UTF-8, cut at random offsets: the ranges' lines are the file's, in order, and each range's
    first line and record numbers are those the whole reading reaches there; counting in small chunks
    (a \\r\\n across chunks) gives the whole reading's counts."""
    rng = random.Random(0)
    path = tmp_path / "f.jsonl"
    for _ in range(300):
        data = random_file(rng)
        path.write_bytes(data)
        with path.open(encoding="utf-8", errors="surrogateescape") as f:  # how the readers open a plain file
            lines = list(f)
        with open(path, "rb") as f:
            assert count_lines(f, 0, len(data), chunk_bytes=rng.randint(1, 9)) == (
                len(lines), sum(bool(line.strip()) for line in lines))
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(1, 6)))
        parts = split_lines(str(path), len(data), cuts) if data else []
        read, records = [], 0
        for part in parts:
            assert part.start < part.end and (part.start == 0 or data[part.start - 1 : part.start] == b"\n")
            assert (part.line, part.record) == (len(read) + 1, records)
            with open_range(part) as f:
                got = list(f)
            read += got
            records += sum(bool(line.strip()) for line in got)
        assert read == lines


def test_documents_of_ranges_are_those_of_the_file_ids_and_errors_included(tmp_path):
    rng = random.Random(1)
    records = [{"text": f"document {i}"} | ({"id": f"own{i}"} if i % 3 == 0 else {}) for i in range(200)]
    lines = [json.dumps(r) for r in records]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(line.encode() + rng.choice([b"\n", b"\r\n", b"\n\n", b"\n \n"]) for line in lines))
    whole = [(d.id, d.text) for d in iter_documents([path])]
    parts = split_lines(str(path), path.stat().st_size, [1000, 1001, 3000, 6000])
    assert len(parts) == 4
    assert [(d.id, d.text) for d in iter_documents(parts)] == whole
    assert whole[1] == ("f.jsonl:1", "document 1")

    path.write_bytes(path.read_bytes() + b"{not json\n")
    last = split_lines(str(path), path.stat().st_size, [path.stat().st_size - len(b"{not json\n")])[-1]
    assert last.start > 0
    with path.open() as f:
        where = f"f.jsonl:{len(list(f))}: not valid JSON"
    with pytest.raises(UserError, match=where):
        list(iter_documents([last]))
