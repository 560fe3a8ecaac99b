"""What the checkpoint manifest's sha256 costs: hashing at save and verifying at resume, vs the save (not a test).

One process, strategy single, a Llama-shape model at the given width: a real step directory is written
the way the trainer writes it (DCP model + optimizer state, the consolidated ``model/``, the manifest),
then read back the way resume and ``load_pretrained`` check it. Reported, in seconds (best of
``--repeat``): the whole save, the manifest's hashing inside it, a full verification (resume) and the
``model/``-only verification (generate, export, eval, model.init), with the bytes hashed.

    PYTHONPATH=. python bench/checkpoint_hashing.py [--d-model 512 --layers 8] [--json PATH]
    PYTHONPATH=. python bench/checkpoint_hashing.py --smoke      # the tiny-llama preset
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(shape: dict, repeat: int) -> dict:
    import torch

    from common import manifest
    from model import ModelConfig, build_model
    from model.io import STEP_MODEL_DIR, save_pretrained
    from trainer.checkpoint import CheckpointWriter, verify
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.strategy.single import Single

    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    strategy = Single(TrainConfig.from_dict({"micro_batch_size": 1}), env)
    model = strategy.wrap(build_model(ModelConfig.from_dict(shape)))
    loss = model(torch.randint(0, model.config.vocab_size, (1, 16))).float().pow(2).mean()
    strategy.backward(loss)
    strategy.step(1e-4)  # optimizer moments exist, as in a real checkpoint

    with tempfile.TemporaryDirectory() as root:
        writer = CheckpointWriter(Path(root), keep_last=1, env=env)
        state = {"step": 1}
        counter = iter(range(1, 1 << 30))

        def save() -> Path:
            step = next(counter)
            tmp = writer.begin(step)
            strategy.save(tmp)
            save_pretrained(model, tmp / STEP_MODEL_DIR)
            return writer.commit(tmp, step, state)

        save_s = best(save, repeat)
        step_dir = save()
        total = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        weights = sum(p.stat().st_size for p in (step_dir / STEP_MODEL_DIR).rglob("*") if p.is_file())
        return {
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_mb": round(total / 1e6, 2),
            "model_dir_mb": round(weights / 1e6, 2),
            "save_s": round(save_s, 4),
            "hash_at_save_s": round(best(lambda: manifest.write_manifest(step_dir), repeat), 4),
            "verify_resume_s": round(best(lambda: verify(step_dir), repeat), 4),
            "verify_model_dir_s": round(best(lambda: manifest.verify(step_dir, under=STEP_MODEL_DIR), repeat), 4),
            "sha256_mb_per_s": round(total / 1e6 / best(lambda: verify(step_dir), repeat), 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny-llama preset, once")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.smoke:
        shape, repeat = {"preset": "tiny-llama"}, 1
    else:
        shape = {"preset": "tiny-llama", "d_model": args.d_model, "n_layers": args.layers,
                 "n_heads": max(1, args.d_model // 64), "n_kv_heads": max(1, args.d_model // 64),
                 "d_ff": 4 * args.d_model, "vocab_size": 8192}
        repeat = args.repeat
    result = {"shape": shape, **measure(shape, repeat)}
    share = result["hash_at_save_s"] / result["save_s"]
    print(json.dumps(result, indent=1))
    print(f"hashing is {share:.0%} of the save; a resume verifies {result['checkpoint_mb']} MB in "
          f"{result['verify_resume_s']} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
