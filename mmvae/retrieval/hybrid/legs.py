"""The legs of a case index and their standardised scores.

A *leg* is one ranking the index can give for a query: each dense block of the stored vectors
(the experts of ``experts`` vectors, one per modality; the frozen pretrained features of the
``features`` kinds, one per modality; the one fused posterior of ``fused`` vectors) and, when the
index has one, the report's BM25 leg (:mod:`mmvae.retrieval.index.lexical`). A query uses the
legs its modalities provide (a dense leg of modality m when the query has m, the lexical leg when
it has report words; the fused leg always).

Scores, per leg, higher = more similar: the cosine between the query's block and the case's block
(undefined — NaN — for a case without that modality), or BM25. They live on different scales, so
each is standardised per query against a fixed reference set of the index's cases (Bruch, Gai &
Ingber, ACM TOIS 2023, "An analysis of fusion functions for hybrid retrieval": normalise, then
combine convexly):

.. math::

    z_\\ell(c) = \\frac{s_\\ell(q, c) - \\mu_\\ell(q)}{\\sigma_\\ell(q)},
    \\qquad \\mu_\\ell, \\sigma_\\ell \\text{ over the reference cases that have the leg}

The reference set is the ``min(N, 2048)`` cases whose BLAKE2b hash of the case id is smallest:
all cases of a small index, a fixed sample of a large one, the same whatever the query's filter or
the index kind. A leg a case lacks gets ``z = 0`` (no evidence either way); a leg whose reference
scores do not vary (σ = 0) gives ``z = 0`` everywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from mmvae.errors import InputError

__all__ = ["Leg", "LEXICAL", "FUSED", "legs_of", "index_legs", "LegScorer", "zscore", "REFERENCE_SIZE"]

LEXICAL = "bm25:report"
FUSED = "fused"
REFERENCE_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class Leg:
    """One ranking: ``name`` (``expert:<m>``, ``features:<m>``, ``fused`` or ``bm25:report``),
    the ``modality`` a query needs for it (None: every query), and for dense legs the columns
    ``[start, stop)`` of the stored vectors."""
    name: str
    modality: str | None
    start: int = 0
    stop: int = 0
    lexical: bool = False

    @property
    def label(self) -> str:
        """Short display name: ``T2``, ``T2 (features)``, ``report (words)``, ``fused``."""
        if self.lexical:
            return "report (words)"
        if self.name == FUSED:
            return "fused"
        kind, _, m = self.name.partition(":")
        return m if kind == "expert" else f"{m} ({kind})"


def legs_of(identity: dict, latent_dim: int, modalities: Sequence[str] | None, lexical: bool) -> list[Leg]:
    """The legs of vectors laid out as ``identity`` says (``embedding``, ``blocks``) for a model
    of ``modalities`` (the query modalities, in the vectors' order; needed by ``experts``
    vectors), plus the lexical leg when ``lexical``."""
    kind = str(identity.get("embedding", "fused") or "fused")
    legs: list[Leg] = []
    if kind == "fused":
        legs.append(Leg(FUSED, None, 0, int(latent_dim)))
    elif kind == "experts":
        mods = list(modalities or identity.get("modalities") or [])
        if not mods or int(latent_dim) % len(mods):
            raise InputError(f"cannot split {latent_dim}-wide experts vectors into legs without the model's "
                             f"modalities (got {mods})")
        w = int(latent_dim) // len(mods)
        legs += [Leg(f"expert:{m}", m, j * w, (j + 1) * w) for j, m in enumerate(mods)]
    else:
        blocks = [(str(m), int(w)) for m, w in identity.get("blocks") or []]
        if sum(w for _, w in blocks) != int(latent_dim):
            raise InputError(f"the index's blocks {blocks} do not add up to its width {latent_dim}")
        seen: set[str] = set()
        start = 0
        for m, w in blocks:
            expert = kind == "experts+features" and m not in seen
            seen.add(m)
            legs.append(Leg(f"{'expert' if expert else 'features'}:{m}", m, start, start + w))
            start += w
    if lexical:
        legs.append(Leg(LEXICAL, "report", lexical=True))
    return legs


def index_legs(index, modalities: Sequence[str] | None = None) -> list[Leg]:
    """The legs of a :class:`~mmvae.retrieval.index.CaseIndex` (``modalities``: the model's
    query modalities, default the index identity's ``modalities``)."""
    return legs_of(index.identity, index.latent_dim, modalities, index.lexical is not None)


def reference_rows(case_ids: Sequence[str], size: int = REFERENCE_SIZE) -> np.ndarray:
    """Rows int64 of the reference set (module doc): the ``size`` smallest BLAKE2b hashes."""
    if len(case_ids) <= size:
        return np.arange(len(case_ids), dtype=np.int64)
    h = np.array([int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "big")
                  for c in case_ids], dtype=np.uint64)
    return np.sort(np.argsort(h, kind="stable")[:size]).astype(np.int64)


def zscore(scores: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(scores − μ)/σ`` float32 with μ, σ over the finite values of ``ref``; NaN → 0; all 0
    when σ is 0 or fewer than 2 reference values are finite. ``scores`` ``(..., n)``."""
    r = np.asarray(ref, np.float64)
    r = r[np.isfinite(r)]
    s = np.asarray(scores, np.float64)
    if len(r) < 2 or float(r.std()) < 1e-9:
        return np.zeros(s.shape, np.float32)
    z = (s - r.mean()) / r.std()
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


class LegScorer:
    """Raw scores of the legs of one index: each dense block's row norms (cached per index
    version; the blocks themselves are read from the index's stored means), the reference rows,
    and the BM25 leg."""

    def __init__(self, index, legs: Sequence[Leg]):
        self.index, self.legs = index, list(legs)
        self._version = None

    def _refresh(self) -> None:
        ix = self.index
        if self._version == ix.version:
            return
        self.norm, self.has = {}, {}
        for leg in self.legs:
            if leg.lexical:
                self.has[leg.name] = ix.lexical.has_text()
                continue
            n = np.linalg.norm(np.asarray(ix._mu[:, leg.start:leg.stop], np.float32), axis=1)
            self.has[leg.name] = n > 1e-12
            self.norm[leg.name] = np.maximum(n, 1e-12)
        self.ref = reference_rows(ix._case_ids)
        self._version = ix.version

    def scores(self, leg: Leg, q: np.ndarray | None = None, tokens: Sequence[str] | None = None) -> np.ndarray:
        """float32 ``(N,)`` scores of every case for the query (dense: its vector ``q (D,)``;
        lexical: its ``tokens``); NaN for cases without the leg."""
        self._refresh()
        if leg.lexical:
            s = self.index.lexical.scores(tokens or [])
        else:
            qb = np.asarray(q, np.float32)[leg.start:leg.stop]
            nq = float(np.linalg.norm(qb))
            if nq <= 1e-12:
                return np.full(self.index.size, np.nan, np.float32)
            s = (np.asarray(self.index._mu, np.float32)[:, leg.start:leg.stop] @ (qb / nq)) / self.norm[leg.name]
        return np.where(self.has[leg.name], s, np.nan).astype(np.float32)
