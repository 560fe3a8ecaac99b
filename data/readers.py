"""Streaming readers for raw corpora: .txt, .jsonl, .json, .parquet and .warc files, or directories of them.

A .txt file has no document separator, so what a document is there is a choice (``txt_mode``):
``"chapter"`` (from one chapter heading, alone in its block, to the next: a book), ``"passage"``
(consecutive blank-line blocks joined until they hold at least ``PASSAGE_WORDS`` words: running
text such as stories whose paragraphs are separated by blank lines too), ``"block"`` (each
blank-line block), ``"line"`` (each non-empty line) or ``"file"``. ``"auto"`` (the default) picks
chapters when the file has at least two headings, else passages when it has a blank line, else lines
(one article per line, as in many corpus dumps): a book is never cut into thousands of unrelated
paragraphs that the quality filters then drop one by one and the loader masks apart. A hard-wrapped
file (Gutenberg's fixed line width) has each paragraph read as one line, so line rules see paragraphs.
.jsonl gives one per line and .json one per array item, with the text taken from ``text_field``.
Files are read line by line, so memory stays flat (a .json array is the exception: it is parsed
whole). Text files may be gzip (.gz) or zstandard (.zst) compressed. .parquet is read a record batch
at a time, taking the ``text_field`` column. .warc/.warc.gz keeps HTTP 200 responses with an HTML
type, decodes them in the charset they declare (:func:`decode_html`) and extracts the main text with the
chosen extractor (``EXTRACTORS``: trafilatura or resiliparse, :func:`extract_main_text`); the other responses,
and records cut short, are counted in ``skipped``.
Bytes that are not UTF-8 become U+FFFD and are counted per file (``invalid_utf8``: prep's report);
a file that is mostly such bytes is not text and is refused in one line. Record errors name
``file:line`` (1-based) for .jsonl and ``file item N`` (1-based) for .json arrays.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import importlib.util
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common.errors import UserError
from data.line_ranges import LineRange, open_range

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".warc")
COMPRESSIONS = (".gz", ".zst")
PARQUET_BATCH_ROWS = 1024
HTML_TYPES = ("text/html", "application/xhtml+xml")
CHARSET = re.compile(r"charset\s*=\s*([^;\s]+)", re.IGNORECASE)
META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
META_CHARSET_BYTES = 2048  # where a page's <meta charset> must be (HTML's rule: the first 1024 bytes; some slack)
TXT_MODES = ("auto", "chapter", "passage", "block", "line", "file")
TXT_MODE_HELP = (
    "what a document of a .txt file is: chapter (heading to heading), passage (blank-line blocks joined to "
    "at least 200 words), block, line, or file; auto (default): chapters when the file has two or more "
    "chapter headings, else passages when it has blank lines, else lines. report.json says what each file got"
)
INVALID_UTF8_FRACTION = 0.1  # more of a file's bytes than this undecodable: not text (random bytes, a binary)
ESCAPED_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of an undecodable byte
PASSAGE_WORDS = 200  # "passage": a document is at least this many words (Gopher keeps 50 and more)
HEADING_CHARS = 60
WRAP_MAX_CHARS = 100  # a hard-wrapped file's lines are at most this long (Gutenberg wraps at about 70)
WRAP_FILL = 0.85  # ... and the median line a paragraph continues after fills this much of the longest
HEADING = re.compile(
    r"(?:(?:first|second|third|fourth)\s+)?(?:(?:chapter|book|part|volume|canto|capitolo|chapitre|kapitel|libro|parte)"
    r"\s+(?:[ivxlcdm]+|\d+|[a-z]+)\b|(?:epilogue|prologue)\b).*",
    re.IGNORECASE,
)


@dataclass
class Document:
    """One raw document: a stable id, its text, and whatever other fields the record carried."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus the supported files under named directories (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in SUFFIXES)
            if not found:
                raise UserError(f"{path}: no .txt, .jsonl, .json, .parquet or .warc files in this directory")
            files += found
        elif path.is_file():
            if _suffix(path) not in SUFFIXES:
                raise UserError(f"{path}: unsupported file type; use .txt, .jsonl, .json (optionally .gz or .zst), "
                                ".parquet or .warc (optionally .gz)")
            files.append(path)
        else:
            raise UserError(f"no such file or directory: {path}")
    return files


def iter_documents(
    inputs: Iterable[str | Path | LineRange], *, text_field: str = "text", txt_mode: str = "auto",
    extractor: str = "trafilatura", skipped: Counter[str] | None = None, invalid_utf8: Counter[str] | None = None,
) -> Iterator[Document]:
    """Every document of every input (a file, a directory, or a :class:`LineRange` of a .jsonl file), in
    order, WARC pages' main text taken with ``extractor``; records that give no document are counted in
    ``skipped``, bytes that are not UTF-8 (replaced by U+FFFD) in ``invalid_utf8`` per file."""
    if txt_mode not in TXT_MODES:
        raise UserError(f"unknown txt mode {txt_mode!r}; choose from {', '.join(TXT_MODES)}")
    check_extractor(extractor)
    skipped = Counter() if skipped is None else skipped
    sources: list[Path | LineRange] = []
    for item in inputs:  # every input checked before the first document is read
        sources += [item] if isinstance(item, LineRange) else expand_inputs([item])
    for source in sources:
        if isinstance(source, LineRange):
            with _Text(open_range(source), Path(source.path), invalid_utf8) as f:
                yield from _jsonl(f, Path(source.path), text_field, source.line, source.record)
        else:
            yield from _file_documents(source, text_field, txt_mode, extractor, skipped, invalid_utf8)


def _file_documents(path: Path, text_field: str, txt_mode: str, extractor: str, skipped: Counter[str],
                    invalid_utf8: Counter[str] | None) -> Iterator[Document]:
    suffix = _suffix(path)
    if suffix == ".parquet":
        yield from _parquet(path, text_field)
    elif suffix == ".warc":
        yield from _warc(path, extractor, skipped)
    else:
        with open_text(path, invalid_utf8) as f:
            if suffix == ".txt":
                yield from _txt(f, path, resolve_txt_mode(path, txt_mode))
            elif suffix == ".jsonl":
                yield from _jsonl(f, path, text_field)
            else:
                yield from _json(f, path, text_field)


def iter_records(
    inputs: Iterable[str | Path], skipped: Counter[str] | None = None, invalid_utf8: Counter[str] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, record) for every JSON object of .jsonl/.json inputs (SFT and preference data), the name
    ``file:line``; with ``skipped`` a line that is not JSON is counted there instead of failing."""
    for path in expand_inputs(inputs):
        suffix = _suffix(path)
        if suffix not in (".jsonl", ".json"):
            raise UserError(f"{path}: conversations must be .jsonl or .json records, not {suffix} files")
        with open_text(path, invalid_utf8) as f:
            if suffix == ".jsonl":
                for lineno, _, record in _jsonl_objects(f, path, skipped):
                    yield f"{path}:{lineno}", record
            else:
                for index, record in enumerate(_json_array(f, path)):
                    yield f"{path} item {index + 1}", record


def _suffix(path: Path) -> str:
    """The format suffix under any compression suffix: a.jsonl.zst → .jsonl; "" for an unsupported pair."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    suffix = Path(name[: len(name) - len(compression)]).suffix
    if compression and (suffix == ".parquet" or (suffix == ".warc" and compression != ".gz")):
        return ""  # Parquet compresses inside the file; warcio reads gzip only
    return suffix


def is_warc(path: str | Path) -> bool:
    """Whether the file is a WARC (.warc or .warc.gz): read through an extractor."""
    return _suffix(Path(path)) == ".warc"


def splittable(path: str | Path) -> bool:
    """Whether the file can be read in parts (:mod:`data.line_ranges`): plain .jsonl, not compressed."""
    return _suffix(Path(path)) == ".jsonl" and not Path(path).name.lower().endswith(COMPRESSIONS)


def open_text(path: Path, invalid_utf8: Counter[str] | None = None) -> _Text:
    """A (possibly compressed) UTF-8 text file; undecodable bytes become U+FFFD, counted (see :class:`_Text`)."""
    return _Text(_open_raw(path), path, invalid_utf8)


def _open_raw(path: Path) -> TextIO:
    """The file as text, undecodable bytes kept as surrogate escapes (for :class:`_Text` to count)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="surrogateescape")
    return path.open(encoding="utf-8", errors="surrogateescape")


class _Text:
    """A text file read line by line (or whole) whose undecodable bytes become U+FFFD, counted into
    ``invalid_utf8[path]`` at close; mostly undecodable (more than ``INVALID_UTF8_FRACTION``) → one line."""

    def __init__(self, f: TextIO, path: Path, invalid_utf8: Counter[str] | None) -> None:
        self.f, self.path, self.counts = f, path, invalid_utf8
        self.chars = self.invalid = 0

    def _clean(self, text: str) -> str:
        self.chars += len(text)
        if not ESCAPED_BYTES.search(text):
            return text
        text, n = ESCAPED_BYTES.subn("\ufffd", text)
        self.invalid += n
        return text

    def __iter__(self) -> Iterator[str]:
        return (self._clean(line) for line in self.f)

    def read(self) -> str:
        return self._clean(self.f.read())

    def __enter__(self) -> _Text:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.f.close()
        if kind is not None or not self.invalid:
            return
        if self.counts is not None:
            self.counts[str(self.path)] += self.invalid
        if self.invalid > INVALID_UTF8_FRACTION * self.chars:
            raise UserError(f"{self.path}: {self.invalid} of about {self.chars} bytes are not UTF-8: not a text file "
                            "(convert another encoding with iconv -t UTF-8)")


def resolve_txt_mode(path: Path, txt_mode: str) -> str:
    """The mode a .txt file is read in: ``txt_mode`` itself, or what ``"auto"`` picks for this file."""
    return _txt_profile(Path(path)).mode if txt_mode == "auto" else txt_mode


@dataclass(frozen=True)
class TxtProfile:
    """What one pass over a .txt file's blocks tells: the mode ``auto`` picks, and whether its paragraphs
    are hard-wrapped (a fixed line width, as Project Gutenberg's books are)."""

    mode: str
    hard_wrapped: bool


def _txt_profile(path: Path) -> TxtProfile:
    stat = path.stat()
    return _profile(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _profile(path: Path, size: int, mtime_ns: int) -> TxtProfile:
    """One pass over the file's blocks (remembered while the file is unchanged: reading and the report ask).
    Hard-wrapped: the longest line is at most ``WRAP_MAX_CHARS`` and the lines that a paragraph
    continues after are, in the median, close to it (wrapped prose fills its lines; verse does not)."""
    blocks = headings = longest = 0
    continued: Counter[int] = Counter()  # line lengths, as a histogram: memory stays flat for any file
    with open_text(path) as f:
        for block in _blocks(f):
            blocks += 1
            headings += _is_heading(block)
            lengths = [len(line.rstrip()) for line in block]
            longest = max(longest, *lengths)
            continued.update(lengths[:-1])
    mode = "chapter" if headings >= 2 else "passage" if blocks > 1 else "line"
    wrapped = bool(continued) and longest <= WRAP_MAX_CHARS and _median(continued) >= WRAP_FILL * longest
    return TxtProfile(mode, wrapped)


def _median(histogram: Counter[int]) -> int:
    """The (upper) median of the values a histogram counts."""
    middle, seen = sum(histogram.values()) // 2, 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen > middle:
            return value
    raise ValueError("empty histogram")


def txt_modes(inputs: Iterable[str | Path], txt_mode: str) -> dict[str, str]:
    """What each .txt input among ``inputs`` is read as (for reports)."""
    return {str(p): resolve_txt_mode(p, txt_mode) for p in expand_inputs(inputs) if _suffix(p) == ".txt"}


def _is_heading(block: list[str]) -> bool:
    return len(block) == 1 and len(block[0].strip()) <= HEADING_CHARS and bool(HEADING.fullmatch(block[0].strip()))


def _blocks(f: _Text) -> Iterator[list[str]]:
    """The file's blank-line-separated blocks, each a list of its lines."""
    block: list[str] = []
    for line in f:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _txt(f: _Text, path: Path, mode: str) -> Iterator[Document]:
    if mode == "file":
        yield Document(path.name, f.read())
        return
    if mode == "line":
        lines = (line for line in f if line.strip())
        yield from (Document(f"{path.name}:{i}", line) for i, line in enumerate(lines))
        return
    blocks = _blocks(f)
    if _txt_profile(path).hard_wrapped:
        blocks = (_unwrap(block) for block in blocks)
    groups = {"block": _each_block, "chapter": _chapters, "passage": _passages}[mode](blocks)
    for index, group in enumerate(groups):
        yield Document(f"{path.name}:{index}", "\n".join("".join(block) for block in group))


def _unwrap(block: list[str]) -> list[str]:
    """A hard-wrapped paragraph as the one line it is: the wrap is the file's layout, not the text's (and
    line rules such as FineWeb's line punctuation would otherwise read each 70-character piece as a line)."""
    return [" ".join(line.strip() for line in block) + "\n"]


def _each_block(blocks: Iterator[list[str]]) -> Iterator[list[list[str]]]:
    for block in blocks:
        yield [block]


def _chapters(blocks: Iterator[list[str]]) -> Iterator[list[list[str]]]:
    """From a heading to the next heading that follows some text: a run of headings (BOOK ONE,
    CHAPTER I) opens one chapter, and text before the first heading is a document of its own."""
    group: list[list[str]] = []
    has_text = False
    for block in blocks:
        heading = _is_heading(block)
        if heading and has_text:
            yield group
            group, has_text = [], False
        group.append(block)
        has_text = has_text or not heading
    if group:
        yield group


def _passages(blocks: Iterator[list[str]]) -> Iterator[list[list[str]]]:
    """Consecutive blocks joined until they hold ``PASSAGE_WORDS`` words; a short tail joins the last passage."""
    group: list[list[str]] = []
    words = 0
    ready: list[list[str]] | None = None
    for block in blocks:
        group.append(block)
        words += sum(len(line.split()) for line in block)
        if words >= PASSAGE_WORDS:
            if ready is not None:
                yield ready
            ready, group, words = group, [], 0
    if ready is not None:
        yield ready + group
    elif group:
        yield group


def _jsonl_objects(f: _Text, path: Path, skipped: Counter[str] | None = None, first_line: int = 1,
                   first_record: int = 0) -> Iterator[tuple[int, int, Any]]:
    """(1-based line, 0-based record index, record) per non-blank line, numbered from ``first_line`` and
    ``first_record``; a line that is not JSON fails, or is counted in ``skipped`` when given."""
    index = first_record
    for lineno, line in enumerate(f, first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if skipped is None:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            skipped["not valid JSON"] += 1
            continue
        yield lineno, index, record
        index += 1


def _json_array(f: _Text, path: Path) -> list[Any]:
    try:
        data = json.loads(f.read())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, list) else [data]


def _jsonl(f: _Text, path: Path, text_field: str, first_line: int = 1, first_record: int = 0) -> Iterator[Document]:
    for lineno, index, record in _jsonl_objects(f, path, None, first_line, first_record):
        yield _from_record(record, f"{path}:{lineno}", f"{path.name}:{index}", text_field)


def _json(f: _Text, path: Path, text_field: str) -> Iterator[Document]:
    for index, record in enumerate(_json_array(f, path)):
        yield _from_record(record, f"{path} item {index + 1}", f"{path.name}:{index}", text_field)


def _from_record(record: Any, where: str, default_id: str, text_field: str) -> Document:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        keys = ", ".join(sorted(record)) or "none"
        raise UserError(f"{where}: no text field {text_field!r} (keys: {keys}); set --text-field")
    meta = {k: v for k, v in record.items() if k not in (text_field, "id")}
    return Document(str(record.get("id", default_id)), text, meta)


def _parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path}: no text column {text_field!r} (columns: {', '.join(columns)}); set --text-field")
    index = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            yield _from_record(record, f"{path} row {index + 1}", f"{path.name}:{index}", text_field)
            index += 1


def decode_html(body: bytes, content_type: str = "") -> str:
    """A page's text in the charset its HTTP header names, else its ``<meta>`` tag names, else UTF-8 (the
    order browsers use; a name Python does not know counts as absent; Latin-1 and ASCII read as
    windows-1252, as the WHATWG Encoding standard says). Undecodable bytes become U+FFFD."""
    header, meta = CHARSET.search(content_type), META_CHARSET.search(body[:META_CHARSET_BYTES])
    names = ([header.group(1)] if header else []) + ([meta.group(1).decode("ascii")] if meta else [])
    for name in names:
        try:
            codec = codecs.lookup(name.strip("\"'")).name
        except LookupError:
            continue
        return body.decode("cp1252" if codec in ("iso8859-1", "ascii") else codec, errors="replace")
    return body.decode("utf-8", errors="replace")


def _trafilatura(page: str, url: str | None) -> str | None:
    """trafilatura as FineWeb runs it (datatrove's extractor: precision favoured, comments left out), but
    without its cross-document deduplication, whose output depends on the pages extracted before (a page's
    text must not depend on how the corpus is split into tasks)."""
    import trafilatura

    return trafilatura.extract(page, url=url, favor_precision=True, include_comments=False)


def _resiliparse(page: str, url: str | None) -> str | None:
    """resiliparse's main-content rules (no comments, alt texts or list bullets): ~23x trafilatura's speed,
    lower precision (bench/html_extraction.py)."""
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(page, main_content=True, alt_texts=False, list_bullets=False, comments=False)


EXTRACTORS: dict[str, Callable[[str, str | None], str | None]] = {
    "trafilatura": _trafilatura, "resiliparse": _resiliparse}
EXTRACTOR_HELP = (
    "how WARC pages become their main text: trafilatura (default; FineWeb's settings: F1 0.970 on "
    "bench/html_extraction.py's pages, ~2.4 MB of HTML/s per core) or resiliparse (F1 0.918, more page "
    "furniture kept, ~55 MB/s per core: a whole prep about 2x faster; pip install resiliparse)"
)


def check_extractor(extractor: str) -> None:
    """A known extractor whose package is installed, else one line saying what to do."""
    if extractor not in EXTRACTORS:
        raise UserError(f"unknown extractor {extractor!r}; choose from {', '.join(EXTRACTORS)}")
    if importlib.util.find_spec(extractor) is None:
        raise UserError(f"--extractor {extractor} needs the {extractor} package: pip install {extractor}")


def extract_main_text(page: str, url: str | None = None, extractor: str = "trafilatura") -> str | None:
    """A page's main text as ``extractor`` (a key of ``EXTRACTORS``) finds it; None or "" when it finds none.
    bench/html_extraction.py measures the extractors' speed and quality."""
    return EXTRACTORS[extractor](page, url)


def _warc(path: Path, extractor: str, skipped: Counter[str]) -> Iterator[Document]:
    """HTML responses with status 200 → their main text, with the URL and crawl date kept as fields."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    with path.open("rb") as f:
        try:
            for record in ArchiveIterator(f):
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                status = record.http_headers.get_statuscode()
                content_type = record.http_headers.get_header("Content-Type") or ""
                mime = content_type.split(";")[0].strip().lower()
                body = record.content_stream().read()
                if record.raw_stream.limit > 0:  # fewer bytes than the record's Content-Length: cut short
                    skipped["warc_truncated"] += 1
                    continue
                if status != "200":
                    skipped["warc_status_not_200"] += 1
                    continue
                if mime not in HTML_TYPES:
                    skipped["warc_not_html"] += 1
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                text = extract_main_text(decode_html(body, content_type), url, extractor)
                if not text:
                    skipped["warc_no_main_text"] += 1
                    continue
                meta = {"url": url, "date": record.rec_headers.get_header("WARC-Date")}
                yield Document(record.rec_headers.get_header("WARC-Record-ID") or url, text, meta)
        except (ArchiveLoadFailed, EOFError, OSError):  # a broken gzip member or header ends the file
            skipped["warc_truncated"] += 1
