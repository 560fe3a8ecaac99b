"""`tessera import --hf DIR --out DIR`: turn a Hugging Face model directory (Llama, GPT-2, BERT, T5)
into a Tessera model directory that pretrain/sft/align (``model.init``) and generate accept."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, type=Path, help="a directory with config.json + model.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="the Tessera model directory to write")


def run(args: argparse.Namespace) -> int:
    from model.io import HF_CONFIG, copy_tokenizer_files, load_pretrained, save_pretrained

    if not (args.hf / HF_CONFIG).is_file():
        raise UserError(f"{args.hf}: not a Hugging Face model directory (no {HF_CONFIG})")
    model = load_pretrained(args.hf)
    save_pretrained(model, args.out)
    copied = copy_tokenizer_files(args.hf, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imported {args.hf} ({model.config.arch}, {n_params:,} parameters) to {args.out}"
          + (f" with {', '.join(copied)}" if copied else ""))
    return 0
