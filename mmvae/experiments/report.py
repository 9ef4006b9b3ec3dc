"""The results report's arithmetic: issue targets checked against a grid summary.

A summary entry (:func:`mmvae.experiments.grid.summarise`) holds ``method``, ``fusion``,
``objective``, ``train_subset``, ``query`` (``'+'``-joined modality names), ``mean``,
``sd`` (over seeds), ``n_seeds`` and ``lo``/``hi`` (mean per-seed bootstrap 95% CI
bounds) of one metric.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence


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


UNSUPERVISED_BASELINES = ("raw_pca", "handcrafted", "report_minilm", "report_tfidf", "clip", "late_fusion")
SUPERVISED_BASELINES = ("supervised", "logreg_tfidf")
SEMI_SUPERVISED_TARGETS = {"labels20": 0.85, "labels100": 0.90}   # objective variant → all-modality target


def _own_full_queries(summary: Sequence[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Each baseline's query with every modality it has (its own full query)."""
    out = {}
    for s in summary:
        if s["method"] in methods and s["method"] != "vae" and s["query"] == s["train_subset"]:
            out[f"{s['method']} [{s['train_subset']}]"] = s
    return out


def _beats(name: str, entry: dict, baselines: dict[str, dict], what: str) -> Target:
    best_name, best = max(baselines.items(), key=lambda kv: kv[1]["mean"])
    margin = entry["mean"] - best["mean"]
    beaten = sum(entry["mean"] > b["mean"] for b in baselines.values())
    return Target(name, f"{what} > each one's full query",
                  f"beats {beaten} of {len(baselines)}; best {best_name} {fmt(best)}",
                  beaten == len(baselines), f"{-margin:.3f} below {best_name}" if margin <= 0 else "")


def check_targets(summary: Sequence[dict], modalities: Sequence[str], *, fusion: str = "poe",
                  all_target: float = 0.60, fusion_gain: float = 0.10,
                  semi_targets: dict[str, float] | None = None) -> list[Target]:
    """The retrieval targets for the full-modality VAE of ``fusion`` against ``summary``.

    Unsupervised (objective ``default``): all-modality mAP ≥ ``all_target``, a gain of
    ``fusion_gain`` over the best single-modality query, no modality that hurts, above
    every unsupervised baseline (:data:`UNSUPERVISED_BASELINES`), and a text-only query
    at least as good as ``report_minilm`` and ``report_tfidf``. Semi-supervised (the
    objective variants of ``semi_targets``, default :data:`SEMI_SUPERVISED_TARGETS`):
    all-modality mAP ≥ the variant's target; with labels on every training case also
    above the supervised baselines (:data:`SUPERVISED_BASELINES`). Variants or baselines
    absent from ``summary`` are left out.
    """
    semi_targets = SEMI_SUPERVISED_TARGETS if semi_targets is None else semi_targets
    full = "+".join(modalities)
    vae = pick(summary, fusion=fusion, train_subset=full)
    by_q = {s["query"]: s for s in vae}
    all_q = by_q.get(full)
    out = []
    if all_q is None:
        return [Target("all-modality mAP@10", f"≥ {all_target:.2f}", f"no {fusion} cell trained on {full}", None)]
    gap = all_target - all_q["mean"]
    n_all = all_q.get("num_queries")      # only the queries that have every modality count here
    where = f"{fusion}; {n_all} queries with every modality" if n_all else fusion
    out.append(Target("all-modality mAP@10", f"≥ {all_target:.2f}", f"{fmt(all_q)} ({where})", gap <= 0,
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
    unsup = _own_full_queries(summary, UNSUPERVISED_BASELINES)
    if unsup:
        out.append(_beats("beats every unsupervised baseline", all_q, unsup, "PoE all-modality query"))
    text = by_q.get("report")
    for base in ("report_minilm", "report_tfidf"):
        ref = next(iter(pick(summary, method=base, query="report")), None)
        if text is not None and ref is not None:
            d = text["mean"] - ref["mean"]
            out.append(Target(f"text-only query ≥ {base}", f"PoE `report` query ≥ {base}",
                              f"{fmt(text)} vs {fmt(ref)}", d >= 0, f"{-d:.3f} below" if d < 0 else ""))
    for variant, target in semi_targets.items():
        semi = next(iter(pick(summary, fusion=fusion, objective=variant, train_subset=full, query=full)), None)
        if semi is None:
            continue
        g = target - semi["mean"]
        out.append(Target(f"semi-supervised `{variant}`", f"all-modality ≥ {target:.2f}", f"{fmt(semi)} ({fusion})",
                          g <= 0, f"{g:.3f} below" if g > 0 else ""))
        sup = _own_full_queries(summary, SUPERVISED_BASELINES)
        if variant == "labels100" and sup:
            out.append(_beats("`labels100` beats the supervised baselines", semi, sup, "all-modality query"))
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


def _section_span(text: str, title: str) -> tuple[int, int] | None:
    """``(start, end)`` of the level-2 section ``## title`` (up to the next level-2 heading)."""
    head = f"## {title}\n"
    i = text.find(head) if text.startswith(head) else text.find("\n" + head)
    if i < 0:
        return None
    i = i if text.startswith(head) and i == 0 else i + 1
    j = text.find("\n## ", i + len(head))
    return i, (len(text) if j < 0 else j + 1)


def extract_section(text: str, title: str) -> str | None:
    """The body of ``## title`` in a markdown text, or None."""
    span = _section_span(text, title)
    if span is None:
        return None
    return text[span[0] + len(f"## {title}\n"): span[1]].strip("\n") + "\n"


def replace_section(text: str, title: str, body: str) -> str:
    """``text`` with the body of ``## title`` replaced (the section appended when absent)."""
    block = f"## {title}\n\n{body.strip()}\n"
    span = _section_span(text, title)
    if span is None:
        return text.rstrip("\n") + "\n\n" + block
    rest = text[span[1]:]
    return text[:span[0]] + block + ("\n" + rest if rest else "")


def machine() -> dict:
    """Where a number was measured: ``cpu`` (model name), ``cores``, ``jax``, ``backend``,
    ``device_kind``, ``device_count`` (used by reports and experiments/benchmarks)."""
    import os
    import platform

    import jax
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count()}


def machine_line() -> str:
    """``CPU model, N cores, jax X (backend)[, commit abc1234]``: where a report was computed."""
    from mmvae.runs.files import git_commit
    m = machine()
    commit = git_commit()
    return (f"{m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']})"
            + (f", commit {commit[:7]}" if commit else ""))


def splice_section(docs: Path, section: str, begin: str, end: str) -> None:
    """Write ``section`` (which starts with ``begin`` and ends with ``end``) into the Markdown
    file ``docs`` in place of the text between those markers, or append it; atomically, so the
    hand-written text around the markers is kept."""
    from mmvae.atomic import atomic_write_text
    docs = Path(docs)
    text = docs.read_text() if docs.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(docs, text)
