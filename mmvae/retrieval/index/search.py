"""A search, step by step: argument checks → allowed rows (filter, exclude) → how many
first-pass candidates each query needs → the first pass (:mod:`.candidates`) → exact
and posterior scoring (:mod:`.rerank`) → :class:`Result` rows."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from mmvae.errors import InputError
from mmvae.retrieval.index.candidates import first_pass
from mmvae.retrieval.index.filters import exclude_rows, filter_mask
from mmvae.retrieval.index.inputs import as_matrix, check_k
from mmvae.retrieval.index.rerank import RERANKS, top_k


@dataclasses.dataclass
class Result:
    """One retrieved case. ``rank`` starts at 1; ``score``: higher = more similar."""

    rank: int
    case_id: str
    score: float
    modalities: list[str]
    labels: Any


def _check_query(query_mu, k, query_logvar, rerank, rerank_factor, L: int):
    """``(k, qmu (Q, L) float32, qlv (Q, L) float32 or None)``; InputError for bad arguments."""
    k = check_k(k)
    if isinstance(rerank_factor, bool) or not isinstance(rerank_factor, (int, np.integer)) \
            or rerank_factor < 1:
        raise InputError(f"rerank_factor must be an integer ≥ 1 (got {rerank_factor!r})")
    if rerank not in RERANKS:
        raise InputError(f"rerank must be one of {list(RERANKS)} (got {rerank!r})")
    qmu = as_matrix(query_mu, "query_mu", L)
    qlv = None
    if rerank is not None:
        if query_logvar is None:
            raise InputError(f"rerank={rerank!r} needs query_logvar")
        qlv = as_matrix(query_logvar, "query_logvar", L)
        if qlv.shape != qmu.shape:
            raise InputError(f"query_logvar has shape {qlv.shape}, query_mu {qmu.shape}")
    return k, qmu, qlv


def _available(allowed: np.ndarray, excl: list[np.ndarray], k: int, size: int, narrowed: bool) -> np.ndarray:
    """Cases each query may return ``(Q,)``; InputError when ``k`` exceeds the fewest."""
    counts = np.array([int(allowed.sum()) - int(allowed[e].sum()) for e in excl])
    if k > counts.min():
        what = "the index"
        if narrowed:
            what += " after filter/exclude"
        raise InputError(f"k={k} is larger than {what} ({int(counts.min())} of "
                         f"{size} cases available)")
    return counts


def _check_dims(dims, L: int) -> np.ndarray | None:
    """The 0/1 mask as float64 ``(L,)``, None when absent or all ones."""
    if dims is None:
        return None
    dims = np.asarray(dims, np.float64).reshape(-1)
    if dims.shape != (L,):
        raise InputError(f"dims has {dims.shape[0]} entries, the index's latent size is {L}")
    return None if np.all(dims > 0) else dims


def _need(ix, k: int, counts: np.ndarray, rerank, rerank_factor: int, dims) -> np.ndarray:
    """First-pass candidates per query (int64 ``(Q,)``): ``k``, or ``rerank_factor·k``
    (× ``⌈L/|dims|⌉`` with a mask) when they are re-scored, at most what is available;
    every available case for a masked search of an exhaustive kind (``flat``: scored
    exactly)."""
    widen = ix.backend.approximate or rerank is not None or dims is not None
    factor = rerank_factor * (int(np.ceil(ix.latent_dim / max(1.0, float((dims > 0).sum()))))
                              if dims is not None else 1)
    need = np.minimum(factor * k, counts) if widen else np.full(len(counts), k)
    if dims is not None and ix.backend.exhaustive:
        need = counts                        # exact: every allowed case is scored on dims
    return need.astype(np.int64)


def _result(ix, rank: int, row: int, score: float) -> Result:
    m = ix._meta[row]
    return Result(rank=rank, case_id=ix._case_ids[row], score=float(score),
                  modalities=list(m["modalities"]), labels=copy.deepcopy(m["labels"]))


def search(ix, query_mu, k, *, query_logvar=None, filter=None, exclude=None,  # noqa: A002
           rerank=None, rerank_factor=4, dims=None) -> list[list[Result]]:
    """:meth:`~mmvae.retrieval.index.CaseIndex.search` of ``ix`` (arguments there)."""
    k, qmu, qlv = _check_query(query_mu, k, query_logvar, rerank, rerank_factor, ix.latent_dim)
    Q = qmu.shape[0]
    if Q == 0:
        return []
    allowed = filter_mask(filter, ix._case_ids, ix._meta)
    excl = exclude_rows(exclude, ix._row_of_case, Q)
    counts = _available(allowed, excl, k, ix.size, filter is not None or exclude is not None)
    dims = _check_dims(dims, ix.latent_dim)
    need = _need(ix, k, counts, rerank, rerank_factor, dims)
    cands = first_pass(ix, ix._faiss_input(qmu), qmu, need, allowed, excl, dims)
    results = []
    for qi in range(Q):
        rows, scores = top_k(cands[qi], k, qmu[qi], None if qlv is None else qlv[qi],
                             ix._mu, ix._logvar, ix.metric, rerank, dims)
        results.append([_result(ix, rank, int(r), s) for rank, (r, s) in enumerate(zip(rows, scores), start=1)])
    return results
