"""ZeRO-3 + CPU offload: the largest Llama-shape model that trains on one GPU (issue 7).

Climbs a ladder of sizes (vocab 32768, micro-batch 1, bf16, activation checkpointing), each in its own
subprocess so that an out-of-memory ends only that size. A size trains a few steps on random tokens
through Tessera's own DeepSpeed strategy (zero3, offload optimizer+params) as a one-rank process group.
The host, not the GPU, sets the limit: it holds the fp32 master weights, gradients and both Adam
moments plus the offloaded bf16 weights (~18 bytes per parameter). Sizes whose estimate exceeds the
host RAM available are skipped; a watchdog kills a size whose RSS crosses it. The climb stops at the
first size that does not train. A table is printed and JSON written after every size.

    PYTHONPATH=. python bench/zero3_offload.py [--sizes 1b,3b,5b] [--seq-len 2048] [--budget-s 450]
    PYTHONPATH=. python bench/zero3_offload.py --smoke      # tiny shapes on CPU (gloo), what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
RESULT_PREFIX = "ZERO3_RESULT "
# Host bytes per parameter under zero3 + offload optimizer+params with a torch AdamW client optimizer:
# fp32 master 4 + fp32 gradient 4 + Adam exp_avg 4 + exp_avg_sq 4 + offloaded bf16 weight 2.
HOST_BYTES_PER_PARAM = 18
HOST_OVERHEAD_GIB = 3.0  # torch, CUDA context, DeepSpeed's buffers: a process before any parameter
HOST_MARGIN_GIB = 2.0  # left to the rest of the machine when the limit is taken from MemAvailable

# Llama shapes: GQA with 8 KV heads, head_dim 128, SwiGLU, RoPE θ 500000; vocab and max_seq_len set per run.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"preset": "llama-1b"},  # Llama 3.2 1B shape, tied embeddings
    "3b": {"preset": "llama-1b", "d_model": 3072, "n_layers": 28, "n_heads": 24, "d_ff": 8192},  # Llama 3.2 3B
    "5b": {"preset": "llama3-8b", "n_layers": 20},
    "6b": {"preset": "llama3-8b", "n_layers": 24},
    "7b": {"preset": "llama3-8b", "n_layers": 28},
    "8b": {"preset": "llama3-8b"},
    "13b": {"preset": "llama3-8b", "d_model": 5120, "n_layers": 40, "n_heads": 40, "d_ff": 13824},
    "20b": {"preset": "llama3-8b", "d_model": 6144, "n_layers": 48, "n_heads": 48, "d_ff": 16384},
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny-llama"},
    "tiny-2x": {"preset": "tiny-llama", "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 352,
                "tie_embeddings": False},  # an LM head of its own, as from 5b up
}
LADDER = "1b,3b,5b,7b,8b,13b,20b"


@dataclasses.dataclass
class Settings:
    """What every size of one ladder shares."""

    seq_len: int
    vocab_size: int
    micro_batch: int
    steps: int
    smoke: bool

    def model_config(self, size: str) -> Any:
        from model.config import ModelConfig

        shape = (SMOKE_SHAPES if self.smoke else SHAPES)[size]
        return ModelConfig.from_dict({**shape, "vocab_size": self.vocab_size, "max_seq_len": self.seq_len})


def host_estimate_gib(params: int) -> float:
    return params * HOST_BYTES_PER_PARAM / GIB + HOST_OVERHEAD_GIB


# --- the child: one size ---------------------------------------------------------------------------------


def train_size(size: str, settings: Settings) -> dict[str, Any]:
    """Build ``size``, wrap it with the zero3 strategy, train ``settings.steps`` steps; the first is warm-up."""
    import torch

    from model import build_model
    from model.flops import count_parameters, flops_per_token
    from trainer.config import TrainConfig
    from trainer.distributed import init_distributed, teardown
    from trainer.objectives.clm import CausalLM
    from trainer.strategy import build_strategy
    from trainer.strategy.deepspeed import import_deepspeed

    train_cfg = TrainConfig.from_dict({
        "strategy": "zero3", "offload": "optimizer+params", "precision": "bf16", "activation_checkpointing": "full",
        "micro_batch_size": settings.micro_batch, "lr": 1e-4, "min_lr": 0.0, "warmup_steps": 0,
    }, "train")
    cfg = settings.model_config(size)
    env = init_distributed(need_group=True)
    cuda = env.device.type == "cuda"
    row: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu"}
    import_deepspeed()  # before the first reading: the library is overhead, not bytes per parameter
    rss = {"start": _own_rss_gib()}  # host RSS at each stage, to calibrate HOST_BYTES_PER_PARAM
    try:
        started = time.perf_counter()
        torch.manual_seed(0)
        with env.device:  # straight onto the GPU: no fp32 copy in host RAM, no slow CPU init
            net = build_model(cfg)
        row["build_s"] = time.perf_counter() - started
        strategy = build_strategy(train_cfg, env)
        model = strategy.wrap(net)
        del net
        row["wrap_s"] = time.perf_counter() - started - row["build_s"]
        rss["wrapped"] = _own_rss_gib()
        row["optimizer_fused"] = all(group.get("fused") for group in strategy.optimizer.param_groups)
        if cuda:
            row["gpu_wrap_peak_gib"] = torch.cuda.max_memory_allocated() / GIB  # the fp32 model before partitioning
            torch.cuda.reset_peak_memory_stats()
        objective = CausalLM("clm", train_cfg.loss_chunk_size)
        batch = random_batch(cfg.vocab_size, settings, env.device)
        times, losses = [], []
        for _ in range(settings.steps):
            start = time.perf_counter()
            with strategy.accumulate(last=True):
                with strategy.autocast():
                    out = objective.loss(model, batch)
                loss = out.loss_sum / out.count
                strategy.backward(loss)
            strategy.step(train_cfg.lr)
            losses.append(loss.item())  # synchronises
            times.append(time.perf_counter() - start)
        rss["trained"] = _own_rss_gib()
        row["host_bytes_per_param"] = (rss["trained"] - rss["start"]) * GIB / count_parameters(cfg)
        timed = times[1:] or times
        step_s = sum(timed) / len(timed)
        tokens = settings.micro_batch * settings.seq_len
        row.update(status="ok", losses=losses, step_times_s=times, step_s=step_s, tokens_per_s=tokens / step_s,
                   tflops=flops_per_token(cfg, settings.seq_len) * tokens / step_s / 1e12)
        if cuda:
            row["gpu_step_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["gpu_reserved_peak_gib"] = torch.cuda.max_memory_reserved() / GIB
    except Exception as exc:
        out_of_memory = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row["status"] = "OOM" if out_of_memory else "error"
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        if not out_of_memory:
            raise
    finally:
        row["host_rss_gib"] = rss
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        teardown(barrier=False)
    return row


def random_batch(vocab_size: int, settings: Settings, device: Any) -> dict[str, Any]:
    """Random tokens, labels shifted by one as the CLM collator does (-100 on the last position)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab_size, (settings.micro_batch, settings.seq_len), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((settings.micro_batch, 1), -100)], dim=1)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


# --- the parent: the ladder --------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    returncode: int
    killed_for: str | None  # "host-RAM OOM" or "timeout" when the watchdog ended it
    host_rss_peak_bytes: int


def watch(proc: subprocess.Popen, host_limit_bytes: int, timeout_s: float, poll_s: float = 0.2) -> Outcome:
    """Wait for ``proc``; kill it when its RSS crosses the limit or time runs out.

    The peak RSS is the kernel's own (``wait4``), also for a killed child. The child stays in our
    process group, so that ``timeout`` and the end of a device call reach it too.
    """
    deadline = time.monotonic() + timeout_s
    killed_for, peak = None, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Outcome(proc.returncode, killed_for, max(peak, usage.ru_maxrss * 1024))
        if killed_for is None:
            rss = _proc_status_bytes(proc.pid, "VmRSS")
            peak = max(peak, _proc_status_bytes(proc.pid, "VmHWM"))
            if rss > host_limit_bytes:
                killed_for = "host-RAM OOM"
            elif time.monotonic() > deadline:
                killed_for = "timeout"
            if killed_for:
                proc.kill()
        time.sleep(poll_s)


def _proc_status_bytes(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _own_rss_gib() -> float:
    return _proc_status_bytes(os.getpid(), "VmRSS") / GIB


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def probe(size: str, settings: Settings, host_limit_gib: float, timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Run one size in a child process and turn how it ended into a row."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if settings.smoke:
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = [sys.executable, "-m", "bench.zero3_offload", "--worker", size,
               "--settings", json.dumps(dataclasses.asdict(settings))]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            outcome = watch(proc, int(host_limit_gib * GIB), timeout_s)
        finally:
            if proc.returncode is None:  # we are being stopped (SIGTERM, Ctrl-C): the child goes too
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    results = [line[len(RESULT_PREFIX):] for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    row: dict[str, Any] = json.loads(results[-1]) if results else {}
    row.update(wall_s=time.perf_counter() - started, host_rss_peak_gib=outcome.host_rss_peak_bytes / GIB,
               returncode=outcome.returncode)
    if outcome.killed_for == "host-RAM OOM":
        row.update(status="host-RAM OOM", error=f"RSS crossed {host_limit_gib:.1f} GiB; killed")
    elif outcome.killed_for == "timeout":
        row.update(status="timeout", error=f"no result after {timeout_s:.0f} s; killed")
    elif outcome.returncode == -signal.SIGKILL and "status" not in row:
        row.update(status="host-RAM OOM", error="killed by SIGKILL (the kernel's OOM killer?)")
    elif "status" not in row or (row["status"] == "ok" and outcome.returncode != 0):
        row.update(status="error", error=row.get("error") or _last_line(text) or f"exit code {outcome.returncode}")
    if row["status"] != "ok":
        row["log_tail"] = text.splitlines()[-15:]
    return row


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_ladder(sizes: list[str], settings: Settings, host_ram_gib: float, budget_s: float, size_timeout_s: float,
               min_size_s: float, json_path: Path, log_dir: Path) -> dict[str, Any]:
    """Climb ``sizes``; stop at the first that does not train; write the report after every size."""
    import torch  # not torch.cuda: the GPU is the children's

    from model.flops import count_parameters

    started = time.monotonic()
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": None, "host": platform.node(), "torch": torch.__version__, "deepspeed": _version("deepspeed"),
        "settings": dataclasses.asdict(settings),
        "strategy": "zero3, offload optimizer+params, bf16, activation checkpointing, torch fused AdamW on CPU",
        "host_ram_gib": host_ram_gib, "host_bytes_per_param": HOST_BYTES_PER_PARAM,
        "host_overhead_gib": HOST_OVERHEAD_GIB, "rows": [], "largest_ok": None,
    }
    stopped: str | None = None
    for size in sizes:
        params = count_parameters(settings.model_config(size))
        row: dict[str, Any] = {"size": size, "params": params, "host_estimate_gib": host_estimate_gib(params)}
        left = max(0.0, budget_s - (time.monotonic() - started))
        if stopped:
            row["status"] = f"not run: {stopped}"
        elif row["host_estimate_gib"] > host_ram_gib:
            row["status"] = f"skipped: host RAM estimate {row['host_estimate_gib']:.0f} > {host_ram_gib:.0f} GiB"
            stopped = f"{size} does not fit the host RAM"
        elif left < min_size_s:
            row["status"] = f"not run: {left:.0f} s of the budget left"
            stopped = "budget spent"
        else:
            print(f"{size}: {_params(params)} parameters ...", flush=True)
            row.update(probe(size, settings, host_ram_gib, min(size_timeout_s, left), log_dir / f"{size}.log"))
            report["device"] = report["device"] or row.get("device")
            print(f"{size}: {row['status']}, {_fmt(row.get('step_s'), '.1f')} s/step, "
                  f"host RSS peak {row['host_rss_peak_gib']:.1f} GiB, {row['wall_s']:.0f} s in all", flush=True)
            if row["status"] == "ok":
                report["largest_ok"] = {"size": size, "params": params}
            else:
                stopped = f"{size} ended with {row['status']}"
                print("\n".join(row.get("log_tail", [])), flush=True)
        report["rows"].append(row)
        write_json(report, json_path)
    return report


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"device: {report['device'] or '-'}  torch {report['torch']}  deepspeed {report['deepspeed']}  "
          f"host RAM for the ladder: {report['host_ram_gib']:.0f} GiB")
    print(f"{report['strategy']}; seq {s['seq_len']}, micro-batch {s['micro_batch']}, vocab {s['vocab_size']}")
    header = (f"{'size':<8}{'params':>8}{'est host':>10}{'step s':>8}{'tokens/s':>10}{'TFLOP/s':>9}"
              f"{'GPU step':>10}{'GPU wrap':>10}{'host RSS':>10}  status")
    print(header)
    print("-" * (len(header) + 20))
    for r in report["rows"]:
        print(f"{r['size']:<8}{_params(r['params']):>8}{r['host_estimate_gib']:>9.1f}G"
              f"{_fmt(r.get('step_s'), '.2f'):>8}{_fmt(r.get('tokens_per_s'), ',.0f'):>10}"
              f"{_fmt(r.get('tflops'), '.1f'):>9}{_fmt(r.get('gpu_step_peak_gib'), '.1f', 'G'):>10}"
              f"{_fmt(r.get('gpu_wrap_peak_gib'), '.1f', 'G'):>10}{_fmt(r.get('host_rss_peak_gib'), '.1f', 'G'):>10}"
              f"  {r['status']}{': ' + r['error'] if r.get('error') else ''}")
    best = report["largest_ok"]
    print(f"largest that trained: {best['size']} ({_params(best['params'])})" if best else "none trained")


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo), 2 steps")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, ascending (default {LADDER}); "
                        f"known: {', '.join(SHAPES)}")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; smoke 64)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 32768 (smoke 512)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="steps per size, the first untimed (default 3)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole ladder's wall-clock budget")
    parser.add_argument("--size-timeout-s", type=float, default=300.0, help="one size's limit")
    parser.add_argument("--min-size-s", type=float, default=60.0, help="start no size with less budget left")
    parser.add_argument("--host-ram-gib", type=float, default=None,
                        help=f"host RAM the ladder may use (default MemAvailable - {HOST_MARGIN_GIB:.0f} GiB)")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/zero3_offload.json"))
    parser.add_argument("--log-dir", type=Path, default=Path("runs/bench/zero3_offload"), help="one log per size")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one size in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        row = train_size(args.worker, Settings(**json.loads(args.settings)))
        return 0 if row["status"] in ("ok", "OOM") else 1
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    sizes = (args.sizes or (",".join(SMOKE_SHAPES) if args.smoke else LADDER)).split(",")
    unknown = [s for s in sizes if s not in shapes]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; choose from {', '.join(shapes)}")
    if min(args.micro_batch, args.steps or 1, args.seq_len or 1) < 1:
        parser.error("--micro-batch, --steps and --seq-len must be at least 1")
    settings = Settings(
        seq_len=args.seq_len or (64 if args.smoke else 2048),
        vocab_size=args.vocab_size or (512 if args.smoke else 32768),
        micro_batch=args.micro_batch, steps=args.steps or (2 if args.smoke else 3), smoke=args.smoke,
    )
    host_ram = args.host_ram_gib if args.host_ram_gib is not None else mem_available_gib() - HOST_MARGIN_GIB
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (and end the running size) on timeout's TERM
    report = run_ladder(sizes, settings, host_ram, args.budget_s, args.size_timeout_s, args.min_size_s,
                        args.json, args.log_dir)
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
