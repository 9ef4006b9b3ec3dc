"""A FAISS index of case embeddings (diagonal Gaussian posteriors), stored as a folder.

Kinds (``kind=``)
-----------------
``flat``    exact search, ``IndexIDMap2(IndexFlat)``.
``ivf``     ``IndexIVFFlat`` (inverted lists, exact vectors), ids stored by the IVF.
``ivfpq``   ``IndexIVFPQ`` (``m_pq`` sub-quantizers of 8 bits); candidates are re-scored
            exactly with the stored float means.
``hnsw``    ``IndexIDMap2(IndexHNSWFlat)`` graph. HNSW cannot delete vectors, so a removed
            case becomes a *tombstone*: its vector stays in the graph and is skipped.
``binary``  hash codes = signs of ``P (x − c)`` where ``x`` is the (normalised, for
            cosine) mean, ``c`` the mean of the build vectors and ``P`` a random
            orthogonal projection (seeded; stacked orthogonal blocks when ``nbits > L``)
            or the identity (``binary_projection='none'``), ``nbits`` = L rounded up to a
            multiple of 8 by default; searched by Hamming distance in
            ``IndexBinaryIDMap2(IndexBinaryFlat)`` for a first pass of
            ``rerank_factor·k`` candidates that are then re-ranked exactly with the
            stored float means.

Metric (``metric=``): ``cosine`` = inner product of L2-normalised means, ``l2`` = squared
L2 distance between means. Every :class:`Result` score is *higher = more similar*:
the cosine similarity, or minus the squared L2 distance, computed exactly from the
stored means (float64), whatever the kind.

Filters and exclusions (``search(..., filter=, exclude=)``) are applied inside faiss: an
``IDSelectorBitmap`` of the allowed ids in ``SearchParameters`` (``SearchParametersIVF``
/ ``SearchParametersHNSW`` with ``nprobe`` / ``efSearch``), one faiss call per distinct
allowed set. ``flat``, ``ivf``, ``ivfpq``, ``hnsw`` and ``binary`` (faiss ≥ 1.15) honour
selectors; with an older faiss, a filtered ``binary`` search ranks the allowed cases
exactly, as does an ``hnsw`` search that leaves at most ``max(ef_search, k)`` cases.

Posterior-aware re-ranking (``search(..., rerank=...)``) re-scores the best
``rerank_factor·k`` candidates (by the metric) with the query posterior
``N(μq, diag σq²)`` and each candidate's ``N(μd, diag σd²)`` in raw latent space:

* ``'bhattacharyya'``: score = −D_B with, for ``s_j = (σq_j² + σd_j²)/2``,
  ``D_B = 1/8 Σ_j (μq_j − μd_j)² / s_j + 1/2 Σ_j [ln s_j − (ln σq_j² + ln σd_j²)/2]``.
* ``'expected_likelihood'``: score = ``log ∫ N(z; μq, Σq) N(z; μd, Σd) dz
  = log N(μq; μd, Σq + Σd) = −1/2 Σ_j [ln(2π v_j) + (μq_j − μd_j)² / v_j]``,
  ``v_j = σq_j² + σd_j²``.

Log-variances are clipped to [-30, 30] for these computations.

Folder layout (written by :meth:`CaseIndex.save`, atomically; no pickle anywhere):

``index.faiss``        the faiss index (``faiss.serialize_index`` / ``_binary``).
``embeddings.npy``     float32 ``(2, N, L)``: ``[0]`` posterior means, ``[1]`` log-variances,
                       rows in ``metadata.jsonl`` order.
``metadata.jsonl``     one JSON object per case: ``id`` (faiss int64 id), ``case_id``,
                       ``modalities``, ``labels`` (+ ``report`` only when the index was
                       built with ``include_text=True``).
``binary_hash.npy``    (``binary`` only) float32 ``(nbits + 1, L)``: projection rows,
                       then the centre.
``index.json``         format, version, kind, metric, latent_dim, counts, next id,
                       parameters, identity and the sha256 of every other file.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from mmvae.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_text
from mmvae.errors import IndexError_, InputError
from mmvae.data.cache import source_hash   # SHA-256 of a file's bytes

log = logging.getLogger(__name__)

__all__ = ["Result", "CaseIndex", "build_index", "load_index", "KINDS", "METRICS",
           "RERANKS", "FORMAT_VERSION", "default_nlist", "default_nprobe", "default_m_pq"]

FORMAT = "mmvae-case-index"
FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "ivfpq", "hnsw", "binary")
METRICS = ("cosine", "l2")
RERANKS = (None, "bhattacharyya", "expected_likelihood")
FILTER_KEYS = ("has", "has_any", "lacks", "labels")
_LOGVAR_CLIP = 30.0


@dataclasses.dataclass
class Result:
    """One retrieved case. ``rank`` starts at 1; ``score``: higher = more similar."""

    rank: int
    case_id: str
    score: float
    modalities: list[str]
    labels: Any


# --------------------------------------------------------------------------- defaults
def default_nlist(n: int) -> int:
    """IVF lists: ≈ 4·sqrt(N), at most N/39 (faiss wants ≥ 39 training points per list), ≥ 1."""
    return int(max(1, min(round(4.0 * math.sqrt(max(n, 1))), n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: ≈ 2·sqrt(nlist), at least 8, at most nlist."""
    return int(max(1, min(nlist, max(8, round(2.0 * math.sqrt(nlist))))))


def default_m_pq(latent_dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of L that is ≤ min(32, L/2) (2+ dims each)."""
    cap = max(1, min(32, latent_dim // 2))
    return max(m for m in range(1, cap + 1) if latent_dim % m == 0)


# --------------------------------------------------------------------------- helpers
def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _jsonable(x, what: str):
    try:
        return json.loads(json.dumps(x, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON serialisable: {e}") from None


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be an integer ≥ 1 (got {k!r})")
    if int(k) < 1:
        raise InputError(f"k must be ≥ 1 (got {k})")
    return int(k)


def _as_matrix(x, name: str, L: int | None, *, dim_error=IndexError_) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InputError(f"{name} must be a (n, L) array, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if L is not None and a.shape[1] != L:
        raise dim_error(f"{name} has latent dimension {a.shape[1]}, the index has latent dimension {L}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} holds NaN or infinite values")
    return a


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _norm_meta(m, case_id: str, include_text: bool) -> dict:
    if m is None:
        m = {}
    if not isinstance(m, Mapping):
        raise InputError(f"meta must be a dict, got {type(m).__name__}", case_id=case_id)
    mods = m.get("modalities", [])
    if mods is None:
        mods = []
    if isinstance(mods, str):
        mods = [mods]
    mods = [str(x) for x in mods]
    labels = m.get("labels", {})
    out = {"modalities": mods, "labels": _jsonable({} if labels is None else labels,
                                                   f"labels of case {case_id!r}")}
    if include_text and m.get("report") is not None:
        out["report"] = str(m["report"])
    if m.get("source") is not None:      # where the case came from, e.g. its PACS study (mmvae.pacs)
        if not isinstance(m["source"], Mapping):
            raise InputError(f"meta 'source' must be a dict, got {type(m['source']).__name__}", case_id=case_id)
        out["source"] = _jsonable(dict(m["source"]), f"source of case {case_id!r}")
    return out


def _check_case_ids(case_ids, n: int) -> list[str]:
    if isinstance(case_ids, str):
        raise InputError("case_ids must be a list of strings, not one string")
    ids = list(case_ids)
    if len(ids) != n:
        raise InputError(f"got {len(ids)} case ids for {n} embeddings")
    out = []
    for c in ids:
        if isinstance(c, (np.str_,)):
            c = str(c)
        if not isinstance(c, str) or not c:
            raise InputError(f"case ids must be non-empty strings, got {c!r}")
        out.append(c)
    seen: set[str] = set()
    dup = sorted({c for c in out if c in seen or seen.add(c)})
    if dup:
        raise InputError(f"duplicate case id(s) in the input: {', '.join(map(repr, dup[:5]))}")
    return out


def _hash_matrix(L: int, nbits: int, seed: int, projection: str) -> np.ndarray:
    if projection == "none":
        P = np.zeros((nbits, L), np.float64)
        r = min(nbits, L)
        P[np.arange(r), np.arange(r)] = 1.0
        return P.astype(np.float32)
    rng = np.random.default_rng(seed)
    blocks, rows = [], 0
    while rows < nbits:
        q, r = np.linalg.qr(rng.standard_normal((L, L)))
        q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]
        blocks.append(q.T)
        rows += L
    return np.vstack(blocks)[:nbits].astype(np.float32)


def _posterior_scores(mq, lvq, md, lvd, method: str) -> np.ndarray:
    """Scores (higher = more similar) of one query posterior vs rows of candidates."""
    mq = mq.astype(np.float64)[None, :]
    md = md.astype(np.float64)
    lvq = np.clip(lvq.astype(np.float64), -_LOGVAR_CLIP, _LOGVAR_CLIP)[None, :]
    lvd = np.clip(lvd.astype(np.float64), -_LOGVAR_CLIP, _LOGVAR_CLIP)
    d2 = (mq - md) ** 2
    vq, vd = np.exp(lvq), np.exp(lvd)
    if method == "bhattacharyya":
        s = 0.5 * (vq + vd)
        db = 0.125 * (d2 / s).sum(axis=1) + 0.5 * (np.log(s) - 0.5 * (lvq + lvd)).sum(axis=1)
        return -db
    v = vq + vd
    return -0.5 * (np.log(2.0 * np.pi * v) + d2 / v).sum(axis=1)


@functools.cache
def _binary_selectors() -> bool:
    """Whether this faiss filters ``IndexBinaryFlat`` searches with an ``IDSelector``
    (1.15 does; older releases raise "search params not supported for this index")."""
    ix = faiss.IndexBinaryFlat(8)
    ix.add(np.zeros((2, 1), np.uint8))
    try:
        sel = faiss.IDSelectorBatch(np.array([1], np.int64))
        _, i = ix.search(np.zeros((1, 1), np.uint8), 1, params=faiss.SearchParameters(sel=sel))
    except (RuntimeError, TypeError):
        return False
    return int(i[0, 0]) == 1


# --------------------------------------------------------------------------- the index
class CaseIndex:
    """Case embeddings + metadata + a faiss index. Build with :func:`build_index`,
    open with :func:`load_index`. Not thread-safe."""

    def __init__(self, *, kind: str, metric: str, latent_dim: int, identity: dict,
                 params: dict, faiss_index, mu: np.ndarray, logvar: np.ndarray,
                 ids: np.ndarray, case_ids: list[str], meta: list[dict], next_id: int,
                 include_text: bool, hash_proj: np.ndarray | None = None,
                 hash_center: np.ndarray | None = None):
        self.kind = kind
        self.metric = metric
        self.latent_dim = int(latent_dim)
        self.identity = identity
        self.params = params
        self.include_text = bool(include_text)
        self._index = faiss_index
        self._mu = mu
        self._logvar = logvar
        self._ids = np.asarray(ids, dtype=np.int64)
        self._case_ids = list(case_ids)
        self._meta = meta
        self._next_id = int(next_id)
        self._hash_proj = hash_proj
        self._hash_center = hash_center
        self._reindex()

    # ---- bookkeeping
    def _reindex(self) -> None:
        self._row_of_case = {c: i for i, c in enumerate(self._case_ids)}
        self._id2row = np.full(max(self._next_id, 1), -1, dtype=np.int64)
        self._id2row[self._ids] = np.arange(len(self._ids))

    def __len__(self) -> int:
        return len(self._case_ids)

    @property
    def size(self) -> int:
        """Number of (live) cases."""
        return len(self._case_ids)

    @property
    def case_ids(self) -> list[str]:
        return list(self._case_ids)

    @property
    def ntotal(self) -> int:
        """Vectors in the faiss index (includes HNSW tombstones)."""
        return int(self._index.ntotal)

    def __contains__(self, case_id) -> bool:
        return case_id in self._row_of_case

    def embeddings(self, case_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, logvar)`` float32 ``(n, L)`` of the given cases."""
        rows = self._rows_of(case_ids)
        return self._mu[rows].copy(), self._logvar[rows].copy()

    def metadata(self, case_id: str) -> dict:
        """A copy of a case's stored metadata (``case_id``, ``modalities``, ``labels``...)."""
        row = self._rows_of([case_id])[0]
        return {"case_id": case_id, **copy.deepcopy(self._meta[row])}

    def _rows_of(self, case_ids) -> np.ndarray:
        if isinstance(case_ids, str):
            case_ids = [case_ids]
        unknown = [c for c in case_ids if c not in self._row_of_case]
        if unknown:
            raise InputError(f"unknown case id(s) in the index: {', '.join(map(repr, unknown[:5]))}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        return np.array([self._row_of_case[c] for c in case_ids], dtype=np.int64)

    def _faiss_input(self, mu: np.ndarray) -> np.ndarray:
        x = _normalise(mu) if self.metric == "cosine" else np.ascontiguousarray(mu, np.float32)
        if self.kind == "binary":
            bits = (x - self._hash_center[None, :]) @ self._hash_proj.T > 0
            return np.ascontiguousarray(np.packbits(bits, axis=1))
        return x

    def _exact_scores(self, q: np.ndarray, rows: np.ndarray, dims: np.ndarray | None = None) -> np.ndarray:
        """Exact metric scores (float64, higher = better) of one query vs rows, on the
        dimensions ``dims`` (0/1 mask) only when given."""
        d = self._mu[rows].astype(np.float64)
        q = q.astype(np.float64)
        if dims is not None:
            d, q = d * dims, q * dims
        if self.metric == "cosine":
            d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
            q = q / max(float(np.linalg.norm(q)), 1e-12)
            return d @ q
        return -((d - q[None, :]) ** 2).sum(axis=1)

    # ---- search
    def _filter_mask(self, flt) -> np.ndarray:
        n = self.size
        if flt is None:
            return np.ones(n, dtype=bool)
        if callable(flt):
            return np.array([bool(flt({"case_id": c, **m}))
                             for c, m in zip(self._case_ids, self._meta)], dtype=bool)
        if not isinstance(flt, Mapping):
            raise InputError(f"filter must be a callable or a dict, got {type(flt).__name__}")
        bad = [key for key in flt if key not in FILTER_KEYS]
        if bad:
            raise InputError(f"unknown filter key(s) {bad}; supported: {list(FILTER_KEYS)}")

        def as_list(v):
            return [v] if isinstance(v, str) else list(v)

        has = as_list(flt.get("has", []))
        has_any = as_list(flt["has_any"]) if "has_any" in flt else None
        lacks = as_list(flt.get("lacks", []))
        labels = flt.get("labels", {})
        if not isinstance(labels, Mapping):
            raise InputError("filter 'labels' must be a dict label name → value(s)")
        mask = np.zeros(n, dtype=bool)
        for i, m in enumerate(self._meta):
            mods = set(m["modalities"])
            ok = all(x in mods for x in has) and not any(x in mods for x in lacks)
            if ok and has_any is not None:
                ok = any(x in mods for x in has_any)
            if ok and labels:
                lab = m["labels"] if isinstance(m["labels"], Mapping) else {}
                for name, want in labels.items():
                    wants = [want] if isinstance(want, (str, int, float)) else list(want)
                    if name not in lab or lab[name] not in wants:
                        ok = False
                        break
            mask[i] = ok
        return mask

    def _exclude_rows(self, exclude, Q: int) -> list[np.ndarray]:
        empty = np.zeros(0, dtype=np.int64)
        if exclude is None:
            return [empty] * Q
        if isinstance(exclude, str):
            exclude = [exclude]
        exclude = list(exclude)

        def rows(ids):
            return np.unique(np.array([self._row_of_case[c] for c in ids if c in self._row_of_case],
                                      dtype=np.int64))

        if exclude and all(x is None or isinstance(x, (list, tuple, set, frozenset))
                           for x in exclude):
            if len(exclude) != Q:
                raise InputError(f"per-query exclude has {len(exclude)} lists for {Q} queries")
            return [empty if x is None else rows(list(x)) for x in exclude]
        r = rows(exclude)
        return [r] * Q

    def _search_params(self, sel, k: int, it: int, n_allowed: int):
        """faiss search parameters of round ``it`` and whether the round is final
        (queries still short then go to :meth:`_exact_fallback`). A filter keeping a
        fraction f of the vectors multiplies nprobe / efSearch by 1/f (and 4 a round),
        so about as many allowed vectors are scanned as an unfiltered search scans."""
        scale = 4 ** it * self.ntotal / max(n_allowed, 1)
        if self.kind in ("ivf", "ivfpq"):
            nlist = faiss.extract_index_ivf(self._index).nlist
            nprobe = min(nlist, math.ceil(int(self.params["nprobe"]) * scale))
            # all lists probed: every allowed vector is seen, none comes back short
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe), nprobe >= nlist
        if self.kind == "hnsw":   # a graph walk can miss vectors even at efSearch = ntotal
            ef = min(self.ntotal, math.ceil(max(int(self.params["ef_search"]), k) * scale))
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef), ef >= self.ntotal
        return (None if sel is None else faiss.SearchParameters(sel=sel)), True

    def _faiss_search(self, x: np.ndarray, k: int, params) -> np.ndarray:
        """faiss ids ``(len(x), k)``, -1 where fewer than ``k`` vectors qualify."""
        # One query: OpenMP's fork/join costs more than it saves (100k flat, 2 cores:
        # ~1 ms on one thread vs ~3 ms on two idle, 2 vs 6-16 ms with a training job running).
        threads = faiss.omp_get_max_threads()
        one_thread = len(x) == 1 and threads > 1
        if one_thread:
            faiss.omp_set_num_threads(1)
        try:
            if params is None:
                return self._index.search(x, k)[1]
            return self._index.search(x, k, params=params)[1]
        finally:
            if one_thread:
                faiss.omp_set_num_threads(threads)

    def _candidates(self, x: np.ndarray, qmu: np.ndarray, need: np.ndarray,
                    allowed_base: np.ndarray, excl: list[np.ndarray], dims=None) -> list[np.ndarray]:
        """Per query, the first ``need[i]`` allowed rows in first-pass order.

        Queries with the same allowed set (filter minus their exclusions) share one
        faiss search whose ``IDSelectorBitmap`` admits only the allowed ids (and never
        an HNSW tombstone), so faiss itself returns only allowed rows: flat and binary
        return ``need`` of them in one call; IVF probes more lists and HNSW widens
        efSearch for queries that came back short (:meth:`_search_params`). Kinds whose
        faiss index ignores selectors (``IndexBinaryFlat`` before faiss 1.15) rank the
        allowed rows exactly.
        """
        out: list[np.ndarray | None] = [None] * x.shape[0]
        groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
        for qi, e in enumerate(excl):
            e = np.unique(e[allowed_base[e]])
            groups.setdefault(e.tobytes(), (e, []))[1].append(qi)
        base_bits = None
        for e, members in groups.values():
            allowed = allowed_base.copy()
            allowed[e] = False
            n_allowed, k = int(allowed_base.sum()) - len(e), int(need[members].max())
            sel = None
            if n_allowed < self.ntotal:          # a filter, exclusions or tombstones
                # exact instead when faiss cannot filter this kind, or when so few rows
                # are allowed that an HNSW walk would need efSearch ≥ ntotal
                if (self.kind == "binary" and not _binary_selectors()) or (
                        self.kind == "hnsw" and n_allowed <= max(int(self.params["ef_search"]), k)):
                    for qi in members:
                        out[qi] = self._exact_fallback(qmu[qi], need[qi], allowed, dims)
                    continue
                if base_bits is None:                # allowed_base over the faiss ids
                    base_bits = np.zeros(len(self._id2row), dtype=bool)
                    base_bits[self._ids[allowed_base]] = True
                bits = base_bits.copy()
                bits[self._ids[e]] = False
                sel = faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))
            pending, it = np.array(members, dtype=np.int64), 0
            while len(pending):
                params, final = self._search_params(sel, k, it, n_allowed)
                labels = self._faiss_search(x[pending], k, params)
                still = []
                for j, qi in enumerate(pending):
                    ids = labels[j]
                    rows = self._id2row[ids[ids >= 0]]
                    if len(rows) >= need[qi]:
                        out[qi] = rows[: need[qi]]
                    elif final:
                        out[qi] = self._exact_fallback(qmu[qi], need[qi], allowed, dims)
                    else:
                        still.append(qi)
                pending = np.array(still, dtype=np.int64)
                it += 1
        return out  # type: ignore[return-value]

    def _exact_fallback(self, q, need, allowed, dims=None) -> np.ndarray:
        """Rank all allowed rows exactly (no selector support, or an HNSW walk came up short),
        on ``dims`` when given."""
        rows = np.nonzero(allowed)[0]
        s = self._exact_scores(q, rows, dims)
        return rows[np.argsort(-s, kind="stable")[:need]]

    def search(self, query_mu, k: int, *, query_logvar=None,
               filter: Callable[[dict], bool] | Mapping | None = None,  # noqa: A002
               exclude: Sequence | None = None, rerank: str | None = None,
               rerank_factor: int = 4, dims=None) -> list[list[Result]]:
        """Top-``k`` cases for each query.

        Args:
          query_mu: ``(Q, L)`` (or ``(L,)``) query posterior means.
          k: results per query, ≥ 1 and ≤ the number of cases left after
            ``filter``/``exclude`` (else :class:`InputError`).
          query_logvar: ``(Q, L)`` query log-variances; required by ``rerank``.
          filter: ``callable(meta) -> bool`` on ``{'case_id', 'modalities', 'labels',
            ...}``, or a dict with keys ``has`` (modality or list: all present),
            ``has_any`` (list: one present), ``lacks`` (modality or list: none present),
            ``labels`` (``{name: value or list of values}``), e.g. ``{'has': 'dwi'}``.
          exclude: case ids never returned (unknown ids are ignored), or one list per
            query (``[[...], [...]]``) e.g. for leave-one-out.
          rerank: None, ``'bhattacharyya'`` or ``'expected_likelihood'`` (module doc).
          rerank_factor: candidates re-scored = ``rerank_factor·k`` (posterior
            re-ranking, and the exact re-scoring of ``ivfpq``/``binary`` codes).
          dims: optional 0/1 ``(L,)`` mask: score on these dimensions only (a query that
            informs part of the vector: some modalities' private blocks, or the experts
            blocks of the modalities it has: :func:`mmvae.retrieval.embed.query_dims`).
            ``flat`` then scores every allowed case exactly; the other kinds re-score
            ``rerank_factor·k·⌈L/|dims|⌉`` first-pass candidates (the first pass sees the
            whole vector, whose norm the masked-out blocks change, so a query that informs
            a fifth of the vector gets five times the candidates).

        Returns:
          one list of :class:`Result` per query, best first.
        """
        k = _check_k(k)
        if isinstance(rerank_factor, bool) or not isinstance(rerank_factor, (int, np.integer)) \
                or rerank_factor < 1:
            raise InputError(f"rerank_factor must be an integer ≥ 1 (got {rerank_factor!r})")
        if rerank not in RERANKS:
            raise InputError(f"rerank must be one of {list(RERANKS)} (got {rerank!r})")
        qmu = _as_matrix(query_mu, "query_mu", self.latent_dim)
        Q = qmu.shape[0]
        qlv = None
        if rerank is not None:
            if query_logvar is None:
                raise InputError(f"rerank={rerank!r} needs query_logvar")
            qlv = _as_matrix(query_logvar, "query_logvar", self.latent_dim)
            if qlv.shape != qmu.shape:
                raise InputError(f"query_logvar has shape {qlv.shape}, query_mu {qmu.shape}")
        if Q == 0:
            return []
        allowed = self._filter_mask(filter)
        excl = self._exclude_rows(exclude, Q)
        counts = np.array([int(allowed.sum()) - int(allowed[e].sum()) for e in excl])
        if k > counts.min():
            what = "the index"
            if filter is not None or exclude is not None:
                what += " after filter/exclude"
            raise InputError(f"k={k} is larger than {what} ({int(counts.min())} of "
                             f"{self.size} cases available)")
        if dims is not None:
            dims = np.asarray(dims, np.float64).reshape(-1)
            if dims.shape != (self.latent_dim,):
                raise InputError(f"dims has {dims.shape[0]} entries, the index's latent size is {self.latent_dim}")
            if np.all(dims > 0):
                dims = None
        widen = self.kind in ("ivfpq", "binary") or rerank is not None or dims is not None
        factor = rerank_factor * (int(np.ceil(self.latent_dim / max(1.0, float((dims > 0).sum()))))
                                  if dims is not None else 1)
        need = np.minimum(factor * k, counts) if widen else np.full(Q, k)
        if dims is not None and self.kind == "flat":
            need = counts                        # exact: every allowed case is scored on dims
        x = self._faiss_input(qmu)
        cands = self._candidates(x, qmu, need.astype(np.int64), allowed, excl, dims)

        results: list[list[Result]] = []
        for qi in range(Q):
            rows = cands[qi]
            scores = self._exact_scores(qmu[qi], rows, dims)
            if rerank is not None:
                top = np.argsort(-scores, kind="stable")
                rows = rows[top]
                keep = slice(None) if dims is None else dims > 0      # the dimensions the query informs
                scores = _posterior_scores(qmu[qi][keep], qlv[qi][keep], self._mu[rows][:, keep],
                                           self._logvar[rows][:, keep], rerank)
            order = np.argsort(-scores, kind="stable")[:k]
            res = []
            for rank, o in enumerate(order, start=1):
                r = int(rows[o])
                m = self._meta[r]
                res.append(Result(rank=rank, case_id=self._case_ids[r], score=float(scores[o]),
                                  modalities=list(m["modalities"]),
                                  labels=copy.deepcopy(m["labels"])))
            results.append(res)
        return results

    # ---- mutation
    def add(self, mu, logvar, case_ids: Sequence[str], meta: Sequence[dict] | None = None) -> None:
        """Add cases without rebuilding (IVF kinds use the trained quantizer).

        Raises InputError for a case id already in the index (nothing is added) and
        IndexError_ for a latent dimension that differs from the index's.
        """
        mu = _as_matrix(mu, "mu", self.latent_dim)
        logvar = _as_matrix(logvar, "logvar", self.latent_dim)
        if logvar.shape != mu.shape:
            raise InputError(f"logvar has shape {logvar.shape}, mu {mu.shape}")
        ids_in = _check_case_ids(case_ids, mu.shape[0])
        dup = [c for c in ids_in if c in self._row_of_case]
        if dup:
            raise InputError(f"case id(s) already in the index: {', '.join(map(repr, dup[:5]))}")
        if meta is None:
            meta = [None] * len(ids_in)
        meta = list(meta)
        if len(meta) != len(ids_in):
            raise InputError(f"got {len(meta)} metadata entries for {len(ids_in)} cases")
        new_meta = [_norm_meta(m, c, self.include_text) for m, c in zip(meta, ids_in)]
        if not ids_in:
            return
        new_ids = np.arange(self._next_id, self._next_id + len(ids_in), dtype=np.int64)
        self._index.add_with_ids(self._faiss_input(mu), new_ids)
        self._mu = np.concatenate([self._mu, mu]).astype(np.float32)
        self._logvar = np.concatenate([self._logvar, logvar]).astype(np.float32)
        self._ids = np.concatenate([self._ids, new_ids])
        self._case_ids += ids_in
        self._meta += new_meta
        self._next_id += len(ids_in)
        self._reindex()

    def remove(self, case_ids: Sequence[str]) -> None:
        """Remove cases without rebuilding; an unknown case id raises (nothing removed)."""
        if isinstance(case_ids, str):
            case_ids = [case_ids]
        case_ids = list(case_ids)
        if len(set(case_ids)) != len(case_ids):
            raise InputError("remove: duplicate case ids in the request")
        rows = self._rows_of(case_ids)
        if not len(rows):
            return
        ids = self._ids[rows]
        if self.kind != "hnsw":  # HNSW cannot delete: the ids become tombstones
            n = self._index.remove_ids(faiss.IDSelectorBatch(ids))
            if n != len(ids):
                raise IndexError_(f"faiss removed {n} of {len(ids)} vectors; the index is inconsistent")
        keep = np.ones(self.size, dtype=bool)
        keep[rows] = False
        self._mu = self._mu[keep]
        self._logvar = self._logvar[keep]
        self._ids = self._ids[keep]
        self._case_ids = [c for c, kp in zip(self._case_ids, keep) if kp]
        self._meta = [m for m, kp in zip(self._meta, keep) if kp]
        self._reindex()

    # ---- identity
    def check_identity(self, expect: Mapping | None) -> None:
        """Raise IndexError_ when ``expect`` (e.g. the current model's identity) differs
        from the identity the index was built with (keys of ``expect`` are compared;
        ``latent_dim`` against the index's latent size)."""
        if not expect:
            return
        exp = _jsonable(dict(expect), "expect_identity")
        diffs = []
        for key, want in exp.items():
            have = self.latent_dim if key == "latent_dim" else self.identity.get(key, "<missing>")
            if key == "latent_dim":
                try:
                    same = int(want) == self.latent_dim
                except (TypeError, ValueError):
                    same = False
            else:
                same = have == want
            if not same:
                diffs.append(f"{key}: {have!r} vs {want!r}")
        if diffs:
            def name(d):
                for key in ("model", "model_fingerprint", "fingerprint", "name"):
                    if key in d:
                        return repr(d[key])
                return "<unnamed>"
            raise IndexError_(
                f"index was built with model {name(self.identity)} latent {self.latent_dim}, "
                f"this model has {name(exp)} latent {exp.get('latent_dim', '?')} "
                f"(differs in {'; '.join(diffs)})")

    # ---- persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder so that a kill at any point leaves a complete index.

        Everything goes into a hidden temporary sibling (``.<name>.tmp-*``, ``index.json``
        written last); then the old folder (if any) is renamed aside (``.<name>.old-*``),
        the new one renamed in and the old one deleted. On an exception the old folder is
        put back. After a SIGKILL between the two renames :func:`load_index` reads the
        ``.old-*`` folder (the last complete index) and the next save puts it back first;
        ``.tmp-*`` folders left by a killed writer are deleted by the next save. One
        writer at a time. Refuses to replace a non-empty folder that is not an index
        (has no ``index.json``).
        """
        folder = Path(folder)
        recover_interrupted_save(folder)
        if folder.exists():
            if not folder.is_dir():
                raise InputError("index destination exists and is not a folder", path=str(folder))
            if any(folder.iterdir()) and not (folder / "index.json").is_file():
                raise InputError("refusing to replace a non-empty folder that is not an index",
                                 path=str(folder))
        parent = folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
        try:
            self._write_files(tmp)
            old = None
            if folder.exists():
                old = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                if old is not None:
                    os.rename(old, folder)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _write_files(self, d: Path) -> None:
        files: dict[str, str] = {}
        if self.kind == "binary":
            blob = faiss.serialize_index_binary(self._index)
        else:
            blob = faiss.serialize_index(self._index)
        atomic_write_bytes(d / "index.faiss", np.asarray(blob).tobytes())
        atomic_save_npy(d / "embeddings.npy",
                        np.stack([self._mu, self._logvar]).astype(np.float32))
        if self.kind == "binary":
            atomic_save_npy(d / "binary_hash.npy",
                            np.vstack([self._hash_proj, self._hash_center[None, :]]).astype(np.float32))
        lines = []
        for i, c, m in zip(self._ids, self._case_ids, self._meta):
            rec = {"id": int(i), "case_id": c, "modalities": m["modalities"], "labels": m["labels"]}
            if self.include_text and "report" in m:
                rec["report"] = m["report"]
            if "source" in m:
                rec["source"] = m["source"]
            lines.append(json.dumps(rec, ensure_ascii=False))
        atomic_write_text(d / "metadata.jsonl", "".join(x + "\n" for x in lines))
        for name in sorted(p.name for p in d.iterdir() if not p.name.startswith(".")):
            files[name] = source_hash(d / name)
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "latent_dim": self.latent_dim,
            "count": self.size,
            "faiss_ntotal": self.ntotal,
            "tombstones": self.ntotal - self.size,
            "next_id": self._next_id,
            "include_text": self.include_text,
            "params": self.params,
            "identity": self.identity,
            "files": files,
        }
        atomic_write_text(d / "index.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- build
def build_index(mu, logvar, case_ids: Sequence[str], meta: Sequence[dict] | None = None, *,
                kind: str = "flat", metric: str = "cosine", identity: Mapping | None = None,
                nlist: int | None = None, m_pq: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64,
                nbits: int | None = None, binary_projection: str = "random",
                seed: int = 0, include_text: bool = False) -> CaseIndex:
    """Build a :class:`CaseIndex` (see the module docstring for the kinds).

    Args:
      mu, logvar: ``(N, L)`` posterior means and log-variances (finite).
      case_ids: ``N`` unique non-empty strings.
      meta: ``N`` dicts with ``modalities`` (list of names) and ``labels`` (any
        JSON value, usually ``{name: value}``), optionally ``report`` (kept only when
        ``include_text``); None = no metadata.
      identity: model/checkpoint/config identity (JSON-able); ``latent_dim`` is
        filled in (and must equal L when given). Built from embeddings, it carries their
        ``weights_digest`` (the parameters that computed the vectors), which
        :meth:`mmvae.retrieval.query.Retriever.load` compares with the run's.
      nlist: IVF lists (default :func:`default_nlist`); nprobe: lists probed
        (default :func:`default_nprobe`); m_pq: PQ sub-quantizers, must divide L
        (default :func:`default_m_pq`); hnsw_m / ef_construction / ef_search: HNSW
        graph degree and beam widths; nbits: binary code length, a multiple of 8
        (default L rounded up to a multiple of 8); binary_projection: ``'random'``
        (seeded orthogonal) or ``'none'`` (signs of the centred means).
      seed: seeds k-means (IVF/PQ) and the binary projection.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {list(KINDS)} (got {kind!r})")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {list(METRICS)} (got {metric!r})")
    mu = _as_matrix(mu, "mu", None)
    N, L = mu.shape
    if N < 1 or L < 1:
        raise InputError(f"need at least one case with L ≥ 1 (got mu of shape {mu.shape})")
    logvar = _as_matrix(logvar, "logvar", None)
    if logvar.shape != mu.shape:
        raise InputError(f"logvar has shape {logvar.shape}, mu {mu.shape}")
    cids = _check_case_ids(case_ids, N)
    if meta is None:
        meta = [None] * N
    meta = list(meta)
    if len(meta) != N:
        raise InputError(f"got {len(meta)} metadata entries for {N} cases")
    metas = [_norm_meta(m, c, include_text) for m, c in zip(meta, cids)]
    ident = _jsonable(dict(identity or {}), "identity")
    if "latent_dim" in ident and ident["latent_dim"] != L:
        raise InputError(f"identity says latent_dim={ident['latent_dim']} but mu has {L} columns")
    ident["latent_dim"] = L

    params: dict[str, Any] = {"seed": int(seed)}
    fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    hash_proj = hash_center = None
    x = _normalise(mu) if metric == "cosine" else mu
    if kind == "flat":
        index = faiss.index_factory(L, "IDMap2,Flat", fm)
    elif kind == "hnsw":
        if hnsw_m < 2:
            raise InputError(f"hnsw_m must be ≥ 2 (got {hnsw_m})")
        index = faiss.index_factory(L, f"IDMap2,HNSW{int(hnsw_m)}", fm)
        h = faiss.downcast_index(index.index)
        h.hnsw.efConstruction = int(ef_construction)
        h.hnsw.efSearch = int(ef_search)
        params.update(hnsw_m=int(hnsw_m), ef_construction=int(ef_construction),
                      ef_search=int(ef_search))
    elif kind in ("ivf", "ivfpq"):
        nl = default_nlist(N) if nlist is None else int(nlist)
        if not 1 <= nl <= N:
            raise InputError(f"nlist must be in [1, N={N}] (got {nlist})")
        npb = default_nprobe(nl) if nprobe is None else int(nprobe)
        if not 1 <= npb:
            raise InputError(f"nprobe must be ≥ 1 (got {nprobe})")
        npb = min(npb, nl)
        if kind == "ivf":
            ivf = faiss.index_factory(L, f"IVF{nl},Flat", fm)
        else:
            m = default_m_pq(L) if m_pq is None else int(m_pq)
            if m < 1 or L % m:
                raise InputError(f"m_pq must divide the latent size {L} (got {m_pq})")
            if N < 256:
                raise InputError(f"ivfpq needs at least 256 cases to train 8-bit codebooks (got {N})")
            ivf = faiss.index_factory(L, f"IVF{nl},PQ{m}x8np", fm)   # np: no polysemous training
            ivf.pq.cp.seed = int(seed)
            params["m_pq"] = m
        ivf.cp.seed = int(seed)
        ivf.train(x)
        ivf.nprobe = npb
        index = ivf
        params.update(nlist=nl, nprobe=npb)
    else:  # binary
        nb = int(math.ceil(L / 8) * 8) if nbits is None else int(nbits)
        if nb < 8 or nb % 8:
            raise InputError(f"nbits must be a positive multiple of 8 (got {nbits})")
        if binary_projection not in ("random", "none"):
            raise InputError(f"binary_projection must be 'random' or 'none' (got {binary_projection!r})")
        hash_proj = _hash_matrix(L, nb, int(seed), binary_projection)
        hash_center = x.astype(np.float64).mean(axis=0).astype(np.float32)
        index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(nb))
        params.update(nbits=nb, binary_projection=binary_projection)

    ci = CaseIndex(kind=kind, metric=metric, latent_dim=L, identity=ident, params=params,
                   faiss_index=index, mu=mu.copy(), logvar=logvar.copy(),
                   ids=np.arange(N, dtype=np.int64), case_ids=cids, meta=metas, next_id=N,
                   include_text=include_text, hash_proj=hash_proj, hash_center=hash_center)
    index.add_with_ids(ci._faiss_input(mu), np.arange(N, dtype=np.int64))
    return ci


# --------------------------------------------------------------------------- load
def _leftovers(folder: Path, kind: str) -> list[Path]:
    """Hidden ``.<name>.<kind>-*`` siblings of an index folder (newest first)."""
    if not folder.parent.is_dir():
        return []
    found = [p for p in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover_interrupted_save(folder: str | os.PathLike) -> list[str]:
    """Undo what a killed :meth:`CaseIndex.save` left next to ``folder``: delete its
    ``.tmp-*`` folders, put the ``.old-*`` folder (the last complete index) back when
    ``folder`` is missing, delete stale ``.old-*`` folders otherwise. Returns what it did."""
    folder = Path(folder)
    done = []
    for t in _leftovers(folder, "tmp"):
        shutil.rmtree(t, ignore_errors=True)
        done.append(f"removed unfinished {t.name}")
    olds = [o for o in _leftovers(folder, "old") if (o / "index.json").is_file()]
    if olds and not folder.exists():
        os.rename(olds[0], folder)
        done.append(f"restored {folder.name} from {olds[0].name} (a save was interrupted)")
        olds = olds[1:]
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)
        done.append(f"removed stale {o.name}")
    return done


def load_index(folder: str | os.PathLike, *, expect_identity: Mapping | None = None) -> CaseIndex:
    """Open an index folder written by :meth:`CaseIndex.save`, verifying it.

    When ``folder`` is missing because a save was killed between its two renames, the
    last complete index (its hidden ``.<name>.old-*`` sibling) is read instead, with a
    warning; nothing is moved (the next save repairs the folder).

    Checks that ``index.json`` exists and has a known format version, the sha256 of
    every file, that faiss can read the index, that all parts agree, and (when
    ``expect_identity`` is given) :meth:`CaseIndex.check_identity`. Every problem is
    an :class:`IndexError_`. Nothing is written.
    """
    folder = Path(folder)
    if not folder.exists():
        olds = [o for o in _leftovers(folder, "old") if (o / "index.json").is_file()]
        if olds:
            log.warning("index %s: the last save was interrupted; reading the previous complete index %s",
                        folder, olds[0].name)
            folder = olds[0]
    jpath = folder / "index.json"
    if not folder.is_dir():
        raise IndexError_(f"no index folder at {str(folder)!r}")
    if not jpath.is_file():
        raise IndexError_(f"{str(folder)!r} has no index.json (not an index, or an incomplete save)")
    try:
        info = json.loads(jpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexError_(f"index file index.json is corrupt (not valid JSON: {e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise IndexError_(f"{str(jpath)!r} is not an mmvae case index")
    if info.get("version") != FORMAT_VERSION:
        raise IndexError_(f"index format version {info.get('version')!r} is not supported "
                          f"(this mmvae reads version {FORMAT_VERSION})")
    try:
        kind, metric = info["kind"], info["metric"]
        L, count, next_id = int(info["latent_dim"]), int(info["count"]), int(info["next_id"])
        files = dict(info["files"])
        params, identity = dict(info["params"]), dict(info["identity"])
        include_text = bool(info.get("include_text", False))
    except (KeyError, TypeError, ValueError) as e:
        raise IndexError_(f"index.json is malformed ({type(e).__name__}: {e})") from None
    if kind not in KINDS or metric not in METRICS:
        raise IndexError_(f"index.json names an unknown kind/metric ({kind!r}, {metric!r})")
    required = ["index.faiss", "embeddings.npy", "metadata.jsonl"]
    if kind == "binary":
        required.append("binary_hash.npy")
    for name in required:
        if name not in files:
            raise IndexError_(f"index.json lists no checksum for {name}")
    for name, sha in files.items():
        p = folder / name
        if os.sep in name or name.startswith(".") or not p.is_file():
            raise IndexError_(f"index file {name} is missing")
        if source_hash(p) != sha:
            raise IndexError_(f"index file {name} is corrupt (checksum mismatch)")

    data = np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8)
    try:
        index = faiss.deserialize_index_binary(data) if kind == "binary" \
            else faiss.deserialize_index(data)
    except Exception as e:  # faiss raises RuntimeError with a C++ trace
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexError_(f"index file index.faiss cannot be read by faiss: {msg[:300]}") from None

    def load_npy(name):
        try:
            return np.load(folder / name, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexError_(f"index file {name} cannot be read: {e}") from None

    emb = load_npy("embeddings.npy")
    if emb.dtype != np.float32 or emb.shape != (2, count, L):
        raise IndexError_(f"embeddings.npy has shape {emb.shape} {emb.dtype}, "
                          f"expected (2, {count}, {L}) float32")
    ids, cids, metas = [], [], []
    try:
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        for line in lines:
            if not line.strip():
                continue
            rec = json.loads(line)
            ids.append(int(rec["id"]))
            cids.append(str(rec["case_id"]))
            m = {"modalities": [str(x) for x in rec.get("modalities", [])],
                 "labels": rec.get("labels", {})}
            if "report" in rec:
                m["report"] = rec["report"]
            if isinstance(rec.get("source"), dict):
                m["source"] = rec["source"]
            metas.append(m)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IndexError_(f"index file metadata.jsonl is malformed ({e})") from None
    if len(cids) != count or len(set(cids)) != count or len(set(ids)) != count:
        raise IndexError_(f"metadata.jsonl has {len(cids)} entries ({len(set(cids))} unique), "
                          f"index.json says {count}")
    if ids and (min(ids) < 0 or max(ids) >= next_id):
        raise IndexError_("metadata.jsonl holds ids outside the index's id range")
    dim = L if kind != "binary" else int(params.get("nbits", -1))
    if index.d != dim or index.ntotal < count:
        raise IndexError_(f"index.faiss (d={index.d}, {index.ntotal} vectors) does not match "
                          f"index.json (d={dim}, {count} cases)")
    hash_proj = hash_center = None
    if kind == "binary":
        hb = load_npy("binary_hash.npy")
        if hb.dtype != np.float32 or hb.shape != (dim + 1, L):
            raise IndexError_(f"binary_hash.npy has shape {hb.shape}, expected ({dim + 1}, {L})")
        hash_proj, hash_center = hb[:dim].copy(), hb[dim].copy()
    ci = CaseIndex(kind=kind, metric=metric, latent_dim=L, identity=identity, params=params,
                   faiss_index=index, mu=np.ascontiguousarray(emb[0]),
                   logvar=np.ascontiguousarray(emb[1]), ids=np.array(ids, dtype=np.int64),
                   case_ids=cids, meta=metas, next_id=next_id, include_text=include_text,
                   hash_proj=hash_proj, hash_center=hash_center)
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params["ef_search"])
    ci.check_identity(expect_identity)
    return ci
