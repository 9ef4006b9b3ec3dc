"""Simulated relevance feedback on a hybrid index (the protocol of Kurtz et al. 2015, KUR15).

Every labelled case queries the other labelled cases with what it has (leave-one-out). After
each ranking a simulated radiologist marks the first ``marks`` results of the top ``k`` not yet
marked, relevant when their label equals the query's (the hidden label), not relevant otherwise;
the query then moves by Rocchio on its dense vector (``q' = α q + β mean(R) − γ mean(S)``, each
block averaged over the marked cases that have it, as :meth:`Retriever.apply_feedback`) and,
with ``learn_weights``, the leg weights by the Hedge update (:func:`~.fusion.feedback_weights`).
AP@k is measured on the full ranking after every round (marked cases stay in it, as on the
review page).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmvae.retrieval.hybrid.fit import label_values
from mmvae.retrieval.hybrid.fusion import feedback_weights, fuse, normalise_weights, resolve_weights
from mmvae.retrieval.hybrid.legs import index_legs, reference_rows, zscore
from mmvae.retrieval.hybrid.search import scorer_of
from mmvae.retrieval.metrics import average_precision_at_k

__all__ = ["simulated_feedback"]


def _marked_mean(vec: np.ndarray, has: dict, legs, rows: np.ndarray) -> np.ndarray:
    """Mean ``(D,)`` of the marked rows' vectors, each dense leg's block over the rows that have it."""
    out = np.zeros(vec.shape[1], np.float64)
    for leg in legs:
        if leg.lexical:
            continue
        r = rows[has[leg.name][rows]]
        if len(r):
            out[leg.start:leg.stop] = vec[r, leg.start:leg.stop].mean(0)
    return out


def simulated_feedback(index, label: str, *, k: int = 10, rounds: int = 3, marks: int = 3,
                       learn_weights: bool = True, weights=None, method: str = "weighted",
                       rocchio=(1.0, 0.75, 0.25), eta: float = 1.0,
                       modalities: Sequence[str] | None = None, queries: Sequence[str] | None = None) -> np.ndarray:
    """AP@k per query and round, float64 ``(Q, rounds + 1)`` (column 0: no feedback yet).

    ``weights``: the starting weight set (None: the index's default, else uniform). ``queries``:
    the case ids that query (default every labelled case), in the index's order; the database is
    always every labelled case."""
    values = label_values(index, label)
    rows = np.array([i for i, v in enumerate(values) if v is not None], np.int64)
    asked = None if queries is None else set(queries)
    legs = index_legs(index, modalities)
    sc = scorer_of(index, legs)
    sc._refresh()
    ref = reference_rows([index._case_ids[r] for r in rows])
    w_all, _ = resolve_weights(index, legs, weights)
    vec = np.asarray(index._mu, np.float64)
    lab = np.array([values[r] for r in rows], dtype=object)
    alpha, beta, gamma = rocchio
    query_pos = [qi for qi, r in enumerate(rows) if asked is None or index._case_ids[r] in asked]
    out = np.zeros((len(query_pos), rounds + 1))
    for oi, qi in enumerate(query_pos):
        r = rows[qi]
        act = [leg for leg in legs if sc.has[leg.name][r]]
        if not act:
            continue
        w = normalise_weights(w_all, [leg.name for leg in act])
        q = vec[r].copy()
        tokens = index.lexical.tokens[r] if index.lexical is not None else None
        rel = lab == lab[qi]
        rel[qi] = False
        nrel = int(rel.sum())
        marked: set[int] = set()
        for rd in range(rounds + 1):
            raw = np.stack([sc.scores(leg, q, tokens)[rows] for leg in act])
            z = np.stack([zscore(s, s[ref]) for s in raw])
            f, _ = fuse(z, raw, np.array([w[leg.name] for leg in act]), method)
            f[qi] = -np.inf
            top = np.argsort(-f, kind="stable")[:k]
            out[oi, rd] = average_precision_at_k(rel[top][None], np.array([nrel]), k)[0]
            if rd == rounds:
                break
            new = [j for j in top if j not in marked][:marks]
            marked.update(new)
            R = np.array([j for j in new if rel[j]], np.int64)
            S = np.array([j for j in new if not rel[j]], np.int64)
            mr = _marked_mean(vec, sc.has, act, rows[R]) if len(R) else 0.0
            ms = _marked_mean(vec, sc.has, act, rows[S]) if len(S) else 0.0
            q = alpha * q + (beta * mr if len(R) else 0.0) - (gamma * ms if len(S) else 0.0)
            if learn_weights:
                w = feedback_weights(w, {leg.name: z[i, R] for i, leg in enumerate(act)},
                                     {leg.name: z[i, S] for i, leg in enumerate(act)}, eta=eta)
    return out
