"""Scoring of first-pass candidates: exactly by the metric, then optionally by the posteriors.

Metric scores (``metric=``), higher = more similar, float64 from the stored float32
means: ``cosine`` = inner product of L2-normalised means, ``l2`` = minus the squared L2
distance between means.

Posterior-aware re-ranking (``search(..., rerank=...)``) re-scores the best
``rerank_factor·k`` candidates (by the metric) with the query posterior
``N(μq, diag σq²)`` and each candidate's ``N(μd, diag σd²)`` in raw latent space:

* ``'bhattacharyya'``: score = −D_B with, for ``s_j = (σq_j² + σd_j²)/2``,
  ``D_B = 1/8 Σ_j (μq_j − μd_j)² / s_j + 1/2 Σ_j [ln s_j − (ln σq_j² + ln σd_j²)/2]``.
* ``'expected_likelihood'``: score = ``log ∫ N(z; μq, Σq) N(z; μd, Σd) dz
  = log N(μq; μd, Σq + Σd) = −1/2 Σ_j [ln(2π v_j) + (μq_j − μd_j)² / v_j]``,
  ``v_j = σq_j² + σd_j²``.

Log-variances are clipped to [-30, 30] for these computations.
"""
from __future__ import annotations

import numpy as np

RERANKS = (None, "bhattacharyya", "expected_likelihood")
LOGVAR_CLIP = 30.0


def exact_scores(mu: np.ndarray, rows: np.ndarray, q: np.ndarray, metric: str,
                 dims: np.ndarray | None = None) -> np.ndarray:
    """Metric scores float64 ``(len(rows),)`` (higher = better) of the query ``q (L,)``
    against the stored means ``mu[rows]`` (``mu (N, L)``), on the dimensions ``dims``
    (0/1 ``(L,)`` mask) only when given."""
    d = mu[rows].astype(np.float64)
    q = q.astype(np.float64)
    if dims is not None:
        d, q = d * dims, q * dims
    if metric == "cosine":
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        return d @ q
    return -((d - q[None, :]) ** 2).sum(axis=1)


def posterior_scores(mq, lvq, md, lvd, method: str) -> np.ndarray:
    """Scores float64 ``(n,)`` (higher = more similar) of one query posterior (``mq``,
    ``lvq``: ``(L,)`` mean and log-variance) vs ``n`` candidates (``md``, ``lvd``:
    ``(n, L)``) by ``method`` (``'bhattacharyya'`` or ``'expected_likelihood'``)."""
    mq = mq.astype(np.float64)[None, :]
    md = md.astype(np.float64)
    lvq = np.clip(lvq.astype(np.float64), -LOGVAR_CLIP, LOGVAR_CLIP)[None, :]
    lvd = np.clip(lvd.astype(np.float64), -LOGVAR_CLIP, LOGVAR_CLIP)
    d2 = (mq - md) ** 2
    vq, vd = np.exp(lvq), np.exp(lvd)
    if method == "bhattacharyya":
        s = 0.5 * (vq + vd)
        db = 0.125 * (d2 / s).sum(axis=1) + 0.5 * (np.log(s) - 0.5 * (lvq + lvd)).sum(axis=1)
        return -db
    v = vq + vd
    return -0.5 * (np.log(2.0 * np.pi * v) + d2 / v).sum(axis=1)


def top_k(rows: np.ndarray, k: int, qmu: np.ndarray, qlv: np.ndarray | None, mu: np.ndarray,
          logvar: np.ndarray, metric: str, rerank: str | None,
          dims: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the candidate ``rows`` of one query, best first: ``(rows (≤k,),
    scores (≤k,) float64)``. Scored by the metric (on ``dims`` when given), then, with
    ``rerank``, re-scored by the posteriors (``qmu``, ``qlv (L,)`` vs ``mu``, ``logvar
    (N, L)``) on the dimensions the query informs. Ties keep first-pass order."""
    scores = exact_scores(mu, rows, qmu, metric, dims)
    if rerank is not None:
        rows = rows[np.argsort(-scores, kind="stable")]
        keep = slice(None) if dims is None else dims > 0
        scores = posterior_scores(qmu[keep], qlv[keep], mu[rows][:, keep], logvar[rows][:, keep], rerank)
    order = np.argsort(-scores, kind="stable")[:k]
    return rows[order], scores[order]
