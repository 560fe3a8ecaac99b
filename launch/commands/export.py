"""`tessera export --checkpoint DIR --out DIR`: write the Hugging Face layout (config.json,
model.safetensors) of a Tessera checkpoint, with its tokenizer files, for transformers / vLLM."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a model directory or a checkpoints/ directory (its latest)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the Hugging Face files into")


def run(args: argparse.Namespace) -> int:
    from model.hf import layout_for
    from model.io import copy_tokenizer_files, find_tokenizer_dir, load_pretrained, save_hf

    model = load_pretrained(args.checkpoint)
    save_hf(model, args.out)
    tok_dir = find_tokenizer_dir(args.checkpoint)
    copied = copy_tokenizer_files(tok_dir, args.out) if tok_dir is not None else []
    print(f"exported {layout_for(model.config).architecture} to {args.out}"
          + (f" with {', '.join(copied)}" if copied else " (no tokenizer files found)"))
    return 0
