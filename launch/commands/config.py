"""`tessera config show|schema`: the resolved run config, and the keys it may hold."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the resolved config (defaults ← --config ← overrides) as YAML",
                          description="print the resolved config, every default included, as a run would read it")
    show.add_argument("--config", type=Path, help="YAML recipe")
    show.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    schema = sub.add_parser("schema", help="print every key with its type, default and choices",
                            description="every config key: Markdown tables (the README's reference) or JSON Schema")
    schema.add_argument("--json", action="store_true", help="a JSON Schema editors can validate YAML recipes with")


def run(args: argparse.Namespace) -> int:
    import yaml

    from launch import config_reference
    from trainer.config import RunConfig

    if args.action == "show":
        from launch.entry import load

        print(yaml.safe_dump(load(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    elif args.json:
        print(json.dumps(config_reference.json_schema(RunConfig), indent=2))
    else:
        print(config_reference.reference(RunConfig), end="")
    return 0
