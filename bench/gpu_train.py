"""Training-step throughput: Tessera vs Hugging Face transformers, same shapes, same process.

For each workload (Llama-shape 125M and 1B decoders, BERT-base MLM, T5-base v1.1 span corruption)
one training step (forward, backward, fused AdamW) is timed after warm-up, for Tessera (eager and
per-block compiled) and for transformers (SDPA, bf16 autocast, fused AdamW; eager, compiled, and
with Liger kernels when ``liger_kernel`` is importable). Prints a table and writes JSON: tokens/s,
MFU (PaLM formula with attention) against 989 TFLOP/s and against the bf16 matmul rate measured
first, peak memory, and each Tessera row's ratio to the best transformers row of its workload.

    PYTHONPATH=. python bench/gpu_train.py [--workloads llama-125m,bert-base] [--modes ...] [--json F]
    PYTHONPATH=. python bench/gpu_train.py --smoke      # tiny shapes on CPU (what CI runs)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model import build_model
from model.config import Arch, ModelConfig
from model.hf import config_to_hf
from trainer.objectives.clm import CausalLM
from trainer.objectives.mlm import MaskedLM
from trainer.objectives.span import SpanCorruption
from trainer.strategy.prepare import prepare

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16


@dataclasses.dataclass
class Workload:
    name: str
    preset: str
    batch: int
    seq_len: int
    decoder_len: int = 0  # encoder_decoder only
    overrides: dict = dataclasses.field(default_factory=dict)


WORKLOADS = {
    "llama-1b": Workload("llama-1b", "llama-1b", batch=8, seq_len=2048),
    "llama-125m": Workload("llama-125m", "llama-125m", batch=16, seq_len=2048),
    "bert-base": Workload("bert-base", "bert-base", batch=64, seq_len=512),
    "t5-base": Workload("t5-base", "t5-base", batch=32, seq_len=512, decoder_len=114),
}
SMOKE_WORKLOADS = {
    "tiny-llama": Workload("tiny-llama", "tiny-llama", batch=2, seq_len=64, overrides={"vocab_size": 512}),
    "tiny-bert": Workload("tiny-bert", "tiny-bert", batch=2, seq_len=64, overrides={"vocab_size": 512}),
    "tiny-t5": Workload("tiny-t5", "tiny-t5", batch=2, seq_len=64, decoder_len=16, overrides={"vocab_size": 512}),
}
MODES = ("tessera", "tessera-compiled", "hf", "hf-compiled", "hf-liger")


def model_config(workload: Workload) -> ModelConfig:
    return ModelConfig.from_dict({"preset": workload.preset, **workload.overrides})


def make_batch(cfg: ModelConfig, workload: Workload, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens shaped like the collators' batches (labels already shifted, -100 ignored)."""
    g = torch.Generator().manual_seed(0)
    b, t = workload.batch, workload.seq_len
    ids = torch.randint(4, cfg.vocab_size, (b, t), generator=g)
    if cfg.arch == Arch.decoder:
        labels = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], dim=1)
        batch = {"input_ids": ids, "labels": labels}
    elif cfg.arch == Arch.encoder:
        masked = torch.rand((b, t), generator=g) < 0.15
        batch = {"input_ids": ids, "labels": torch.where(masked, ids, -100),
                 "attention_mask": torch.ones(b, t, dtype=torch.bool)}
    else:
        d = workload.decoder_len
        labels = torch.randint(4, cfg.vocab_size, (b, d), generator=g)
        decoder_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1]], dim=1)
        batch = {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.bool),
                 "decoder_input_ids": decoder_ids, "labels": labels,
                 "decoder_attention_mask": torch.ones(b, d, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}


def tokens_per_step(workload: Workload) -> int:
    return workload.batch * (workload.seq_len + workload.decoder_len)


def step_flops(cfg: ModelConfig, workload: Workload) -> float:
    """Training FLOPs of one step, PaLM style: 6 × matmul params × tokens + 12·L·d·T attention."""
    b, t, td, d = workload.batch, workload.seq_len, workload.decoder_len, cfg.d_model
    head = 6.0 * cfg.vocab_size * d
    if cfg.arch != Arch.encoder_decoder:
        from model.flops import flops_per_token

        return flops_per_token(cfg, t) * b * t
    with torch.device("meta"):
        model = build_model(cfg)
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.layers"))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.layers"))
    enc_tokens, dec_tokens = b * t, b * td
    attention = 12.0 * d * (cfg.n_layers * t * enc_tokens + cfg.decoder_layers * (td + t) * dec_tokens)
    return 6.0 * enc * enc_tokens + (6.0 * dec + head) * dec_tokens + attention


def measure_matmul_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def tessera_runner(cfg: ModelConfig, compiled: bool, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    torch.manual_seed(0)
    model = prepare(build_model(cfg).to(device), activation_checkpointing="none", compile=compiled)
    chunk = 4096 if device.type == "cuda" else 64
    objective = {Arch.decoder: lambda: CausalLM("clm", chunk), Arch.encoder: lambda: MaskedLM(chunk),
                 Arch.encoder_decoder: lambda: SpanCorruption(chunk)}[cfg.arch]()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = objective.loss(model, batch)
        return out.loss_sum / out.count

    return model, loss


def hf_runner(cfg: ModelConfig, mode: str, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    import transformers

    hf = config_to_hf(cfg)
    hf_config = transformers.CONFIG_MAPPING[hf.pop("model_type")](**{k: v for k, v in hf.items() if k != "dtype"})
    if mode == "hf-liger":
        import liger_kernel.transformers as liger

        apply = {"llama": liger.apply_liger_kernel_to_llama}.get(hf_config.model_type)
        if apply is None:
            raise RuntimeError(f"Liger has no patch for {hf_config.model_type}")
        apply()
    auto = {Arch.decoder: transformers.AutoModelForCausalLM, Arch.encoder: transformers.AutoModelForMaskedLM,
            Arch.encoder_decoder: transformers.AutoModelForSeq2SeqLM}[cfg.arch]
    torch.manual_seed(0)
    model = auto.from_config(hf_config, attn_implementation="sdpa").to(device)
    forward = torch.compile(model) if mode == "hf-compiled" else model

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if cfg.arch == Arch.decoder:  # transformers shifts labels itself: give it the unshifted ids
            return forward(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return forward(**batch).loss

    return model, loss


def time_mode(workload: Workload, mode: str, device: torch.device, steps: int, warmup: int) -> dict:
    cfg = model_config(workload)
    if mode.startswith("tessera"):
        model, loss_fn = tessera_runner(cfg, mode == "tessera-compiled", device)
    else:
        model, loss_fn = hf_runner(cfg, mode, device)
    batch = make_batch(cfg, workload, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)  # also synchronises
    seconds = (time.perf_counter() - start) / steps
    flops = step_flops(cfg, workload)
    row = {
        "workload": workload.name, "mode": mode, "batch": workload.batch, "seq_len": workload.seq_len,
        "decoder_len": workload.decoder_len, "step_s": seconds, "tokens_per_s": tokens_per_step(workload) / seconds,
        "tflops": flops / seconds / 1e12, "loss": final_loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32, 1 timed step")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("runs/bench/gpu_train.json"))
    args = parser.parse_args(argv)

    table = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    names = args.workloads.split(",") if args.workloads else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; choose from {', '.join(table)}")
    modes = args.modes.split(",")
    if "hf-liger" in modes and _version("liger_kernel") is None:
        print("liger_kernel is not importable: skipping the hf-liger rows")
        modes.remove("hf-liger")
    if args.smoke:
        modes = [m for m in modes if not m.endswith("compiled")]  # compile on CPU costs minutes, proves little
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    steps = args.steps or (1 if args.smoke else 10)
    warmup = args.warmup or (1 if args.smoke else 3)
    matmul = measure_matmul_tflops(device)

    rows: list[dict] = []
    for name in names:
        for mode in modes:
            try:
                rows.append(time_mode(table[name], mode, device, steps, warmup))
            except Exception as exc:  # a peer setting that cannot run (no Liger patch, OOM) is reported
                rows.append({"workload": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:200]})
            gc.collect()  # free the last mode's model and optimizer before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(rows, matmul)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": _version("transformers"),
              "liger_kernel": _version("liger_kernel"), "matmul_tflops": matmul, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print_table(report)
    return 0


def add_ratios(rows: list[dict], matmul: float | None) -> None:
    for row in rows:
        if "error" in row:
            continue
        row["mfu"] = row["tflops"] / PEAK_BF16_TFLOPS
        row["mfu_measured_peak"] = row["tflops"] / matmul if matmul else None
        peers = [r["tokens_per_s"] for r in rows
                 if r["workload"] == row["workload"] and r["mode"].startswith("hf") and "error" not in r]
        row["vs_best_hf"] = row["tokens_per_s"] / max(peers) if peers and row["mode"].startswith("tessera") else None


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
          f"liger {report['liger_kernel']}  measured bf16 matmul: {_fmt(report['matmul_tflops'], '.0f')} TFLOP/s")
    header = f"{'workload':<12}{'mode':<18}{'tokens/s':>12}{'MFU':>8}{'MFU/meas':>10}{'mem GiB':>9}{'vs HF':>8}"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['workload']:<12}{r['mode']:<18}  {r['error']}")
            continue
        print(f"{r['workload']:<12}{r['mode']:<18}{r['tokens_per_s']:>12,.0f}{_fmt(r['mfu'], '.1%'):>8}"
              f"{_fmt(r['mfu_measured_peak'], '.1%'):>10}{_fmt(r['peak_mem_gib'], '.1f'):>9}"
              f"{_fmt(r['vs_best_hf'], '.2f'):>8}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
