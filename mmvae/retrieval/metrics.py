"""Retrieval metrics over ranked result lists (numpy; scipy for the bootstrap).

Conventions
-----------
* ``relevant`` is a ``(Q, k)`` boolean array: ``relevant[q, i]`` tells whether the
  result at rank ``i + 1`` of query ``q`` is relevant. Rows may have fewer than ``k``
  columns (fewer results); missing results count as not relevant.
* ``num_relevant`` is ``(Q,)``: how many relevant items the database holds for each
  query (``R``), the query itself excluded in leave-one-out evaluation.
* Every ``*_at_k`` function returns **per-query** values ``(Q,)``; average them (after
  masking out queries without ground truth) or feed them to :func:`bootstrap_ci`.

Definitions (``rel_i ∈ {0, 1}`` the relevance at rank ``i``, ``g_i`` a graded gain)::

    P@k    = (1/k) Σ_{i≤k} rel_i
    R@k    = (Σ_{i≤k} rel_i) / R                              (0 when R = 0)
    AP@k   = (1/min(k, R)) Σ_{i≤k} P@i · rel_i                 (0 when R = 0)
    DCG@k  = Σ_{i≤k} g_i / log2(i + 1)
    nDCG@k = DCG@k / IDCG@k, IDCG@k the DCG of the ideal gains (0 when IDCG = 0)

Queries with ``R = 0`` get 0 from recall and AP by definition; :func:`retrieval_metrics`
excludes them (and queries whose own label is missing) from every mean and reports
how many queries remained as ``num_queries``.

Ground truth
------------
* single-label: an item is relevant when its label equals the query's label; gain 1.
* multi-label: labels are sets (or ``'|'``-joined strings, e.g. ``"edema|abscess"``);
  an item is relevant when the Jaccard overlap with the query's set is > 0 (i.e. they
  share at least one label); the graded nDCG gain is the number of shared labels.
* a label that is ``None``, ``""``, NaN or an empty set is *missing*: such an item is
  never relevant and such a query is skipped.
"""
from __future__ import annotations

import csv
import inspect
import io
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from mmvae.atomic import atomic_write_text
from mmvae.errors import InputError

__all__ = [
    "precision_at_k", "recall_at_k", "average_precision_at_k", "ndcg_at_k",
    "relevance_from_labels", "bootstrap_ci", "exact_search", "retrieval_metrics",
    "format_markdown_table", "write_csv",
]

_CHUNK = 512  # queries per matmul chunk in exact search / label overlap
# scipy ≥ 1.15 seeds bootstrap with ``rng``; 1.14 only has ``random_state``
_RNG_ARG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


# --------------------------------------------------------------------------- basics
def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be an integer ≥ 1 (got {k!r})")
    if int(k) < 1:
        raise InputError(f"k must be ≥ 1 (got {k})")
    return int(k)


def _as_2d(a, dtype, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=dtype)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InputError(f"{name} must be a (Q, k) array, got shape {a.shape}")
    return a


def _pad_to_k(a: np.ndarray, k: int, fill) -> np.ndarray:
    """Cut ``a`` (Q, n) to k columns, or pad it with ``fill``."""
    if a.shape[1] >= k:
        return a[:, :k]
    pad = np.full((a.shape[0], k - a.shape[1]), fill, dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def precision_at_k(relevant, k: int) -> np.ndarray:
    """Per-query precision@k: ``(1/k) Σ_{i≤k} rel_i``. Returns ``(Q,)`` float64."""
    k = _check_k(k)
    rel = _pad_to_k(_as_2d(relevant, bool, "relevant"), k, False)
    return rel.sum(axis=1) / float(k)


def recall_at_k(relevant, num_relevant, k: int) -> np.ndarray:
    """Per-query recall@k: ``hits@k / R``; 0 for queries with ``R = 0``."""
    k = _check_k(k)
    rel = _pad_to_k(_as_2d(relevant, bool, "relevant"), k, False)
    r = np.asarray(num_relevant, dtype=np.float64).reshape(-1)
    if r.shape[0] != rel.shape[0]:
        raise InputError(f"num_relevant has {r.shape[0]} entries, relevant has {rel.shape[0]} rows")
    hits = rel.sum(axis=1).astype(np.float64)
    out = np.zeros_like(r)
    np.divide(hits, r, out=out, where=r > 0)
    return out


def average_precision_at_k(relevant, num_relevant, k: int) -> np.ndarray:
    """Per-query AP@k = ``(1/min(k, R)) Σ_{i≤k} P@i · rel_i``; 0 when ``R = 0``.

    Example: relevance ``[1, 0, 1, 0, 0]`` with ``R = 2`` gives ``(1/1 + 2/3) / 2``.
    """
    k = _check_k(k)
    rel = _pad_to_k(_as_2d(relevant, bool, "relevant"), k, False).astype(np.float64)
    r = np.asarray(num_relevant, dtype=np.float64).reshape(-1)
    if r.shape[0] != rel.shape[0]:
        raise InputError(f"num_relevant has {r.shape[0]} entries, relevant has {rel.shape[0]} rows")
    p_at_i = np.cumsum(rel, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    s = (p_at_i * rel).sum(axis=1)
    denom = np.minimum(float(k), r)
    out = np.zeros_like(r)
    np.divide(s, denom, out=out, where=denom > 0)
    return out


def ndcg_at_k(gains, ideal_gains, k: int | None = None) -> np.ndarray:
    """Per-query nDCG@k with linear gains: ``DCG = Σ_{i≤k} g_i / log2(i + 1)``.

    ``gains`` (Q, k) are the gains of the returned results in rank order;
    ``ideal_gains`` (Q, k') the gains of the best possible ranking (they are sorted
    in decreasing order here, so any order is accepted). ``k`` defaults to the number
    of columns of ``gains``. Queries with an ideal DCG of 0 get 0.
    """
    g = _as_2d(gains, np.float64, "gains")
    ig = _as_2d(ideal_gains, np.float64, "ideal_gains")
    if ig.shape[0] != g.shape[0]:
        raise InputError(f"ideal_gains has {ig.shape[0]} rows, gains has {g.shape[0]}")
    k = _check_k(g.shape[1] if k is None else k)
    g = _pad_to_k(g, k, 0.0)
    ig = _pad_to_k(-np.sort(-ig, axis=1), k, 0.0)
    disc = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = (g * disc).sum(axis=1)
    idcg = (ig * disc).sum(axis=1)
    out = np.zeros_like(dcg)
    np.divide(dcg, idcg, out=out, where=idcg > 0)
    return out


# --------------------------------------------------------------------------- labels
def _is_missing_scalar(x) -> bool:
    if x is None:
        return True
    if isinstance(x, str):
        return x.strip() == ""
    if isinstance(x, (float, np.floating)):
        return bool(np.isnan(x))
    return False


def _label_set(x) -> frozenset:
    """A multi-label value as a frozenset of strings ('|'-joined strings are split)."""
    if x is None:
        return frozenset()
    if isinstance(x, str):
        return frozenset(p.strip() for p in x.split("|") if p.strip())
    if isinstance(x, (float, np.floating)) and np.isnan(x):
        return frozenset()
    if isinstance(x, (set, frozenset, list, tuple, np.ndarray)):
        return frozenset(str(v).strip() for v in x
                         if not _is_missing_scalar(v) and str(v).strip())
    return frozenset([str(x)])


def _single_label(x):
    """A single-label value normalised to a string, or None when missing."""
    if _is_missing_scalar(x):
        return None
    if isinstance(x, (np.integer,)):
        x = int(x)
    return str(x)


def relevance_from_labels(query_labels: Sequence, result_labels: Sequence[Sequence],
                          multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Relevance of retrieved items from labels.

    Args:
      query_labels: ``Q`` labels (multi-label: sets or ``'|'``-joined strings).
      result_labels: ``Q`` rows of the retrieved items' labels in rank order (rows may
        be ragged; they are padded to the longest row with missing labels).
      multilabel: ``False``: relevant ⇔ same label, gain 1. ``True``: relevant ⇔
        Jaccard(query, item) > 0, gain = number of shared labels.

    Returns:
      ``(relevant, gains)``: ``(Q, k)`` bool and ``(Q, k)`` float64. A missing query or
      item label is never relevant (gain 0).
    """
    q = list(query_labels)
    rows = [list(r) for r in result_labels]
    if len(rows) != len(q):
        raise InputError(f"result_labels has {len(rows)} rows, query_labels has {len(q)}")
    k = max((len(r) for r in rows), default=0)
    gains = np.zeros((len(q), k), dtype=np.float64)
    for i, (ql, row) in enumerate(zip(q, rows)):
        if multilabel:
            qs = _label_set(ql)
            if not qs:
                continue
            for j, rl in enumerate(row):
                gains[i, j] = len(qs & _label_set(rl))
        else:
            qs = _single_label(ql)
            if qs is None:
                continue
            for j, rl in enumerate(row):
                gains[i, j] = 1.0 if _single_label(rl) == qs else 0.0
    return gains > 0, gains


def _encode_labels(query_labels, db_labels, multilabel: bool):
    """Encode labels for vectorised overlap counting.

    single-label: integer codes (Q,), (N,) with -1 for missing.
    multi-label: multi-hot float32 matrices (Q, V), (N, V).
    """
    if multilabel:
        qs = [_label_set(x) for x in query_labels]
        ds = [_label_set(x) for x in db_labels]
        vocab = {lab: i for i, lab in enumerate(sorted(set().union(*qs, *ds)))}
        qm = np.zeros((len(qs), max(len(vocab), 1)), np.float32)
        dm = np.zeros((len(ds), max(len(vocab), 1)), np.float32)
        for i, s in enumerate(qs):
            qm[i, [vocab[x] for x in s]] = 1.0
        for i, s in enumerate(ds):
            dm[i, [vocab[x] for x in s]] = 1.0
        return qm, dm, qm.sum(axis=1) > 0
    qv = [_single_label(x) for x in query_labels]
    dv = [_single_label(x) for x in db_labels]
    vocab = {lab: i for i, lab in enumerate(sorted({x for x in qv + dv if x is not None}))}
    qc = np.array([-1 if x is None else vocab[x] for x in qv], dtype=np.int64)
    dc = np.array([-1 if x is None else vocab[x] for x in dv], dtype=np.int64)
    return qc, dc, qc >= 0


def _shared(qenc: np.ndarray, denc: np.ndarray, multilabel: bool) -> np.ndarray:
    """(c, N) float gains between a chunk of queries and all database items."""
    if multilabel:
        return qenc @ denc.T
    return ((qenc[:, None] == denc[None, :]) & (qenc[:, None] >= 0)).astype(np.float32)


# --------------------------------------------------------------------------- bootstrap
def bootstrap_ci(per_query_values, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """BCa bootstrap over queries (Efron 1987): ``(mean, lo, hi)``.

    ``per_query_values``: ``(Q,)`` (flattened). ``lo``/``hi`` bound the
    ``1 - alpha`` bias-corrected and accelerated interval of the mean over ``n_boot``
    resamples of the queries (``scipy.stats.bootstrap(method='BCa')``, numpy
    Generator seeded with ``seed``, so the result is deterministic). An empty input
    gives ``(nan, nan, nan)``; ``n_boot = 0``, one value or all values equal give
    ``lo = hi = mean``. BCa is undefined for too few resamples (e.g. ``n_boot = 1``):
    scipy then warns and ``lo``/``hi`` are NaN. Raises InputError unless
    ``0 < alpha < 1``.

    Efron, B. (1987). Better bootstrap confidence intervals. JASA 82(397), 171-185.
    """
    v = np.asarray(per_query_values, dtype=np.float64).reshape(-1)
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1) (got {alpha})")
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if n_boot <= 0 or v.size < 2 or np.all(v == v[0]):   # no spread: BCa has no interval
        return (mean, mean, mean)
    # batch bounds the (batch, Q) resample and jackknife arrays to ~2M values
    ci = stats.bootstrap((v,), np.mean, n_resamples=int(n_boot), confidence_level=1.0 - alpha,
                         method="BCa", batch=max(1, 2_000_000 // v.size),
                         **{_RNG_ARG: np.random.default_rng(seed)}).confidence_interval
    return (mean, float(ci.low), float(ci.high))


# --------------------------------------------------------------------------- search
def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def exact_search(query_emb, db_emb, k: int, *, metric: str = "cosine",
                 exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k search by chunked matmul.

    Returns ``(indices (Q, k') int64, scores (Q, k') float32)`` with ``k' = min(k,
    N)``, higher score = more similar (cosine similarity, or minus the squared L2
    distance). ``exclude`` ``(Q,)`` gives one database index to drop per query (-1:
    none); a dropped slot at the end of a row is filled with index -1, score -inf.
    Ties are broken by the lower database index.
    """
    k = _check_k(k)
    q = np.asarray(query_emb, dtype=np.float32)
    d = np.asarray(db_emb, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise InputError(f"query_emb {q.shape} and db_emb {d.shape} must be (Q, L) and (N, L)")
    if metric not in ("cosine", "l2"):
        raise InputError(f"metric must be 'cosine' or 'l2' (got {metric!r})")
    Q, N = q.shape[0], d.shape[0]
    ex = _check_exclude(exclude, Q, N)
    if metric == "cosine":
        q, d = _normalise(q), _normalise(d)
    dn = (d.astype(np.float64) ** 2).sum(axis=1)
    kk = min(k, N)
    idx = np.full((Q, kk), -1, dtype=np.int64)
    sc = np.full((Q, kk), -np.inf, dtype=np.float32)
    for s in range(0, Q, _CHUNK):
        e = min(Q, s + _CHUNK)
        sim = q[s:e].astype(np.float64) @ d.T.astype(np.float64)
        if metric == "l2":
            qn = (q[s:e].astype(np.float64) ** 2).sum(axis=1, keepdims=True)
            sim = -(qn - 2.0 * sim + dn[None, :])
        rows = np.nonzero(ex[s:e] >= 0)[0]
        sim[rows, ex[s:e][rows]] = -np.inf
        order = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
        top = np.take_along_axis(sim, order, axis=1)
        order = np.where(np.isfinite(top), order, -1)
        idx[s:e] = order
        sc[s:e] = top
    return idx, sc


def _check_exclude(exclude, Q: int, N: int) -> np.ndarray:
    if exclude is None:
        return np.full(Q, -1, dtype=np.int64)
    ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
    if ex.shape[0] != Q:
        raise InputError(f"exclude has {ex.shape[0]} entries, expected one per query ({Q})")
    if np.any(ex >= N) or np.any(ex < -1):
        raise InputError(f"exclude holds indices outside [-1, {N - 1}]")
    return ex


# --------------------------------------------------------------------------- evaluation
def retrieval_metrics(query_emb, db_emb, query_labels: Sequence, db_labels: Sequence,
                      k: int, *, exclude=None, metric: str = "cosine",
                      multilabel: bool = False, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05, ranked=None) -> dict[str, Any]:
    """Precision/recall/mAP/nDCG at ``k`` with bootstrap confidence intervals.

    Args:
      query_emb: ``(Q, L)`` query embeddings (e.g. posterior means).
      db_emb: ``(N, L)`` database embeddings.
      query_labels, db_labels: ``Q`` and ``N`` labels (see module docstring).
      k: cut-off, ≥ 1.
      exclude: ``(Q,)`` database index to drop per query (the query itself in
        leave-one-out evaluation), -1 for none. The dropped item never counts as
        retrieved nor as relevant (it is left out of ``R`` and the ideal gains).
      metric: ``'cosine'`` or ``'l2'`` for the exact numpy search.
      multilabel: see :func:`relevance_from_labels`.
      n_boot, seed, alpha: BCa bootstrap over queries (:func:`bootstrap_ci`).
      ranked: optional precomputed ``(Q, k)`` database indices in rank order (-1 for
        no result), e.g. from a :class:`mmvae.retrieval.index.CaseIndex` search mapped
        to database rows; then ``query_emb``/``db_emb`` are only used for shape checks
        and may be None.

    Returns:
      ``{f"precision@{k}": (mean, lo, hi), f"recall@{k}": ..., f"map@{k}": ...,
      f"ndcg@{k}": ..., "num_queries": int, "num_skipped": int}``. Queries whose
      label is missing or that have no relevant item in the database are skipped.
    """
    k = _check_k(k)
    ql, dl = list(query_labels), list(db_labels)
    Q, N = len(ql), len(dl)
    if ranked is None:
        q = np.asarray(query_emb)
        d = np.asarray(db_emb)
        if q.ndim != 2 or q.shape[0] != Q:
            raise InputError(f"query_emb has shape {q.shape}, expected ({Q}, L) to match query_labels")
        if d.ndim != 2 or d.shape[0] != N:
            raise InputError(f"db_emb has shape {d.shape}, expected ({N}, L) to match db_labels")
        ranked, _ = exact_search(q, d, k, metric=metric, exclude=exclude)
    else:
        ranked = _as_2d(ranked, np.int64, "ranked")
        if ranked.shape[0] != Q:
            raise InputError(f"ranked has {ranked.shape[0]} rows, expected {Q}")
        if np.any(ranked >= N) or np.any(ranked < -1):
            raise InputError(f"ranked holds indices outside [-1, {N - 1}]")
    ex = _check_exclude(exclude, Q, N)
    ranked = _pad_to_k(ranked, k, -1)

    qenc, denc, q_has = _encode_labels(ql, dl, multilabel)
    gains = np.zeros((Q, k), np.float64)
    ideal = np.zeros((Q, k), np.float64)
    num_rel = np.zeros(Q, np.int64)
    for s in range(0, Q, _CHUNK):
        e = min(Q, s + _CHUNK)
        sh = _shared(qenc[s:e], denc, multilabel).astype(np.float64)
        rows = np.nonzero(ex[s:e] >= 0)[0]
        sh[rows, ex[s:e][rows]] = 0.0
        num_rel[s:e] = (sh > 0).sum(axis=1)
        r = ranked[s:e]
        g = np.take_along_axis(sh, np.maximum(r, 0), axis=1)
        gains[s:e] = np.where(r >= 0, g, 0.0)
        kk = min(k, N)
        top = -np.sort(-sh, axis=1)[:, :kk] if N else np.zeros((e - s, 0))
        ideal[s:e, :kk] = top
    relevant = gains > 0
    keep = q_has & (num_rel > 0)
    vals = {
        f"precision@{k}": precision_at_k(relevant, k),
        f"recall@{k}": recall_at_k(relevant, num_rel, k),
        f"map@{k}": average_precision_at_k(relevant, num_rel, k),
        f"ndcg@{k}": ndcg_at_k(gains, ideal, k),
    }
    out: dict[str, Any] = {
        name: bootstrap_ci(v[keep], n_boot=n_boot, alpha=alpha, seed=seed)
        for name, v in vals.items()
    }
    out["num_queries"] = int(keep.sum())
    out["num_skipped"] = int(Q - keep.sum())
    return out


# --------------------------------------------------------------------------- reporting
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (tuple, list)) and len(v) == 3 and all(
            isinstance(x, (int, float, np.number)) for x in v):
        m, lo, hi = (float(x) for x in v)
        return f"{m:.4f} [{lo:.4f}, {hi:.4f}]"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4f}"
    return str(v)


def format_markdown_table(rows: Iterable[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (one dict per row).

    ``columns`` defaults to the keys in order of first appearance. Floats are shown
    with 4 decimals, ``(mean, lo, hi)`` triples as ``mean [lo, hi]``, missing values
    as empty cells; ``|`` inside cells is escaped.
    """
    rows = list(rows)
    if columns is None:
        columns = _columns_of(rows)
    cols = [str(c) for c in columns]

    def cell(x) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
             "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _columns_of(rows: list[dict]) -> list:
    cols: list = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    return cols


def write_csv(rows: Iterable[dict], path: str | os.PathLike,
              columns: Sequence[str] | None = None) -> str:
    """Write ``rows`` to ``path`` as CSV, atomically. Returns the path as a string.

    A ``(mean, lo, hi)`` triple in column ``c`` is written as three columns ``c``,
    ``c_lo``, ``c_hi``; floats are written with full precision (``repr``).
    """
    rows = list(rows)
    if columns is None:
        columns = _columns_of(rows)
    triple = {c for c in columns if any(
        isinstance(r.get(c), (tuple, list)) and len(r.get(c)) == 3 for r in rows)}
    header: list[str] = []
    for c in columns:
        header += [str(c), f"{c}_lo", f"{c}_hi"] if c in triple else [str(c)]

    def val(x):
        if x is None:
            return ""
        if isinstance(x, (np.floating, float)):
            return repr(float(x))
        if isinstance(x, np.integer):
            return int(x)
        return x

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        out = []
        for c in columns:
            v = r.get(c)
            if c in triple:
                if isinstance(v, (tuple, list)) and len(v) == 3:
                    out += [val(x) for x in v]
                else:
                    out += [val(v), "", ""]
            else:
                out.append(val(v))
        w.writerow(out)
    atomic_write_text(path, buf.getvalue())
    return str(path)
