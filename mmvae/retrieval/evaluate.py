"""Leave-one-case-out retrieval over every query subset of modalities.

For a query subset S, every case that has all modalities of S (and a label) queries
the cohort with the posterior of S alone; the database holds every case's posterior
over all of its modalities; the query case itself is excluded. Relevance: same label.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmvae.models.fusion import all_subsets
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.metrics import retrieval_metrics

METRICS = ("map", "precision", "recall", "ndcg")


def subset_name(modalities: Sequence[str], row: np.ndarray) -> str:
    return "+".join(m for m, r in zip(modalities, row) if r > 0)


def parse_subset(name: str, modalities: Sequence[str]) -> np.ndarray:
    parts = [p for p in name.replace(",", "+").split("+") if p]
    unknown = [p for p in parts if p not in modalities]
    if unknown or not parts:
        from mmvae.errors import InputError
        raise InputError(f"query subset {name!r}: unknown modality {unknown}; known: {list(modalities)}")
    return np.asarray([1.0 if m in parts else 0.0 for m in modalities], np.float32)


def all_query_subsets(modalities: Sequence[str]) -> list[np.ndarray]:
    """Every non-empty subset, singletons first (see :func:`mmvae.models.fusion.all_subsets`)."""
    return list(all_subsets(len(modalities)))


def evaluate_subsets(emb: Embeddings, label: str, k: int = 10, *, subsets: Sequence[np.ndarray] | None = None,
                     metric: str = "cosine", multilabel: bool = False, n_boot: int = 1000,
                     seed: int = 0) -> list[dict]:
    """One row per query subset: ``query``, ``num_queries`` and ``<metric>@k`` (+ ``_lo``/``_hi`` CI)."""
    labels = np.asarray([lab.get(label, "") for lab in emb.labels], dtype=object)
    rows = []
    for s in (subsets if subsets is not None else all_query_subsets(emb.modalities)):
        has_all = np.all(emb.present[:, s > 0] > 0, axis=1) & (labels != "")
        q_idx = np.nonzero(has_all)[0]
        row = {"query": subset_name(emb.modalities, s), "num_queries": int(len(q_idx))}
        if len(q_idx) == 0:
            rows.append(row)
            continue
        q_mu, _ = emb.subset_posterior(s)
        db = emb.mu
        dims = emb.query_dims(s)
        if dims is not None:     # compare on the dimensions the query informs (private blocks)
            q_mu, db = q_mu * dims, db * dims
        res = retrieval_metrics(q_mu[q_idx], db, labels[q_idx], labels, k, exclude=q_idx,
                                metric=metric, multilabel=multilabel, n_boot=n_boot, seed=seed)
        row["num_queries"] = int(res.get("num_queries", len(q_idx)))
        for name in METRICS:
            mean, lo, hi = res[f"{name}@{k}"]
            row[f"{name}@{k}"], row[f"{name}@{k}_lo"], row[f"{name}@{k}_hi"] = float(mean), float(lo), float(hi)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], k: int = 10) -> str:
    head = f"| query | n | mAP@{k} (95% CI) | P@{k} | R@{k} | nDCG@{k} |\n|---|---:|---|---:|---:|---:|\n"
    lines = []
    for r in rows:
        if f"map@{k}" not in r:
            lines.append(f"| {r['query']} | 0 | – | – | – | – |")
            continue
        lines.append(f"| {r['query']} | {r['num_queries']} | {r[f'map@{k}']:.3f} "
                     f"({r[f'map@{k}_lo']:.3f}–{r[f'map@{k}_hi']:.3f}) | {r[f'precision@{k}']:.3f} | "
                     f"{r[f'recall@{k}']:.3f} | {r[f'ndcg@{k}']:.3f} |")
    return head + "\n".join(lines) + "\n"
