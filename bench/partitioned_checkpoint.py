"""Tensor-parallel checkpoints per rank: each rank's own pieces vs whole tensors gathered on every rank (not a test).

Each rank of a gloo process group (``--ranks``, on this machine's CPUs) wraps a Llama-shape model with
tensor parallel (``--tp``, dp the rest; ``--strategy`` ddp or fsdp), takes one AdamW step (so the Adam
moments exist), then saves and loads a checkpoint two ways:
  * pieces: the strategy's own ``save``/``load`` (each rank writes and reads only its blocks of the
    split tensors, :mod:`trainer.strategy.dcp_chunks`);
  * gathered: what every rank did before, each split tensor and moment all-gathered whole (under FSDP2
    also over dp) on every rank, DCP writing the whole tensors, and a load reading whole tensors on
    every rank.
Reported per setting (the largest rank): the peak resident memory the save and the load added
(VmHWM after resetting it before each), their seconds, and the bytes this rank wrote. The settings
run one after the other in one set of fresh processes.

    PYTHONPATH=. python bench/partitioned_checkpoint.py [--ranks 4 --tp 2 --layers 8 --d-model 768] [--json PATH]
    PYTHONPATH=. python bench/partitioned_checkpoint.py --smoke     # tiny shapes, what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from bench.init_host_memory import KIB_PER_GIB, _reset_peak, _status_kib

GIB = 2**30
SMOKE_SHAPE = {"preset": "tiny-llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "vocab_size": 64,
               "tie_embeddings": False}
STRATEGIES = ("ddp", "fsdp")
MODES = ("pieces", "gathered")


def _gathered_state(parallel) -> dict:
    """The state dict of the former checkpoints: every split tensor and moment whole on this rank."""
    state = parallel._state()
    for name, holder, key in parallel._tensors(state):
        holder[key] = parallel._gather(name, holder[key])
    return state


def _rank(rank: int, ranks: int, port: int, tp: int, shape: dict[str, Any], directory: str, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed.checkpoint as dcp

    from model import ModelConfig, build_model
    from trainer.config import TrainConfig
    from trainer.distributed import barrier, init_distributed, teardown
    from trainer.strategy.tensor_parallel import TensorParallel

    torch.set_num_threads(1)
    env = init_distributed(need_group=True)
    rows = []
    for strategy in STRATEGIES:
        with torch.device("meta"):  # materialised block by block by the strategy, as in the trainer
            net = build_model(ModelConfig.from_dict(shape))
        parallel = TensorParallel(TrainConfig.from_dict({"strategy": strategy, "seed": 0}), env, size=tp)
        wrapped = parallel.wrap(net)
        tokens = torch.randint(0, shape["vocab_size"], (1, 65), generator=torch.Generator().manual_seed(rank))
        logits = wrapped(tokens[:, :-1])
        parallel.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
        parallel.step(1e-3)
        del net, wrapped, logits
        for mode in MODES:
            path = Path(directory) / f"{strategy}_{mode}"
            row = {"strategy": strategy, "mode": mode}
            for action in ("save", "load"):
                barrier()
                _reset_peak()  # a peak of its own for each action, whatever ran before in this process
                start_kib, start = _status_kib("VmRSS"), time.perf_counter()
                if mode == "pieces":
                    getattr(parallel, action)(path)
                else:
                    getattr(dcp, action)(_gathered_state(parallel), checkpoint_id=path / "dcp")
                row[f"{action}_s"] = time.perf_counter() - start
                row[f"{action}_peak_gib"] = (_status_kib("VmHWM") - start_kib) / KIB_PER_GIB
            row["written_gib"] = sum(f.stat().st_size for f in (path / "dcp").glob(f"__{rank}_*.distcp")) / GIB
            rows.append(row)
        del parallel
    out.put(rows)
    teardown()


def measure(tp: int, shape: dict[str, Any], ranks: int) -> list[dict[str, Any]]:
    """Every setting, one after the other in the same fresh processes: the largest rank's figures of each."""
    from common.net import free_port

    port = free_port()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)  # freed tensors leave RSS (see init_host_memory)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as directory:
        procs = [ctx.Process(target=_rank, args=(r, ranks, port, tp, shape, directory, out)) for r in range(ranks)]
        for p in procs:
            p.start()
        per_rank = [out.get(timeout=3600) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a rank exited with {p.exitcode}")
    return [{**first, "tp": tp, **{key: max(rows[i][key] for rows in per_rank) for key in first
                                   if key not in ("strategy", "mode")}}
            for i, first in enumerate(per_rank[0])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    d = args.d_model
    shape = SMOKE_SHAPE if args.smoke else {
        "preset": "llama-1b", "d_model": d, "n_layers": args.layers, "n_heads": d // 64, "n_kv_heads": d // 128,
        "d_ff": d * 8 // 3 // 64 * 64, "vocab_size": 32768, "max_seq_len": 2048, "tie_embeddings": False}
    import torch

    from model import ModelConfig, build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(ModelConfig.from_dict(shape)).parameters())
    ranks = 2 if args.smoke else args.ranks
    tp = 2 if args.smoke else args.tp
    rows = measure(tp, shape, ranks)
    whole_gib = params * 4 * 3 / GIB  # fp32 weights and two Adam moments
    print(f"{ranks} ranks (gloo, CPU), tp={tp}; {params / 1e6:.1f}M parameters, fp32 weights + Adam moments "
          f"{whole_gib:.2f} GiB")
    print(f"{'strategy':<9}{'checkpoint':<11}{'save peak':>10}{'load peak':>10}{'written':>9}{'save s':>8}"
          f"{'load s':>8}   (GiB per rank, largest rank)")
    for r in rows:
        print(f"{r['strategy']:<9}{r['mode']:<11}{r['save_peak_gib']:>10.3f}{r['load_peak_gib']:>10.3f}"
              f"{r['written_gib']:>9.3f}{r['save_s']:>8.2f}{r['load_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ranks": ranks, "tp": tp, "params": params, "shape": shape, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
