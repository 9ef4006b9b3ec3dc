"""Fusing the legs' rankings, and the leg weights a round of feedback teaches.

Two fusion functions over the legs ``L_q`` a query has, with weights ``w`` (normalised over
``L_q`` to sum to 1):

* ``weighted`` (default): the convex combination of standardised scores (Bruch, Gai & Ingber,
  ACM TOIS 2023), ``F(c) = Σ_ℓ w_ℓ z_ℓ(c)`` (:mod:`.legs`). Invariant to any positive affine
  change of one leg's scores.
* ``rrf``: weighted reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009),
  ``F(c) = Σ_ℓ w_ℓ / (60 + r_ℓ(c))`` with ``r_ℓ(c)`` the case's rank by leg ℓ among the
  candidates that have the leg (1 = best; a case without the leg gets nothing from it).

The contribution of leg ℓ to a result is ``w_ℓ z_ℓ(c)`` (``weighted``) or its RRF term.

Feedback (:func:`feedback_weights`): after a round of relevant / not-relevant marks, each leg's
weight is multiplied by ``exp(η · g_ℓ)`` with ``g_ℓ`` = mean z of the relevant marks − mean z
of the non-relevant marks under the query that was shown (an absent set counts 0, the
reference mean), then renormalised: the exponentiated-gradient / Hedge update (Freund &
Schapire, 1997) on the margin each leg gives the marked cases, ``η = 1`` (z units).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import numpy as np

from mmvae.errors import IndexError_, InputError

__all__ = ["METHODS", "RRF_K", "normalise_weights", "fuse", "rrf_terms", "feedback_weights",
           "resolve_weights"]

METHODS = ("weighted", "rrf")
RRF_K = 60


def normalise_weights(weights: Mapping[str, float], active: Sequence[str]) -> dict[str, float]:
    """Weights of the ``active`` legs, summing to 1 (uniform when they are all 0); legs not in
    ``weights`` get 0. InputError for a negative or non-finite weight."""
    w = {}
    for name in active:
        v = float(weights.get(name, 0.0))
        if not np.isfinite(v) or v < 0:
            raise InputError(f"fusion weight of leg {name!r} must be finite and ≥ 0 (got {v})")
        w[name] = v
    tot = sum(w.values())
    if tot <= 0:
        return {n: 1.0 / len(active) for n in active} if active else {}
    return {n: v / tot for n, v in w.items()}


def rrf_terms(scores: np.ndarray) -> np.ndarray:
    """``1 / (60 + rank)`` float64 ``(n,)`` of candidates by one leg's raw scores ``(n,)``
    (NaN: the case lacks the leg → 0). Ties share the better rank order of appearance."""
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    out = np.zeros(len(s))
    idx = np.nonzero(ok)[0]
    order = idx[np.argsort(-s[idx], kind="stable")]
    out[order] = 1.0 / (RRF_K + np.arange(1, len(order) + 1))
    return out


def fuse(z: np.ndarray, raw: np.ndarray, weights: np.ndarray, method: str = "weighted") -> tuple[np.ndarray, np.ndarray]:
    """Fused scores ``(n,)`` and per-leg contributions ``(n_legs, n)`` of ``n`` candidates.

    Args: ``z (n_legs, n)`` standardised scores (:func:`~.legs.zscore`), ``raw (n_legs, n)``
    raw scores (NaN where a case lacks the leg; RRF ranks these), ``weights (n_legs,)``
    normalised over the legs the query has (0 for the others), ``method`` in :data:`METHODS`."""
    if method not in METHODS:
        raise InputError(f"fusion method must be one of {list(METHODS)} (got {method!r})")
    w = np.asarray(weights, np.float64)[:, None]
    if method == "weighted":
        contrib = w * np.asarray(z, np.float64)
    else:
        contrib = w * np.stack([rrf_terms(r) for r in raw]) if len(raw) else np.zeros((0, z.shape[1]))
    return contrib.sum(0), contrib


def feedback_weights(weights: Mapping[str, float], z_relevant: Mapping[str, np.ndarray],
                     z_nonrelevant: Mapping[str, np.ndarray], eta: float = 1.0) -> dict[str, float]:
    """Leg weights after one round of marks (module doc): ``w_ℓ ← w_ℓ exp(η g_ℓ)``, renormalised.

    ``z_relevant[ℓ]`` / ``z_nonrelevant[ℓ]``: the standardised scores (under the query that
    was shown) of the cases marked relevant / not relevant, one array per leg in ``weights``."""
    out = {}
    for name, w in weights.items():
        r = np.asarray(z_relevant.get(name, []), np.float64)
        s = np.asarray(z_nonrelevant.get(name, []), np.float64)
        g = (r.mean() if r.size else 0.0) - (s.mean() if s.size else 0.0)
        out[name] = float(w) * float(np.exp(np.clip(eta * g, -20.0, 20.0)))
    tot = sum(out.values())
    return {n: v / tot for n, v in out.items()} if tot > 0 else dict(weights)


def resolve_weights(index, legs, spec=None) -> tuple[dict[str, float], str]:
    """The weight set a query uses and its name: ``spec`` None → the index's default fitted set
    (``fusion.json``) or uniform; ``'uniform'``; a label with fitted weights; or a mapping
    ``{leg: weight}``. InputError for an unknown label or a weight on a leg the index lacks;
    IndexError_ for weights fitted for other vectors (:func:`check_fusion`)."""
    names = [leg.name for leg in legs]
    if isinstance(spec, Mapping):
        bad = sorted(set(spec) - set(names))
        if bad:
            raise InputError(f"fusion weights name leg(s) {bad} that the index lacks (it has {names})")
        return {n: float(spec.get(n, 0.0)) for n in names}, "given"
    fusion = index.fusion
    if fusion is not None:
        check_fusion(index, legs)
    sets = (fusion or {}).get("sets", {})
    if spec is None:
        spec = (fusion or {}).get("default") or "uniform"
    if spec == "uniform":
        return {n: 1.0 for n in names}, "uniform"
    if spec not in sets:
        raise InputError(f"no fusion weights fitted for label {spec!r} in this index "
                         f"(fitted: {sorted(sets) or 'none'}; or use 'uniform'): run mmvae fit-fusion --label {spec}")
    w = sets[spec]["weights"]
    return {n: float(w.get(n, 0.0)) for n in names}, str(spec)


def fusion_identity(index, legs) -> dict:
    """What fitted weights are tied to: the vectors' weights digest, layout and the leg names."""
    ident = index.identity
    return {"weights_digest": ident.get("weights_digest"), "embedding": ident.get("embedding", "fused"),
            "latent_dim": int(index.latent_dim), "legs": [leg.name for leg in legs]}


def check_fusion(index, legs) -> None:
    """IndexError_ when the index's ``fusion.json`` was fitted for other vectors or other legs."""
    have = (index.fusion or {}).get("identity")
    want = fusion_identity(index, legs)
    if have is None:
        raise IndexError_("index file fusion.json has no identity: fit the weights again (mmvae fit-fusion)")
    diffs = [f"{k}: {have.get(k)!r} vs {want[k]!r}" for k in want if have.get(k) != want[k]]
    if diffs:
        raise IndexError_("the fusion weights in fusion.json were fitted for another index ("
                          + "; ".join(diffs) + "): fit them again with mmvae fit-fusion")
