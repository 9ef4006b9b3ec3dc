"""The evaluation protocol every experiment cell and baseline shares.

Split: :func:`mmvae.data.dataset.split_indices` with the config's ``data.val_fraction``
and ``data.split_seed`` — the same split training uses, so a model (or a baseline fitted
on labels) never saw the labels of a query. Queries: the held-out cases that have every
modality of the query subset and a label. Database: every case of the cohort (training
and held-out) under its full-modality embedding, the query itself excluded. Relevance:
same label. Metrics: P/R/mAP/nDCG@k with percentile-bootstrap 95% CIs over queries.

A method exposes its embeddings as anything with ``modalities``, ``present (N, M)``,
``labels``, ``mu (N, D)`` (database rows) and ``subset_posterior(subset) -> (vectors,
_)`` — :class:`mmvae.retrieval.embed.Embeddings` for the VAEs, :class:`BlockEmbeddings`
for baselines built from per-modality feature blocks.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mmvae.data.dataset import split_indices
from mmvae.retrieval.evaluate import METRICS, all_query_subsets, subset_name
from mmvae.retrieval.metrics import retrieval_metrics

COMBINES = ("concat", "mean")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class BlockEmbeddings:
    """Per-modality feature blocks ``blocks (N, M, D)`` with presence ``present (N, M)``.

    The embedding of a case from a modality subset S combines its blocks in S that are
    present: ``concat`` — each block L2-normalised, absent blocks zero, concatenated
    (N, M·D); ``mean`` — mean of the L2-normalised present blocks (N, D), for methods
    whose blocks share one space (e.g. a CLIP-style model). Cases with no block in S
    get a zero vector.
    """
    case_ids: list[str]
    modalities: list[str]
    blocks: np.ndarray
    present: np.ndarray
    labels: list[dict]
    combine: str = "concat"

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        n, m, _ = self.blocks.shape
        if self.present.shape != (n, m) or len(self.case_ids) != n or len(self.labels) != n:
            raise ValueError(f"inconsistent shapes: blocks {self.blocks.shape}, present {self.present.shape}, "
                             f"{len(self.case_ids)} ids, {len(self.labels)} labels")
        if len(self.modalities) != m:
            raise ValueError(f"{len(self.modalities)} modality names for {m} blocks")

    def subset_posterior(self, subset: np.ndarray) -> tuple[np.ndarray, None]:
        """Embeddings ``(N, D')`` from the modalities in ``subset`` (M,) only."""
        mask = (self.present * np.asarray(subset, np.float32)[None]) > 0          # (N, M)
        b = _unit(self.blocks.astype(np.float32)) * mask[..., None]
        if self.combine == "concat":
            return b.reshape(b.shape[0], -1), None
        return b.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1), None

    @property
    def mu(self) -> np.ndarray:
        return self.subset_posterior(np.ones(len(self.modalities), np.float32))[0]


def held_out(n: int, config) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, query_idx)`` of a cohort of ``n`` cases: the training run's split."""
    return split_indices(n, float(config.data.val_fraction), int(config.data.split_seed))


def evaluate(emb, label: str, query_idx: np.ndarray, k: int = 10, *,
             subsets: Sequence[np.ndarray] | None = None, metric: str = "cosine",
             n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per query subset: ``query``, ``num_queries``, ``<metric>@k`` and ``_lo``/``_hi``.

    Subsets default to every non-empty subset of ``emb.modalities``. A subset no query
    case has yields a row with ``num_queries = 0`` and no metrics.
    """
    labels = np.asarray([lab.get(label, "") for lab in emb.labels], dtype=object)
    eligible = np.zeros(len(labels), bool)
    eligible[np.asarray(query_idx, int)] = True
    db = np.asarray(emb.mu)
    rows = []
    for s in (subsets if subsets is not None else all_query_subsets(emb.modalities)):
        s = np.asarray(s, np.float32)
        q_idx = np.nonzero(eligible & np.all(emb.present[:, s > 0] > 0, axis=1) & (labels != ""))[0]
        row = {"query": subset_name(emb.modalities, s), "num_queries": int(len(q_idx))}
        if len(q_idx):
            q = np.asarray(emb.subset_posterior(s)[0])
            db_s = db
            dims = emb.query_dims(s) if hasattr(emb, "query_dims") else None
            if dims is not None:     # private blocks: compare on the dimensions the query informs
                q, db_s = q * dims, db * dims
            res = retrieval_metrics(q[q_idx], db_s, labels[q_idx], labels, k, exclude=q_idx, metric=metric,
                                    n_boot=n_boot, seed=seed)
            row["num_queries"] = int(res["num_queries"])
            for name in METRICS:
                mean, lo, hi = res[f"{name}@{k}"]
                row[f"{name}@{k}"], row[f"{name}@{k}_lo"], row[f"{name}@{k}_hi"] = float(mean), float(lo), float(hi)
        rows.append(row)
    return rows


def tidy(rows: list[dict], k: int = 10, **cell) -> list[dict]:
    """Long format: one row per (cell, query, metric) with ``value``, ``lo``, ``hi``.

    ``cell`` holds the cell's identifying columns (method, fusion, objective,
    train_subset, seed, ...), copied onto every row.
    """
    out = []
    for r in rows:
        for name in METRICS:
            key = f"{name}@{k}"
            if key not in r:
                continue
            out.append(dict(cell, query=r["query"], num_queries=r["num_queries"], metric=key,
                            value=r[key], lo=r[f"{key}_lo"], hi=r[f"{key}_hi"]))
    return out
