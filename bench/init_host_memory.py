"""Host memory of building and sharding a model, per rank: whole vs block by block (not a test).

Each rank of a gloo process group (``--ranks``, on this machine's CPUs) builds a Llama-shape model and wraps it with
fsdp or zero3, in two ways:
  * whole: the model materialised in full on the host first (what every rank did before
    ``TesseraModel.materialize`` went block by block);
  * blockwise: the trainer's path, a meta-device model materialised one block at a time, each block
    sharded (fsdp) or partitioned (zero3) as soon as it is ready.
Reported per rank: the peak resident memory added while building and wrapping (VmHWM after resetting
it), the memory still held after wrapping, and the fp32 size of the whole model for scale. Each
setting runs in fresh processes (a peak only grows). On CPU the device is the host, so zero3's figures
also hold what ``deepspeed.initialize`` allocates (its fp32 partition and flat buffers), on a GPU
machine device memory.

    PYTHONPATH=. python bench/init_host_memory.py [--ranks 8] [--layers 16] [--d-model 1024] [--json PATH]
    PYTHONPATH=. python bench/init_host_memory.py --smoke     # tiny shapes, what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

GIB = 2**30
KIB_PER_GIB = 2**20
SMOKE_SHAPE = {"preset": "tiny-llama", "tie_embeddings": False}
SETTINGS = [(strategy, mode) for strategy in ("fsdp", "zero3") for mode in ("whole", "blockwise")]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _rank(rank: int, ranks: int, port: int, strategy: str, mode: str, shape: dict[str, Any], out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    from model import ModelConfig, build_model
    from trainer.config import TrainConfig
    from trainer.distributed import init_distributed, teardown
    from trainer.strategy import build_strategy
    from trainer.strategy.deepspeed import import_deepspeed

    torch.set_num_threads(1)
    env = init_distributed(need_group=True)
    import_deepspeed()  # libraries are not what is measured
    cfg = ModelConfig.from_dict(shape)
    train = TrainConfig.from_dict({"strategy": strategy, "micro_batch_size": 1, "seed": 0})
    sharding = build_strategy(train, env)
    _reset_peak()
    start = _status_kib("VmRSS")
    with torch.device("meta"):
        net = build_model(cfg)
    params = sum(p.numel() for p in net.parameters())
    if mode == "whole":
        net.materialize("cpu", seed=0)
    sharding.wrap(net)
    del net
    out.put({"rank": rank, "params": params, "peak_gib": (_status_kib("VmHWM") - start) / KIB_PER_GIB,
             "held_gib": (_status_kib("VmRSS") - start) / KIB_PER_GIB})
    teardown()


def measure(strategy: str, mode: str, shape: dict[str, Any], ranks: int) -> dict[str, Any]:
    """One setting in fresh processes: the largest rank's figures."""
    from common.net import free_port

    port = free_port()
    # tensors over 64 KiB get their own mappings, returned on free: RSS is then live memory, not glibc
    # heap fragmentation (which otherwise keeps freed blocks resident and blurs the peaks)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, ranks, port, strategy, mode, shape, out)) for r in range(ranks)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a rank of {strategy}/{mode} exited with {p.exitcode}")
    params = rows[0]["params"]
    return {"strategy": strategy, "mode": mode, "params": params, "fp32_model_gib": params * 4 / GIB,
            "peak_gib": max(r["peak_gib"] for r in rows), "held_gib": max(r["held_gib"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    d = args.d_model
    shape = SMOKE_SHAPE if args.smoke else {
        "preset": "llama-1b", "d_model": d, "n_layers": args.layers, "n_heads": d // 64, "n_kv_heads": d // 256,
        "d_ff": d * 11 // 4, "max_seq_len": 2048, "tie_embeddings": False}
    ranks = 2 if args.smoke else args.ranks
    rows = [measure(strategy, mode, shape, ranks) for strategy, mode in SETTINGS]
    print(f"{ranks} ranks (gloo, CPU); {rows[0]['params'] / 1e6:.1f}M parameters, "
          f"fp32 model {rows[0]['fp32_model_gib']:.2f} GiB")
    print(f"{'strategy':<10}{'build':<11}{'peak GiB/rank':>14}{'held GiB/rank':>14}")
    for r in rows:
        print(f"{r['strategy']:<10}{r['mode']:<11}{r['peak_gib']:>14.2f}{r['held_gib']:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ranks": ranks, "shape": shape, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
