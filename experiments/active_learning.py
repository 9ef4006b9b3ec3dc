"""Simulated active learning on a cohort with known labels: learning curves per strategy.

    python experiments/active_learning.py [--config configs/quickstart.py] [--out runs/active]
        [--seeds 0,1,2] [--strategies random,uncertainty,disagreement,coreset,hybrid]
        [--start 0.02] [--target 0.10] [--rounds 2] [--round-steps 60] [--set KEY=VALUE ...]
        [--docs docs/results.md]

See :mod:`mmvae.experiments.active` for the protocol. Writes ``OUT/curve.csv`` (one row per
seed × strategy × round), ``docs/results/active_learning.csv`` and ``.png`` (mAP@k vs labelled
fraction, mean ± sd over seeds) and the "Active learning" section of docs/results.md
(replaced in place; ``make_report.py`` keeps it). The semi-supervised objective settings of
the grid's ``labels*`` variants apply (SupCon weight 5000, no private blocks).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.py"))
    p.add_argument("--out", default="runs/active")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="random,uncertainty,disagreement,coreset,hybrid")
    p.add_argument("--start", type=float, default=0.02)
    p.add_argument("--target", type=float, default=0.10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--round-steps", type=int, default=60)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--docs", default=str(ROOT / "docs" / "results.md"), help="'' to leave the docs alone")
    p.add_argument("--report-only", action="store_true",
                   help="no runs: write the docs from OUT/curve.csv as it stands (e.g. an interrupted run)")
    a = p.parse_args(argv)

    from mmvae.config import load_config
    from mmvae.experiments.active import curve_table, run_active_learning
    from mmvae.experiments.report import replace_section
    from mmvae.quickstart import synthesize
    from mmvae.atomic import atomic_write_text

    config = load_config(a.config, [f"--config.{x}" for x in a.set])
    with config.unlocked():          # the grid's semi-supervised settings (valid once labels are given)
        config.objective.supcon_weight = 5000.0
        config.model.private_dim = 0
    if a.report_only:
        with open(Path(a.out) / "curve.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = run_active_learning(config, a.out, seeds=[int(s) for s in a.seeds.split(",")],
                                   strategies=[s for s in a.strategies.split(",") if s], start=a.start,
                                   target=a.target, rounds=a.rounds, round_steps=a.round_steps,
                                   synthesize=lambda c, d: synthesize(c, d, show_progress=False))
    k = int(config.retrieval.k)
    if not a.docs:
        print(curve_table(rows, k))
        return 0
    docs = Path(a.docs)
    res = docs.parent / "results"
    res.mkdir(parents=True, exist_ok=True)
    src = Path(a.out) / "curve.csv"
    atomic_write_text(res / "active_learning.csv", src.read_text())
    plot(rows, res / "active_learning.png", k)
    section = active_section(rows, k, a)
    text = docs.read_text() if docs.exists() else "# Results\n"
    atomic_write_text(docs, replace_section(text, "Active learning", section))
    print(section)
    return 0


def plot(rows, path: Path, k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in dict.fromkeys(r["strategy"] for r in rows):
        rounds = sorted({int(r["round"]) for r in rows if r["strategy"] == s})
        x = [np.mean([float(r["fraction"]) for r in rows if r["strategy"] == s and int(r["round"]) == n]) for n in rounds]
        v = [[float(r["map"]) for r in rows if r["strategy"] == s and int(r["round"]) == n] for n in rounds]
        m, sd = np.array([np.mean(y) for y in v]), np.array([np.std(y, ddof=1) if len(y) > 1 else 0 for y in v])
        ax.errorbar(100 * np.array(x), m, yerr=sd, marker="o", capsize=3, label=s)
    ax.set_xlabel("training cases labelled (%)")
    ax.set_ylabel(f"all-modality mAP@{k}, held-out queries")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def active_section(rows, k: int, a) -> str:
    from mmvae.experiments.active import curve_table
    last = max(int(r["round"]) for r in rows)
    final = {s: [float(r["map"]) for r in rows if r["strategy"] == s and int(r["round"]) == last]
             for s in dict.fromkeys(r["strategy"] for r in rows)}
    rand = final.get("random")
    lines = [f"Command: `python experiments/active_learning.py --seeds {a.seeds} --strategies {a.strategies} "
             f"--start {a.start} --target {a.target} --rounds {a.rounds} --round-steps {a.round_steps}`"
             + (f" with `{' '.join(a.set)}`" if a.set else "") + ". Protocol: `mmvae/experiments/active.py` — a "
             "semi-supervised run (label expert + SupCon) starts from labels on a random seed set; each round "
             "`mmvae suggest` picks the next cases from the unlabelled training pool, their hidden labels are "
             "revealed, and the run is fine-tuned from its last checkpoint. Metric: all-modality mAP@"
             f"{k} of the held-out cases against the whole cohort (mean ± sd over seeds; the queries never "
             "use labels). Round seconds = suggest + fine-tune.", "", curve_table(rows, k)]
    if rand:
        lines.append(f"At the last round (≈{100 * a.target:.0f} % labelled), gain over random "
                     "(mean over seeds, ± sd of the paired differences):")
        lines.append("")
        by_seed = {s: {int(r["seed"]): float(r["map"]) for r in rows if r["strategy"] == s and int(r["round"]) == last}
                   for s in final}
        for s in final:
            if s == "random":
                continue
            d = [by_seed[s][x] - by_seed["random"][x] for x in by_seed[s] if x in by_seed["random"]]
            status = "meets" if np.mean(d) >= 0.05 else "misses"
            lines.append(f"- {s}: {np.mean(d):+.3f} ± {np.std(d, ddof=1) if len(d) > 1 else 0:.3f} "
                         f"({status} the +0.05 target)")
    secs = [float(r["round_seconds"]) for r in rows if int(r["round"]) > 0]
    if secs:
        lines += ["", f"One round (suggest + fine-tune {a.round_steps} steps): median {np.median(secs):.0f} s, "
                      f"max {np.max(secs):.0f} s on this machine (target ≤ 180 s)."]
    lines += ["", "![active learning](results/active_learning.png)", "",
              "Every row: [`results/active_learning.csv`](results/active_learning.csv)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
