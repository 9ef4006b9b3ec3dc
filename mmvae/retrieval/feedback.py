"""Relevance feedback on latent queries."""
from __future__ import annotations

import numpy as np

from mmvae.errors import InputError

__all__ = ["rocchio"]


def _as_set(x, L: int, name: str) -> np.ndarray:
    if x is None:
        return np.zeros((0, L), dtype=np.float64)
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, L), dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != L:
        raise InputError(f"{name} must have shape (n, {L}), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} holds NaN or infinite values")
    return a


def rocchio(query, relevant, nonrelevant, alpha: float = 1.0, beta: float = 0.75,
            gamma: float = 0.25) -> np.ndarray:
    """Rocchio relevance feedback in latent space.

    .. math::

        q' = \\alpha\\, q + \\beta \\frac{1}{|R|}\\sum_{r\\in R} r
             - \\gamma \\frac{1}{|S|}\\sum_{s\\in S} s

    i.e. ``q' = α q + β mean(relevant) − γ mean(nonrelevant)``, where an empty set
    contributes 0 (not NaN). Pure function: the inputs are not modified.

    Args:
      query: ``(L,)`` query vector (e.g. the posterior mean of the query case).
      relevant: ``(R, L)`` vectors judged relevant (``R`` may be 0; None = empty).
      nonrelevant: ``(S, L)`` vectors judged not relevant (``S`` may be 0).
      alpha, beta, gamma: weights (defaults 1.0, 0.75, 0.25 as in the config).

    Returns:
      ``(L,)`` updated query: float64 for float64 input, float32 otherwise.
    """
    q = np.asarray(query)
    if q.ndim != 1:
        raise InputError(f"query must be a vector (L,), got shape {q.shape}")
    L = q.shape[0]
    qf = q.astype(np.float64)
    if not np.all(np.isfinite(qf)):
        raise InputError("query holds NaN or infinite values")
    rel = _as_set(relevant, L, "relevant")
    non = _as_set(nonrelevant, L, "nonrelevant")
    out = float(alpha) * qf
    if rel.shape[0]:
        out = out + float(beta) * rel.mean(axis=0)
    if non.shape[0]:
        out = out - float(gamma) * non.mean(axis=0)
    dtype = q.dtype if np.issubdtype(q.dtype, np.floating) and q.dtype.itemsize >= 8 else np.float32
    return out.astype(dtype)
