"""`tessera generate --checkpoint DIR --prompt TEXT`: decode text from a model directory.

The tokenizer is ``tokenizer.json`` beside the weights (or in ``--tokenizer DIR``); ``bos_token``,
``eos_token`` and ``pad_token`` come from ``tokenizer_config.json`` when present. A decoder prompt
starts with BOS; an encoder-decoder source ends with EOS. Decoding stops at EOS (and ``<|end|>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import UserError

MAX_NEW_TOKENS = 64  # also the default an export's generation_config.json gives transformers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a model directory, a checkpoints/ directory (its latest), or a Hugging Face directory")
    parser.add_argument("--prompt", required=True, action="append",
                        help="text to continue (repeat for a batch)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user turn in the tokenizer's chat template (for SFT/DPO models)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from data.tokenizer import special_ids, stop_ids, tokenizer_config
    from model.generate import generate
    from model.io import find_tokenizer_dir, load_pretrained
    from model.transformer import Seq2SeqLM

    tok_dir = args.tokenizer or find_tokenizer_dir(args.checkpoint)
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer.json in {args.tokenizer or args.checkpoint}; pass --tokenizer DIR")
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    config = tokenizer_config(tok_dir / "tokenizer_config.json")
    special = special_ids(tokenizer, config)
    model = load_pretrained(args.checkpoint)
    seq2seq = isinstance(model, Seq2SeqLM)
    chat_config = config if args.chat else None
    rows = [_prompt_ids(text, tokenizer, special, seq2seq, chat_config) for text in args.prompt]
    pad = special.get("pad", model.config.pad_token_id)
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    stops = stop_ids(special)
    out = generate(model, input_ids, attention_mask=attention_mask if len(set(map(len, rows))) > 1 else None,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, num_beams=args.num_beams, eos_token_ids=stops, pad_token_id=pad, seed=args.seed)
    new_tokens = out[:, 1:] if seq2seq else out[:, width:]
    for text, ids in zip(args.prompt, new_tokens.tolist()):
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        separator = " → " if args.chat or seq2seq else ""  # an answer, not a continuation of the prompt
        print(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False) if args.json
              else text + separator + completion)
    return 0


def _prompt_ids(text: str, tokenizer, special: dict[str, int], seq2seq: bool, chat_config: dict | None) -> list[int]:
    """Token ids of one prompt. A chat prompt is rendered by the chat template (which places BOS and
    the assistant's role tag itself); plain text gets BOS in front (decoder) or EOS behind (encoder)."""
    if chat_config is not None:
        ids = tokenizer.encode(_chat_prompt(text, chat_config), add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if seq2seq and "eos" in special:
            ids = [*ids, special["eos"]]
        elif not seq2seq and "bos" in special:
            ids = [special["bos"], *ids]
    if not ids:
        raise UserError(f"the prompt {text!r} encodes to no tokens")
    return ids


def _chat_prompt(text: str, config: dict) -> str:
    """``text`` as one user turn followed by the assistant's generation prompt."""
    from data.conversations import default_chat_template, render

    template = config.get("chat_template") or default_chat_template()
    specials = {k: config.get(k) for k in ("bos_token", "eos_token")}
    return render(template, [{"role": "user", "content": text}], add_generation_prompt=True, **specials)
