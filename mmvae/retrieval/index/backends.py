"""Index kinds: one :class:`Backend` per kind, kept in the registry ``BACKENDS``.

Built-in kinds (``build_index(kind=...)``):

``flat``    exact search, ``IndexIDMap2(IndexFlat)``.
``ivf``     ``IndexIVFFlat`` (inverted lists, exact vectors), ids stored by the IVF.
``ivfpq``   ``IndexIVFPQ`` (``m_pq`` sub-quantizers of 8 bits); candidates are re-scored
            exactly with the stored float means.
``opq-ivfpq`` ``OPQ{m}_{d},IVF{nlist},PQ{m}``: the same codes after a learnt rotation (OPQ,
            Ge et al. 2014) of the vectors padded to ``d`` = L rounded up to a multiple of
            ``m_pq`` (default 32 sub-quantizers): the FAISS wiki's recipe for 10⁶–10⁹ vectors
            ("Indexing 1M vectors"); ``m_pq`` B of code + 8 B of id per case.
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

A new kind is one :class:`Backend` (how to build and train its faiss index, what faiss
is given, its search parameters per widening round, what it stores besides the faiss
index) passed to :func:`register`; ``build_index(kind=name)`` and ``load_index`` then
handle it. Every backend sees vectors ``x (n, L)`` float32 in metric space: L2-normalised
means for ``cosine``, the means for ``l2``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import faiss
import numpy as np

from mmvae.errors import IndexError_, InputError


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """The kind-specific arguments of :func:`~mmvae.retrieval.index.build_index` (each
    backend reads its own)."""

    nlist: int | None = None
    m_pq: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    nbits: int | None = None
    binary_projection: str = "random"
    seed: int = 0


def _as_is(x: np.ndarray, state: dict) -> np.ndarray:
    return x


def _plain_params(index, params: dict, sel, k: int, scale: float):
    return (None if sel is None else faiss.SearchParameters(sel=sel)), True


def _never(params: dict, n_allowed: int, k: int) -> bool:
    return False


def _nothing(index, params: dict) -> None:
    return None


def _latent_dim(params: dict, L: int) -> int:
    return L


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the case index needs to know about one index kind.

    * ``build(x (N, L), faiss_metric, opts: BuildOptions)`` → ``(faiss index, trained and
      empty, params: dict (JSON, stored in index.json), state: dict of arrays)``; bad
      options raise InputError;
    * ``encode(x (n, L), state)`` → what faiss is given for these vectors (float32
      ``(n, L)``, or packed codes ``(n, nbits/8)`` uint8 for a binary index);
    * ``search_params(index, params, sel, k, scale)`` → ``(faiss SearchParameters or None,
      final)``: a search of ``k`` neighbours with the ``IDSelector`` ``sel`` (None: no
      filter) scanning ``scale`` × the usual (``scale`` ≥ 1 grows ×4 a round while queries
      come back short); ``final``: no wider round would find more;
    * ``exact_when_filtered(params, n_allowed, k)``: rank a filtered search of ``n_allowed``
      allowed vectors exactly instead of in faiss;
    * ``configure(index, params)``: search settings after loading (nprobe, efSearch);
    * ``dim(params, L)``: the faiss index's ``d``;
    * ``approximate``: faiss holds lossy codes: first-pass candidates are widened to
      ``rerank_factor·k`` and re-scored exactly; ``exhaustive``: the first pass scans every
      vector, so a search on part of the dimensions scores every allowed case exactly
      instead of widening; ``deletes``: False when removed cases stay
      in faiss as tombstones; ``binary``: a faiss binary index (its own (de)serialisers);
    * ``state_file``, ``save_state(state)`` → array, ``load_state(array, params, L)`` →
      state (IndexError_ when malformed): the extra file of a kind with state.
    """

    name: str
    build: Callable[[np.ndarray, int, BuildOptions], tuple[Any, dict, dict]]
    encode: Callable[[np.ndarray, dict], np.ndarray] = _as_is
    search_params: Callable[..., tuple[Any, bool]] = _plain_params
    exact_when_filtered: Callable[[dict, int, int], bool] = _never
    configure: Callable[[Any, dict], None] = _nothing
    dim: Callable[[dict, int], int] = _latent_dim
    approximate: bool = False
    exhaustive: bool = False
    deletes: bool = True
    binary: bool = False
    state_file: str | None = None
    save_state: Callable[[dict], np.ndarray] | None = None
    load_state: Callable[[np.ndarray, dict, int], dict] | None = None


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


# --------------------------------------------------------------------------- flat
def _build_flat(x: np.ndarray, fm: int, opts: BuildOptions):
    return faiss.index_factory(x.shape[1], "IDMap2,Flat", fm), {}, {}


# --------------------------------------------------------------------------- hnsw
def _build_hnsw(x: np.ndarray, fm: int, opts: BuildOptions):
    if opts.hnsw_m < 2:
        raise InputError(f"hnsw_m must be ≥ 2 (got {opts.hnsw_m})")
    index = faiss.index_factory(x.shape[1], f"IDMap2,HNSW{int(opts.hnsw_m)}", fm)
    h = faiss.downcast_index(index.index)
    h.hnsw.efConstruction = int(opts.ef_construction)
    h.hnsw.efSearch = int(opts.ef_search)
    return index, dict(hnsw_m=int(opts.hnsw_m), ef_construction=int(opts.ef_construction),
                       ef_search=int(opts.ef_search)), {}


def _hnsw_params(index, params: dict, sel, k: int, scale: float):
    # a graph walk can miss vectors even at efSearch = ntotal
    ef = min(index.ntotal, math.ceil(max(int(params["ef_search"]), k) * scale))
    return faiss.SearchParametersHNSW(sel=sel, efSearch=ef), ef >= index.ntotal


def _hnsw_exact(params: dict, n_allowed: int, k: int) -> bool:
    # so few rows allowed that an HNSW walk would need efSearch ≥ ntotal
    return n_allowed <= max(int(params["ef_search"]), k)


def _hnsw_configure(index, params: dict) -> None:
    faiss.downcast_index(index.index).hnsw.efSearch = int(params["ef_search"])


# --------------------------------------------------------------------------- ivf, ivfpq
def default_m_opq(latent_dim: int) -> int:
    """OPQ sub-quantizers: 32 (the FAISS wiki's ``OPQ32_…,PQ32``), fewer when L < 64 (2+ dims each)."""
    return int(max(1, min(32, latent_dim // 2)))


def _build_ivf(x: np.ndarray, fm: int, opts: BuildOptions, *, pq: bool = False, opq: bool = False):
    N, L = x.shape
    nl = default_nlist(N) if opts.nlist is None else int(opts.nlist)
    if not 1 <= nl <= N:
        raise InputError(f"nlist must be in [1, N={N}] (got {opts.nlist})")
    npb = default_nprobe(nl) if opts.nprobe is None else int(opts.nprobe)
    if not 1 <= npb:
        raise InputError(f"nprobe must be ≥ 1 (got {opts.nprobe})")
    npb = min(npb, nl)
    params: dict[str, Any] = {}
    if opq:
        m = default_m_opq(L) if opts.m_pq is None else int(opts.m_pq)
        if m < 1:
            raise InputError(f"m_pq must be ≥ 1 (got {opts.m_pq})")
        if N < 256:
            raise InputError(f"opq-ivfpq needs at least 256 cases to train 8-bit codebooks (got {N}): "
                             "use --kind flat or ivf")
        d = -(-L // m) * m
        index = faiss.index_factory(L, f"OPQ{m}_{d},IVF{nl},PQ{m}x8np", fm)
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).verbose = False
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.pq.cp.seed = int(opts.seed)
        params.update(m_pq=m, opq_dim=d)
    elif not pq:
        ivf = faiss.index_factory(L, f"IVF{nl},Flat", fm)
    else:
        m = default_m_pq(L) if opts.m_pq is None else int(opts.m_pq)
        if m < 1 or L % m:
            raise InputError(f"m_pq must divide the latent size {L} (got {opts.m_pq})")
        if N < 256:
            raise InputError(f"ivfpq needs at least 256 cases to train 8-bit codebooks (got {N}): "
                             "use --kind flat or ivf")
        ivf = faiss.index_factory(L, f"IVF{nl},PQ{m}x8np", fm)   # np: no polysemous training
        ivf.pq.cp.seed = int(opts.seed)
        params["m_pq"] = m
    if opq:
        ivf.cp.seed = int(opts.seed)
        with _quiet_stderr():
            index.train(x)
        ivf.nprobe = npb
        return index, {**params, "nlist": nl, "nprobe": npb}, {}
    ivf.cp.seed = int(opts.seed)
    ivf.train(x)
    ivf.nprobe = npb
    return ivf, {**params, "nlist": nl, "nprobe": npb}, {}


class _quiet_stderr:
    """Silence the C++ library's own stderr lines for a block (OPQ's inner k-means prints a warning
    per iteration when a sub-space has few distinct points)."""

    def __enter__(self):
        import os
        import sys
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 2)

    def __exit__(self, *exc):
        import os
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)
        return False


def _ivf_params(index, params: dict, sel, k: int, scale: float):
    nlist = faiss.extract_index_ivf(index).nlist
    nprobe = min(nlist, math.ceil(int(params["nprobe"]) * scale))
    # all lists probed: every allowed vector is seen, none comes back short
    return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe), nprobe >= nlist


def _ivf_configure(index, params: dict) -> None:
    faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


# --------------------------------------------------------------------------- binary
def hash_matrix(L: int, nbits: int, seed: int, projection: str) -> np.ndarray:
    """The binary kind's projection ``P``: float32 ``(nbits, L)``, the identity's first
    rows (``'none'``) or stacked seeded random orthogonal ``(L, L)`` blocks (``'random'``)."""
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


def _build_binary(x: np.ndarray, fm: int, opts: BuildOptions):
    L = x.shape[1]
    nb = int(math.ceil(L / 8) * 8) if opts.nbits is None else int(opts.nbits)
    if nb < 8 or nb % 8:
        raise InputError(f"nbits must be a positive multiple of 8 (got {opts.nbits})")
    if opts.binary_projection not in ("random", "none"):
        raise InputError(f"binary_projection must be 'random' or 'none' (got {opts.binary_projection!r})")
    state = {"proj": hash_matrix(L, nb, int(opts.seed), opts.binary_projection),
             "center": x.astype(np.float64).mean(axis=0).astype(np.float32)}
    index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(nb))
    return index, dict(nbits=nb, binary_projection=opts.binary_projection), state


def _binary_encode(x: np.ndarray, state: dict) -> np.ndarray:
    bits = (x - state["center"][None, :]) @ state["proj"].T > 0
    return np.ascontiguousarray(np.packbits(bits, axis=1))


def _binary_exact(params: dict, n_allowed: int, k: int) -> bool:
    return not _binary_selectors()     # this faiss cannot filter a binary index


def _binary_save(state: dict) -> np.ndarray:
    return np.vstack([state["proj"], state["center"][None, :]]).astype(np.float32)


def _binary_load(hb: np.ndarray, params: dict, L: int) -> dict:
    dim = int(params.get("nbits", -1))
    if hb.dtype != np.float32 or hb.shape != (dim + 1, L):
        raise IndexError_(f"binary_hash.npy has shape {hb.shape}, expected ({dim + 1}, {L})")
    return {"proj": hb[:dim].copy(), "center": hb[dim].copy()}


# --------------------------------------------------------------------------- registry
FLAT = Backend("flat", _build_flat, exhaustive=True)
IVF = Backend("ivf", _build_ivf, search_params=_ivf_params, configure=_ivf_configure)
IVFPQ = Backend("ivfpq", functools.partial(_build_ivf, pq=True), search_params=_ivf_params,
                configure=_ivf_configure, approximate=True)
HNSW = Backend("hnsw", _build_hnsw, search_params=_hnsw_params, exact_when_filtered=_hnsw_exact,
               configure=_hnsw_configure, deletes=False)
BINARY = Backend("binary", _build_binary, encode=_binary_encode, exact_when_filtered=_binary_exact,
                 dim=lambda params, L: int(params.get("nbits", -1)), approximate=True, binary=True,
                 state_file="binary_hash.npy", save_state=_binary_save, load_state=_binary_load)

OPQ_IVFPQ = Backend("opq-ivfpq", functools.partial(_build_ivf, opq=True), search_params=_ivf_params,
                    configure=_ivf_configure, approximate=True)

BACKENDS: dict[str, Backend] = {b.name: b for b in (FLAT, IVF, IVFPQ, OPQ_IVFPQ, HNSW, BINARY)}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (InputError if its name is taken by another)."""
    if BACKENDS.get(backend.name, backend) is not backend:
        raise InputError(f"an index kind named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def backend_of(kind: str) -> Backend:
    """The registered backend of ``kind`` (InputError naming the registered kinds)."""
    if kind not in BACKENDS:
        raise InputError(f"kind must be one of {list(BACKENDS)} (got {kind!r})")
    return BACKENDS[kind]
