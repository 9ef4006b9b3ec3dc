"""A hybrid search of one query: each leg's exact scores → standardise → fuse → top k.

Every allowed case (``filter=`` / ``exclude=``) is scored exactly by every leg the query has, from
the stored vectors' blocks and the BM25 leg (:mod:`.legs`), whatever the index kind: one
matrix-vector product per dense leg (15 ms for 100,000 cases and 5 legs + BM25 on 2 cores,
docs/benchmarks.md). The FAISS structure is not consulted: its first pass would only repeat,
approximately, what this scan computes exactly. An archive too large to scan needs a candidate
stage first (the archive-scale issue).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import numpy as np

from mmvae.errors import InputError
from mmvae.retrieval.hybrid.fusion import fuse, normalise_weights, resolve_weights
from mmvae.retrieval.hybrid.legs import Leg, LegScorer, index_legs, zscore
from mmvae.retrieval.index.filters import exclude_rows, filter_mask
from mmvae.retrieval.index.inputs import check_k
from mmvae.retrieval.index.search import Result

__all__ = ["HybridResult", "HybridQuery", "active_legs", "hybrid_search", "scorer_of"]


@dataclasses.dataclass
class HybridResult(Result):
    """A :class:`Result` whose ``score`` is the fused score, with each leg's part of it
    (``contributions``, summing to ``score``) and its raw score (``leg_scores``: cosine or BM25;
    legs the case lacks are absent)."""
    contributions: dict = dataclasses.field(default_factory=dict)
    leg_scores: dict = dataclasses.field(default_factory=dict)

    def matched_on(self, labels: dict | None = None, top: int = 3) -> str:
        """``"report (words) 0.61, T2 0.22"``: the legs that raised the case most."""
        parts = sorted(self.contributions.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{(labels or {}).get(n, n)} {v:.2f}" for n, v in parts if v > 0)


@dataclasses.dataclass
class HybridQuery:
    """A query as the legs see it: its stored-layout vector ``vector (D,)``, the modalities
    it was made of (``modalities``), and its report tokens (``tokens``; None: no text)."""
    vector: np.ndarray
    modalities: list
    tokens: list | None = None


def scorer_of(index, legs: Sequence[Leg]) -> LegScorer:
    """The index's cached :class:`LegScorer` for these legs."""
    cache = index.__dict__.setdefault("_leg_scorers", {})
    key = tuple(leg.name for leg in legs)
    if key not in cache:
        cache[key] = LegScorer(index, legs)
    return cache[key]


def active_legs(legs: Sequence[Leg], query: HybridQuery) -> list[Leg]:
    """The legs a query has: the fused leg, a dense leg of a modality it has, the lexical leg
    when it has tokens."""
    out = []
    for leg in legs:
        if leg.lexical:
            if query.tokens:
                out.append(leg)
        elif leg.modality is None or leg.modality in query.modalities:
            out.append(leg)
    return out


def hybrid_search(index, query: HybridQuery, k: int, *, weights=None, method: str = "weighted",
                  filter=None, exclude=None, modalities: Sequence[str] | None = None,  # noqa: A002
                  ) -> tuple[list[HybridResult], dict]:
    """The top ``k`` cases of one query by fused leg scores, and the weights used.

    Args:
      index: a :class:`~mmvae.retrieval.index.CaseIndex`.
      query: its vector ``(D,)`` in the index's layout, modalities and report tokens.
      k: results (≤ the cases left after filter/exclude, else InputError).
      weights: None (the index's fitted default, else uniform), ``'uniform'``, a label with
        fitted weights, or ``{leg: weight}`` (:func:`~.fusion.resolve_weights`).
      method: ``'weighted'`` or ``'rrf'`` (:mod:`.fusion`).
      filter, exclude: as :meth:`CaseIndex.search`.
      modalities: the model's query modalities (``experts`` vectors' order).

    Returns ``(results best first, {'weights': {leg: w} normalised over the query's legs,
    'weight_set': name, 'legs': [names]})``. InputError when the query has no leg.
    """
    k = check_k(k)
    legs = index_legs(index, modalities)
    act = active_legs(legs, query)
    if not act:
        raise InputError(f"the query has none of the index's legs ({[leg.name for leg in legs]})")
    w_all, set_name = resolve_weights(index, legs, weights)
    w = normalise_weights(w_all, [leg.name for leg in act])
    allowed = filter_mask(filter, index._case_ids, index._meta)
    ex = exclude_rows(exclude, index._row_of_case, 1)[0]
    allowed[ex] = False
    n_allowed = int(allowed.sum())
    if k > n_allowed:
        raise InputError(f"k={k} is larger than the index{' after filter/exclude' if n_allowed < index.size else ''} "
                         f"({n_allowed} of {index.size} cases available)")
    sc = scorer_of(index, legs)
    raw_full = {leg.name: sc.scores(leg, query.vector, query.tokens) for leg in act}
    rows = np.nonzero(allowed)[0]
    raw = np.stack([raw_full[leg.name][rows] for leg in act])
    z = np.stack([zscore(raw_full[leg.name][rows], raw_full[leg.name][sc.ref]) for leg in act])
    fused, contrib = fuse(z, raw, np.array([w[leg.name] for leg in act]), method)
    order = np.argsort(-fused, kind="stable")[:k]
    out = []
    for rank, j in enumerate(order, start=1):
        r = int(rows[j])
        m = index._meta[r]
        out.append(HybridResult(
            rank=rank, case_id=index._case_ids[r], score=float(fused[j]), modalities=list(m["modalities"]),
            labels=copy.deepcopy(m["labels"]),
            contributions={leg.name: float(contrib[i, j]) for i, leg in enumerate(act)},
            leg_scores={leg.name: float(raw[i, j]) for i, leg in enumerate(act) if np.isfinite(raw[i, j])}))
    return out, {"weights": w, "weight_set": set_name, "legs": [leg.name for leg in act], "method": method}


def standardised_scores(index, query: HybridQuery, case_ids: Sequence[str],
                        modalities: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{leg: z (n,)}`` of the given cases for the query, every leg the query has (what a round
    of feedback weighs, :func:`~.fusion.feedback_weights`)."""
    legs = index_legs(index, modalities)
    sc = scorer_of(index, legs)
    rows = index._rows_of(list(case_ids))
    out = {}
    for leg in active_legs(legs, query):
        s = sc.scores(leg, query.vector, query.tokens)
        out[leg.name] = zscore(s, s[sc.ref])[rows]
    return out
