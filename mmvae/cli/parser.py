"""The ``mmvae`` parser, assembled from the command modules (in the order of ``mmvae --help``)."""
from __future__ import annotations

import argparse

from mmvae.cli import embed, evaluate, index, pacs, query, quickstart, scan, serve, suggest, synth, train

DESCRIPTION = "The ``mmvae`` command line."

# Each module's add(sub) declares its sub-command(s); scan adds `scan` and `check`.
COMMANDS = (synth, train, embed, index, evaluate, scan, query, suggest, pacs, serve, quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmvae", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p
