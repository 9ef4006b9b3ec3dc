"""A FAISS index of case embeddings (diagonal Gaussian posteriors), stored as a folder.

Build with :func:`build_index`, open with :func:`load_index`, search, add and remove with
:class:`CaseIndex`. Every :class:`Result` score is *higher = more similar*: the cosine
similarity (``metric='cosine'``: inner product of L2-normalised means), or minus the
squared L2 distance (``metric='l2'``), computed exactly from the stored means (float64),
whatever the kind.

The package, one concern a module:

* :mod:`.backends`: the index kinds (``flat``, ``ivf``, ``ivfpq``, ``hnsw``, ``binary``),
  one :class:`Backend` each in the registry ``BACKENDS`` (:func:`register` adds one);
* :mod:`.search`: a search step by step; :mod:`.filters`: ``filter=`` / ``exclude=``;
  :mod:`.candidates`: the first pass in faiss (selectors, widening, exact fallbacks);
  :mod:`.rerank`: exact scores and posterior re-ranking (Bhattacharyya, expected likelihood);
* :mod:`.storage`: the folder layout, atomic save, verified load, crash recovery;
* :mod:`.inputs`: argument checks.
"""
from __future__ import annotations

import copy
import os
import shutil  # noqa: F401  (tests patch mmvae.retrieval.index.shutil / .os to kill a save)
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from mmvae.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_text  # noqa: F401  (storage writes through these names)
from mmvae.errors import IndexError_, InputError
from mmvae.retrieval.index import search as _search
from mmvae.retrieval.index import storage
from mmvae.retrieval.index.backends import (BACKENDS, Backend, BuildOptions, backend_of, default_m_pq,
                                            default_nlist, default_nprobe, register)
from mmvae.retrieval.index.candidates import faiss_search
from mmvae.retrieval.index.filters import FILTER_KEYS  # noqa: F401
from mmvae.retrieval.index.lexical import LexicalLeg, tokenize
from mmvae.retrieval.index.inputs import as_matrix, check_case_ids, check_pair, jsonable, normalise, norm_metas
from mmvae.retrieval.index.rerank import RERANKS
from mmvae.retrieval.index.search import Result
from mmvae.retrieval.index.storage import FORMAT, FORMAT_VERSION, METRICS, recover_interrupted_save  # noqa: F401

__all__ = ["Result", "CaseIndex", "build_index", "load_index", "KINDS", "METRICS",
           "RERANKS", "FORMAT_VERSION", "default_nlist", "default_nprobe", "default_m_pq",
           "Backend", "BACKENDS", "register", "recover_interrupted_save"]

KINDS = tuple(BACKENDS)   # the built-in kinds; BACKENDS also holds registered ones


class CaseIndex:
    """Case embeddings + metadata + a faiss index. Build with :func:`build_index`,
    open with :func:`load_index`. Not thread-safe.

    Rows (``_mu``, ``_logvar`` float32 ``(N, L)``, ``_ids`` int64 faiss ids, ``_case_ids``,
    ``_meta``) are the live cases in order; ``_state``: the backend's arrays (binary hash)."""

    def __init__(self, *, kind: str, metric: str, latent_dim: int, identity: dict, params: dict,
                 faiss_index, mu: np.ndarray, logvar: np.ndarray, ids: np.ndarray, case_ids: list[str],
                 meta: list[dict], next_id: int, include_text: bool, state: dict | None = None,
                 lexical: LexicalLeg | None = None, fusion: dict | None = None):
        self.kind, self.metric, self.latent_dim = kind, metric, int(latent_dim)
        self.backend: Backend = BACKENDS[kind]
        self.identity, self.params, self.include_text = identity, params, bool(include_text)
        self._index, self._state = faiss_index, dict(state or {})
        self._mu, self._logvar = mu, logvar
        self._ids = np.asarray(ids, dtype=np.int64)
        self._case_ids, self._meta, self._next_id = list(case_ids), meta, int(next_id)
        # The report's BM25 leg (None: the index has none) and fitted fusion weights
        # (fusion.json; :mod:`mmvae.retrieval.hybrid`).
        self.lexical, self.fusion = lexical, fusion
        self.version = 0              # bumped by every change of the cases (hybrid caches key on it)
        if lexical is not None and len(lexical) != len(self._case_ids):
            raise IndexError_(f"the lexical leg has {len(lexical)} cases, the index {len(self._case_ids)}")
        self._reindex()

    def _reindex(self) -> None:
        self.version = getattr(self, "version", 0) + 1
        self._row_of_case = {c: i for i, c in enumerate(self._case_ids)}
        self._id2row = np.full(max(self._next_id, 1), -1, dtype=np.int64)
        self._id2row[self._ids] = np.arange(len(self._ids))

    def __len__(self) -> int:
        return len(self._case_ids)

    def __contains__(self, case_id) -> bool:
        return case_id in self._row_of_case

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

    def embeddings(self, case_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, logvar)`` float32 ``(n, L)`` of the given cases."""
        rows = self._rows_of(case_ids)
        return self._mu[rows].copy(), self._logvar[rows].copy()

    def metadata(self, case_id: str) -> dict:
        """A copy of a case's stored metadata (``case_id``, ``modalities``, ``labels``...)."""
        return {"case_id": case_id, **copy.deepcopy(self._meta[self._rows_of([case_id])[0]])}

    def _rows_of(self, case_ids) -> np.ndarray:
        if isinstance(case_ids, str):
            case_ids = [case_ids]
        unknown = [c for c in case_ids if c not in self._row_of_case]
        if unknown:
            raise InputError(f"unknown case id(s) in the index: {', '.join(map(repr, unknown[:5]))}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        return np.array([self._row_of_case[c] for c in case_ids], dtype=np.int64)

    def _faiss_input(self, mu: np.ndarray) -> np.ndarray:
        """What faiss is given for the means ``mu (n, L)`` (normalised for cosine, encoded by the kind)."""
        x = normalise(mu) if self.metric == "cosine" else np.ascontiguousarray(mu, np.float32)
        return self.backend.encode(x, self._state)

    def _faiss_search(self, x: np.ndarray, k: int, params) -> np.ndarray:
        return faiss_search(self._index, x, k, params)

    def search(self, query_mu, k: int, *, query_logvar=None,
               filter: Callable[[dict], bool] | Mapping | None = None,  # noqa: A002
               exclude: Sequence | None = None, rerank: str | None = None,
               rerank_factor: int | None = None, dims=None) -> list[list[Result]]:
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
          rerank: None, ``'bhattacharyya'`` or ``'expected_likelihood'`` (:mod:`.rerank`).
          rerank_factor: candidates re-scored = ``rerank_factor·k`` (posterior
            re-ranking, and the exact re-scoring of ``ivfpq``/``opq-ivfpq``/``binary``
            codes); default the index's ``params['rerank_factor']`` (set at build time),
            else 4.
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
        if rerank_factor is None:
            rerank_factor = int(self.params.get("rerank_factor", 4))
        return _search.search(self, query_mu, k, query_logvar=query_logvar, filter=filter,
                              exclude=exclude, rerank=rerank, rerank_factor=rerank_factor, dims=dims)

    def add(self, mu, logvar, case_ids: Sequence[str], meta: Sequence[dict] | None = None,
            reports: Sequence[str | None] | None = None) -> None:
        """Add cases without rebuilding (IVF kinds use the trained quantizer).

        ``reports``: the cases' report texts (None entries: no report), tokenised into the
        lexical leg when the index has one (without, the new cases have no words there).

        Raises InputError for a case id already in the index (nothing is added) and
        IndexError_ for a latent dimension that differs from the index's.
        """
        mu, logvar = check_pair(mu, logvar, self.latent_dim)
        ids_in = check_case_ids(case_ids, mu.shape[0])
        dup = [c for c in ids_in if c in self._row_of_case]
        if dup:
            raise InputError(f"case id(s) already in the index: {', '.join(map(repr, dup[:5]))}")
        new_meta = norm_metas(meta, ids_in, self.include_text)
        if reports is not None and len(reports) != len(ids_in):
            raise InputError(f"{len(reports)} reports for {len(ids_in)} cases")
        if not ids_in:
            return
        if self.lexical is not None:
            self.lexical.add([tokenize(r) for r in (reports or [None] * len(ids_in))])
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
        """Remove cases without rebuilding; an unknown case id raises (nothing removed).
        A kind that cannot delete (``hnsw``) keeps their vectors as skipped tombstones."""
        case_ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        if len(set(case_ids)) != len(case_ids):
            raise InputError("remove: duplicate case ids in the request")
        rows = self._rows_of(case_ids)
        if not len(rows):
            return
        ids = self._ids[rows]
        if self.backend.deletes:
            n = self._index.remove_ids(faiss.IDSelectorBatch(ids))
            if n != len(ids):
                raise IndexError_(f"faiss removed {n} of {len(ids)} vectors; the index is inconsistent")
        keep = np.ones(self.size, dtype=bool)
        keep[rows] = False
        self._mu, self._logvar, self._ids = self._mu[keep], self._logvar[keep], self._ids[keep]
        self._case_ids = [c for c, kp in zip(self._case_ids, keep) if kp]
        self._meta = [m for m, kp in zip(self._meta, keep) if kp]
        if self.lexical is not None:
            self.lexical.keep(keep)
        self._reindex()

    def check_identity(self, expect: Mapping | None) -> None:
        """Raise IndexError_ when ``expect`` (e.g. the current model's identity) differs
        from the identity the index was built with (keys of ``expect`` are compared;
        ``latent_dim`` against the index's latent size)."""
        if expect:
            _check_identity(self.identity, self.latent_dim, jsonable(dict(expect), "expect_identity"))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder so that a kill at any point leaves a complete index.

        Everything goes into a hidden temporary sibling (``.<name>.tmp-*``, ``index.json``
        written last); then the old folder (if any) is renamed aside (``.<name>.old-*``),
        the new one renamed in and the old one deleted. On an exception the old folder is
        put back. After a SIGKILL between the two renames :func:`load_index` reads the
        ``.old-*`` folder (the last complete index) and the next save puts it back first;
        ``.tmp-*`` folders left by a killed writer are deleted by the next save. One
        writer at a time. Refuses to replace a non-empty folder that is not an index
        (has no ``index.json``). Layout: :mod:`.storage`.
        """
        return storage.save(self, folder)


def _check_identity(identity: dict, latent_dim: int, exp: dict) -> None:
    diffs = []
    for key, want in exp.items():
        have = latent_dim if key == "latent_dim" else identity.get(key, "<missing>")
        if key == "latent_dim":
            try:
                same = int(want) == latent_dim
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
            f"index was built with model {name(identity)} latent {latent_dim}, "
            f"this model has {name(exp)} latent {exp.get('latent_dim', '?')} "
            f"(differs in {'; '.join(diffs)})")


def build_index(mu, logvar, case_ids: Sequence[str], meta: Sequence[dict] | None = None, *,
                kind: str = "flat", metric: str = "cosine", identity: Mapping | None = None,
                nlist: int | None = None, m_pq: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64,
                nbits: int | None = None, binary_projection: str = "random",
                seed: int = 0, include_text: bool = False,
                reports: Sequence[str | None] | None = None, rerank_factor: int | None = None) -> CaseIndex:
    """Build a :class:`CaseIndex` (the kinds: :mod:`.backends`).

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
      rerank_factor: the searches' default first pass, ``rerank_factor·k`` candidates
        re-scored exactly (stored in ``params``; None: 4). Lossy codes of many cases need
        more (docs/scale.md: 10⁶ cases).
      reports: ``N`` report texts (None: no report): builds the lexical (BM25) leg
        (:mod:`.lexical`; its tokens are stored in the folder, the texts are not).

    Raises InputError for a bad argument (unknown kind or metric, shapes, ids, options).
    """
    backend = backend_of(kind)
    if metric not in METRICS:
        raise InputError(f"metric must be one of {list(METRICS)} (got {metric!r})")
    mu = as_matrix(mu, "mu", None)
    N, L = mu.shape
    if N < 1 or L < 1:
        raise InputError(f"need at least one case with L ≥ 1 (got mu of shape {mu.shape})")
    logvar = as_matrix(logvar, "logvar", None)
    if logvar.shape != mu.shape:
        raise InputError(f"logvar has shape {logvar.shape}, mu {mu.shape}")
    cids = check_case_ids(case_ids, N)
    metas = norm_metas(meta, cids, include_text)
    if reports is not None and len(reports) != N:
        raise InputError(f"{len(reports)} reports for {N} cases")
    lexical = None if reports is None else LexicalLeg([tokenize(r) for r in reports])
    ident = jsonable(dict(identity or {}), "identity")
    if "latent_dim" in ident and ident["latent_dim"] != L:
        raise InputError(f"identity says latent_dim={ident['latent_dim']} but mu has {L} columns")
    ident["latent_dim"] = L
    opts = BuildOptions(nlist=nlist, m_pq=m_pq, nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction,
                        ef_search=ef_search, nbits=nbits, binary_projection=binary_projection, seed=seed)
    fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index, params, state = backend.build(normalise(mu) if metric == "cosine" else mu, fm, opts)
    if rerank_factor is not None:
        if int(rerank_factor) < 1:
            raise InputError(f"rerank_factor must be ≥ 1 (got {rerank_factor})")
        params = {**params, "rerank_factor": int(rerank_factor)}
    ci = CaseIndex(kind=kind, metric=metric, latent_dim=L, identity=ident, params={"seed": int(seed), **params},
                   faiss_index=index, mu=mu.copy(), logvar=logvar.copy(),
                   ids=np.arange(N, dtype=np.int64), case_ids=cids, meta=metas, next_id=N,
                   include_text=include_text, state=state, lexical=lexical)
    index.add_with_ids(ci._faiss_input(mu), np.arange(N, dtype=np.int64))
    return ci


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
    ci = CaseIndex(**storage.read_folder(folder))
    ci.check_identity(expect_identity)
    return ci
