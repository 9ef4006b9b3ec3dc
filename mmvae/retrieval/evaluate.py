"""The one retrieval evaluation: every query subset of modalities, leave the query out.

For a query subset S, each eligible case that has every modality of S and a label
queries the database with its embedding from S alone; the database holds every case's
embedding over all of its modalities (``emb.mu``); the query case itself is excluded.
Relevance: same label. Metrics: P/R/mAP/nDCG@k (:mod:`mmvae.retrieval.metrics`) with
BCa bootstrap 95 % CIs over queries. Eligible queries: every case (leave-one-out, the
CLI and quickstart) or the held-out cases of the training split (validation, the grid
and baselines; see :func:`mmvae.experiments.protocol.held_out`).

``emb`` is anything with ``modalities``, ``present (N, M)``, ``labels`` (one dict per
case), ``mu (N, D)`` and ``subset_posterior(subset (M,)) -> ((N, D) vectors, _)``, and
optionally ``query_dims(subset) -> (D,) 0/1 or None``:
:class:`mmvae.retrieval.embed.Embeddings` for the VAEs, block embeddings for baselines.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmvae.errors import InputError
from mmvae.models.fusion import all_subsets
from mmvae.retrieval.metrics import exact_search, retrieval_metrics

METRICS = ("map", "precision", "recall", "ndcg")


def subset_name(modalities: Sequence[str], row: np.ndarray) -> str:
    return "+".join(m for m, r in zip(modalities, row) if r > 0)


def parse_subset(name: str, modalities: Sequence[str]) -> np.ndarray:
    """``"t1+report"`` (or ``t1,report``) → 0/1 row ``(M,)`` over ``modalities``; unknown → InputError."""
    parts = [p for p in name.replace(",", "+").split("+") if p]
    unknown = [p for p in parts if p not in modalities]
    if unknown or not parts:
        raise InputError(f"query subset {name!r}: unknown modality {unknown}; known: {list(modalities)}")
    return np.asarray([1.0 if m in parts else 0.0 for m in modalities], np.float32)


def all_query_subsets(modalities: Sequence[str]) -> list[np.ndarray]:
    """Every non-empty subset, singletons first (see :func:`mmvae.models.fusion.all_subsets`)."""
    return list(all_subsets(len(modalities)))


def evaluate(emb, label: str, k: int = 10, *, query_idx: Sequence[int] | None = None,
             subsets: Sequence[np.ndarray] | None = None, metric: str = "cosine", multilabel: bool = False,
             n_boot: int = 1000, seed: int = 0, own: bool = False, chance: bool = False) -> list[dict]:
    """One row per query subset: ``query``, ``num_queries``, ``<metric>@k`` and ``_lo``/``_hi`` (95 % CI).

    Args:
      emb: the embeddings (see the module docstring).
      label: the label field that defines relevance (same value = relevant).
      query_idx: the cases allowed to query (default: every case, leave-one-out).
      subsets: 0/1 rows ``(M,)``; default every non-empty subset of ``emb.modalities``.
      metric: ``cosine`` | ``l2`` on the vectors (on the dimensions the query informs
        when ``emb.query_dims`` says so: private latent blocks, per-expert vectors).
      own: a case queries with the modalities of the subset it has (at least one), not
        only when it has all of them (the query a user makes with what a case has).
      chance: also ``chance_map@k``, the mAP@k of random rankings for the same queries
        (:func:`chance_map`; single-label only).
    A subset no eligible case has yields ``num_queries = 0`` and no metrics.
    """
    labels = np.asarray([lab.get(label, "") for lab in emb.labels], dtype=object)
    eligible = np.ones(len(labels), bool)
    if query_idx is not None:
        eligible[:] = False
        eligible[np.asarray(query_idx, int)] = True
    db = np.asarray(emb.mu)
    rows = []
    for s in (subsets if subsets is not None else all_query_subsets(emb.modalities)):
        s = np.asarray(s, np.float32)
        has = emb.present[:, s > 0] > 0
        q_idx = np.nonzero(eligible & (np.any(has, 1) if own else np.all(has, 1)) & (labels != ""))[0]
        row = {"query": subset_name(emb.modalities, s), "num_queries": int(len(q_idx))}
        if len(q_idx):
            q = np.asarray(emb.subset_posterior(s)[0])[q_idx]
            # The modalities each query has; queries compare on the dimensions theirs inform.
            used = (emb.present[q_idx] > 0) & (s > 0)
            ranked = np.full((len(q_idx), min(k, len(labels))), -1, np.int64)
            for pattern in np.unique(used, axis=0):
                sel = np.nonzero(np.all(used == pattern, 1))[0]
                dims = emb.query_dims(pattern.astype(np.float32)) if hasattr(emb, "query_dims") else None
                qq, dd = (q[sel], db) if dims is None else (q[sel] * dims, db * dims)
                ranked[sel] = exact_search(qq, dd, k, metric=metric, exclude=q_idx[sel])[0]
            res = retrieval_metrics(None, None, labels[q_idx], labels, k, exclude=q_idx, ranked=ranked,
                                    multilabel=multilabel, n_boot=n_boot, seed=seed)
            row["num_queries"] = int(res["num_queries"])
            if chance and not multilabel:
                row[f"chance_map@{k}"] = chance_map(labels, q_idx, k, seed=seed)
            for name in METRICS:
                mean, lo, hi = res[f"{name}@{k}"]
                row[f"{name}@{k}"], row[f"{name}@{k}_lo"], row[f"{name}@{k}_hi"] = float(mean), float(lo), float(hi)
        rows.append(row)
    return rows


def chance_map(labels: Sequence, query_idx: Sequence[int], k: int = 10, *, draws: int = 20,
               seed: int = 0) -> float:
    """Mean mAP@k of uniformly random rankings of the database for the given queries.

    Same protocol as :func:`evaluate`: the database is every case, the query itself
    excluded, relevance = same label; averaged over ``draws`` random rankings.
    """
    labels = np.asarray([str(v) for v in labels], dtype=object)
    q = np.asarray([i for i in query_idx if labels[i] != ""], np.int64)
    n = len(labels)
    if not len(q):
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        ranked = np.full((len(q), k), -1, np.int64)       # -1: no result (k ≥ the other cases)
        for r, i in enumerate(q):
            perm = rng.permutation(n)
            rest = perm[perm != i][:k]
            ranked[r, :len(rest)] = rest
        res = retrieval_metrics(None, None, labels[q], labels, k, exclude=q, ranked=ranked, n_boot=0)
        vals.append(float(res[f"map@{k}"][0]))
    return float(np.mean(vals))


def markdown_table(rows: list[dict], k: int = 10) -> str:
    """Rows of :func:`evaluate` as a Markdown table (a chance column when the rows have one)."""
    ch = any(f"chance_map@{k}" in r for r in rows)
    head = (f"| query | n | mAP@{k} (95% CI) | P@{k} | R@{k} | nDCG@{k} |" + (f" chance mAP@{k} |" if ch else "")
            + "\n|---|---:|---|---:|---:|---:|" + ("---:|" if ch else "") + "\n")
    lines = []
    for r in rows:
        if f"map@{k}" not in r:
            lines.append(f"| {r['query']} | 0 | – | – | – | – |" + (" – |" if ch else ""))
            continue
        lines.append(f"| {r['query']} | {r['num_queries']} | {r[f'map@{k}']:.3f} "
                     f"({r[f'map@{k}_lo']:.3f}–{r[f'map@{k}_hi']:.3f}) | {r[f'precision@{k}']:.3f} | "
                     f"{r[f'recall@{k}']:.3f} | {r[f'ndcg@{k}']:.3f} |"
                     + (f" {r[f'chance_map@{k}']:.3f} |" if ch else ""))
    return head + "\n".join(lines) + "\n"
