"""`tessera export --checkpoint DIR --out DIR`: write the Hugging Face layout (config.json,
model.safetensors) of a Tessera checkpoint, with its tokenizer files, for transformers / vLLM.
With a tokenizer, config.json names the bos / eos / pad ids and generation_config.json makes
transformers' ``generate`` stop where ``tessera generate`` stops (EOS, and ``<|end|>`` when present).

A LoRA checkpoint exports as its base (DIR) plus the adapter in PEFT's layout (DIR/adapter:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR/adapter)``); with
``--merge``, as one model with the adapter folded into the weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ADAPTER_DIR = "adapter"  # a LoRA checkpoint's PEFT adapter, beside the base it adapts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a model directory or a checkpoints/ directory (its latest)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the Hugging Face files into")
    parser.add_argument("--merge", action="store_true",
                        help="a LoRA checkpoint: write the merged model instead of the base + a PEFT adapter")


def run(args: argparse.Namespace) -> int:
    from common.errors import UserError
    from model.io import find_tokenizer_dir, load_pretrained

    model = load_pretrained(args.checkpoint)
    if args.merge and model.lora_config is None:
        raise UserError(f"--merge: {args.checkpoint} has no LoRA adapter to merge; export it without --merge")
    print(export_model(model, find_tokenizer_dir(args.checkpoint), args.out, merge=args.merge))
    return 0


def export_model(model: Any, tok_dir: Path | None, out: Path, *, merge: bool) -> str:
    """Write ``model`` (and the tokenizer files of ``tok_dir``) in the Hugging Face layout to ``out``;
    the line saying what was written. ``merge``: fold a LoRA adapter into the weights (else the base
    plus the adapter in PEFT's layout)."""
    from tokenizers import Tokenizer

    from data.tokenizer import special_ids, stop_ids, tokenizer_config
    from launch.commands.generate import MAX_NEW_TOKENS
    from model.hf import layout_for
    from model.io import copy_tokenizer_files, save_hf, save_hf_token_ids, save_peft_adapter
    from model.lora import merge as merge_adapter

    adapter = model.lora_config is not None
    if merge:
        merge_adapter(model)
    save_hf(model, out)  # unmerged adapters: the base's weights
    if adapter and not merge:
        save_peft_adapter(model, out / ADAPTER_DIR, out)
    copied = copy_tokenizer_files(tok_dir, out) if tok_dir is not None else []
    if tok_dir is not None:
        special = special_ids(Tokenizer.from_file(str(tok_dir / "tokenizer.json")),
                              tokenizer_config(tok_dir / "tokenizer_config.json"))
        save_hf_token_ids(out, bos=special.get("bos"), stops=stop_ids(special),
                          pad=special.get("pad", model.config.pad_token_id), max_new_tokens=MAX_NEW_TOKENS)
        copied.append("generation_config.json")
    what = " (merged with its LoRA adapter)" if merge else ""
    what += f" and its LoRA adapter to {out / ADAPTER_DIR}" if adapter and not merge else ""
    return (f"exported {layout_for(model.config).architecture}{what} to {out}"
            + (f" with {', '.join(copied)}" if copied else " (no tokenizer files found)"))
