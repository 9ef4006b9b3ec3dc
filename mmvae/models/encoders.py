"""Modality encoders (data → Gaussian expert over the shared latent) and decoders.

Shapes at the boundaries (B: batch, S: series per modality, L: latent size):

* :class:`ImageEncoder`: ``(B, S, *spatial)`` + series mask ``(B, S)`` → mu, logvar ``(B, L)``
* :class:`ImageDecoder`: ``z (N, L)`` → ``(N, *spatial)``
* :class:`ReportEncoder`: token ids, mask ``(B, T)`` → mu, logvar ``(B, L)``
* :class:`BagOfWordsDecoder`: ``z (N, L)`` → logits ``(N, V)``
* :class:`ClinicalEncoder` / :class:`ClinicalDecoder`: masked tabular fields.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.models import fusion
from mmvae.models.layers import MLP, ConvResBlock, Downsample, Upsample
from mmvae.models.text import BertConfig, BertEncoder, mean_pool

SET_POOLINGS = ("poe", "mean", "attention")
POOLINGS = ("flatten", "attention", "max", "multiscale")


def total_factor(channels: Sequence[int], patch: int = 2) -> int:
    """Down-sampling factor of an encoder: ``patch · 2^(stages - 1)``."""
    return int(patch) * 2 ** (len(channels) - 1)


class ImageEncoder(nnx.Module):
    """Residual conv encoder with space-to-depth down-sampling, applied to a set of series.

    Stage i: Downsample(×1/f_i, c_{i-1} → c_i) then ``blocks`` residual blocks at c_i, with
    f_0 = ``patch`` (a patch stem) and f_i = 2 after. No blocks at stage 0 unless
    ``full_res_blocks``: 3^d convolutions on few channels at a fine resolution cost most
    of the FLOPs and run at a fraction of matmul speed on CPU (measured, 2 cores: 3^3 conv
    16→16 channels at 32³ ~13 GFLOP/s fwd+bwd; 64→64 at 16³ ~47; 128→128 at 8³ ~70; a
    large matmul ~160), so the fast configuration is a wide patch stem (``patch=4``) with
    blocks on ≥ 64 channels. The
    final ``(spatial / (patch·2^(n-1))) × c_n`` feature map is flattened into a feature vector per
    series; series of one case are pooled permutation-invariantly (``set_pooling``):

    * ``poe``: each series gets its own Gaussian; they are multiplied (no prior);
    * ``mean``: masked mean of the series features, then one Gaussian;
    * ``attention``: one learned query attends over the series features (masked).
    """

    def __init__(self, shape: Sequence[int], channels: Sequence[int], latent_dim: int, *,
                 blocks: int = 1, full_res_blocks: bool = False, set_pooling: str = "poe", patch: int = 2,
                 pooling: str = "flatten", dtype=jnp.float32, rngs: nnx.Rngs):
        if set_pooling not in SET_POOLINGS:
            raise ValueError(f"unknown set_pooling {set_pooling!r}; choose one of {SET_POOLINGS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling = pooling
        d = len(shape)
        factor = total_factor(channels, patch)
        if any(s % factor for s in shape):
            raise ValueError(f"image shape {tuple(shape)} must be divisible by {factor} "
                             f"(patch {patch} × 2 ** (number of stages {len(channels)} - 1))")
        self.spatial_dims = d
        self.set_pooling = set_pooling
        stages = []
        cin = 1
        for i, c in enumerate(channels):
            stages.append(Downsample(cin, c, d, factor=patch if i == 0 else 2, dtype=dtype, rngs=rngs))
            n_blocks = blocks if (i > 0 or full_res_blocks) else 0
            stages.extend(ConvResBlock(c, d, dtype=dtype, rngs=rngs) for _ in range(n_blocks))
            cin = c
        self.stages = nnx.List(stages)
        c_n = channels[-1]
        if pooling == "flatten":
            feat = int(math.prod(s // factor for s in shape)) * c_n
        elif pooling == "multiscale":
            feat = 2 * sum(int(c) for c in channels)
        else:
            feat = 2 * c_n
        if pooling == "attention":
            self.att_v = nnx.Linear(c_n, c_n, rngs=rngs)
            self.att_u = nnx.Linear(c_n, c_n, rngs=rngs)
            self.att_w = nnx.Linear(c_n, 1, rngs=rngs)
        self.feature = nnx.Linear(feat, 4 * latent_dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(4 * latent_dim, 2 * latent_dim, rngs=rngs)
        if set_pooling == "attention":
            self.query = nnx.Param(jnp.zeros((4 * latent_dim,)))
            self.key = nnx.Linear(4 * latent_dim, 4 * latent_dim, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """``(N, *spatial)`` → ``(N, F)``."""
        h = x[..., None]
        pooled = []
        for i, layer in enumerate(self.stages):
            if self.pooling == "multiscale" and isinstance(layer, Downsample) and i > 0:
                pooled.append(_max_mean(h))                     # the previous stage's output
            h = layer(h)
        if self.pooling == "multiscale":
            h = jnp.concatenate(pooled + [_max_mean(h)], -1)
        elif self.pooling == "flatten":
            h = h.reshape(h.shape[0], -1)
        else:
            h = h.reshape(h.shape[0], -1, h.shape[-1]).astype(jnp.float32)          # (N, P, C)
            mean = jnp.mean(h, axis=1)
            if self.pooling == "max":
                h = jnp.concatenate([jnp.max(h, axis=1), mean], -1)
            else:
                gate = jnp.tanh(self.att_v(h)) * jax.nn.sigmoid(self.att_u(h))
                a = jax.nn.softmax(self.att_w(gate)[..., 0], axis=1)              # (N, P)
                h = jnp.concatenate([jnp.einsum("np,npc->nc", a, h), mean], -1)
        return jax.nn.silu(self.feature(h)).astype(jnp.float32)

    def __call__(self, x: jax.Array, series_mask: jax.Array) -> fusion.Gaussian:
        b, s = x.shape[:2]
        h = self.features(x.reshape((b * s,) + x.shape[2:])).reshape(b, s, -1)
        m = series_mask.astype(jnp.float32)
        if self.set_pooling == "poe":
            out = self.head(h)
            mu, lv = jnp.split(out, 2, axis=-1)
            return fusion.poe(mu, lv, m, prior=False)
        if self.set_pooling == "mean":
            pooled = jnp.sum(h * m[..., None], 1) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1.0)
        else:
            scores = jnp.einsum("bsf,f->bs", self.key(h), self.query[...]) / math.sqrt(h.shape[-1])
            scores = jnp.where(m > 0, scores, -1e9)
            w = jax.nn.softmax(scores, axis=-1) * (jnp.sum(m, 1, keepdims=True) > 0)
            pooled = jnp.einsum("bs,bsf->bf", w, h)
        mu, lv = jnp.split(self.head(pooled), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


def _max_mean(h: jax.Array) -> jax.Array:
    """``(N, *spatial, C)`` → ``(N, 2C)``: global max and mean over the spatial axes."""
    h = h.reshape(h.shape[0], -1, h.shape[-1]).astype(jnp.float32)
    return jnp.concatenate([jnp.max(h, axis=1), jnp.mean(h, axis=1)], -1)


class ImageDecoder(nnx.Module):
    """Mirror of :class:`ImageEncoder`: dense → (residual blocks, Upsample ×2) per stage, the
    last Upsample by ``patch``.

    ``full_res_channels`` > 0: the last Upsample makes a full-resolution feature map of that
    many channels, then a per-voxel dense layer gives intensities (-1: ``max(8, c_0 // 2)``).
    0: the last Upsample emits the intensities itself (SiLU → dense to ``patch^d`` values
    per coarse voxel → depth-to-space, an "unpatchify" head): no full-resolution
    activations, which with many subset decodes per case dominate memory and time.
    """

    def __init__(self, shape: Sequence[int], channels: Sequence[int], latent_dim: int, *,
                 blocks: int = 1, full_res_blocks: bool = False, patch: int = 2, full_res_channels: int = -1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        d = len(shape)
        factor = total_factor(channels, patch)
        self.base = tuple(s // factor for s in shape)
        self.c_last = channels[-1]
        self.inp = nnx.Linear(latent_dim, int(math.prod(self.base)) * channels[-1], dtype=dtype, rngs=rngs)
        layers = []
        rev = list(channels[::-1])
        for i, c in enumerate(rev):
            n_blocks = blocks if (i < len(rev) - 1 or full_res_blocks) else 0
            layers.extend(ConvResBlock(c, d, dtype=dtype, rngs=rngs) for _ in range(n_blocks))
            last = i == len(rev) - 1
            if not last:
                cout = rev[i + 1]
            else:
                cout = max(8, rev[-1] // 2) if full_res_channels < 0 else (full_res_channels or 1)
            layers.append(Upsample(c, cout, d, factor=patch if last else 2, dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)
        self.direct = full_res_channels == 0
        self.out = None if self.direct else nnx.Linear(cout, 1, rngs=rngs)

    @property
    def out_patch(self) -> int | None:
        """With the unpatchify head, the factor f of :meth:`__call__`'s ``patched`` layout."""
        return self.layers[-1].factor if self.direct else None

    def __call__(self, z: jax.Array, patched: bool = False) -> jax.Array:
        """``z (N, L)`` → ``(N, *shape)`` intensities.

        ``patched`` (unpatchify head only; ignored otherwise): ``(N, *shape/f, f^d)``, the
        layout :func:`space_to_depth` gives the image, skipping the depth-to-space. A
        likelihood summed over voxels is the same in either layout; this one saves the
        transpose of every subset's full-resolution output and its gradient.
        """
        h = self.inp(z).reshape((z.shape[0],) + self.base + (self.c_last,))
        for layer in self.layers[:-1]:
            h = layer(h)
        if self.direct:
            if patched:
                return self.layers[-1].proj(jax.nn.silu(h)).astype(jnp.float32)
            return self.layers[-1](jax.nn.silu(h)).astype(jnp.float32)[..., 0]
        h = self.layers[-1](h)
        return self.out(jax.nn.silu(h)).astype(jnp.float32)[..., 0]


class ReportEncoder(nnx.Module):
    """BERT encoder → masked mean pooling → dense → Gaussian (mu, logvar)."""

    def __init__(self, cfg: BertConfig, latent_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.bert = BertEncoder(cfg, dtype=dtype, rngs=rngs)
        self.head = MLP([cfg.hidden_size, 4 * latent_dim, 2 * latent_dim], rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> fusion.Gaussian:
        h = self.bert(ids, mask)
        pooled = mean_pool(h, mask).astype(jnp.float32)
        mu, lv = jnp.split(self.head(pooled), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


class LabelEncoder(nnx.Module):
    """Class index ``(B,)`` → Gaussian expert: embedding → MLP → (mu, logvar) ``(B, L)``.

    The label is one more modality (semi-supervised multimodal VAE): where a case has no
    label its expert is masked out of the fusion, so queries never need one.
    """

    def __init__(self, num_classes: int, latent_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(num_classes, hidden, rngs=rngs)
        self.mlp = MLP([hidden, hidden, 2 * latent_dim], rngs=rngs)

    def __call__(self, ids: jax.Array) -> fusion.Gaussian:
        mu, lv = jnp.split(self.mlp(jax.nn.silu(self.embed(ids))), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


class LabelDecoder(nnx.Module):
    """``z (N, L)`` → class logits ``(N, C)`` of a categorical likelihood."""

    def __init__(self, num_classes: int, latent_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([latent_dim, hidden, num_classes], rngs=rngs)

    def __call__(self, z):
        return self.mlp(z)


class BagOfWordsDecoder(nnx.Module):
    """``z (N, L)`` → vocabulary logits ``(N, V)`` of a multinomial over report words."""

    def __init__(self, latent_dim: int, vocab_size: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([latent_dim, hidden, vocab_size], rngs=rngs)

    def __call__(self, z):
        return self.mlp(z)


class TokenDecoder(nnx.Module):
    """``z (N, L)`` → per-position vocabulary logits ``(N, T, V)`` (non-autoregressive).

    Each position gets ``MLP(z) + position embedding`` → SiLU → dense to the vocabulary.
    """

    def __init__(self, latent_dim: int, vocab_size: int, max_len: int, hidden: int, *, rngs: nnx.Rngs):
        self.inp = MLP([latent_dim, hidden, hidden], rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, hidden)))
        self.out = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, z):
        h = self.inp(z)[:, None, :] + self.pos[...][None]
        return self.out(jax.nn.silu(h))


class ClinicalEncoder(nnx.Module):
    """Masked tabular fields → Gaussian. Input: values·mask and the mask itself, so a
    missing field is distinguishable from a zero value."""

    def __init__(self, num_numeric: int, cardinalities: Sequence[int], latent_dim: int, hidden: int, *,
                 rngs: nnx.Rngs):
        self.cardinalities = tuple(int(c) for c in cardinalities)
        din = 2 * num_numeric + sum(self.cardinalities) + len(self.cardinalities)
        self.mlp = MLP([din, hidden, hidden, 2 * latent_dim], rngs=rngs)

    def __call__(self, num, num_mask, cat, cat_mask) -> fusion.Gaussian:
        parts = [num * num_mask, num_mask]
        for f, card in enumerate(self.cardinalities):
            parts.append(jax.nn.one_hot(cat[:, f], card) * cat_mask[:, f:f + 1])
        parts.append(cat_mask)
        mu, lv = jnp.split(self.mlp(jnp.concatenate(parts, -1)), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


class ClinicalDecoder(nnx.Module):
    """``z`` → (numeric predictions ``(N, Fn)``, list of per-field logits)."""

    def __init__(self, num_numeric: int, cardinalities: Sequence[int], latent_dim: int, hidden: int, *,
                 rngs: nnx.Rngs):
        self.num_numeric = num_numeric
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.mlp = MLP([latent_dim, hidden, num_numeric + sum(self.cardinalities)], rngs=rngs)

    def __call__(self, z):
        out = self.mlp(z)
        num = out[:, : self.num_numeric]
        logits, start = [], self.num_numeric
        for card in self.cardinalities:
            logits.append(out[:, start:start + card])
            start += card
        return num, logits
