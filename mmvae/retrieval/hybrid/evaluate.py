"""One evaluation of an index's hybrid rankings: each leg alone, fused, fitted, feedback.

Used by the ablation grid (``--hybrid``), make_report and experiments/hybrid_retrieval.py, so
every table of hybrid numbers comes from the same protocol:

* the database is every case of the index that carries the label; the queries are ``queries``
  (case ids; default all of them, leave-one-out), each queried with what it has (its stored
  vector, its modalities, its report's tokens); relevant = same label value;
* **each leg alone** over the queries that have the leg; **uniform** weights over the legs a
  query has; **RRF** (Cormack et al. 2009, k = 60); **fitted** weights
  (:func:`~mmvae.retrieval.hybrid.fit.fit_weights`), never fitted on the query: fitted on the
  ``fit_cases`` (the training split, queries and database restricted to them) when given, else
  by ``folds``-fold cross-validation over the queries;
* **simulated feedback** (KUR15, :func:`~mmvae.retrieval.hybrid.protocols.simulated_feedback`):
  ``marks`` marks per round by the hidden label, after 1 … ``rounds`` rounds, Rocchio alone and
  Rocchio + the leg weights a round teaches;
* **chance**: random rankings of the same database for the same queries
  (:func:`mmvae.retrieval.evaluate.chance_map`).

Each row carries mean AP@k with its 95 % BCa CI over the queries (:func:`bootstrap_ci`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmvae.errors import InputError
from mmvae.retrieval.evaluate import chance_map
from mmvae.retrieval.hybrid.fit import ap_at_k, cross_validate, fit_weights, fused_scores, label_values, leg_matrices
from mmvae.retrieval.hybrid.protocols import simulated_feedback
from mmvae.retrieval.metrics import bootstrap_ci

__all__ = ["evaluate_hybrid", "display_name", "markdown_table", "summarize"]


def _row(name: str, ap: np.ndarray, k: int, n_boot: int, seed: int) -> dict:
    ap = np.asarray(ap, np.float64)
    ap = ap[np.isfinite(ap)]
    if not len(ap):
        return {"ranking": name, "metric": f"map@{k}", "value": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "num_queries": 0}
    mean, lo, hi = bootstrap_ci(ap, n_boot=n_boot, seed=seed)
    return {"ranking": name, "metric": f"map@{k}", "value": float(mean), "lo": float(lo), "hi": float(hi),
            "num_queries": int(len(ap))}


def evaluate_hybrid(index, label: str, *, k: int = 10, queries: Sequence[str] | None = None,
                    fit_cases: Sequence[str] | None = None, folds: int = 5, rounds: int = 3, marks: int = 3,
                    seed: int = 0, n_boot: int = 1000) -> tuple[list[dict], dict]:
    """The hybrid rankings of ``index`` for ``label`` (module doc) → ``(rows, fit)``.

    ``rows``: one dict per ranking (``ranking``, ``metric`` = ``map@k``, ``value``, ``lo``,
    ``hi``, ``num_queries``), in this order: ``leg <name>`` per leg, ``fused uniform``, ``fused rrf``,
    ``fused fitted``, ``feedback rocchio, round r`` and ``feedback rocchio+weights, round r`` for
    r = 1 … ``rounds``, ``chance``.
    ``fit``: the fitted weights per leg (``weights``; the mean of the folds' weights under
    cross-validation) and how they were fitted (``fitted_on``: ``'fit_cases'`` or
    ``'<folds>-fold CV'``). Raises InputError when fewer than two cases have ``label`` or when
    ``fit_cases`` and the queries overlap."""
    if fit_cases is not None and set(fit_cases) & set(index._case_ids if queries is None else queries):
        raise InputError("fit_cases and queries overlap: fitted weights would be scored on cases they were fitted on")
    m = leg_matrices(index, label)
    ids = list(m.case_ids)
    pos = {c: i for i, c in enumerate(ids)}
    q = np.arange(len(ids)) if queries is None else np.array(sorted({pos[c] for c in queries if c in pos}), np.int64)
    sub = m.take(q)
    rows = []
    for li, leg in enumerate(m.legs):
        one = np.zeros(len(m.legs))
        one[li] = 1.0
        ap = np.where(sub.active[li], ap_at_k(fused_scores(sub, one), sub, k), np.nan)
        rows.append(_row(f"leg {leg.name}", ap, k, n_boot, seed))
    rows.append(_row("fused uniform", ap_at_k(fused_scores(sub, np.ones(len(m.legs))), sub, k), k, n_boot, seed))
    query_ids = [ids[i] for i in q]
    rrf = simulated_feedback(index, label, k=k, rounds=0, method="rrf", learn_weights=False, weights="uniform",
                             queries=query_ids)[:, 0]
    rows.append(_row("fused rrf", rrf, k, n_boot, seed))
    fit_rows = None if fit_cases is None else np.array(sorted(pos[c] for c in fit_cases if c in pos), np.int64)
    if fit_rows is not None and len(fit_rows) >= 2:
        w, _ = fit_weights(m.sub(fit_rows), k)
        fitted, how = ap_at_k(fused_scores(sub, w), sub, k), "fit_cases"
    else:             # every labelled case in the folds; each query scored by the fold that held it out
        cv = cross_validate(m, k, folds, seed=seed)
        fitted, how = cv["fitted"][q], f"{max(2, min(int(folds), len(ids)))}-fold CV"
        w = np.mean([[f["weights"][leg.name] for leg in m.legs] for f in cv["folds"]], 0)
    rows.append(_row("fused fitted", fitted, k, n_boot, seed))
    for learn, name in ((False, "feedback rocchio"), (True, "feedback rocchio+weights")):
        fb = simulated_feedback(index, label, k=k, rounds=rounds, marks=marks, learn_weights=learn,
                                weights="uniform", queries=query_ids)
        for rd in range(1, rounds + 1):
            rows.append(_row(f"{name}, round {rd}", fb[:, rd], k, n_boot, seed))
    values = [v for v in label_values(index, label) if v is not None]     # leg_matrices' cases, in order
    chance = chance_map(values, list(q), k)
    rows.append({"ranking": "chance", "metric": f"map@{k}", "value": float(chance), "lo": float(chance),
                 "hi": float(chance), "num_queries": int(len(q))})
    return rows, {"weights": {leg.name: float(x) for leg, x in zip(m.legs, w)}, "fitted_on": how}


def display_name(ranking: str, fitted_on: str = "") -> str:
    """The words a table shows for a ranking name of :func:`evaluate_hybrid`."""
    if ranking.startswith("leg "):
        return f"{ranking[4:]} alone"
    if ranking.startswith("feedback "):
        what, rd = ranking[len("feedback "):].split(", round ")
        who = "Rocchio + leg weights" if what == "rocchio+weights" else "Rocchio"
        return f"feedback: {who}, after {rd} round{'s' if int(rd) > 1 else ''}"
    if ranking == "fused fitted":
        how = "fitted on the training split" if fitted_on == "fit_cases" else fitted_on
        return f"fused, fitted weights ({how})" if how else "fused, fitted weights"
    return {"fused uniform": "fused, uniform weights", "fused rrf": "fused, RRF (uniform)",
            "chance": "chance (random ranking)"}.get(ranking, ranking)


def markdown_table(rows: list[dict], fitted_on: str = "", *, spread: bool = False) -> str:
    """Markdown table of :func:`evaluate_hybrid` rows: ranking, mAP@k [95 % CI], queries. With
    ``spread``, rows summarised over seeds (``mean``, ``sd``, ``n_seeds``; :func:`summarize`)."""
    if not rows:
        return ""
    k = rows[0]["metric"].split("@")[1]
    if spread:
        out = [f"| ranking | mAP@{k} (mean ± sd over seeds) | 95 % CI (first seed) | queries |", "|---|---|---|---|"]
        for r in rows:
            sd = f" ± {r['sd']:.3f}" if r["n_seeds"] > 1 else ""
            out.append(f"| {display_name(r['ranking'], fitted_on)} | {r['mean']:.3f}{sd} | "
                       f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['num_queries']} |")
        return "\n".join(out)
    out = [f"| ranking | mAP@{k} [95 % CI] | queries |", "|---|---|---|"]
    for r in rows:
        ci = "" if r["ranking"] == "chance" else f" [{r['lo']:.3f}, {r['hi']:.3f}]"
        out.append(f"| {display_name(r['ranking'], fitted_on)} | {r['value']:.3f}{ci} | {r['num_queries']} |")
    return "\n".join(out)


def summarize(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    """Rows of several seeds (each with ``seed``) → one row per ``keys`` + ranking: ``mean``,
    ``sd`` (ddof 1; 0 for one seed), ``n_seeds``, and the first seed's ``lo``/``hi``/``num_queries``.
    Order kept (first appearance)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(x) for x in keys) + (r["ranking"],), []).append(r)
    out = []
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: int(r.get("seed", 0)))
        v = np.array([r["value"] for r in rs], float)
        out.append({**{x: rs[0].get(x) for x in keys}, "ranking": key[-1], "metric": rs[0]["metric"],
                    "mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0,
                    "n_seeds": len(v), "lo": rs[0]["lo"], "hi": rs[0]["hi"], "num_queries": rs[0]["num_queries"]})
    return out
