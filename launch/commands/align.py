"""`tessera align --config FILE [--nproc N] [section.key=value ...]`."""

import argparse

from launch import entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    entry.add_arguments(parser, nproc=True)


def run(args: argparse.Namespace) -> int:
    return entry.command(args, "align")
