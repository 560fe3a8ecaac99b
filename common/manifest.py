"""The checkpoint manifest: every file of a directory with its size and sha256, written last.

The trainer writes one per step directory (trainer/checkpoint.py) and checks it before resuming;
model/io.py checks the ``model/`` entries before it reads weights. Hashes are computed on a few
threads: hashlib releases the GIL on large blocks, so files hash in parallel.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import UserError

MANIFEST = "manifest.json"
HASH_THREADS = 4


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_all(paths: Sequence[Path]) -> list[str]:
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: Path) -> None:
    """List every file under ``directory`` (but the manifest) with its size and sha256, atomically."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = _sha256_all(files)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": digest}
               for p, digest in zip(files, digests)}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries (relative name → bytes, sha256); one line when it is missing or unreadable."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise UserError(f"checkpoint {directory} is incomplete (no {MANIFEST}): its save did not finish")
    try:
        files = json.loads(manifest.read_text())["files"]
        if not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e) for e in files.values()):
            raise KeyError("bytes")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {directory}: {MANIFEST} is unreadable; the checkpoint cannot be trusted") from None
    return files


def check_sizes(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    """Fail with one line naming the first listed file that is missing or of another size."""
    for name, entry in files.items():
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"checkpoint {directory} is truncated: {name} is {found}, expected {entry['bytes']} bytes")


def damaged(directory: Path, files: dict[str, dict[str, Any]], names: Sequence[str]) -> str | None:
    """The first of ``names`` whose sha256 differs from its manifest entry, or None."""
    digests = _sha256_all([directory / name for name in names])
    return next((name for name, digest in zip(names, digests) if digest != files[name]["sha256"]), None)


def damaged_error(directory: Path, name: str) -> UserError:
    return UserError(f"checkpoint file {directory / name} does not match its sha256 in {directory / MANIFEST}: "
                     "it changed after it was saved (corrupted or edited) and was not loaded")


def verify(directory: Path, under: str = "") -> None:
    """Check the sizes and hashes of the listed files (those under the sub-directory ``under`` only,
    when given); fail with one line naming the first bad file."""
    files = read_manifest(directory)
    if under:
        files = {name: entry for name, entry in files.items() if name.startswith(f"{under}/")}
    check_sizes(directory, files)
    bad = damaged(directory, files, sorted(files))
    if bad is not None:
        raise damaged_error(directory, bad)
