"""Training-step throughput: Tessera vs Hugging Face transformers, same shapes, same process.

For each workload (Llama-shape 125M and 1B decoders, a Mixtral-shape MoE on the 1B trunk, BERT-base
MLM, T5-base v1.1 span corruption)
one training step (forward, backward, fused AdamW) is timed after warm-up, for Tessera (eager,
per-block compiled, and with ``model.kernels=liger``) and for transformers (SDPA, bf16 autocast,
fused AdamW; eager, compiled, and with Liger kernels when ``liger_kernel`` is importable). Prints
each row as it finishes, then a table, and rewrites the JSON after every row (a run cut short
keeps what finished): tokens/s, MFU (PaLM formula with attention) against 989 TFLOP/s and against
the bf16 matmul rate measured first, peak memory, and each Tessera row's speed and memory against
the fastest transformers row of its workload. ``--budget-s`` skips what would start after it.
Two multi-GPU rows run the real strategies, one process per GPU (NCCL), bf16: ``tessera-tp``
(tensor parallel of a dense decoder) and ``tessera-ep`` (expert parallel of the MoE one), each over
the most GPUs (up to 8) that divide what it splits; on fewer than 2 GPUs (or CPU) they are skipped,
saying why. Their tokens/s count every GPU's tokens (an ep rank reads its own batch, a tp group one);
their TFLOP/s and MFU are per GPU.

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
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

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
    # Mixtral-shape MoE on llama-1b's trunk: 8 experts, top-2 (~2.0B parameters, ~0.6B active); HF peer: Mixtral
    "moe-1b": Workload("moe-1b", "llama-1b", batch=8, seq_len=2048,
                       overrides={"n_experts": 8, "experts_per_token": 2, "moe_d_ff": 2048}),
}
SMOKE_WORKLOADS = {
    "tiny-llama": Workload("tiny-llama", "tiny-llama", batch=2, seq_len=64, overrides={"vocab_size": 512}),
    "tiny-bert": Workload("tiny-bert", "tiny-bert", batch=2, seq_len=64, overrides={"vocab_size": 512}),
    "tiny-t5": Workload("tiny-t5", "tiny-t5", batch=2, seq_len=64, decoder_len=16, overrides={"vocab_size": 512}),
    "tiny-moe": Workload("tiny-moe", "tiny-moe", batch=2, seq_len=64, overrides={"vocab_size": 512}),
}
# Run mode by mode (every workload's eager rows first, the slow-to-start compiled ones last), so a
# run cut short by --budget-s still compares each workload on something.
MODES = ("tessera", "hf", "tessera-liger", "hf-liger", "tessera-tp", "tessera-ep", "tessera-compiled", "hf-compiled")
LIGER_MODES = ("tessera-liger", "hf-liger")
PARALLEL_MODES = {"tessera-tp": "tp", "tessera-ep": "ep"}  # mode → the parallel.* key it sets


def model_config(workload: Workload, mode: str = "tessera") -> ModelConfig:
    kernels = "liger" if mode == "tessera-liger" else "torch"
    return ModelConfig.from_dict({"preset": workload.preset, **workload.overrides, "kernels": kernels})


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
    with device:  # build on the GPU directly: no host copy of the weights
        model = build_model(cfg)
    model = prepare(model, activation_checkpointing="none", compile=compiled)
    chunk = 4096 if device.type == "cuda" else 64
    objective = {Arch.decoder: lambda: CausalLM("clm", chunk), Arch.encoder: lambda: MaskedLM(chunk),
                 Arch.encoder_decoder: lambda: SpanCorruption(chunk)}[cfg.arch]()

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = objective.loss(model, batch)
        return out.loss_sum / out.count

    return model, loss


class Unsupported(Exception):
    """A peer setting that does not exist for this workload (reported, not an error)."""


def hf_runner(cfg: ModelConfig, mode: str, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    import transformers

    hf = config_to_hf(cfg)
    hf_config = transformers.CONFIG_MAPPING[hf.pop("model_type")](**{k: v for k, v in hf.items() if k != "dtype"})
    if mode == "hf-liger":
        import liger_kernel.transformers as liger

        apply = {"llama": liger.apply_liger_kernel_to_llama}.get(hf_config.model_type)
        if apply is None:
            raise Unsupported(f"Liger has no patch for {hf_config.model_type}")
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


@contextlib.contextmanager
def liger_patch_undone() -> Iterator[None]:
    """Liger patches transformers' Llama module and class in place: put them back afterwards, so the
    plain transformers rows that follow are plain."""
    from transformers.models.llama import modeling_llama

    module = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward
    try:
        yield
    finally:
        for name, value in module.items():
            setattr(modeling_llama, name, value)
        modeling_llama.LlamaForCausalLM.forward = forward


def time_mode(workload: Workload, mode: str, device: torch.device, steps: int, warmup: int) -> dict:
    began = time.perf_counter()
    cfg = model_config(workload, mode)
    if mode == "tessera-liger" and cfg.arch != Arch.decoder:
        raise Unsupported("Liger covers RMSNorm/SwiGLU/RoPE: nothing of this architecture but the loss")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode.startswith("tessera"):
        model, loss_fn = tessera_runner(cfg, mode == "tessera-compiled", device)
    else:
        model, loss_fn = hf_runner(cfg, mode, device)
    batch = make_batch(cfg, workload, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> torch.Tensor:
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
    setup_s = time.perf_counter() - began  # build, compile and warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)  # also synchronises
    seconds = (time.perf_counter() - start) / steps
    return {
        "workload": workload.name, "mode": mode, "batch": workload.batch, "seq_len": workload.seq_len,
        "decoder_len": workload.decoder_len, "step_s": seconds, "tokens_per_s": tokens_per_step(workload) / seconds,
        "tflops": step_flops(cfg, workload) / seconds / 1e12, "loss": final_loss, "setup_s": setup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def parallel_size(cfg: ModelConfig, mode: str, gpus: int) -> int:
    """The GPUs a tp/ep row splits over: the most (up to 8) that divide what it splits."""
    key = PARALLEL_MODES[mode]
    if cfg.arch != Arch.decoder or (key == "tp") == bool(cfg.n_experts):
        raise Unsupported("tp splits dense decoder blocks" if key == "tp" else "ep splits an MoE decoder's experts")
    splits = (cfg.n_heads, cfg.kv_heads, cfg.d_ff) if key == "tp" else (cfg.n_experts,)
    size = max((n for n in (8, 4, 2) if n <= gpus and all(s % n == 0 for s in splits)), default=0)
    if size < 2:
        raise Unsupported(f"parallel.{key} needs 2+ CUDA GPUs (one process each); this machine has {gpus}")
    return size


def time_parallel(workload: Workload, mode: str, size: int, steps: int, warmup: int, timeout_s: float = 600) -> dict:
    """Rank 0's row of a ``size``-process tp/ep run (started with "spawn": CUDA cannot fork)."""
    from common.net import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_parallel_rank, args=(rank, size, port, workload, mode, steps, warmup, queue))
             for rank in range(size)]
    for proc in procs:
        proc.start()
    try:
        results = [queue.get(timeout=timeout_s) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if errors := [r["error"] for r in results if "error" in r]:
        raise RuntimeError(errors[0])
    return next(r for r in results if r)


def _parallel_rank(rank: int, size: int, port: int, workload: Workload, mode: str, steps: int, warmup: int,
                   queue: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        queue.put(_parallel_steps(workload, mode, size, steps, warmup))
    except Exception as exc:
        queue.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}"[:300]})
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _parallel_steps(workload: Workload, mode: str, size: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` steps of the real strategy on this rank; rank 0's row, ``{}`` on the others."""
    from model.moe import moe_layers, pop_router_stats
    from trainer.config import ParallelConfig, TrainConfig
    from trainer.distributed import init_distributed
    from trainer.strategy import build_strategy

    began = time.perf_counter()
    env = init_distributed(need_group=True)
    cuda = env.device.type == "cuda"
    key = PARALLEL_MODES[mode]
    train = TrainConfig.from_dict({"strategy": "ddp", "precision": "bf16" if cuda else "fp32"})
    strategy = build_strategy(train, env, parallel=ParallelConfig.from_dict({key: size}))
    cfg = model_config(workload)
    with torch.device("meta"):  # materialised on the host; only this rank's part goes to the GPU
        model = build_model(cfg)
    model = strategy.wrap(model)
    objective = CausalLM("clm", 4096 if cuda else 64)
    batch = make_batch(cfg, workload, env.device)  # the same tokens on every rank (an ep rank's own batch)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with strategy.autocast():
            out = objective.loss(model, batch)
        loss = out.loss_sum / out.count
        strategy.backward(loss)
        strategy.step(lr=1e-4)
        pop_router_stats(moe_layers(model))  # what the loop logs; dropped here
        return loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - began
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)
    seconds = (time.perf_counter() - start) / steps
    if env.rank:
        return {}
    batches = size if key == "ep" else 1  # ep ranks each read a batch; a tp group shares one
    return {
        "workload": workload.name, "mode": mode, "gpus": size, "batch": workload.batch, "seq_len": workload.seq_len,
        "decoder_len": workload.decoder_len, "step_s": seconds,
        "tokens_per_s": batches * tokens_per_step(workload) / seconds,
        "tflops": batches * step_flops(cfg, workload) / seconds / 1e12 / size, "loss": final_loss,
        "setup_s": setup_s, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def run_row(workload: Workload, mode: str, device: torch.device, steps: int, warmup: int) -> dict:
    """One (workload, mode) row; what cannot run is reported in the row, and the GPU is freed after."""
    patched = liger_patch_undone() if mode == "hf-liger" else contextlib.nullcontext()
    try:
        if mode in PARALLEL_MODES:
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            return time_parallel(workload, mode, parallel_size(model_config(workload), mode, gpus), steps, warmup)
        with patched:
            return time_mode(workload, mode, device, steps, warmup)
    except Unsupported as exc:
        return {"workload": workload.name, "mode": mode, "skipped": str(exc)}
    except Exception as exc:  # OOM, a compile failure: reported, the next row runs
        return {"workload": workload.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        gc.collect()  # free this mode's model and optimizer before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, fp32, 1 timed step")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/gpu_train.json"))
    args = parser.parse_args(argv)
    began = time.perf_counter()

    table = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    names = args.workloads.split(",") if args.workloads else list(table)
    modes = args.modes.split(",")
    for kind, given, known in (("workload", names, table), ("mode", modes, MODES)):
        if unknown := [n for n in given if n not in known]:
            parser.error(f"unknown {kind} {unknown[0]!r}; choose from {', '.join(known)}")
    if _version("liger_kernel") is None and any(m in LIGER_MODES for m in modes):
        print("liger_kernel is not importable: skipping the Liger rows")
        modes = [m for m in modes if m not in LIGER_MODES]
    if args.smoke:
        modes = [m for m in modes if not m.endswith("compiled")]  # compile on CPU costs minutes, proves little
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    steps = args.steps or (1 if args.smoke else 10)
    warmup = args.warmup or (1 if args.smoke else 3)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": _version("transformers"),
              "liger_kernel": _version("liger_kernel"), "matmul_tflops": measure_matmul_tflops(device),
              "steps": steps, "warmup": warmup, "rows": []}
    print_header(report)
    for mode in modes:
        for name in names:
            if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
                row = {"workload": name, "mode": mode, "skipped": f"past --budget-s {args.budget_s:.0f}"}
            else:
                row = run_row(table[name], mode, device, steps, warmup)
            report["rows"].append(row)
            add_ratios(report["rows"], report["matmul_tflops"])
            print(format_row(row), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    print()
    print_header(report)
    for row in report["rows"]:
        print(format_row(row))
    return 0


def add_ratios(rows: list[dict], matmul: float | None) -> None:
    """MFU, and each Tessera row's speed and peak memory against its workload's fastest transformers row."""
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        row["mfu"] = row["tflops"] / PEAK_BF16_TFLOPS
        row["mfu_measured_peak"] = row["tflops"] / matmul if matmul else None
        peers = [r for r in rows if r["workload"] == row["workload"] and r["mode"].startswith("hf")
                 and "tokens_per_s" in r]
        single = row["mode"].startswith("tessera") and "gpus" not in row  # HF rows run on one GPU
        best = max(peers, key=lambda r: r["tokens_per_s"]) if peers and single else None
        row["vs_best_hf"] = row["tokens_per_s"] / best["tokens_per_s"] if best else None
        row["best_hf_mode"] = best["mode"] if best else None
        row["mem_vs_best_hf"] = (row["peak_mem_gib"] / best["peak_mem_gib"]
                                 if best and row["peak_mem_gib"] and best["peak_mem_gib"] else None)


HEADER = (f"{'workload':<12}{'mode':<18}{'tokens/s':>12}{'MFU':>8}{'MFU/meas':>10}{'mem GiB':>9}{'vs HF':>8}"
          f"{'mem/HF':>8}{'setup s':>9}")


def print_header(report: dict) -> None:
    print(f"device: {report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
          f"liger {report['liger_kernel']}  measured bf16 matmul: {_fmt(report['matmul_tflops'], '.0f')} TFLOP/s  "
          f"({report['steps']} timed steps after {report['warmup']} warm-up)")
    print(HEADER)
    print("-" * len(HEADER))


def format_row(r: dict) -> str:
    if "tokens_per_s" not in r:
        return f"{r['workload']:<12}{r['mode']:<18}  {r.get('error') or 'skipped: ' + r['skipped']}"
    mode = f"{r['mode']} ×{r['gpus']}" if "gpus" in r else r["mode"]
    return (f"{r['workload']:<12}{mode:<18}{r['tokens_per_s']:>12,.0f}{_fmt(r.get('mfu'), '.1%'):>8}"
            f"{_fmt(r.get('mfu_measured_peak'), '.1%'):>10}{_fmt(r['peak_mem_gib'], '.1f'):>9}"
            f"{_fmt(r.get('vs_best_hf'), '.2f'):>8}{_fmt(r.get('mem_vs_best_hf'), '.2f'):>8}{r['setup_s']:>9.0f}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
