"""Hybrid retrieval: the index's dense legs and the report's BM25 leg, fused.

* :mod:`.legs`: what the legs of an index are, their scores, standardised per query;
* :mod:`.fusion`: weighted sum of standardised scores (default) or reciprocal rank fusion,
  the weight sets (uniform, fitted per label), the weights a round of feedback teaches;
* :mod:`.search`: one query → candidates → exact leg scores → fused top k with each leg's
  contribution;
* :mod:`.fit`: leg weights fitted on labelled cases by cross-validated mAP@k
  (``mmvae fit-fusion``), and the evaluation protocols (each leg alone, fused, simulated
  relevance feedback).
"""
from mmvae.retrieval.hybrid.fusion import METHODS, feedback_weights, fuse, resolve_weights
from mmvae.retrieval.hybrid.legs import FUSED, LEXICAL, Leg, LegScorer, index_legs, legs_of, zscore
from mmvae.retrieval.hybrid.search import HybridQuery, HybridResult, active_legs, hybrid_search

__all__ = ["METHODS", "feedback_weights", "fuse", "resolve_weights", "FUSED", "LEXICAL", "Leg", "LegScorer",
           "index_legs", "legs_of", "zscore", "HybridQuery", "HybridResult", "active_legs", "hybrid_search"]
