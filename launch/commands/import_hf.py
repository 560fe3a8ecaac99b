"""`tessera import --hf DIR --out DIR`: turn a Hugging Face model directory (Llama, GPT-2, BERT, T5)
into a Tessera model directory that pretrain/sft/align (``model.init``) and generate accept.

With ``--peft ADAPTER``, OUT becomes a Tessera LoRA adapter directory made from that PEFT adapter,
adapting the model at ``--hf`` (recorded by path and sha256; its weights are not copied)."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, type=Path,
                        help="a directory with config.json + model.safetensors, or a Hugging Face Hub id (gpt2, "
                             "meta-llama/Llama-3.2-1B: fetched into the HF cache, which HF_HOME/HF_HUB_OFFLINE steer)")
    parser.add_argument("--out", required=True, type=Path, help="the Tessera model directory to write")
    parser.add_argument("--peft", type=Path, help="a PEFT LoRA adapter directory of the --hf model to import")


def run(args: argparse.Namespace) -> int:
    from common.hub import local_or_hub
    from model.io import HF_CONFIG, copy_tokenizer_files, import_peft_adapter, load_pretrained, save_pretrained

    source = local_or_hub(args.hf)
    if not (source / HF_CONFIG).is_file():
        raise UserError(f"{args.hf}: not a Hugging Face model directory (no {HF_CONFIG})")
    if args.peft is not None:
        model = import_peft_adapter(args.peft, source, args.out)
        copied = copy_tokenizer_files(args.peft, args.out) or copy_tokenizer_files(source, args.out)
        print(f"imported the LoRA adapter {args.peft} (rank {model.lora_config.rank}, "
              f"{len(model.lora_config.targets)} sites) of {args.hf} to {args.out}")
        return 0
    model = load_pretrained(source)
    save_pretrained(model, args.out)
    copied = copy_tokenizer_files(source, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imported {args.hf} ({model.config.arch}, {n_params:,} parameters) to {args.out}"
          + (f" with {', '.join(copied)}" if copied else ""))
    return 0
