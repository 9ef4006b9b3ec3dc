"""Leg weights fitted on labelled cases (``mmvae fit-fusion``), and the hybrid evaluation protocols.

The queries are the index's cases that carry the label, each queried with what it has (its
stored vector, its modalities, its report's tokens), leave-one-out among those cases; a case is
relevant when it has the query's label value. For every query and leg the standardised scores
of all those cases are computed once (:func:`leg_matrices`), so a weight vector costs one
weighted sum and one top-k per query.

Fitting (:func:`fit_weights`): coordinate ascent on mean AP@k (the metric of
:func:`mmvae.retrieval.metrics.average_precision_at_k`) from uniform weights, each sweep trying
every leg's weight at ``{0, ¼, ½, 1, 2, 4} ×`` the mean weight and keeping a change only when it
raises the mean AP by more than 1e-4; at most 4 sweeps (a few labelled queries fit a handful of
weights: Bruch, Gai & Ingber 2023 tune one convex weight on a few queries).

Cross-validation (:func:`fit_fusion`): the queries are split into ``folds`` (seeded); the weights
are fitted on the other folds and scored on the held-out one, so every reported fitted score
comes from weights that never saw the query; the stored weights are then fitted on all queries.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from mmvae.errors import InputError
from mmvae.retrieval.hybrid.fusion import fusion_identity
from mmvae.retrieval.hybrid.legs import index_legs, reference_rows, zscore
from mmvae.retrieval.hybrid.search import scorer_of
from mmvae.retrieval.metrics import average_precision_at_k, bootstrap_ci

__all__ = ["LegMatrices", "leg_matrices", "fused_scores", "ap_at_k", "fit_weights", "cross_validate",
           "fit_fusion", "label_values"]

FACTORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def label_values(index, label: str) -> list:
    """Each case's value of ``label`` (None when missing or empty)."""
    out = []
    for m in index._meta:
        lab = m.get("labels") if isinstance(m.get("labels"), dict) else {}
        v = lab.get(label)
        out.append(None if v is None or str(v) == "" else str(v))
    return out


class LegMatrices:
    """Standardised scores ``z (n_legs, Q, Q)`` of the labelled cases queried against each other,
    which legs each query has (``active (n_legs, Q)`` bool), relevance ``rel (Q, Q)`` (self
    excluded), ``nrel (Q,)``, the case ids and the legs."""

    def __init__(self, z, active, rel, case_ids, legs):
        self.z, self.active, self.rel, self.case_ids, self.legs = z, active, rel, case_ids, legs
        self.nrel = rel.sum(1)
        self.self_col = np.arange(len(case_ids))     # each query's own column in the database

    def take(self, q: np.ndarray) -> "LegMatrices":
        """The same database, only the queries ``q`` (row indices)."""
        out = LegMatrices.__new__(LegMatrices)
        out.z, out.active, out.rel = self.z[:, q], self.active[:, q], self.rel[q]
        out.case_ids, out.legs, out.nrel = [self.case_ids[i] for i in q], self.legs, self.nrel[q]
        out.self_col = self.self_col[q]
        return out

    def sub(self, rows: np.ndarray) -> "LegMatrices":
        """Only the cases ``rows``, as queries and as the database (a training fold that never
        sees the held-out cases, not even as relevant items)."""
        return LegMatrices(self.z[:, rows][:, :, rows], self.active[:, rows], self.rel[rows][:, rows],
                           [self.case_ids[i] for i in rows], self.legs)


def leg_matrices(index, label: str, *, modalities: Sequence[str] | None = None) -> LegMatrices:
    """:class:`LegMatrices` of the index's cases that have ``label``; InputError when no case or
    only one value has it."""
    values = label_values(index, label)
    rows = np.array([i for i, v in enumerate(values) if v is not None], np.int64)
    if len(rows) < 2:
        have = sorted({k for m in index._meta for k in (m.get("labels") or {})})
        raise InputError(f"label {label!r}: {len(rows)} case(s) of the index have it (labels present: "
                         f"{', '.join(have) or 'none'})")
    legs = index_legs(index, modalities)
    sc = scorer_of(index, legs)
    sc._refresh()
    ref = reference_rows([index._case_ids[r] for r in rows])
    Q = len(rows)
    z = np.zeros((len(legs), Q, Q), np.float32)
    active = np.zeros((len(legs), Q), bool)
    vec = np.asarray(index._mu, np.float32)
    for li, leg in enumerate(legs):
        has = sc.has[leg.name][rows]
        active[li] = has
        for qi in np.nonzero(has)[0]:
            r = rows[qi]
            tokens = index.lexical.tokens[r] if leg.lexical else None
            s = sc.scores(leg, vec[r], tokens)[rows]
            z[li, qi] = zscore(s, s[ref])
    vals = np.array([values[r] for r in rows], dtype=object)
    rel = vals[:, None] == vals[None, :]
    np.fill_diagonal(rel, False)
    return LegMatrices(z, active, rel, [index._case_ids[r] for r in rows], legs)


def fused_scores(m: LegMatrices, w: np.ndarray) -> np.ndarray:
    """``(Q, Q)`` fused scores for weights ``w (n_legs,)`` (a query whose legs all weigh 0 uses
    uniform weights over its legs, as a search does); the query itself at −inf."""
    w = np.asarray(w, np.float32)
    f = np.tensordot(w, m.z, axes=1)
    zero = (w[:, None] * m.active).sum(0) <= 0
    if zero.any():
        f[zero] = m.z[:, zero].sum(0)
    f[np.arange(len(f)), m.self_col] = -np.inf
    return f


def ap_at_k(scores: np.ndarray, m: LegMatrices, k: int) -> np.ndarray:
    """AP@k ``(Q,)`` of rankings by ``scores (Q, Q)`` (higher first)."""
    kk = min(k, scores.shape[1] - 1)
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.take_along_axis(scores, top, 1)
    top = np.take_along_axis(top, np.argsort(-order, axis=1, kind="stable"), 1)
    rel = np.take_along_axis(m.rel, top, 1)
    return average_precision_at_k(rel, m.nrel, kk)


def _mean_ap(m, w, k) -> float:
    return float(ap_at_k(fused_scores(m, w), m, k).mean())


def fit_weights(m: LegMatrices, k: int, *, sweeps: int = 4) -> tuple[np.ndarray, float]:
    """Coordinate ascent (module doc) → ``(weights (n_legs,) summing to 1, mean AP@k on m)``."""
    L = m.z.shape[0]
    w = np.ones(L) / L
    best = _mean_ap(m, w, k)
    for _ in range(sweeps):
        improved = False
        for li in range(L):
            scale = float(w[w > 0].mean()) if (w > 0).any() else 1.0 / L
            for f in FACTORS:
                cand = w.copy()
                cand[li] = f * scale
                if cand.sum() <= 0 or np.allclose(cand, w):
                    continue
                cand = cand / cand.sum()
                s = _mean_ap(m, cand, k)
                if s > best + 1e-4:
                    best, w, improved = s, cand, True
        if not improved:
            break
    return w, best


def cross_validate(m: LegMatrices, k: int, folds: int = 5, seed: int = 0) -> dict:
    """Per-query AP@k of weights fitted on the other folds, of uniform weights and of each leg
    alone (over the queries that have it), with the folds' scores: ``{'fitted': (Q,), 'uniform':
    (Q,), 'legs': {name: (Q,) NaN where absent}, 'folds': [...]}``."""
    Q = len(m.case_ids)
    folds = max(2, min(int(folds), Q))
    perm = np.random.default_rng(seed).permutation(Q)
    parts = np.array_split(perm, folds)
    fitted = np.zeros(Q)
    fold_rows = []
    for f, test in enumerate(parts):
        train = np.setdiff1d(perm, test)
        w, train_ap = fit_weights(m.sub(np.sort(train)), k)
        sub = m.take(test)
        ap = ap_at_k(fused_scores(sub, w), sub, k)
        fitted[test] = ap
        uni = ap_at_k(fused_scores(sub, np.ones(len(w))), sub, k)
        fold_rows.append({"fold": f, "n": int(len(test)), "fitted": float(ap.mean()), "uniform": float(uni.mean()),
                          "train_fitted": float(train_ap),
                          "weights": {leg.name: float(x) for leg, x in zip(m.legs, w)}})
    uniform = ap_at_k(fused_scores(m, np.ones(len(m.legs))), m, k)
    legs = {}
    for li, leg in enumerate(m.legs):
        e = np.zeros(len(m.legs))
        e[li] = 1.0
        ap = ap_at_k(fused_scores(m, e), m, k)
        legs[leg.name] = np.where(m.active[li], ap, np.nan)
    return {"fitted": fitted, "uniform": uniform, "legs": legs, "folds": fold_rows}


def _summary(x: np.ndarray, n_boot: int, seed: int) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"map": None, "n": 0}
    mean, lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed) if n_boot else (float(x.mean()), None, None)
    return {"map": float(mean), "lo": lo if lo is None else float(lo), "hi": hi if hi is None else float(hi),
            "n": int(len(x))}


def fit_fusion(index, label: str, *, k: int = 10, folds: int = 5, seed: int = 0,
               modalities: Sequence[str] | None = None, n_boot: int = 1000, default: bool = True) -> dict:
    """Fit the leg weights for ``label`` and store them in ``index.fusion`` (saved with the
    index by :meth:`CaseIndex.save`): the weights fitted on every labelled query, the
    cross-validated scores (fitted, uniform, each leg) with 95 % bootstrap CIs, the folds.
    ``default``: make this label's weights the index's default set. Returns the stored entry."""
    t0 = time.time()
    m = leg_matrices(index, label, modalities=modalities)
    cv = cross_validate(m, k, folds, seed)
    w, train_ap = fit_weights(m, k)
    entry = {
        "weights": {leg.name: float(x) for leg, x in zip(m.legs, w)},
        "k": int(k), "folds": cv["folds"], "n_queries": len(m.case_ids), "seed": int(seed), "method": "weighted",
        "train_map": float(train_ap),
        "cv": {"fitted": _summary(cv["fitted"], n_boot, seed), "uniform": _summary(cv["uniform"], n_boot, seed),
               "legs": {n: _summary(v, n_boot, seed) for n, v in cv["legs"].items()}},
        "seconds": round(time.time() - t0, 2),
    }
    fusion = dict(index.fusion or {})
    fusion["format"] = "mmvae-fusion"
    fusion["identity"] = fusion_identity(index, m.legs)
    sets = dict(fusion.get("sets", {}))
    sets[label] = entry
    fusion["sets"] = sets
    if default or not fusion.get("default"):
        fusion["default"] = label
    index.fusion = fusion
    return entry


def legs_table(entry: dict) -> str:
    """Markdown: cross-validated mAP@k of the fitted and uniform weights and each leg alone."""
    k = entry["k"]

    def cell(s):
        if s.get("map") is None:
            return "–"
        ci = f" [{s['lo']:.3f}, {s['hi']:.3f}]" if s.get("lo") is not None else ""
        return f"{s['map']:.3f}{ci}"
    lines = [f"| ranking | mAP@{k} [95 % CI] | queries | weight |", "|---|---|---|---|",
             f"| fused, fitted weights (cross-validated) | {cell(entry['cv']['fitted'])} | {entry['cv']['fitted']['n']} | |",
             f"| fused, uniform weights | {cell(entry['cv']['uniform'])} | {entry['cv']['uniform']['n']} | |"]
    for name, s in entry["cv"]["legs"].items():
        lines.append(f"| {name} alone | {cell(s)} | {s['n']} | {entry['weights'].get(name, 0):.3f} |")
    return "\n".join(lines)
