"""Which cases a search may return: ``filter=`` (a callable or a dict on the stored
metadata) and ``exclude=`` (case ids, for all queries or one list per query)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mmvae.errors import InputError

FILTER_KEYS = ("has", "has_any", "lacks", "labels")


def _as_list(v) -> list:
    return [v] if isinstance(v, str) else list(v)


def _labels_match(lab, labels: Mapping) -> bool:
    lab = lab if isinstance(lab, Mapping) else {}
    for name, want in labels.items():
        wants = [want] if isinstance(want, (str, int, float)) else list(want)
        if name not in lab or lab[name] not in wants:
            return False
    return True


def filter_mask(flt, case_ids: list[str], meta: list[dict]) -> np.ndarray:
    """Allowed rows, bool ``(N,)`` in row order.

    ``flt``: None (all), ``callable({'case_id', 'modalities', 'labels', ...}) -> bool``, or
    a dict with keys ``has`` (modality or list: all present), ``has_any`` (list: one
    present), ``lacks`` (modality or list: none present), ``labels`` (``{name: value or
    list of values}``). InputError for another type or an unknown key.
    """
    if flt is None:
        return np.ones(len(case_ids), dtype=bool)
    if callable(flt):
        return np.array([bool(flt({"case_id": c, **m})) for c, m in zip(case_ids, meta)], dtype=bool)
    if not isinstance(flt, Mapping):
        raise InputError(f"filter must be a callable or a dict, got {type(flt).__name__}")
    bad = [key for key in flt if key not in FILTER_KEYS]
    if bad:
        raise InputError(f"unknown filter key(s) {bad}; supported: {list(FILTER_KEYS)}")
    has = _as_list(flt.get("has", []))
    has_any = _as_list(flt["has_any"]) if "has_any" in flt else None
    lacks = _as_list(flt.get("lacks", []))
    labels = flt.get("labels", {})
    if not isinstance(labels, Mapping):
        raise InputError("filter 'labels' must be a dict label name → value(s)")
    mask = np.zeros(len(case_ids), dtype=bool)
    for i, m in enumerate(meta):
        mods = set(m["modalities"])
        ok = all(x in mods for x in has) and not any(x in mods for x in lacks)
        if ok and has_any is not None:
            ok = any(x in mods for x in has_any)
        if ok and labels:
            ok = _labels_match(m["labels"], labels)
        mask[i] = ok
    return mask


def exclude_rows(exclude, row_of_case: Mapping[str, int], Q: int) -> list[np.ndarray]:
    """Per query, the sorted unique int64 rows it must not return.

    ``exclude``: None, case ids for every query (a string is one id), or one list (or
    None) per query; unknown ids are ignored. InputError when per-query lists are not
    ``Q``.
    """
    empty = np.zeros(0, dtype=np.int64)
    if exclude is None:
        return [empty] * Q
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)

    def rows(ids):
        return np.unique(np.array([row_of_case[c] for c in ids if c in row_of_case], dtype=np.int64))

    if exclude and all(x is None or isinstance(x, (list, tuple, set, frozenset)) for x in exclude):
        if len(exclude) != Q:
            raise InputError(f"per-query exclude has {len(exclude)} lists for {Q} queries")
        return [empty if x is None else rows(list(x)) for x in exclude]
    return [rows(exclude)] * Q
