"""The shard format: webdataset tar files of token arrays, a manifest, and a fast indexed reader.

Samples are packed (format 3): consecutive samples share one tar sample, keyed by its first sample's
number, that holds per field ``{key}.{field}.npy`` (little-endian numpy array: the field's arrays of
its samples end to end), ``{key}.lengths.npy`` (uint32 ``[samples, fields]``: each sample's element
counts, to split them) and, with metadata, ``{key}.json`` (a list: an object per sample). A pack
holds up to about 1 MiB of payload, so a short document costs its tokens and a few bytes, not a tar
header and an .npy header of its own. Stock webdataset reads these tars as they are and yields packs.
The fields depend on the kind: text → ``tokens``; sft → ``input_ids`` and ``loss_mask`` (uint8);
preference → ``prompt``, ``chosen``, ``rejected``; unpaired (KTO) → ``prompt``, ``completion``, ``label``
(1 desirable, 0 undesirable); classification → ``input_ids`` and ``label``
(the label's index; the names are the manifest's ``labels``); seq2seq → ``source``, ``target``
(see :mod:`data.tasks`); prompt → ``prompt`` (the chat-rendered prompt ending with the assistant
header) and ``record`` (the UTF-8 JSON ``[name, record]`` of the source record, bytes as uint8: what
online alignment's reward functions read). Token arrays are uint16 when the vocabulary
fits, else uint32.

Beside each tar, ``NNNNN.idx.npy`` holds where each sample's arrays lie in it: an array ``[2, samples,
fields]`` of byte offsets and element counts (uint32 for tars below 4 GiB, else int64; format 2:
int64), a row per sample, not per pack, written with the tar (as Megatron's ``.idx`` and MosaicML's
MDS index), so a reader never walks the tar headers and sample ids stay per document.
``manifest.json`` lists every shard (name, samples, tokens, bytes, sha256, and its index's bytes and
sha256), the tokenizer's hash, the kind and the format version. Older directories still load through
the same index: format 2 (one tar sample per sample, with index files) as it is, format 1 (no index
files) by walking the tars. A sample is a zero-copy numpy view into the shard's memory map. A shard
that is missing, truncated, malformed or disagrees with the manifest raises a one-line
:class:`ShardError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError

FORMAT = "tessera-shards"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no index files (indexed on the fly); 1 and 2: one tar sample per sample
INDEX_SUFFIX = ".idx.npy"
PACK_BYTES = 1 << 20  # payload of a pack (format 3): consecutive samples in one tar sample
LENGTHS = "lengths"  # a pack's member of its samples' element counts per field
LENGTHS_DTYPE = np.dtype("<u4")
INDEX_DTYPES = ("<u4", "<i8")  # 4 bytes for tars below 4 GiB (format 3); format 2 wrote int64
KINDS: dict[str, tuple[str, ...]] = {
    "text": ("tokens",),
    "sft": ("input_ids", "loss_mask"),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("input_ids", "label"),
    "seq2seq": ("source", "target"),
    "prompt": ("prompt", "record"),
    "unpaired": ("prompt", "completion", "label"),
}
MASK_FIELDS = frozenset({"loss_mask"})
BYTE_FIELDS = frozenset({"record"})  # UTF-8 text as uint8
NON_TOKEN_FIELDS = MASK_FIELDS | BYTE_FIELDS | {"label"}  # not counted in the manifest's token totals
REFERENCE_LOGPS = "reference_logps.npy"
TAR_BLOCK = 512


class ShardError(UserError):
    """A shard that cannot be read as the manifest describes it: one line, also when a DataLoader
    worker raised it (torch re-raises it in the parent with the worker's traceback as its message)."""

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__}"):
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


@dataclasses.dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    index_bytes: int = 0  # the NNNNN.idx.npy beside the tar; 0 and None in format 1
    index_sha256: str | None = None


@dataclasses.dataclass
class ShardManifest:
    """What ``manifest.json`` holds; ``root`` is the directory it was read from."""

    kind: str
    dtype: str
    tokenizer_sha256: str
    vocab_size: int
    shards: list[ShardInfo]
    root: Path = Path(".")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def fields(self) -> tuple[str, ...]:
        return KINDS[self.kind]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def field_dtype(self, name: str) -> np.dtype:
        return np.dtype("u1") if name in MASK_FIELDS | BYTE_FIELDS else np.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": self.version, "kind": self.kind, "fields": list(self.fields),
            "dtype": self.dtype, "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size},
            "num_samples": self.num_samples, "num_tokens": self.num_tokens,
            "shards": [dataclasses.asdict(s) for s in self.shards], **self.extra,
        }

    def save(self) -> Path:
        path = self.root / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, root: str | Path) -> ShardManifest:
        root = Path(root)
        path = root / "manifest.json" if not root.name.endswith(".json") else root
        if not path.is_file():
            raise UserError(f"no shard manifest at {path}; make shards with `tessera shard`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError("not a Tessera shard manifest")
            if raw.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"format version {raw.get('version')}, this Tessera reads "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}")
            if raw["kind"] not in KINDS:
                raise ValueError(f"unknown kind {raw['kind']!r}")
            known = {"format", "version", "kind", "fields", "dtype", "tokenizer", "num_samples", "num_tokens",
                     "shards"}
            shards = [ShardInfo(**s) for s in raw["shards"]]
            for info in shards:
                _check_shard_name(info.name)
            return cls(
                kind=raw["kind"], dtype=raw["dtype"], tokenizer_sha256=raw["tokenizer"]["sha256"],
                vocab_size=int(raw["tokenizer"]["vocab_size"]), shards=shards,
                root=path.parent, extra={k: v for k, v in raw.items() if k not in known}, version=raw["version"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: malformed manifest ({exc})") from None


def _check_shard_name(name: Any) -> None:
    """A shard is a file beside its manifest (or a ``pipe:`` command): never a path that leaves the directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"shard name {name!r} is not a file name")
    if name.startswith("pipe:"):
        return
    if Path(name).is_absolute() or "\\" in name or ".." in Path(name).parts:
        raise ValueError(f"shard name {name!r} leaves the shard directory; a shard must be a file beside manifest.json")


class ShardWriter:
    """Writes samples into numbered tar shards of about ``shard_bytes`` each, then the manifest.

    Consecutive samples are packed: a pack is one tar sample holding each field's arrays of its
    samples end to end (up to ``pack_bytes`` of payload, or what fills the shard) and their lengths,
    so a short document costs its tokens, not a tar header and an .npy header of its own.
    """

    def __init__(
        self, out_dir: str | Path, *, kind: str, vocab_size: int, tokenizer_sha256: str,
        shard_bytes: int = 64 << 20, pack_bytes: int = PACK_BYTES, extra: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown shard kind {kind!r}; choose from {', '.join(KINDS)}")
        self.root = Path(out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        if any(self.root.glob("*.tar")) or (self.root / "manifest.json").exists():
            raise UserError(f"{self.root} already holds shards; choose an empty --out directory")
        self.kind, self.shard_bytes, self.pack_bytes = kind, max(int(shard_bytes), TAR_BLOCK * 4), int(pack_bytes)
        self.dtype = token_dtype(vocab_size)
        self.manifest = ShardManifest(kind, self.dtype.str, tokenizer_sha256, vocab_size, [], self.root,
                                      dict(extra or {}))
        self._dtypes = [self.manifest.field_dtype(name) for name in KINDS[kind]]
        self._tar: tarfile.TarFile | None = None
        self._samples = self._tokens = 0
        self._count = 0
        self._index: list[np.ndarray] = []  # per pack of the open shard: [samples, offsets then counts of each field]
        self._pack: list[list[np.ndarray]] = []  # the open pack: per sample, an array per field
        self._pack_meta: list[dict[str, Any] | None] = []
        self._pack_payload = 0

    def write(self, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
        """Add one sample: an array per field of the kind (lists of ints are fine)."""
        sample = [np.asarray(arrays[name], dtype).reshape(-1) for name, dtype in zip(KINDS[self.kind], self._dtypes)]
        self._pack.append(sample)
        self._pack_meta.append(dict(meta) if meta else None)
        self._pack_payload += sum(a.nbytes for a in sample)
        room = self.shard_bytes - (self._tar.offset if self._tar is not None else 0)
        if self._pack_payload >= min(self.pack_bytes, room):
            self._write_pack()

    def close(self, *, allow_empty: bool = False) -> ShardManifest:
        """Finish the last shard and write manifest.json (``allow_empty``: also one of no shards, as a
        task of a task run may hold)."""
        self._write_pack()
        self._close_shard()
        if not self.manifest.shards and not allow_empty:
            raise UserError("no samples to write: every input document was empty or skipped")
        self.manifest.save()
        return self.manifest

    def _write_pack(self) -> None:
        """The open pack as one tar sample keyed by its first sample's number: ``lengths.npy``
        (``[samples, fields]`` element counts), a ``{field}.npy`` per field, and ``.json`` (a list, a
        metadata object per sample) when any sample has metadata; its samples' rows in the index."""
        if not self._pack:
            return
        if self._tar is None:
            self._tar = tarfile.open(  # noqa: SIM115 (closed by _close_shard)
                self._path(len(self.manifest.shards)), "w", format=tarfile.USTAR_FORMAT)
        key = f"{self._count:010d}"
        lengths = np.array([[a.size for a in sample] for sample in self._pack], LENGTHS_DTYPE)
        self._add(f"{key}.{LENGTHS}.npy", _npy_bytes(lengths))
        offsets = np.empty(lengths.shape, np.int64)
        for field, (name, dtype) in enumerate(zip(KINDS[self.kind], self._dtypes)):
            column = np.concatenate([sample[field] for sample in self._pack]).astype(dtype, copy=False)
            payload = _npy_bytes(column)
            start = self._tar.offset + TAR_BLOCK + len(payload) - column.nbytes  # one USTAR header block
            ends = np.cumsum(lengths[:, field], dtype=np.int64)
            offsets[:, field] = start + (ends - lengths[:, field]) * dtype.itemsize
            self._add(f"{key}.{name}.npy", payload)
            if name not in NON_TOKEN_FIELDS:
                self._tokens += int(ends[-1])
        if any(self._pack_meta):
            metas = [meta or {} for meta in self._pack_meta]
            self._add(f"{key}.json", json.dumps(metas, ensure_ascii=False).encode())
        self._index.append(np.concatenate([offsets, lengths.astype(np.int64)], 1))
        self._count += len(self._pack)
        self._samples += len(self._pack)
        self._pack, self._pack_meta, self._pack_payload = [], [], 0
        if self._tar.fileobj.tell() >= self.shard_bytes:
            self._close_shard()

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        self._tar.addfile(info, io.BytesIO(payload))

    def _path(self, index: int) -> Path:
        return self.root / f"{index:05d}.tar"

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._path(len(self.manifest.shards))
        data = path.read_bytes()
        fields = len(KINDS[self.kind])
        table = np.concatenate(self._index).reshape(-1, 2, fields).transpose(1, 0, 2)
        small = len(data) < 2**32  # then every offset and count fits 4 bytes: half the index
        index = _npy_bytes(np.ascontiguousarray(table, INDEX_DTYPES[0] if small else INDEX_DTYPES[1]))
        index_path = path.with_suffix(INDEX_SUFFIX)
        tmp = index_path.with_name(index_path.name + ".tmp")
        tmp.write_bytes(index)
        tmp.replace(index_path)
        self.manifest.shards.append(ShardInfo(
            path.name, self._samples, self._tokens, len(data), hashlib.sha256(data).hexdigest(),
            len(index), hashlib.sha256(index).hexdigest(),
        ))
        self._tar, self._samples, self._tokens, self._index = None, 0, 0, []


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclasses.dataclass
class ShardIndex:
    """Where each sample's arrays lie in a shard: byte offsets of the data and element counts,
    both ``[samples, fields]``; a walk of the tar also finds its ``.json`` members, ``[members, 3]``:
    the first sample each describes, the byte offset of its text and its size."""

    offsets: np.ndarray
    counts: np.ndarray
    metadata: np.ndarray | None = None


def shard_path(manifest: ShardManifest, info: ShardInfo) -> Path:
    path = manifest.root / info.name
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != info.bytes:
        raise ShardError(f"shard {path} is {size} bytes, the manifest says {info.bytes} (truncated or replaced?)")
    return path


def open_shard(manifest: ShardManifest, info: ShardInfo, *, allow_pipe: bool = False) -> Any:
    """The shard's bytes as a buffer (a read-only memory map, or a pipe's output when allowed)."""
    if info.name.startswith("pipe:"):
        if not allow_pipe:
            raise ShardError(f"shard {info.name!r} is a pipe: URL; set data.allow_pipe=true to run shell commands")
        done = subprocess.run(info.name[5:], shell=True, capture_output=True, check=False)
        if done.returncode:
            raise ShardError(f"shard {info.name!r}: the command failed with status {done.returncode}")
        return done.stdout
    with shard_path(manifest, info).open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def peek_shard(manifest: ShardManifest, info: ShardInfo) -> None:
    """What is cheap to check before a shard is read: it is there, of the manifest's size, and a tar."""
    path = shard_path(manifest, info)
    with path.open("rb") as f:
        if f.read(TAR_BLOCK)[257:262] != b"ustar":
            raise ShardError(f"shard {path} is malformed: no tar header at byte 0")


def load_index(manifest: ShardManifest, info: ShardInfo) -> ShardIndex:
    """A shard's index file, checked against its size and sha256 in the manifest (read with
    ``allow_pickle=False``: nothing read back runs code)."""
    path = manifest.root / Path(info.name).with_suffix(INDEX_SUFFIX)
    if not path.is_file():
        raise ShardError(f"index {path} is missing; run `tessera shard verify {manifest.root}`")
    data = path.read_bytes()
    if len(data) != info.index_bytes or hashlib.sha256(data).hexdigest() != info.index_sha256:
        raise ShardError(f"index {path} does not match its size and sha256 in the manifest (corrupt or replaced)")
    shape = (2, info.samples, len(manifest.fields))
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ShardError(f"index {path} is malformed: {exc}") from None
    if table.shape != shape or table.dtype.str not in INDEX_DTYPES:
        raise ShardError(f"index {path} holds {table.dtype} {table.shape}, expected {' or '.join(INDEX_DTYPES)} "
                         f"{shape}")
    table = table.astype(np.int64, copy=False)
    return ShardIndex(table[0], table[1])


def check_shard(
    buf: Any, manifest: ShardManifest, info: ShardInfo, *, verify_checksum: bool, index: ShardIndex | None = None,
) -> ShardIndex:
    """Validate a shard's bytes against the manifest (size, sha256, token ids) and return its index:
    ``index`` (from its index file) checked against the bytes, or one built by walking the tar."""
    where = manifest.root / info.name
    if len(buf) != info.bytes:
        raise ShardError(f"shard {where} is {len(buf)} bytes, the manifest says {info.bytes} (truncated?)")
    if verify_checksum and hashlib.sha256(buf).hexdigest() != info.sha256:
        raise ShardError(f"shard {where} does not match its sha256 in the manifest (corrupt or replaced)")
    if index is None:
        try:
            index = _walk_tar(buf, manifest)
        except ValueError as exc:
            raise ShardError(f"shard {where} is malformed: {exc}") from None
    else:
        itemsize = np.array([manifest.field_dtype(f).itemsize for f in manifest.fields])
        if (index.offsets < 0).any() or (index.offsets + index.counts * itemsize > len(buf)).any():
            raise ShardError(f"shard {where}: its index points outside the tar")
    if len(index.offsets) != info.samples:
        raise ShardError(f"shard {where} holds {len(index.offsets)} samples, the manifest says {info.samples}")
    _check_token_ids(buf, manifest, index, where)
    return index


def verify_shard(manifest: ShardManifest, info: ShardInfo) -> tuple[Any, ShardIndex]:
    """Every check there is, up front (``tessera shard verify``): size, sha256, the tar walked member
    by member, token ids, and the index file equal to the walk. Returns the shard's bytes and walk."""
    buf = open_shard(manifest, info)
    walked = check_shard(buf, manifest, info, verify_checksum=True)
    if info.index_sha256 is not None:
        index = load_index(manifest, info)
        if not (np.array_equal(index.offsets, walked.offsets) and np.array_equal(index.counts, walked.counts)):
            raise ShardError(f"index of shard {manifest.root / info.name} disagrees with the tar's members")
    return buf, walked


def read_documents(manifest: ShardManifest, info: ShardInfo) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
    """A shard's samples in order, each as its arrays by field and its metadata (None without), after
    every check of :func:`verify_shard`: what :meth:`ShardWriter.write` takes (a task run's merge)."""
    mapped, walked = verify_shard(manifest, info)
    buf = bytes(mapped)  # the arrays outlive the memory map
    metadata: list[Any] = [None] * info.samples
    for first, start, size in walked.metadata.tolist():
        try:
            value = json.loads(buf[start : start + size])
        except ValueError as exc:
            raise ShardError(f"shard {manifest.root / info.name}: bad metadata at byte {start} ({exc})") from None
        values = value if isinstance(value, list) else [value]  # format 3: a list per pack; 1 and 2: per sample
        if first + len(values) > info.samples:
            raise ShardError(f"shard {manifest.root / info.name}: metadata at byte {start} for samples it lacks")
        metadata[first : first + len(values)] = [v or None for v in values]
    for sample in range(info.samples):
        arrays = {name: np.frombuffer(buf, manifest.field_dtype(name), int(walked.counts[sample, field]),
                                      int(walked.offsets[sample, field]))
                  for field, name in enumerate(manifest.fields)}
        yield arrays, metadata[sample]


def _check_token_ids(buf: Any, manifest: ShardManifest, index: ShardIndex, where: Path) -> None:
    """Every token id below the manifest's vocabulary size (else the embedding lookup would fail
    mid-run with an IndexError): one pass over the shard, a max per sample via ``reduceat``."""
    dtype = np.dtype(manifest.dtype)
    view = np.frombuffer(buf, dtype, len(buf) // dtype.itemsize)
    for field, name in enumerate(manifest.fields):
        if name in NON_TOKEN_FIELDS:
            continue
        present = index.counts[:, field] > 0
        starts = index.offsets[present, field] // dtype.itemsize
        ends = starts + index.counts[present, field]
        if not len(starts):
            continue
        bounds = np.stack([starts, ends], 1).reshape(-1)
        highest = np.maximum.reduceat(view, bounds[bounds < len(view)])[::2]
        if int(highest.max()) >= manifest.vocab_size:
            sample = int(np.flatnonzero(present)[int(np.argmax(highest >= manifest.vocab_size))])
            raise ShardError(f"shard {where}: sample {sample} holds token id {int(highest.max())}, not below the "
                             f"vocabulary size {manifest.vocab_size} of its manifest (corrupt, or made with "
                             "another tokenizer)")


def _walk_tar(buf: Any, manifest: ShardManifest) -> ShardIndex:
    """A shard's index built by walking its tar's headers (and where its metadata lies): a tar sample is
    one sample, or a pack of several when it has a ``lengths.npy`` member (format 3)."""
    fields = manifest.fields
    itemsize = np.array([manifest.field_dtype(name).itemsize for name in fields], np.int64)
    offsets: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    metadata: list[tuple[int, int, int]] = []
    samples = 0

    def add(key: str, members: dict[str, tuple[int, int]]) -> int:
        """The rows of tar sample ``key`` (its members: extension → header offset, size); its sample count."""
        if "json" in members:
            start, size = members.pop("json")
            metadata.append((samples, start, size))
        data = []
        for name in fields:
            if f"{name}.npy" not in members:
                raise ValueError(f"sample {key} lacks its {name} member")
            data.append(_npy_data(buf, *members.pop(f"{name}.npy")))
        starts = np.array([start for start, _ in data], np.int64)
        sizes = np.array([size for _, size in data], np.int64)
        if f"{LENGTHS}.npy" in members:
            start, size = _npy_data(buf, *members.pop(f"{LENGTHS}.npy"))
            lengths = np.frombuffer(buf, LENGTHS_DTYPE, size // LENGTHS_DTYPE.itemsize, start).astype(np.int64)
            lengths = lengths.reshape(-1, len(fields))
            if not (lengths.sum(0) * itemsize == sizes).all():
                raise ValueError(f"pack {key}: its lengths disagree with its arrays' sizes")
        else:
            lengths = (sizes // itemsize)[None]
        if members:
            raise ValueError(f"unexpected member {key}.{next(iter(members))} for kind {manifest.kind}")
        counts.append(lengths)
        offsets.append(starts + (np.cumsum(lengths, 0) - lengths) * itemsize)
        return len(lengths)

    key, members = None, {}
    pos, end = 0, len(buf)
    while pos + TAR_BLOCK <= end:
        header = buf[pos : pos + TAR_BLOCK]
        if header.count(0) == TAR_BLOCK:
            break
        if header[257:262] != b"ustar":
            raise ValueError(f"no tar header at byte {pos}")
        name = header[:100].split(b"\0", 1)[0].decode()
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        data = pos + TAR_BLOCK
        pos = data + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        if pos > end:
            raise ValueError(f"member {name} runs past the end of the file")
        stem, _, ext = name.partition(".")
        if stem != key:
            if key is not None:
                samples += add(key, members)
            key, members = stem, {}
        if ext in members:
            raise ValueError(f"member {name} appears twice")
        members[ext] = (data, size)
    else:
        raise ValueError("the end-of-archive marker is missing (truncated?)")
    if key is not None:
        add(key, members)
    width = len(fields)
    return ShardIndex(np.concatenate(offsets) if offsets else np.zeros((0, width), np.int64),
                      np.concatenate(counts) if counts else np.zeros((0, width), np.int64),
                      np.asarray(metadata, np.int64).reshape(-1, 3))


def _npy_data(buf: Any, start: int, size: int) -> tuple[int, int]:
    """(absolute offset, byte length) of the array data inside an .npy member."""
    if buf[start : start + 6] != b"\x93NUMPY":
        raise ValueError(f"member at byte {start} is not a .npy array")
    major = buf[start + 6]
    width = 2 if major == 1 else 4
    header_len = int.from_bytes(buf[start + 8 : start + 8 + width], "little")
    data = start + 8 + width + header_len
    return data, size - (data - start)
