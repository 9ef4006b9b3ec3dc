"""Latent-space figures of a trained run, gathered in one self-contained HTML page.

    python experiments/visualize_latent.py --workdir RUN [--out DIR] [--label class]
        [--cases 3] [--seed 0] [--methods pca,tsne,umap] [--sigma 1]

Loads the run (``mmvae train`` / ``mmvae quickstart`` work dir: config, newest intact
checkpoint, tokenizer), prepares its cohort (``data.manifest`` of the run's config,
the run's preprocessing cache), embeds every case and writes into ``--out``
(default ``RUN/figures``):

* ``projection_pca.png``, ``projection_tsne.png``, ``projection_umap.png`` (UMAP only
  when ``umap`` is importable; the page says when it was skipped) — the fused posterior
  means of every case, colour = label, marker = modalities present;
* ``posteriors.png`` — for ``--cases`` sampled cases with ≥ 2 modalities: each unimodal
  expert and the joint posterior in the PCA plane with ``--sigma``-σ ellipses of
  ``Σ₂ = W diag(σ²) Wᵀ`` (1-σ by default), expert means joined to the joint mean;
* ``trajectory.png`` — one case (most modalities; seeded choice among ties) as its
  modalities are added one by one in model order, ellipses shrinking (under PoE);
* ``generation_NN_<case>.png`` — per sampled case: rows = image sequences (middle axial
  slice); columns = input, decoded from all present modalities, from each single
  modality, and from all but the row's own sequence (true cross-modal synthesis);
* ``projections.npz`` (case ids, labels, modality patterns, PCA/t-SNE/UMAP coordinates
  — one row per case — and the PCA basis), ``posteriors.json``, ``trajectory.json``;
* ``index.html`` — every PNG above as a base64 data URI, per-class and per-pattern
  counts, the top report terms predicted from the images alone next to the true report,
  and the run's ``retrieval.csv`` (or ``retrieval.md``) if present.

Every file is written atomically; the result is deterministic given ``--seed``.
Figures of an earlier run in ``--out`` that this run did not produce (e.g. a UMAP panel)
are removed so the page and the folder agree. A missing run dir, config or checkpoint
exits with status 2 and one line on stderr. The work is
:func:`mmvae.experiments.latent_figures.run`.
"""
from __future__ import annotations

import argparse
import sys

PROG = "visualize_latent"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="trained run directory (mmvae train / quickstart)")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/figures)")
    p.add_argument("--label", default=None, help="label to colour by (default: the run's data.label)")
    p.add_argument("--cases", type=int, default=3, help="cases for the posterior and generation figures")
    p.add_argument("--seed", type=int, default=0, help="seed of the case sample and of t-SNE/UMAP")
    p.add_argument("--methods", default="pca,tsne,umap", help="comma list of projections: pca, tsne, umap")
    p.add_argument("--sigma", type=float, default=1.0, help="ellipse radius in standard deviations (1 or 2)")
    p.add_argument("--top-terms", type=int, default=10, help="report terms listed per case")
    p.add_argument("--verbose", action="store_true", help="progress bars and timings")
    return p


def main(argv: list[str] | None = None) -> int:
    from mmvae.errors import MmvaeError
    from mmvae.experiments.latent_figures import run
    args = build_parser().parse_args(argv)
    try:
        summary = run(args.workdir, args.out, label=args.label, cases=args.cases, seed=args.seed,
                      methods=args.methods, sigma=args.sigma, top_terms=args.top_terms, verbose=args.verbose)
    except MmvaeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(summary['png'])} figures -> {summary['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
