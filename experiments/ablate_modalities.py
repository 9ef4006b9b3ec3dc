"""Which sequences matter, and does fusion help? The modality-subset ablation grid.

    python experiments/ablate_modalities.py --config configs/quickstart.py --out runs/ablation \
        --train-subsets full,drop-one --fusions poe,moe,mopoe --seeds 0,1,2 \
        --baselines raw_pca,handcrafted,report_minilm,late_fusion,clip,supervised [--jobs 2]

Grid: training subsets (``full``: all modalities; ``drop-one``; ``singletons``; ``all``:
every non-empty subset; or explicit ``t1+t2,t1+dwi+report``) × fusions × objective
variants × seeds, plus baselines (each once per seed). Each cell trains a short run
from the config, embeds the cohort and evaluates every query subset of its training
modalities (held-out queries against the whole cohort; see
``mmvae/experiments/protocol.py``). Outputs under ``--out``: ``results.csv`` (tidy: one
row per cell, query and metric, with the bootstrap CI; failed cells with their error),
``results.md`` (mAP@10 mean ± sd over seeds), ``heatmap_<fusion>_<objective>.png``
(training subset × query subset) and ``cells/<id>/`` (run dirs, ``result.json``). With
``--hybrid``, each VAE cell's hybrid rankings too (each expert block and BM25 on the report
alone, fused with uniform / RRF / fitted weights, simulated relevance feedback; the same
queries): ``hybrid.csv``, ``hybrid.md`` (finished cells are evaluated from their embeddings).
Rerunning the same command resumes: finished cells are skipped. Config overrides
follow the options, e.g. ``--config.train.steps=50``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmvae.errors import MmvaeError
from mmvae.experiments.grid import (BASELINES, OBJECTIVES, GridContext, all_modalities, build_cells, run_grid,
                                    training_subsets, write_outputs)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--out", required=True)
    p.add_argument("--train-subsets", default="full")
    p.add_argument("--fusions", default="poe")
    p.add_argument("--objectives", default="default", help=f"variants: {', '.join(OBJECTIVES)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--baselines", default="", help=f"comma list of {', '.join(BASELINES + ('late_fusion',))}")
    p.add_argument("--label", default="", help="retrieval label(s), comma-separated (default: the config's data.label)")
    p.add_argument("--queries", default="held_out", choices=("held_out", "all"),
                   help="held_out: the training split's held-out cases query the cohort; all: every case "
                        "queries the others (leave-one-out, for tiny cohorts)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--baseline-steps", type=int, default=0, help="training steps of clip/supervised (0: default)")
    p.add_argument("--jobs", type=int, default=1, help="cells run in this many processes")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--hybrid", action="store_true",
                   help="also evaluate each VAE cell's hybrid rankings (legs, fused, fitted weights, feedback)")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse(argv)
    try:
        ctx = GridContext(args.config, overrides, Path(args.out), args.label, args.k, args.baseline_steps,
                          args.queries, hybrid=args.hybrid)
        base = ctx.base_config()
        if not ctx.label:
            ctx.label = str(base.data.label)
        mods = all_modalities(base)
        fusions = [f for f in args.fusions.split(",") if f]
        objectives = [o for o in args.objectives.split(",") if o]
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad:
            raise MmvaeError(f"--objectives: unknown {bad}; known: {list(OBJECTIVES)}")
        baselines = [b for b in args.baselines.split(",") if b]
        bad = [b for b in baselines if b not in BASELINES + ("late_fusion",)]
        if bad:
            raise MmvaeError(f"--baselines: unknown {bad}; known: {list(BASELINES) + ['late_fusion']}")
        seeds = [int(s) for s in args.seeds.split(",") if s]
        cells = build_cells(mods, training_subsets(args.train_subsets, mods), fusions, objectives, seeds, baselines)
        results = run_grid(ctx, cells, jobs=args.jobs, retry_failed=args.retry_failed)
        out = write_outputs(results, mods, ctx.out, f"map@{ctx.k}", ctx.labels)
    except MmvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished cells are kept in {args.out}/cells; the same command resumes", file=sys.stderr)
        return 130
    print(Path(out["markdown"]).read_text())
    if "hybrid_markdown" in out:
        print(Path(out["hybrid_markdown"]).read_text())
    n_failed = sum(r["status"] != "ok" for r in results)
    print(f"{len(results)} cells ({n_failed} failed) -> {out['csv']}, {out['markdown']}, "
          f"{len(out['heatmaps'])} heat map(s)")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
