"""Checks and normalisation of what callers hand the case index (arrays, case ids,
metadata, JSON values). Every problem is an :class:`~mmvae.errors.InputError` (a latent
size that differs from the index's: :class:`~mmvae.errors.IndexError_` by default)."""
from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from mmvae.errors import IndexError_, InputError


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def jsonable(x, what: str):
    """``x`` as plain JSON values (numpy scalars/arrays → numbers/lists, sets → sorted
    lists); InputError naming ``what`` when it cannot be (NaN, other objects)."""
    try:
        return json.loads(json.dumps(x, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON serialisable: {e}") from None


def check_k(k) -> int:
    """``k`` as an int ≥ 1 (bools and non-integers refused)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be an integer ≥ 1 (got {k!r})")
    if int(k) < 1:
        raise InputError(f"k must be ≥ 1 (got {k})")
    return int(k)


def as_matrix(x, name: str, L: int | None, *, dim_error=IndexError_) -> np.ndarray:
    """``x`` (``(n, L)`` or ``(L,)``, numeric, finite) as a C-contiguous float32 ``(n, L)``
    array; ``dim_error`` when ``L`` is given and the columns differ."""
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


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (n, L)`` scaled to unit L2 norm (a zero row stays zero), float32."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def norm_meta(m, case_id: str, include_text: bool) -> dict:
    """One case's stored metadata: ``modalities`` (list of str), ``labels`` (JSON),
    ``report`` (only when ``include_text``), ``source`` (a dict, e.g. its PACS study)."""
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
    out = {"modalities": mods, "labels": jsonable({} if labels is None else labels,
                                                  f"labels of case {case_id!r}")}
    if include_text and m.get("report") is not None:
        out["report"] = str(m["report"])
    if m.get("source") is not None:      # where the case came from, e.g. its PACS study (mmvae.pacs)
        if not isinstance(m["source"], Mapping):
            raise InputError(f"meta 'source' must be a dict, got {type(m['source']).__name__}", case_id=case_id)
        out["source"] = jsonable(dict(m["source"]), f"source of case {case_id!r}")
    return out


def norm_metas(meta, case_ids: list[str], include_text: bool) -> list[dict]:
    """:func:`norm_meta` of each case; ``meta`` None = no metadata; its length must match."""
    if meta is None:
        meta = [None] * len(case_ids)
    meta = list(meta)
    if len(meta) != len(case_ids):
        raise InputError(f"got {len(meta)} metadata entries for {len(case_ids)} cases")
    return [norm_meta(m, c, include_text) for m, c in zip(meta, case_ids)]


def check_case_ids(case_ids, n: int) -> list[str]:
    """``n`` unique non-empty strings (numpy strings converted), else InputError."""
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


def check_pair(mu, logvar, L: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``mu``, ``logvar`` as float32 ``(n, L)`` arrays of the same shape."""
    mu = as_matrix(mu, "mu", L)
    logvar = as_matrix(logvar, "logvar", L)
    if logvar.shape != mu.shape:
        raise InputError(f"logvar has shape {logvar.shape}, mu {mu.shape}")
    return mu, logvar
