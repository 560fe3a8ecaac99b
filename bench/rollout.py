"""Online alignment's step split: rollout (KV-cached sampling of G completions per prompt) vs the
training forward/backward on them, and rollout tokens/s (not a test).

One process, a Llama-shape model at the given width on random prompts: ``--prompts`` prompts of
``--prompt-len`` tokens, ``--generations`` completions each, ``--new-tokens`` sampled tokens (no stop
token, so every completion runs to length). Reported (best of ``--repeat``): generation seconds and
completion tokens/s, the policy's training forward+backward over the same sequences, and the share of
the step the rollout takes.

    PYTHONPATH=. python bench/rollout.py [--d-model 256 --layers 4 --device cpu] [--json PATH]
    PYTHONPATH=. python bench/rollout.py --smoke      # tiny shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.d_model, args.layers, args.vocab, args.prompts, args.generations = 32, 1, 256, 2, 2
        args.prompt_len, args.new_tokens, args.repeat = 8, 4, 1

    from model import build_model
    from model.config import ModelConfig
    from trainer.rollout import completion_logps, sample_completions

    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=max(1, args.d_model // 64), d_ff=4 * args.d_model,
                      max_seq_len=args.prompt_len + args.new_tokens, pos="rope", norm="rmsnorm", mlp="swiglu")
    model = build_model(cfg).to(args.device)
    prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_len), device=args.device)
    mask = torch.ones_like(prompts)
    generator = torch.Generator(args.device).manual_seed(0)

    def rollout():
        return sample_completions(model, prompts, mask, num_generations=args.generations,
                                  max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, stop_ids=[0],
                                  pad_id=0, generator=generator, stop_when_done=False)

    generation_s, completions = best(rollout, args.repeat)

    def train():
        logps, _ = completion_logps(model, completions.input_ids, completions.attention_mask,
                                    completions.prompt_length)
        (-(logps * completions.completion_mask).sum()).backward()
        model.zero_grad(set_to_none=True)

    training_s, _ = best(train, args.repeat)
    new_tokens = completions.completion_ids.numel()
    row = {"device": str(args.device), "d_model": args.d_model, "layers": args.layers,
           "sequences": completions.input_ids.shape[0], "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "generation_s": round(generation_s, 4), "rollout_tokens_per_s": round(new_tokens / generation_s, 1),
           "training_s": round(training_s, 4),
           "rollout_share": round(generation_s / (generation_s + training_s), 3)}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    return row


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
