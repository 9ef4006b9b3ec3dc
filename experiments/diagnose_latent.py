"""Diagnose a trained run's latent space: is the class signal in it, and what else is?

    python experiments/diagnose_latent.py --workdir RUN [--manifest M] [--label class] [--out DIR]

For the run's held-out split (the training run's own split) and the whole cohort:

* retrieval mAP@k (held-out queries against every case, the shared protocol) of the
  all-modality query and of each single-modality query, next to the chance level
  (random rankings under the same protocol);
* linear-probe accuracy (5-fold logistic regression) of the fused posterior mean and of
  each unimodal expert's mean, next to the majority-class rate;
* the share of latent variance that the clinical fields (e.g. age, sex) explain;
* the same retrieval on the concatenated unimodal expert means (each standardised with
  the training cases' mean and sd, L2-normalised, absent experts zero), with and without
  the clinical expert: how much the product of experts itself loses;
* on a synthetic cohort (``synth_truth.jsonl`` beside the manifest): for each image
  modality, the lesion-minus-white-matter contrast (z units, true masks carried through
  the preprocessing) of the input and of the reconstruction from the fused posterior
  mean, and their correlation and slope over the cases (does the decoder learn the
  lesion?).

Writes ``diagnostics.json`` and ``diagnostics.md`` into ``--out`` (default the work dir)
and prints the Markdown table. Exit 2 on bad arguments (a missing work dir, an unknown
label).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmvae.experiments.diagnose import diagnose, markdown

PROG = "diagnose_latent.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="trained run (mmvae train --workdir)")
    p.add_argument("--manifest", default="", help="cohort manifest (default: the run's data.manifest)")
    p.add_argument("--label", default="", help="label to probe and retrieve (default: the run's data.label)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="", help="output folder (default: the work dir)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    wd = Path(args.workdir)
    if not (wd / "model_spec.json").is_file():
        print(f"{PROG}: error: {wd} is not a trained work dir (no model_spec.json)", file=sys.stderr)
        return 2
    from mmvae.atomic import atomic_write_text
    from mmvae.errors import MmvaeError
    try:
        d = diagnose(wd, args.manifest, args.label, args.k)
    except MmvaeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or wd)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diagnostics.json", json.dumps(d, indent=2))
    md = markdown(d)
    atomic_write_text(out / "diagnostics.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
