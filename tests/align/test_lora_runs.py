"""LoRA runs on the real instruction data: only the adapters train, and the loss falls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import merge, parse_overrides
from common.errors import ConfigError
from model.lora import is_adapter_key
from trainer.callbacks import Callback
from trainer.config import RunConfig
from trainer.run import run

MODEL = {"preset": "tiny-llama", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176,
         "max_seq_len": 128}


@pytest.fixture(scope="module")
def base(align_corpus, tmp_path_factory) -> Path:
    """A tiny Llama pretrained briefly on the stories (LoRA adapts a pretrained model)."""
    root = tmp_path_factory.mktemp("lora_base")
    raw = config(root, align_corpus.text, Path("unused"), "train.max_steps=40", "train.lr=3e-3",
                 "train.min_lr=3e-4", "train.micro_batch_size=16")
    raw["model"], raw["lora"] = dict(MODEL), {}
    return run(RunConfig.from_dict(raw), "pretrain").checkpoint / "model"


def config(run_dir: Path, data: tuple[Path, Path], base: Path, *overrides: str) -> dict[str, Any]:
    raw = {
        "model": {"init": str(base)},
        "data": {"train": str(data[0]), "valid": str(data[1]), "seq_len": 96, "num_workers": 0},
        "train": {"micro_batch_size": 8, "max_steps": 12, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                  "seed": 0, "weight_decay": 0.0},
        "checkpoint": {"keep_last": 1},
        "log": {"dir": str(run_dir), "progress": False},
        "lora": {"rank": 8, "alpha": 16, "targets": ["all-linear"]},
    }
    return merge(raw, parse_overrides(list(overrides)))


@torch.no_grad()
def held_out_loss(corpus, model_dir: Path) -> float:
    from data.config import DataConfig
    from data.loader import build_loader
    from data.tokenizer import load_tokenizer
    from model.io import load_pretrained
    from trainer.objectives.clm import CausalLM

    data = DataConfig(train=str(corpus.sft[0]), valid=str(corpus.sft[1]), seq_len=96, num_workers=0)
    batches = build_loader(data, objective="sft", tokenizer=load_tokenizer(corpus.tokenizer), rank=0, world_size=1,
                           micro_batch_size=25, seed=0, split="valid")
    model, objective, total, count = load_pretrained(model_dir).eval(), CausalLM("sft", 0), 0.0, 0
    for batch in batches:
        out = objective.loss(model, batch)
        total, count = total + float(out.loss_sum), count + int(out.count)
    return total / count


class Watch(Callback):
    """The wrapped model's base weights at the start and end, and what the optimizer holds state for."""

    def on_train_start(self, trainer) -> None:
        self.before = {k: v.detach().clone() for k, v in trainer.strategy.model.state_dict().items()}

    def on_train_end(self, trainer) -> None:
        self.after = {k: v.detach().clone() for k, v in trainer.strategy.model.state_dict().items()}
        names = {id(p): n for n, p in trainer.strategy.model.named_parameters()}
        self.optimized = {names[id(p)] for group in trainer.strategy.optimizer.param_groups for p in group["params"]}
        self.state_bytes = sum(t.numel() * t.element_size() for s in trainer.strategy.optimizer.state.values()
                               for t in s.values() if torch.is_tensor(t) and t.dim())


@pytest.fixture(scope="module")
def lora_sft(align_corpus, base, tmp_path_factory):
    watch = Watch()
    result = run(RunConfig.from_dict(config(tmp_path_factory.mktemp("lora_sft"), align_corpus.sft, base)), "sft",
                 [watch])
    return result, watch


def test_sft_with_lora_trains_only_the_adapters(align_corpus, base, lora_sft):
    result, watch = lora_sft
    after, before = held_out_loss(align_corpus, result.checkpoint / "model"), held_out_loss(align_corpus, base)
    assert after < before - 0.15  # measured: 6.79 -> 6.52
    adapters = {k for k in watch.before if is_adapter_key(k)}
    assert watch.optimized == adapters and len(adapters) == 2 * 7 * 2  # A and B of 7 sites per layer
    for key, value in watch.before.items():
        if is_adapter_key(key):
            continue
        assert torch.equal(watch.after[key], value), f"base weight {key} changed"
    assert any(not torch.equal(watch.after[k], watch.before[k]) for k in adapters if k.endswith(".B"))
    assert watch.state_bytes == 2 * 4 * sum(watch.before[k].numel() for k in adapters)  # AdamW's two moments


def test_lora_needs_a_base_model(align_corpus, tmp_path):
    raw = config(tmp_path / "run", align_corpus.sft, Path("unused"))
    del raw["model"]["init"]
    with pytest.raises(ConfigError, match=r"lora.rank > 0 adapts a pretrained model"):
        RunConfig.from_dict(raw)


def test_the_checkpoint_holds_the_adapter_and_exports_for_peft(align_corpus, base, lora_sft, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launch.cli import main
    from model.io import load_pretrained

    result, _ = lora_sft
    model_dir = result.checkpoint / "model"
    assert (model_dir / "adapter.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_pretrained(result.checkpoint).eval()(ids)
    assert main(["export", "--checkpoint", str(result.checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert "and its LoRA adapter to" in capsys.readouterr().out
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "hf" / "adapter")
    assert main(["export", "--checkpoint", str(result.checkpoint), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (peft.eval()(input_ids=ids).logits - ours).abs().max() <= 1e-4
        assert (merged.eval()(input_ids=ids).logits - ours).abs().max() <= 1e-4
    assert main(["export", "--checkpoint", str(base), "--out", str(tmp_path / "x"), "--merge"]) == 2
    assert "has no LoRA adapter" in capsys.readouterr().err


def test_generate_with_the_adapter_equals_the_merged_model(lora_sft, capsys):
    from launch.cli import main
    from model import generate
    from model.io import load_pretrained
    from model.lora import merge

    result, _ = lora_sft
    adapted, merged = load_pretrained(result.checkpoint).eval(), load_pretrained(result.checkpoint).eval()
    merge(merged)
    prompt = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(adapted, prompt, max_new_tokens=12), generate(merged, prompt, max_new_tokens=12))
    assert main(["generate", "--checkpoint", str(result.checkpoint), "--prompt", "Name a colour.",
                 "--max-new-tokens", "4"]) == 0


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step:
            trainer.stop(f"test stop at step {self.step}", reason="test")


def adapter_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model" / "adapter.safetensors")


def test_a_resumed_adapter_run_equals_the_uninterrupted_one(align_corpus, base, lora_sft, tmp_path):
    import torch.distributed.checkpoint as dcp

    straight, _ = lora_sft
    raw = config(tmp_path / "run", align_corpus.sft, base)
    first = run(RunConfig.from_dict(raw), "sft", [StopAt(6)])
    assert first.steps == 6
    saved = dcp.FileSystemReader(str(first.checkpoint / "dcp")).read_metadata().state_dict_metadata
    model_keys = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    assert model_keys and all(is_adapter_key(k) for k in model_keys)  # the frozen base is not in it
    second = run(RunConfig.from_dict(raw), "sft")
    assert second.steps == 12 and second.losses == straight.losses[6:]
    expected, got = adapter_of(straight.checkpoint), adapter_of(second.checkpoint)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_resuming_on_another_base_is_one_line(align_corpus, base, lora_sft, tmp_path):
    from common.errors import UserError
    from model.io import load_pretrained, save_pretrained

    other = load_pretrained(base)
    with torch.no_grad():
        other.embed.tokens.weight.add_(0.01)
    save_pretrained(other, tmp_path / "other")
    straight, _ = lora_sft
    raw = config(tmp_path / "run", align_corpus.sft, tmp_path / "other",
                 f"checkpoint.resume={straight.checkpoint}")
    with pytest.raises(UserError, match="adapts a base with weights sha256") as error:
        run(RunConfig.from_dict(raw), "sft")
    assert "\n" not in str(error.value)


def test_model_init_may_name_an_adapter_to_continue(align_corpus, base, lora_sft, tmp_path):
    straight, _ = lora_sft
    more = "train.max_steps=2", "checkpoint.save_final=false", "train.lr=1e-9", "train.min_lr=0"
    continued = run(RunConfig.from_dict(config(tmp_path / "on", align_corpus.sft, straight.checkpoint, *more)), "sft")
    fresh = run(RunConfig.from_dict(config(tmp_path / "fresh", align_corpus.sft, base, *more)), "sft")
    assert continued.losses[0] < fresh.losses[0] - 0.1  # it starts from the trained adapter, not from B = 0
    raw = config(tmp_path / "other", align_corpus.sft, straight.checkpoint, *more, "lora.rank=4")
    with pytest.raises(ConfigError, match="is a LoRA adapter") as error:
        run(RunConfig.from_dict(raw), "sft")
    assert "\n" not in str(error.value)


class Reference(Callback):
    def on_train_start(self, trainer) -> None:
        from trainer.distributed import unwrap

        reference = trainer.objective.reference_model
        self.is_the_policy = getattr(reference, "module", None) is unwrap(trainer.strategy.model)


def test_dpo_with_lora_uses_the_base_as_reference_and_equals_a_frozen_copy(align_corpus, base, tmp_path,
                                                                            monkeypatch):
    import numpy as np

    import trainer.reference

    dpo = ("train.max_steps=4", "checkpoint.save_final=false", "align.reference=live", "train.lr=1e-2",
           "lora.dropout=0.1")
    watch = Reference()
    shared = run(RunConfig.from_dict(config(tmp_path / "shared", align_corpus.pairs, base, *dpo)), "align", [watch])
    assert watch.is_the_policy  # no second model: the policy with its adapters off
    assert shared.losses[0] == pytest.approx(np.log(2), rel=1e-6)  # policy == reference at step 1
    monkeypatch.setattr(trainer.reference, "reference_is_the_base", lambda ctx: False)
    watch = Reference()
    copied = run(RunConfig.from_dict(config(tmp_path / "copy", align_corpus.pairs, base, *dpo)), "align", [watch])
    assert not watch.is_the_policy
    assert shared.losses[-1] != shared.losses[0]
    np.testing.assert_allclose(shared.losses, copied.losses, rtol=1e-5, atol=0)


class Quantized(Callback):
    def on_train_start(self, trainer) -> None:
        from model.lora import is_quantized

        linears = [m for m in trainer.strategy.model.modules() if isinstance(m, torch.nn.Linear)]
        self.nf4 = sum(is_quantized(m.weight) for m in linears)


def test_qlora_trains_adapters_on_a_4bit_base(align_corpus, base, tmp_path):
    pytest.importorskip("torchao")
    watch = Quantized()
    raw = config(tmp_path / "run", align_corpus.sft, base, "lora.quantize=nf4")
    result = run(RunConfig.from_dict(raw), "sft", [watch])
    assert watch.nf4 == 2 * 4  # qkv, out, up, down of both blocks
    trained = held_out_loss(align_corpus, result.checkpoint / "model")  # on the unquantised base
    assert trained < held_out_loss(align_corpus, base) - 0.15
    with pytest.raises(ConfigError, match=r"lora.quantize=nf4 runs under train.strategy single or ddp"):
        RunConfig.from_dict(config(tmp_path / "z", align_corpus.sft, base, "lora.quantize=nf4",
                                   "train.strategy=zero3"))
