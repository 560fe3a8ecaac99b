"""`tessera tokenizer train INPUT... --vocab-size N --out DIR`: train a byte-level BPE (or Unigram, or WordPiece)."""

from __future__ import annotations

import argparse
from collections import Counter

from data.readers import TXT_MODE_HELP, TXT_MODES
from data.tokenizer import MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a tokenizer on text files", description="train a tokenizer")
    train.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl/.json files (or .gz), or directories")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", required=True, help="output directory: tokenizer.json + tokenizer_config.json")
    train.add_argument("--model", choices=MODELS, default="bpe",
                       help="bpe (byte-level, default), unigram, or wordpiece (BERT's: lower-cased, ## continuations)")
    train.add_argument("--split", choices=["gpt2", "whitespace"], default="gpt2",
                       help="cut words GPT-2 style (default) or only at spaces (keeps symbols like A_B whole)")
    train.add_argument("--sentinels", type=int, default=32, help="T5 sentinel tokens <extra_id_N> (default 32)")
    train.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair frequency to merge")
    train.add_argument("--text-field", default="text", help="the text field of .jsonl/.json records")
    train.add_argument("--txt-mode", choices=TXT_MODES, default="auto", help=TXT_MODE_HELP)


def run(args: argparse.Namespace) -> int:
    from data.readers import iter_documents
    from data.tokenizer import train_tokenizer

    invalid_utf8: Counter[str] = Counter()
    texts = (d.text for d in iter_documents(args.inputs, text_field=args.text_field, txt_mode=args.txt_mode,
                                            invalid_utf8=invalid_utf8))
    tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model=args.model,
                          num_sentinels=args.sentinels, min_frequency=args.min_frequency, split=args.split)
    print(f"{args.model} tokenizer with {tok.vocab_size} tokens → {args.out}/tokenizer.json")
    for path, count in invalid_utf8.items():
        print(f"  replaced {count:6d}  bytes that are not UTF-8 in {path} (with U+FFFD)")
    return 0
