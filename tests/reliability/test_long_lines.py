"""One very long line (a document of megabytes without a newline) is tokenized in pieces cut where
GPT-2's word split cuts anyway: the same ids as the whole text, without the tokenizers library's
per-token bookkeeping for the whole text at once (the issue measured 7.3 GB for a 50 MB line)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.tokenizer as tokenizer_module
from data.shards import ShardManifest, check_shard, open_shard
from data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TRICKY = ("It's  a  test:  don't   stop!  \t Numbers 12345 and 3.14, émigré naïve 東京 "
          "a-b_c  <|end|> x  'll 've  ?!  \n new line  ")


def test_pieces_encode_to_the_ids_of_the_whole_text(shards, monkeypatch):
    tok = load_tokenizer(shards.parent / "tokenizer")
    assert tok.cut_long
    text = "".join(f"{TRICKY}{i} " * (1 + i % 3) for i in range(300))
    whole = tok.encode_batch([text])[0]
    monkeypatch.setattr(tokenizer_module, "LONG_TEXT_CHARS", 37)
    assert len(tok.pieces(text)) > 100
    assert "".join(tok.pieces(text)) == text
    assert tok.encode_batch([text, "short", text[:30]]) == [whole, tok.encode("short"), tok.encode(text[:30])]


SHARD = """
import sys
import data.tokenizer as t
if sys.argv.pop(1) == "whole":
    t.LONG_TEXT_CHARS = 1 << 40
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def shard_peak_mb(mode: str, source: Path, tokenizer: Path, out: Path) -> float:
    """Peak resident memory of a real `tessera shard` of ``source`` (its own process), in MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = ("import resource, subprocess, sys\n"
            "done = subprocess.run(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", code, sys.executable, "-c", SHARD, mode, "shard", str(source),
                           "--tokenizer", str(tokenizer), "--out", str(out), "--txt-mode", "file"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def tokens(root: Path) -> np.ndarray:
    manifest = ShardManifest.load(root)
    [info] = manifest.shards
    buf = open_shard(manifest, info)
    index = check_shard(buf, manifest, info, verify_checksum=True)
    return np.frombuffer(buf, "<u2", int(index.counts[0, 0]), int(index.offsets[0, 0])).copy()


@pytest.mark.slow
def test_a_megabyte_line_shards_to_the_same_tokens_in_half_the_memory(shards, tmp_path):
    book = (REPO / "examples" / "data" / "pretrain_war_and_peace_books_1_4.txt").read_text().replace("\n", " ")
    source = tmp_path / "one_line.txt"
    source.write_text(book[:1_000_000] + "\n")
    tokenizer = shards.parent / "tokenizer"
    pieces = shard_peak_mb("pieces", source, tokenizer, tmp_path / "pieces")
    whole = shard_peak_mb("whole", source, tokenizer, tmp_path / "whole")
    assert np.array_equal(tokens(tmp_path / "pieces"), tokens(tmp_path / "whole"))
    assert pieces < 0.7 * whole, (pieces, whole)  # measured: 145 MB vs 302 MB
