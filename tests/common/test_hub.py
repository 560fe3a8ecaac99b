"""Hub ids as model directories, through huggingface_hub's real cache lookup, offline."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.hub import looks_like_hub_id

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache holding ``tiny-org/tiny-llama`` the way ``hf download`` leaves it (refs/main → snapshot)."""
    import transformers

    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, model


def child(cache: Path, *args: str) -> subprocess.CompletedProcess:
    """``tessera ARGS`` with the cache and offline mode given the way users give them: the environment."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_and_load_a_cached_hub_id_offline(hub_cache, tmp_path):
    cache, reference = hub_cache
    done = child(cache, "import", "--hf", "tiny-org/tiny-llama", "--out", str(tmp_path / "imported"))
    assert done.returncode == 0, done.stderr
    from model.io import load_pretrained

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = load_pretrained(tmp_path / "imported").eval()(ids)
    torch.testing.assert_close(getattr(got, "logits", got), expected, atol=1e-4, rtol=0)


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """This process pointed at the cache, offline (huggingface_hub reads its environment at import)."""
    import huggingface_hub

    cache, reference = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, reference


def test_model_init_reads_a_cached_hub_id(offline):
    from model.io import load_pretrained

    _, reference = offline
    model = load_pretrained("tiny-org/tiny-llama").eval()  # what model.init and generate --checkpoint call
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_an_uncached_hub_id_offline_is_one_line(offline, tmp_path, capsys):
    from launch.cli import main

    cache, _ = offline
    assert main(["import", "--hf", "tiny-org/not-downloaded", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tiny-org/not-downloaded: no such local directory, and not in the Hugging Face cache" \
        in err and str(cache) in err
    assert not (tmp_path / "x").exists()


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("gpt2") and looks_like_hub_id("meta-llama/Llama-3.2-1B")
    assert not looks_like_hub_id("runs")  # a local directory wins
    assert not looks_like_hub_id("runs/pretrain/checkpoints") and not looks_like_hub_id("/abs/model")
    assert not looks_like_hub_id("./model") and not looks_like_hub_id("../model")


def test_shard_takes_a_cached_hub_tokenizer(hub_cache, tmp_path):
    """`tessera shard --tokenizer ORG/NAME` reads the tokenizer from the HF cache: the same shards as its directory."""
    import json

    from data.tokenizer import train_tokenizer

    cache, _ = hub_cache
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of the little corpus, said the {i % 7}th reader\n" for i in range(300)))
    snapshot = cache / "models--tiny-org--tiny-tok" / "snapshots" / COMMIT
    train_tokenizer(text.read_text().splitlines(), snapshot, vocab_size=300)
    (cache / "models--tiny-org--tiny-tok" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-tok" / "refs" / "main").write_text(COMMIT)
    for name, tokenizer in (("hub", "tiny-org/tiny-tok"), ("dir", str(snapshot))):
        done = child(cache, "shard", str(text), "--tokenizer", tokenizer, "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "hub" / "manifest.json").read_text())["num_tokens"] > 300 * 8
    shards = sorted(p.name for p in (tmp_path / "dir").iterdir() if p.name != "manifest.json")
    assert shards and sorted(p.name for p in (tmp_path / "hub").iterdir() if p.name != "manifest.json") == shards
    assert all((tmp_path / "hub" / n).read_bytes() == (tmp_path / "dir" / n).read_bytes() for n in shards)
