"""The ``mmvae`` command line.

Every sub-command has ``--help``. Errors caused by input (``MmvaeError``) print one
line naming the case, modality and file, and exit with status 2.

One module per command (or group of commands): ``add(sub)`` declares its options on the
sub-parsers, ``run(args, extra)`` does it; :mod:`mmvae.cli.parser` assembles them. The work
itself is in the library (:mod:`mmvae.retrieval.pipeline`, :mod:`mmvae.quickstart`, ...),
imported inside ``run``, so ``mmvae --help`` starts without JAX.
"""
from __future__ import annotations

import logging
import os
import sys

from mmvae.cli.parser import build_parser
from mmvae.errors import MmvaeError

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.a.b=value overrides are collected apart from argparse's own options.
    extra = [x for x in argv if x.startswith("--config.")]
    argv = [x for x in argv if not x.startswith("--config.")]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no "PyTorch was not found" banner
    try:
        rc = args.fn(args, extra)
    except MmvaeError as e:
        print(f"mmvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)
