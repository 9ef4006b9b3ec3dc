"""The evaluation protocol every experiment cell and baseline shares.

Split: :func:`mmvae.data.dataset.split_indices` with the config's ``data.val_fraction``
and ``data.split_seed`` — the same split training uses, so a model (or a baseline fitted
on labels) never saw the labels of a query. Queries: the held-out cases that have every
modality of the query subset and a label. Database: every case of the cohort (training
and held-out) under its full-modality embedding, the query itself excluded. Relevance:
same label. Metrics: P/R/mAP/nDCG@k with BCa bootstrap 95% CIs over queries.

A method exposes its embeddings as anything with ``modalities``, ``present (N, M)``,
``labels``, ``mu (N, D)`` (database rows) and ``subset_posterior(subset) -> (vectors,
_)`` — :class:`mmvae.retrieval.embed.Embeddings` for the VAEs, :class:`BlockEmbeddings`
for baselines built from per-modality feature blocks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmvae.data.dataset import split_indices
from mmvae.retrieval.evaluate import METRICS

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

    def query_dims(self, subset: np.ndarray) -> np.ndarray | None:
        """``concat``: the blocks of the modalities in ``subset`` (M,), as a 0/1 ``(M·D,)`` mask, so
        a query is compared with the cases on the modalities it has (as the VAE's per-expert
        vectors are: :func:`mmvae.retrieval.embed.query_dims`); ``mean``: None (one shared space)."""
        if self.combine != "concat":
            return None
        return np.repeat((np.asarray(subset) > 0).astype(np.float32), self.blocks.shape[2])

    @property
    def mu(self) -> np.ndarray:
        return self.subset_posterior(np.ones(len(self.modalities), np.float32))[0]


def held_out(n: int, config) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, query_idx)`` of a cohort of ``n`` cases: the training run's split."""
    return split_indices(n, float(config.data.val_fraction), int(config.data.split_seed))


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
