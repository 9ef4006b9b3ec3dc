"""The results report's arithmetic: issue targets checked against a grid summary.

A summary entry (:func:`mmvae.experiments.grid.summarise`) holds ``method``, ``fusion``,
``objective``, ``train_subset``, ``query`` (``'+'``-joined modality names), ``mean``,
``sd`` (over seeds), ``n_seeds`` and ``lo``/``hi`` (mean per-seed bootstrap 95% CI
bounds) of one metric.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

VAE_METHODS = ("vae", "late_fusion")


@dataclasses.dataclass
class Target:
    name: str
    target: str          # the requirement, in words
    measured: str        # what was measured, in words and numbers
    met: bool | None     # None: could not be evaluated (a cell missing)
    gap: str = ""        # by how much it is missed ("" when met)

    def row(self) -> str:
        status = "n/a" if self.met is None else ("met" if self.met else "**missed**")
        return f"| {self.name} | {self.target} | {self.measured} | {status} | {self.gap} |"


def pick(summary: Sequence[dict], *, method: str = "vae", fusion: str = "poe", objective: str = "default",
         train_subset: str | None = None, query: str | None = None) -> list[dict]:
    """Entries of one method (VAE fusion/objective; baselines ignore those), optionally one query."""
    out = []
    for s in summary:
        if s["method"] != method:
            continue
        if method == "vae" and (s["fusion"] != fusion or s["objective"] != objective):
            continue
        if train_subset is not None and s["train_subset"] != train_subset:
            continue
        if query is not None and s["query"] != query:
            continue
        out.append(s)
    return out


def fmt(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s.get("n_seeds", 1) > 1 else f"{s['mean']:.3f}"


def monotonicity_violations(entries: Sequence[dict]) -> tuple[int, list[tuple[str, str, float]]]:
    """Adding a modality to a query must not lower the mean below the smaller query's CI.

    For every pair of queries ``S`` and ``S ∪ {m}`` among ``entries`` (one method):
    a violation is ``mean(S ∪ {m}) < lo(S)``. Returns ``(pairs checked, violations as
    (S, S ∪ {m}, lo(S) - mean(S ∪ {m})) sorted by the drop, largest first)``.
    """
    by_q = {frozenset(s["query"].split("+")): s for s in entries}
    pairs, bad = 0, []
    for small, s in by_q.items():
        for big, b in by_q.items():
            if len(big) == len(small) + 1 and small < big:
                pairs += 1
                if b["mean"] < s["lo"]:
                    bad.append((s["query"], b["query"], s["lo"] - b["mean"]))
    return pairs, sorted(bad, key=lambda t: -t[2])


def check_targets(summary: Sequence[dict], modalities: Sequence[str], *, fusion: str = "poe",
                  all_target: float = 0.90, fusion_gain: float = 0.10) -> list[Target]:
    """The issue's targets for the full-modality VAE of ``fusion`` against ``summary``."""
    full = "+".join(modalities)
    vae = pick(summary, fusion=fusion, train_subset=full)
    by_q = {s["query"]: s for s in vae}
    all_q = by_q.get(full)
    out = []
    if all_q is None:
        return [Target("all-modality mAP@10", f"≥ {all_target:.2f}", f"no {fusion} cell trained on {full}", None)]
    gap = all_target - all_q["mean"]
    out.append(Target("all-modality mAP@10", f"≥ {all_target:.2f}", f"{fmt(all_q)} ({fusion})", gap <= 0,
                      f"{gap:.3f} below" if gap > 0 else ""))

    singles = [by_q[m] for m in modalities if m in by_q]
    if singles:
        best = max(singles, key=lambda s: s["mean"])
        gain = all_q["mean"] - best["mean"]
        out.append(Target("fusion gain", f"all-modality ≥ best single + {fusion_gain:.2f}",
                          f"{all_q['mean']:.3f} vs best single `{best['query']}` {best['mean']:.3f}: "
                          f"gain {gain:+.3f}", gain >= fusion_gain,
                          f"{fusion_gain - gain:.3f} short" if gain < fusion_gain else ""))
    pairs, bad = monotonicity_violations(vae)
    worst = f"; worst: `{bad[0][0]}` → `{bad[0][1]}` {bad[0][2]:.3f} below the CI" if bad else ""
    out.append(Target("adding a modality never hurts", "mean(S+m) ≥ CI lower bound of S, every pair",
                      f"{len(bad)} of {pairs} pairs violate{worst}", not bad,
                      f"{len(bad)} violations" if bad else ""))

    baselines = {}
    for s in summary:
        if s["method"] != "vae" and s["query"] == s["train_subset"]:   # each baseline's own full query
            baselines[f"{s['method']} [{s['train_subset']}]"] = s
    if baselines:
        name, best = max(baselines.items(), key=lambda kv: kv[1]["mean"])
        margin = all_q["mean"] - best["mean"]
        beaten = sum(all_q["mean"] > b["mean"] for b in baselines.values())
        out.append(Target("beats every baseline (all-modality query)", "PoE > each baseline's full query",
                          f"beats {beaten} of {len(baselines)}; best baseline {name} {fmt(best)}",
                          beaten == len(baselines), f"{-margin:.3f} below {name}" if margin <= 0 else ""))
    text = by_q.get("report")
    minilm = next(iter(pick(summary, method="report_minilm", query="report")), None)
    if text is not None and minilm is not None:
        d = text["mean"] - minilm["mean"]
        out.append(Target("text-only query beats MiniLM", "PoE `report` query > report_minilm",
                          f"{fmt(text)} vs {fmt(minilm)}", d > 0, f"{-d:.3f} below" if d <= 0 else ""))
    return out


def targets_table(targets: Sequence[Target]) -> str:
    return ("| target | requirement | measured (mAP@10, mean ± sd over seeds) | status | gap |\n"
            "|---|---|---|---|---|\n" + "\n".join(t.row() for t in targets) + "\n")


def fusion_table(summary: Sequence[dict], modalities: Sequence[str], fusions: Sequence[str]) -> str:
    """Per fusion: all-modality query, best single-modality query, and the gain."""
    full = "+".join(modalities)
    lines = ["| fusion | all-modality query | best single modality | gain |", "|---|---:|---:|---:|"]
    for f in fusions:
        by_q = {s["query"]: s for s in pick(summary, fusion=f, train_subset=full)}
        if full not in by_q:
            continue
        singles = [by_q[m] for m in modalities if m in by_q]
        best = max(singles, key=lambda s: s["mean"]) if singles else None
        gain = f"{by_q[full]['mean'] - best['mean']:+.3f}" if best else "–"
        lines.append(f"| {f} | {fmt(by_q[full])} | {fmt(best)} (`{best['query']}`) | {gain} |" if best
                     else f"| {f} | {fmt(by_q[full])} | – | – |")
    return "\n".join(lines) + "\n"
