"""The `tessera` console script: one subcommand per pipeline stage.

Each subcommand lives in ``launch/commands/<module>.py`` with ``add_arguments(parser)`` and
``run(args) -> int | None``; it is imported only when used, so ``tessera --help`` stays fast.
User mistakes (:class:`common.errors.UserError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.errors import UserError, exit_status

# name → (module under launch.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("prep", "clean, filter and deduplicate raw text into documents.jsonl + report.json"),
    "tokenizer": ("tokenizer", "train a tokenizer (tessera tokenizer train ...)"),
    "shard": ("shard", "tokenize documents into webdataset tar shards with a manifest"),
    "pretrain": ("pretrain", "pretrain a model (CLM, MLM or span corruption)"),
    "sft": ("sft", "instruction-tune a model on conversations"),
    "align": ("align", "align a model on preference pairs (DPO, IPO, cDPO, SimPO, ORPO)"),
    "generate": ("generate", "decode text from a checkpoint"),
    "export": ("export", "export a checkpoint to the Hugging Face layout"),
    "import": ("import_hf", "import a Hugging Face model directory as a Tessera checkpoint"),
    "eval": ("evaluate", "score a checkpoint on shards (perplexity, accuracy, exact match) or multiple-choice tasks"),
    "slurm": ("slurm", "render (and submit) an sbatch script for a config"),
    "plot": ("plot", "draw a run's metrics as PNG plots"),
    "config": ("config", "print the resolved config (show) or every key with its type and choices (schema)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Train Transformer language models end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(module).add_arguments(p)
    return parser


def parse(argv: list[str], command: str | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after options (``pretrain a=1 --nproc 2 b=2``)."""
    parser = build_parser(only=command)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"tessera: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2

    def run() -> int | None:
        args = parse(argv, command)
        if args.command is None:
            build_parser().print_help()
            return 0
        return _load(COMMANDS[args.command][0]).run(args)

    return exit_status(f"tessera {command}", run)


def _load(module: str):
    try:
        return importlib.import_module(f"launch.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"launch.commands.{module}":
            raise UserError("this command is not available yet") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
