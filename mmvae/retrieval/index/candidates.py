"""The first pass of a search: per query, the best allowed rows by what faiss holds.

Filters and exclusions (``search(..., filter=, exclude=)``) are applied inside faiss: an
``IDSelectorBitmap`` of the allowed ids in ``SearchParameters`` (``SearchParametersIVF``
/ ``SearchParametersHNSW`` with ``nprobe`` / ``efSearch``), one faiss call per distinct
allowed set. ``flat``, ``ivf``, ``ivfpq``, ``hnsw`` and ``binary`` (faiss ≥ 1.15) honour
selectors; with an older faiss, a filtered ``binary`` search ranks the allowed cases
exactly, as does an ``hnsw`` search that leaves at most ``max(ef_search, k)`` cases.

The functions take the :class:`~mmvae.retrieval.index.CaseIndex` searched (its faiss
index, backend, rows ↔ faiss ids) and call its ``_faiss_search``.
"""
from __future__ import annotations

import faiss
import numpy as np

from mmvae.retrieval.index.rerank import exact_scores


def faiss_search(index, x: np.ndarray, k: int, params) -> np.ndarray:
    """faiss ids int64 ``(len(x), k)`` of the queries ``x`` (faiss input), -1 where fewer
    than ``k`` vectors qualify; ``params``: faiss SearchParameters or None."""
    # One query: OpenMP's fork/join costs more than it saves (100k flat, 2 cores:
    # ~1 ms on one thread vs ~3 ms on two idle, 2 vs 6-16 ms with a training job running).
    threads = faiss.omp_get_max_threads()
    one_thread = len(x) == 1 and threads > 1
    if one_thread:
        faiss.omp_set_num_threads(1)
    try:
        if params is None:
            return index.search(x, k)[1]
        return index.search(x, k, params=params)[1]
    finally:
        if one_thread:
            faiss.omp_set_num_threads(threads)


def exact_fallback(ix, q: np.ndarray, need: int, allowed: np.ndarray, dims=None) -> np.ndarray:
    """The best ``need`` allowed rows (``allowed``: bool ``(N,)``) for the query mean
    ``q (L,)``, ranked exactly (on ``dims`` when given): for kinds without selector
    support, or an HNSW walk that came up short."""
    rows = np.nonzero(allowed)[0]
    s = exact_scores(ix._mu, rows, q, ix.metric, dims)
    return rows[np.argsort(-s, kind="stable")[:need]]


def _groups(excl: list[np.ndarray], allowed_base: np.ndarray) -> dict:
    """Queries by allowed set: ``{key: (excluded allowed rows, [query indices])}``."""
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for qi, e in enumerate(excl):
        e = np.unique(e[allowed_base[e]])
        groups.setdefault(e.tobytes(), (e, []))[1].append(qi)
    return groups


def first_pass(ix, x: np.ndarray, qmu: np.ndarray, need: np.ndarray, allowed_base: np.ndarray,
               excl: list[np.ndarray], dims=None) -> list[np.ndarray]:
    """Per query, the first ``need[i]`` allowed rows (int64) in first-pass order.

    Args: ``x`` the faiss input of the queries ``(Q, ·)``; ``qmu (Q, L)`` their means;
    ``need (Q,)`` int64; ``allowed_base (N,)`` bool (the filter); ``excl`` per query its
    excluded rows; ``dims`` the optional 0/1 ``(L,)`` mask of exact fallbacks.

    Queries with the same allowed set (filter minus their exclusions) share one faiss
    search whose ``IDSelectorBitmap`` admits only the allowed ids (and never an HNSW
    tombstone), so faiss itself returns only allowed rows: flat and binary return
    ``need`` of them in one call; IVF probes more lists and HNSW widens efSearch for
    queries that came back short (the backend's ``search_params``). Kinds whose faiss
    index ignores selectors (``IndexBinaryFlat`` before faiss 1.15) rank the allowed
    rows exactly.
    """
    out: list[np.ndarray | None] = [None] * x.shape[0]
    base_bits = None
    for e, members in _groups(excl, allowed_base).values():
        allowed = allowed_base.copy()
        allowed[e] = False
        n_allowed, k = int(allowed_base.sum()) - len(e), int(need[members].max())
        sel = None
        if n_allowed < ix.ntotal:          # a filter, exclusions or tombstones
            if ix.backend.exact_when_filtered(ix.params, n_allowed, k):
                for qi in members:
                    out[qi] = exact_fallback(ix, qmu[qi], need[qi], allowed, dims)
                continue
            if base_bits is None:                # allowed_base over the faiss ids
                base_bits = np.zeros(len(ix._id2row), dtype=bool)
                base_bits[ix._ids[allowed_base]] = True
            bits = base_bits.copy()
            bits[ix._ids[e]] = False
            sel = faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))
        _widening(ix, x, qmu, need, members, sel, k, n_allowed, allowed, dims, out)
    return out  # type: ignore[return-value]


def _widening(ix, x, qmu, need, members, sel, k: int, n_allowed: int, allowed, dims, out) -> None:
    """Search ``members`` (query indices) in rounds, each scanning 4× more, until every
    one has ``need`` allowed rows (set in ``out``) or the round is final (then exactly).
    A filter keeping a fraction f of the vectors multiplies nprobe / efSearch by 1/f,
    so about as many allowed vectors are scanned as an unfiltered search scans."""
    pending, it = np.array(members, dtype=np.int64), 0
    while len(pending):
        scale = 4 ** it * ix.ntotal / max(n_allowed, 1)
        params, final = ix.backend.search_params(ix._index, ix.params, sel, k, scale)
        labels = ix._faiss_search(x[pending], k, params)
        still = []
        for j, qi in enumerate(pending):
            ids = labels[j]
            rows = ix._id2row[ids[ids >= 0]]
            if len(rows) >= need[qi]:
                out[qi] = rows[: need[qi]]
            elif final:
                out[qi] = exact_fallback(ix, qmu[qi], need[qi], allowed, dims)
            else:
                still.append(qi)
        pending = np.array(still, dtype=np.int64)
        it += 1

