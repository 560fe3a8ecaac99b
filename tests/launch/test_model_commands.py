"""`tessera generate / export / import` on a real trained tokenizer and a tiny model directory."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from launch.cli import main
from model import ModelConfig, build_model
from model.generate import generate
from model.io import load_pretrained, save_pretrained

TEXT = Path(__file__).resolve().parents[2] / "examples" / "data" / "pretrain_tinyshakespeare.txt"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with checkpoints/latest → step_00000005 holding a tiny Llama and its tokenizer."""
    from data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("run")
    lines = TEXT.read_text().splitlines()[:3000]
    tokenizer = train_tokenizer(lines, root / "tok", vocab_size=400)
    cfg = ModelConfig.from_dict({"preset": "tiny-llama", "vocab_size": len(tokenizer), "init_std": 0.2})
    step = root / "checkpoints" / "step_00000005"
    save_pretrained(build_model(cfg), step)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(root / "tok" / name, step / name)
    (root / "checkpoints" / "latest").write_text("step_00000005")
    return root


def test_generate_prints_the_model_continuations(run_dir, capsys):
    from tokenizers import Tokenizer

    prompts = ["First Citizen:", "To be"]
    code = main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", prompts[0],
                 "--prompt", prompts[1], "--max-new-tokens", "6", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts

    tok = Tokenizer.from_file(str(run_dir / "tok" / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    model = load_pretrained(run_dir / "checkpoints")
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([[bos, *tok.encode(prompt, add_special_tokens=False).ids]])
        out = generate(model, ids, max_new_tokens=6, eos_token_ids=[eos, tok.token_to_id("<|end|>")])
        assert row["completion"] == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_generate_chat_renders_the_prompt_as_a_user_turn(run_dir, capsys):
    from tokenizers import Tokenizer

    from data.conversations import default_chat_template, render

    assert main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", "Who goes there?",
                 "--chat", "--max-new-tokens", "5", "--json"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    tok = Tokenizer.from_file(str(run_dir / "tok" / "tokenizer.json"))
    text = render(default_chat_template(), [{"role": "user", "content": "Who goes there?"}],
                  add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>")
    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    assert ids[0, 0] == tok.token_to_id("<|bos|>") and tok.token_to_id("<|assistant|>") in ids[0].tolist()
    stops = [tok.token_to_id("<|eos|>"), tok.token_to_id("<|end|>")]
    out = generate(load_pretrained(run_dir / "checkpoints"), ids, max_new_tokens=5, eos_token_ids=stops)
    assert completion == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_generate_from_an_encoder_decoder(run_dir, tmp_path, capsys):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run_dir / "tok" / "tokenizer.json"))
    cfg = ModelConfig.from_dict({"preset": "tiny-t5", "vocab_size": tok.get_vocab_size(), "init_std": 0.3})
    model = build_model(cfg)
    save_pretrained(model, tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--tokenizer", str(run_dir / "tok"),
                 "--prompt", "jump twice", "--max-new-tokens", "5", "--json", "--num-beams", "2"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    eos = tok.token_to_id("<|eos|>")
    ids = torch.tensor([[*tok.encode("jump twice", add_special_tokens=False).ids, eos]])
    out = generate(model, ids, max_new_tokens=5, num_beams=2, eos_token_ids=[eos, tok.token_to_id("<|end|>")])
    assert completion == tok.decode(out[0, 1:].tolist(), skip_special_tokens=True)


def test_export_then_import_round_trips_through_transformers(run_dir, tmp_path, capsys):
    import transformers

    assert main(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    assert "exported LlamaForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([hf_tok("Before we proceed any further")["input_ids"]])
    ours = load_pretrained(run_dir / "checkpoints").eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4

    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "back")(ids), ours(ids), atol=1e-6, rtol=0)


def test_bad_arguments_fail_with_one_line(run_dir, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"tessera generate: error: checkpoint not found: {tmp_path / 'missing'}" \
        " is not a directory"
    assert main(["import", "--hf", str(run_dir / "tok"), "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face model directory (no config.json)" in capsys.readouterr().err
    save_pretrained(build_model(ModelConfig.from_dict({"preset": "tiny-llama", "pos": "alibi"})), tmp_path / "m")
    assert main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face layout represents this model" in err and err.count("\n") == 1
    assert main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", "x",
                 "--num-beams", "2", "--temperature", "0.5"]) == 2
    assert "beam search is deterministic" in capsys.readouterr().err


def test_an_export_stops_in_transformers_generate_where_tessera_generate_stops(run_dir, tmp_path, capsys):
    """The export's generation_config.json alone makes transformers' greedy ``generate`` stop at
    ``<|end|>``; the model is edited so that its greedy continuation reaches ``<|end|>`` early."""
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run_dir / "tok" / "tokenizer.json"))
    bos, eos, end = (tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|end|>"))
    model = load_pretrained(run_dir / "checkpoints").eval()
    prompt = "First Citizen:"
    ids = torch.tensor([[bos, *tok.encode(prompt, add_special_tokens=False).ids]])
    fourth = generate(model, ids, max_new_tokens=4)[0, -1].item()
    with torch.no_grad():  # <|end|> outscores the token the model would have chosen at step 4
        model.output_weight()[end] = 1.5 * model.output_weight()[fourth]
    save_pretrained(model, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(run_dir / "tok" / name, tmp_path / "m" / name)

    assert main(["export", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 0
    assert "generation_config.json" in capsys.readouterr().out
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (bos, [eos, end])
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", prompt, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["completion"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    assert out[-1] == end and len(out) <= 4  # stopped at <|end|>, well short of max_new_tokens=64
    assert tok.decode(out, skip_special_tokens=True) == ours
