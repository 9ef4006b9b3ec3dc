"""Case embeddings: every case's unimodal experts and its fused posterior.

An embedding file (``.npz``, no pickle) holds, for N cases with M modalities and
latent size L: ``experts_mu``/``experts_logvar`` ``(N, M, L)``, ``present`` ``(N, M)``,
``mu``/``logvar`` ``(N, L)`` (the posterior over every modality the case has, under
the model's fusion), ``case_ids``, ``modalities``, ``labels`` (JSON per case) and the
model identity (fingerprint, latent size, checkpoint step, and ``weights_digest``: the
SHA-256 of the exact parameters that encoded the cases, :func:`mmvae.runs.trained.weights_digest`,
recorded by :func:`embed_cohort`; an index built from the file carries it, and a run whose
weights differ refuses that index, :func:`mmvae.retrieval.query.check_weights`). Keeping the experts lets
any query subset be evaluated without re-encoding: the posterior of subset S is
``fuse(experts, present · S)``.

Standardised embeddings (``retrieval.standardize``, the default): every fused posterior
``N(μ, diag e^ℓ)`` is mapped by the per-dimension affine map ``z ↦ (z − c) / s`` with
``c``, ``s`` the mean and standard deviation of the cohort's full posterior means, i.e.
``μ' = (μ − c)/s`` and ``ℓ' = ℓ − 2 log s`` (still a Gaussian, so posterior-aware
re-rankers stay exact). Cosine on standardised means weighs every latent dimension
equally instead of letting a few high-variance ones (e.g. demographics) dominate;
measured on the quickstart: all-modality mAP@10 0.18 → 0.23 (docs/results.md). The
statistics are stored in ``identity['standardize']`` and travel into the index, whose
queries are mapped the same way (:func:`apply_standardize`).

What a case's retrieval vector is (``retrieval.embedding``, :func:`case_vectors`):

- ``fused``: the fused posterior mean ``μ_S`` of the modalities ``S`` it has, ``(E,)``.
- ``experts`` (the default): the unimodal experts' means (each expert's shared and own
  private dimensions, :func:`own_dims`), each standardised by its own cohort statistics and
  concatenated, ``(M·(E − (M−1)·P),)``, with zeros in the blocks of absent modalities; a query is compared with the cases on the blocks of the modalities it
  has (:func:`query_dims`), so the cosine is a sum of per-modality agreements. The PoE
  mean is a precision-weighted average that lets the most confident expert dominate
  the direction; the concatenation keeps each modality's evidence, as late fusion of
  per-modality embeddings does in multimodal retrieval (e.g. Baltrušaitis et al. 2019,
  "Multimodal machine learning: a survey and taxonomy", §fusion). Measured on the
  synthetic cohort (docs/model.md, 3 seeds): all-modality mAP@10 0.344 vs 0.298 fused
  (t1+t2+dwi+report 0.410 vs 0.305), tied for single-modality queries. Its Gaussian is the product of the
  experts' (block-diagonal), so posterior-aware re-rankers stay exact; an absent block
  has mean 0 and the prior's log-variance in standardised units (``−2 log s``).
- ``features``: what frozen pretrained networks say of each modality that has one
  (:meth:`mmvae.models.mvae.MultimodalVAE.frozen_features`: the image features of
  :mod:`mmvae.models.features`, the frozen text model's sentence embedding), one block per
  modality, no trained part. ``experts+features``: the expert blocks followed by the feature
  blocks. In both, every dimension is standardised over the cases that have its modality and
  every block is scaled by ``1/√width``, so each block has about unit norm and the cosine is
  about the sum of per-block cosines over the blocks both sides have: a 1,280-wide image block
  does not outvote a 40-wide expert block. This is the zero-shot baseline of frozen slice
  embeddings (Khun Jush et al. 2024) kept inside the model's retrieval, so the retrieval
  vectors never know less than the frozen networks (docs/model.md). A frozen block's
  log-variance is the cohort's spread (0 before standardisation, ``−2 log s`` after).

The layout of ``features`` and ``experts+features`` vectors is ``identity['blocks']``:
``[[modality, width], ...]`` in vector order (:func:`vector_blocks`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mmvae.atomic import atomic_write_bytes
from mmvae.data.dataset import Cohort
from mmvae.data.pipeline import eval_batches
from mmvae.errors import ConfigError, InputError
from mmvae.models import fusion as F
from mmvae.progress import progress_bar


@dataclasses.dataclass
class Embeddings:
    case_ids: list[str]
    modalities: list[str]
    experts_mu: np.ndarray
    experts_logvar: np.ndarray
    present: np.ndarray
    mu: np.ndarray
    logvar: np.ndarray
    labels: list[dict]
    identity: dict
    fusion: str = "poe"
    # With a label expert: p(label | fused mean) per case (N, C) over label_classes
    # (mmvae.retrieval.uncertainty.label_entropy); None otherwise.
    label_probs: np.ndarray | None = None
    label_classes: list[str] = dataclasses.field(default_factory=list)
    # What mu/logvar hold (module doc): "fused" (N, E), "experts" (N, M·E), "features", "experts+features".
    embedding: str = "fused"
    # Frozen pretrained features (N, Σ_m F_m) of the modalities with frozen_widths[m] > 0, in modality
    # order (zeros where absent); None when the run computed none.
    frozen: np.ndarray | None = None
    frozen_widths: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def from_experts(cls, mu: np.ndarray, logvar: np.ndarray, present: np.ndarray, cohort: Cohort, spec,
                     identity: dict | None = None, embedding: str = "fused",
                     frozen: dict[str, np.ndarray] | None = None) -> "Embeddings":
        """Embeddings of ``cohort`` from its experts ``(N, M, E)`` (unstandardised; see
        :meth:`standardized`); ``embedding``: a kind of :data:`EMBEDDINGS` (module doc);
        ``frozen``: ``{m: (N, F_m)}`` frozen features (needed by the ``features`` kinds).

        Only the observed modalities (``spec.query_modalities``) are kept: a label expert,
        used in training, is never part of a case's embedding."""
        m = len(spec.query_modalities)
        mu, logvar, present = mu[:, :m], logvar[:, :m], present[:, :m]
        ident = dict(identity or {}, shared_dim=spec.latent_dim, private_dim=spec.private_dim)
        ident.pop("standardize", None)
        mat, widths = stack_frozen(frozen, spec.query_modalities, len(mu))
        emb = cls(case_ids=list(cohort.case_ids), modalities=list(spec.query_modalities), experts_mu=mu,
                  experts_logvar=logvar, present=present, mu=mu, logvar=logvar, labels=list(cohort.labels),
                  identity=ident, fusion=spec.fusion, frozen=mat, frozen_widths=widths)
        return emb.as_embedding(embedding)

    def as_embedding(self, embedding: str) -> "Embeddings":
        """The same cases with retrieval vectors of kind ``embedding`` (``fused`` | ``experts``),
        recomputed from the experts, unstandardised (:meth:`standardized` maps them).

        Raises ConfigError for an unknown kind."""
        check_embedding(embedding)
        if "features" in embedding and (self.frozen is None or not any(self.frozen_widths)):
            raise ConfigError(f"retrieval.embedding={embedding!r} needs frozen pretrained features, and these "
                              "embeddings have none: re-embed with a run whose config reads them "
                              "(data.features; a frozen text model for the report)")
        ident = {k: v for k, v in self.identity.items() if k not in ("standardize", "blocks")}
        ident.update(embedding=embedding, latent_dim=embedding_width(
            embedding, self.experts_mu.shape[-1], len(self.modalities), self._private(), self.frozen_widths))
        if "features" in embedding:
            ident["blocks"] = vector_blocks(embedding, self.modalities, self._expert_width(), self.frozen_widths)
        mu, lv = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, embedding,
                              private_dim=self._private(), frozen=self.frozen, frozen_widths=self.frozen_widths)
        return dataclasses.replace(self, mu=mu, logvar=lv, identity=ident, embedding=embedding)

    def _expert_width(self) -> int:
        m, e = self.experts_mu.shape[1], self.experts_mu.shape[2]
        return e - (m - 1) * self._private()

    def standardized(self) -> "Embeddings":
        """These embeddings with the cohort's standardisation applied (see the module doc): centre
        and scale of every dimension from the cases that inform it (``fused``: the full posterior
        means of the cases with at least one modality; ``experts``: each expert's means over the
        cases that have that modality)."""
        if self.identity.get("standardize"):
            return self
        if "features" in self.embedding:
            raw, _ = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding,
                                  private_dim=self._private(), frozen=self.frozen, frozen_widths=self.frozen_widths)
            blocks = self.identity["blocks"]
            owner = np.concatenate([np.full(w, self.modalities.index(m)) for m, w in blocks])
            x = np.where(self.present[:, owner] > 0, raw, np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)        # a modality no case has
                center, scale = np.nanmean(x, 0), np.nanstd(x, 0)
            center, scale = np.nan_to_num(center, nan=0.0), np.nan_to_num(scale, nan=1.0)
            width = np.concatenate([np.full(w, float(w)) for _, w in blocks])
            stats = _stats(center, np.maximum(scale, 1e-6) * np.sqrt(width))      # unit-norm blocks
            mu, lv = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding,
                                  stats, self._private(), self.frozen, self.frozen_widths)
        elif self.embedding == "experts":
            own = own_dims(self.experts_mu, self._private())
            n, m, e = own.shape
            have = self.present > 0                                     # (N, M)
            x = np.where(have[..., None], own, np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)        # a modality no case has
                center, scale = np.nanmean(x, 0), np.nanstd(x, 0)       # (M, E)
            center, scale = np.nan_to_num(center, nan=0.0), np.nan_to_num(scale, nan=1.0)
            stats = _stats(center.reshape(m * e), scale.reshape(m * e))
            mu, lv = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding, stats,
                                  self._private())
        else:
            have = self.present.sum(1) > 0
            base = self.mu[have] if have.any() else self.mu
            stats = _stats(base.mean(0), base.std(0))
            mu, lv = apply_standardize(self.mu, self.logvar, stats)
        return dataclasses.replace(self, mu=mu, logvar=lv, identity=dict(self.identity, standardize=stats))

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What :meth:`standardized` computes its statistics from, for statistics accumulated over
        several parts (:meth:`mmvae.retrieval.shards.ShardSet.standardize_stats`): the unstandardised
        retrieval vectors ``(N, D)``, which of their entries inform each dimension ``(N, D)`` bool, and
        each dimension's block width ``(D,)`` (the ``features`` kinds scale every block by
        ``1/√width``; 1 for the others)."""
        if "features" in self.embedding:
            raw, _ = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding,
                                  private_dim=self._private(), frozen=self.frozen, frozen_widths=self.frozen_widths)
            blocks = self.identity["blocks"]
            owner = np.concatenate([np.full(w, self.modalities.index(m)) for m, w in blocks])
            width = np.concatenate([np.full(w, float(w)) for _, w in blocks])
            return raw, self.present[:, owner] > 0, width
        if self.embedding == "experts":
            raw, _ = case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding,
                                  private_dim=self._private())
            b = raw.shape[1] // self.present.shape[1]
            return raw, np.repeat(self.present > 0, b, axis=1), np.ones(raw.shape[1])
        mu, _ = fused(self.experts_mu, self.experts_logvar, self.present, self.fusion)
        have = self.present.sum(1) > 0          # (the caller falls back to every case when none has one)
        return mu, np.repeat(have[:, None], mu.shape[1], axis=1), np.ones(mu.shape[1])

    def vectors_with(self, stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """The retrieval vectors ``(μ, log σ²)`` ``(N, D)`` of every case standardised by ``stats``
        (statistics of a larger cohort this is part of; None: unstandardised)."""
        return case_vectors(self.experts_mu, self.experts_logvar, self.present, self.fusion, self.embedding,
                            stats, self._private(), self.frozen, self.frozen_widths)

    def query_dims(self, subset: np.ndarray) -> np.ndarray | None:
        """The dimensions a query from ``subset`` (M,) informs, as a 0/1 ``(D,)`` mask, or None when
        every dimension is informed by every modality: see :func:`query_dims`."""
        return query_dims(self.identity, self.modalities, [m for m, x in zip(self.modalities, subset) if x > 0])

    def subset_posterior(self, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each case's retrieval vector ``(N, D)`` (and log-variance) from the modalities in
        ``subset`` (M,) or (N, M) only, mapped as the database (standardisation)."""
        mask = self.present * np.asarray(subset, np.float32)
        return case_vectors(self.experts_mu, self.experts_logvar, mask, self.fusion, self.embedding,
                            self.identity.get("standardize"), self._private(), self.frozen, self.frozen_widths)

    def _private(self) -> int:
        return int(self.identity.get("private_dim", 0) or 0)

    def fused_posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """The fused posterior ``(μ, log σ²)`` ``(N, E)`` over each case's modalities, unstandardised,
        whatever the retrieval vectors are (posterior spread: :mod:`mmvae.retrieval.uncertainty`)."""
        return fused(self.experts_mu, self.experts_logvar, self.present, self.fusion)

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()
        np.savez(buf, experts_mu=self.experts_mu, experts_logvar=self.experts_logvar, present=self.present,
                 mu=self.mu, logvar=self.logvar,
                 case_ids=np.asarray(self.case_ids, dtype=str), modalities=np.asarray(self.modalities, dtype=str),
                 labels=np.asarray([json.dumps(x) for x in self.labels], dtype=str),
                 identity=np.asarray(json.dumps(dict(self.identity, fusion=self.fusion, embedding=self.embedding))),
                 **({"label_probs": self.label_probs, "label_classes": np.asarray(self.label_classes, dtype=str)}
                    if self.label_probs is not None else {}),
                 **({"frozen": self.frozen, "frozen_widths": np.asarray(self.frozen_widths, np.int64)}
                    if self.frozen is not None else {}))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, part_of_set: bool = False) -> "Embeddings":
        """An embeddings file (``.npz``), or a shard-set folder (``mmvae embed`` with several
        processes: :class:`mmvae.retrieval.shards.ShardSet`, concatenated and standardised over
        all its shards). InputError naming the file when it cannot be read, and for one shard of
        a set read on its own (a part of a cohort, unstandardised) unless ``part_of_set``."""
        if Path(path).is_dir():
            from mmvae.retrieval.shards import ShardSet, is_shard_set
            if not is_shard_set(path):
                raise InputError("not an embeddings file or a shard set (no plan.json)", path=str(path))
            return ShardSet(path).embeddings()
        try:
            with np.load(path, allow_pickle=False) as z:
                identity = json.loads(str(z["identity"]))
                if "shard" in identity and not part_of_set:
                    raise InputError("this file is one shard of a shard set (part of the cohort, not standardised): "
                                     "give the set's folder", path=str(path))
                return cls(case_ids=[str(x) for x in z["case_ids"]], modalities=[str(x) for x in z["modalities"]],
                           experts_mu=z["experts_mu"], experts_logvar=z["experts_logvar"], present=z["present"],
                           mu=z["mu"], logvar=z["logvar"], labels=[json.loads(str(x)) for x in z["labels"]],
                           identity=identity, fusion=identity.get("fusion", "poe"),
                           embedding=check_embedding(identity.get("embedding", "fused")),
                           label_probs=z["label_probs"] if "label_probs" in z.files else None,
                           label_classes=[str(x) for x in z["label_classes"]] if "label_classes" in z.files else [],
                           frozen=z["frozen"] if "frozen" in z.files else None,
                           frozen_widths=[int(x) for x in z["frozen_widths"]] if "frozen_widths" in z.files else [])
        except (OSError, ValueError, KeyError, ConfigError, zipfile.BadZipFile, EOFError) as e:
            raise InputError(f"cannot read embeddings: {e}", path=str(path)) from None


def _stats(center: np.ndarray, scale: np.ndarray) -> dict:
    """Standardisation statistics as stored in ``identity['standardize']`` (scale floored at 1e-6)."""
    return {"center": center.astype(float).tolist(), "scale": np.maximum(scale, 1e-6).astype(float).tolist()}


EMBEDDINGS = ("fused", "experts", "features", "experts+features")


def check_embedding(embedding: str) -> str:
    """``embedding`` if it is a kind of :data:`EMBEDDINGS`, else ConfigError."""
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"retrieval.embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    return embedding


def embedding_kind(config) -> str:
    """``config.retrieval.embedding`` (a run saved before the option existed reads ``fused``:
    :data:`mmvae.runs.files.LEGACY_DEFAULTS`)."""
    return check_embedding(str(config.retrieval.embedding))


def embedding_width(embedding: str, expert_dim: int, num_modalities: int, private_dim: int = 0,
                    frozen_widths=()) -> int:
    """Length of a retrieval vector: ``E`` (fused), ``M·(E − (M−1)·P)`` (experts: each expert's
    shared and own private dimensions; ``P`` = ``private_dim``), ``Σ F_m`` (features: the frozen
    widths) or both (experts+features)."""
    m, p = int(num_modalities), int(private_dim or 0)
    kind = check_embedding(embedding)
    if kind == "fused":
        return int(expert_dim)
    width = m * (int(expert_dim) - (m - 1) * p) if "experts" in kind else 0
    return width + (int(sum(frozen_widths)) if "features" in kind else 0)


def vector_blocks(embedding: str, modalities, expert_width: int, frozen_widths) -> list[list]:
    """``[[modality, width], ...]``: the blocks of a ``features`` / ``experts+features`` vector in
    order (expert blocks first, then the frozen blocks of the modalities that have one)."""
    out = [[str(m), int(expert_width)] for m in modalities] if "experts" in embedding else []
    return out + [[str(m), int(w)] for m, w in zip(modalities, frozen_widths) if int(w) > 0]


def stack_frozen(frozen: dict | None, modalities, n: int) -> tuple[np.ndarray | None, list[int]]:
    """``{m: (N, F_m)}`` → ``((N, Σ F_m) in modality order, widths (M,) with 0 for the modalities
    without)``; ``(None, [])`` without any."""
    if not frozen:
        return None, []
    widths = [int(np.asarray(frozen[m]).shape[-1]) if m in frozen else 0 for m in modalities]
    mats = [np.asarray(frozen[m], np.float32).reshape(n, -1) for m in modalities if m in frozen]
    return np.concatenate(mats, 1).astype(np.float32), widths


def own_dims(x: np.ndarray, private_dim: int = 0) -> np.ndarray:
    """Each expert's own dimensions ``(N, M, E) → (N, M, E − (M−1)·P)``: the shared block and
    its modality's private block (on the other private blocks an expert holds the prior
    placeholder, :meth:`mmvae.models.mvae.MultimodalVAE._place`). Unchanged when ``P = 0``."""
    p = int(private_dim or 0)
    if p <= 0:
        return x
    n, m, e = x.shape
    shared = e - m * p
    return np.stack([np.concatenate([x[:, j, :shared], x[:, j, shared + j * p: shared + (j + 1) * p]], -1)
                     for j in range(m)], 1)


def case_vectors(experts_mu: np.ndarray, experts_logvar: np.ndarray, mask: np.ndarray, fusion: str,
                 embedding: str = "fused", stats: dict | None = None,
                 private_dim: int = 0, frozen: np.ndarray | None = None,
                 frozen_widths=()) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval vectors and their log-variances of cases from the experts in ``mask``.

    Args:
      experts_mu, experts_logvar: ``(N, M, E)`` unimodal posteriors (unstandardised).
      mask: ``(N, M)`` 0/1, the experts to use (present · query subset).
      fusion: the model's fusion (``fused`` only).
      embedding: ``fused`` → the fused posterior of the masked experts ``(N, E)``;
        ``experts`` → each expert's own dimensions (:func:`own_dims`) concatenated,
        ``(N, M·B)``; ``features`` → the frozen blocks ``(N, Σ F_m)``; ``experts+features`` →
        both (:func:`vector_blocks`). A masked block has mean 0 and the prior's log-variance
        (``N(0, I)`` mapped by ``stats``: ``−2 log s``), so it counts as unknown.
      stats: standardisation ``{"center", "scale"}`` over the output's dimensions, or None.
      private_dim: the model's private block size ``P`` (``experts`` only).
      frozen, frozen_widths: ``(N, Σ F_m)`` frozen features and each modality's width ``(M,)``
        (:func:`stack_frozen`; the ``features`` kinds only).
    """
    kind = check_embedding(embedding)
    if kind == "fused":
        mu, lv = fused(experts_mu, experts_logvar, mask, fusion)
        return apply_standardize(mu, lv, stats)
    mask = np.asarray(mask) > 0
    mus, lvs, keeps = [], [], []
    if "experts" in kind:
        emu = own_dims(np.asarray(experts_mu, np.float32), private_dim)
        elv = own_dims(np.asarray(experts_logvar, np.float32), private_dim)
        n, m, b = emu.shape
        mus.append(emu.reshape(n, m * b)); lvs.append(elv.reshape(n, m * b))
        keeps.append(np.repeat(mask, b, axis=1))
    if "features" in kind:
        if frozen is None:
            raise ConfigError(f"retrieval.embedding={kind!r} needs frozen pretrained features; none were given")
        start = 0
        for j, w in enumerate(int(x) for x in frozen_widths):
            if w <= 0:
                continue
            block = np.asarray(frozen[:, start:start + w], np.float32)
            mus.append(block); lvs.append(np.zeros_like(block))
            keeps.append(np.repeat(mask[:, j:j + 1], w, axis=1))
            start += w
    mu, lv = np.concatenate(mus, 1), np.concatenate(lvs, 1)
    d = mu.shape[1]
    mu, lv = apply_standardize(mu, lv, stats)
    prior_lv = apply_standardize(np.zeros((1, d), np.float32), np.zeros((1, d), np.float32), stats)[1]
    keep = np.concatenate(keeps, 1)
    return np.where(keep, mu, 0.0).astype(np.float32), np.where(keep, lv, prior_lv).astype(np.float32)


def query_dims(identity: dict, modalities, used) -> np.ndarray | None:
    """0/1 mask ``(D,)`` of the dimensions a query from the ``used`` modalities informs, or None.

    ``fused`` vectors with private blocks (``identity['private_dim'] > 0``): the shared
    dimensions and the private blocks of the ``used`` modalities; the private block of a
    modality the query lacks holds the prior mean 0 in the query, and a database case's
    values there would only add noise to its norm. ``experts`` vectors: the blocks of the
    ``used`` modalities, so a case is compared on the modalities the query has. Returns None
    for fused vectors without private blocks (every dimension is shared).
    """
    p = int(identity.get("private_dim", 0) or 0)
    shared, mods = int(identity.get("shared_dim", 0) or 0), list(modalities)
    if "features" in identity.get("embedding", "fused"):
        return np.concatenate([np.full(int(w), 1.0 if m in used else 0.0, np.float32)
                               for m, w in identity["blocks"]])
    if identity.get("embedding", "fused") == "experts":
        b = int(identity["latent_dim"]) // len(mods)
        return np.concatenate([np.full(b, 1.0 if m in used else 0.0, np.float32) for m in mods])
    if p <= 0:
        return None
    return F.block_mask(shared, p, len(mods), [i for i, m in enumerate(mods) if m in used])


def apply_standardize(mu: np.ndarray, logvar: np.ndarray, stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``(μ − c)/s`` and ``ℓ − 2 log s`` for ``stats = {"center": c, "scale": s}`` (``(E,)`` each);
    unchanged without stats. Shapes ``(..., E)``."""
    if not stats:
        return mu, logvar
    c = np.asarray(stats["center"], np.float32)
    sc = np.asarray(stats["scale"], np.float32)
    return ((mu - c) / sc).astype(np.float32), (logvar - 2.0 * np.log(sc)).astype(np.float32)


_fuse = jax.jit(F.fuse, static_argnums=3)


def fused(mu: np.ndarray, logvar: np.ndarray, mask: np.ndarray, fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mmvae.models.fusion.fuse` on host arrays (one compiled function per fusion and shape)."""
    g = _fuse(mu, logvar, mask, fusion)
    return np.asarray(g.mu), np.asarray(g.logvar)


def make_encode_fn(model: nnx.Module):
    """Jitted ``batch -> (experts_mu, experts_logvar, present)`` for a fixed model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, batch):
        m = nnx.merge(graphdef, state)
        experts, present, _ = m.encode(batch)
        return experts.mu, experts.logvar, present

    return lambda batch: encode(state, batch)


def frozen_from_batch(batch: dict, spec) -> dict[str, np.ndarray]:
    """Host-side :meth:`~mmvae.models.mvae.MultimodalVAE.frozen_features` of a batch that carries
    them precomputed (``features/<m>``; the frozen report BERT's cached ``report/pooled``): the
    training loop's validation pass, which has no model object. ``{m: (B, F_m)}``."""
    out = {}
    for m in spec.image_modalities:
        if f"features/{m}" in batch:
            f = np.asarray(batch[f"features/{m}"], np.float32)
            sm = np.asarray(batch[f"series_mask/{m}"], np.float32) * np.all(np.isfinite(f), -1)
            f = np.where(np.isfinite(f), f, 0.0)
            out[m] = (f * sm[..., None]).sum(1) / np.maximum(sm.sum(1, keepdims=True), 1.0)
    if spec.report and spec.report_decoder == "embedding" and "report/pooled" in batch:
        pooled = np.asarray(batch["report/pooled"], np.float32)
        norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
        present = (np.asarray(batch["report/mask"]).sum(-1) > 0)[:, None]
        out["report"] = np.where(norm > 0, pooled / np.maximum(norm, 1e-12), 0.0) * present
    return out


def make_frozen_fn(model: nnx.Module):
    """Jitted ``batch -> {m: (B, F_m)}``: :meth:`~mmvae.models.mvae.MultimodalVAE.frozen_features`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def frozen(state, batch):
        return nnx.merge(graphdef, state).frozen_features(batch)

    return lambda batch: frozen(state, batch)


def embedding_fns(model) -> tuple:
    """``(encode, frozen, weights digest)`` of ``model`` for :func:`embed_cohort`: the jitted encoder and
    frozen-feature functions (compiled on first use, once per batch shape) and the parameters' digest."""
    from mmvae.runs.trained import weights_digest
    return make_encode_fn(model), make_frozen_fn(model), weights_digest(model)


def embed_cohort(model, cohort: Cohort, *, batch_size: int = 32, identity: dict | None = None,
                 show_progress: bool = True, standardize: bool = True, embedding: str = "fused",
                 fns: tuple | None = None) -> Embeddings:
    """Encode every case of ``cohort`` (batched, jitted; the last batch padded); ``standardize``:
    map the embeddings by the cohort's statistics (:meth:`Embeddings.standardized`);
    ``embedding``: a kind of :data:`EMBEDDINGS` (module doc). The frozen features are kept
    whenever the cohort or the model gives them (the ``features`` kinds need them).
    ``identity`` gets ``weights_digest``, the digest of ``model``'s parameters (the vectors
    are those weights' and no others'). ``fns``: ``(encode, frozen, digest)`` from :func:`embedding_fns`,
    made once for a model that encodes several cohorts (shards): each new jitted closure compiles
    again."""
    encode, frozen_fn, digest = fns or embedding_fns(model)
    identity = dict(identity or {}, weights_digest=digest)
    mus, lvs, pres, frozen = [], [], [], {}
    n_batches = -(-len(cohort) // batch_size)
    for batch, valid in progress_bar(eval_batches(cohort, batch_size), total=n_batches, desc="embed",
                                     enable=show_progress):
        mu, lv, p = jax.device_get(encode(batch))
        mus.append(np.asarray(mu)[valid]); lvs.append(np.asarray(lv)[valid]); pres.append(np.asarray(p)[valid])
        for m, f in jax.device_get(frozen_fn(batch)).items():
            frozen.setdefault(m, []).append(np.asarray(f)[valid])
    emb = Embeddings.from_experts(np.concatenate(mus), np.concatenate(lvs), np.concatenate(pres), cohort,
                                  model.spec, identity, embedding,
                                  frozen={m: np.concatenate(v) for m, v in frozen.items()})
    if model.spec.label_classes:
        emb = dataclasses.replace(emb, label_probs=label_probabilities(model, emb.fused_posterior()[0]),
                                  label_classes=list(model.spec.label_classes))
    return emb.standardized() if standardize else emb


def label_probabilities(model, mu: np.ndarray) -> np.ndarray:
    """The label expert's class probabilities ``softmax(decoder(μ))`` at fused means ``μ (N, E)``
    (unstandardised, as the model produced them) → ``(N, C)``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def probs(state, z):
        m = nnx.merge(graphdef, state)
        return jax.nn.softmax(m.decoders["label"](m._own_z("label", z)), -1)

    return np.asarray(jax.device_get(probs(state, np.asarray(mu, np.float32))), np.float64)
