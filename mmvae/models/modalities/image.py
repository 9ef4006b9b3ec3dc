"""Image modalities (MRI sequences, key images): ``image/<m> (B, S, *shape)``, frozen features
``features/<m> (B, S, F)`` and ``series_mask/<m> (B, S)``.

What the expert reads is ``model.image.input`` (:attr:`ModelSpec.image_input`):

* ``pixels``: residual conv stages with space-to-depth down-sampling, spatial pooling, then
  a set pooling over the S series of a case. Decoder: the mirror, with an optional
  "unpatchify" head. Likelihood: Laplace or Gaussian per voxel with one scale per image
  modality (:func:`mmvae.models.likelihoods.image_log_likelihood`), averaged over a case's
  series.
* ``features``: the frozen pretrained network's pooled features of each series
  (:mod:`mmvae.models.features`) → LayerNorm → MLP → Gaussian, the same set pooling.
  Decoder: an MLP to the mean of a diagonal Gaussian over the features with a learned
  per-dimension log σ (a calibrated decoder, Rybkin et al. 2021), averaged over the series.
  No convolution runs in training: the features are computed once and cached.
* ``both``: the conv encoder's per-series vector and the features' MLP vector concatenated
  before the Gaussian head; the pixel decoder (generation keeps working).

A series holding NaN/Inf is dropped from its case (counted in ``nonfinite``).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models import fusion, likelihoods
from mmvae.models.layers import CONV_IMPLS, MLP, ConvResBlock, Downsample, Upsample, dense, space_to_depth
from mmvae.models.modalities.kind import Kind


def total_factor(channels: Sequence[int], patch: int = 2) -> int:
    """Down-sampling factor of an encoder: ``patch · 2^(stages - 1)``."""
    return int(patch) * 2 ** (len(channels) - 1)


SET_POOLINGS = ("poe", "mean", "attention")
POOLINGS = ("flatten", "attention", "max", "multiscale")


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
                 pooling: str = "flatten", conv: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
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
            stages.extend(ConvResBlock(c, d, dtype=dtype, conv=conv, rngs=rngs) for _ in range(n_blocks))
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
                 conv: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        d = len(shape)
        factor = total_factor(channels, patch)
        self.base = tuple(s // factor for s in shape)
        self.c_last = channels[-1]
        self.inp = nnx.Linear(latent_dim, int(math.prod(self.base)) * channels[-1], dtype=dtype, rngs=rngs)
        layers = []
        rev = list(channels[::-1])
        for i, c in enumerate(rev):
            n_blocks = blocks if (i < len(rev) - 1 or full_res_blocks) else 0
            layers.extend(ConvResBlock(c, d, dtype=dtype, conv=conv, rngs=rngs) for _ in range(n_blocks))
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

    @property
    def deferred(self) -> bool:
        """Unpatchify head and no residual blocks: every layer is a per-voxel dense layer
        followed by a depth-to-space, so the depth-to-spaces can all be skipped (they only
        relabel voxels) and the ``patched`` output keeps the hierarchical order of
        :meth:`patchify`."""
        return self.direct and all(isinstance(layer, Upsample) for layer in self.layers)

    def patchify(self, x: jax.Array) -> jax.Array:
        """``x (N, *shape)`` → the layout of ``__call__(z, patched=True)``.

        Not deferred: :func:`space_to_depth` by the head's factor f, ``(N, *shape/f, f^d)``.
        Deferred: ``(N, P, 1, …, 1, f^d)`` (d + 1 axes after N, like the other patched layout,
        so a patched output never has the unpatched ``(N, *shape)`` rank) with voxels ordered
        (base cell, then each up-sampling's sub-cell, coarse to fine): spatial index
        ``i = ((b·f_1 + s_1)·f_2 + s_2)…`` per axis.
        """
        if not self.deferred:
            return space_to_depth(x[..., None], self.out_patch)
        d = len(self.base)
        factors = [layer.factor for layer in self.layers]             # coarse → fine
        n = x.shape[0]
        split = [n]
        for b in self.base:
            split += [b] + factors
        x = x.reshape(split)
        k = len(factors) + 1                                          # axes per spatial dim
        order = [0] + [1 + a * k + lvl for lvl in range(k) for a in range(d)]
        x = x.transpose(order)
        return x.reshape((n, -1) + (1,) * (d - 1) + (factors[-1] ** d,))

    def __call__(self, z: jax.Array, patched: bool = False) -> jax.Array:
        """``z (N, L)`` → ``(N, *shape)`` intensities.

        ``patched`` (unpatchify head only; ignored otherwise): the layout :meth:`patchify`
        gives the image, skipping the last depth-to-space (and, when :attr:`deferred`, every
        depth-to-space). A likelihood summed over voxels is the same in any layout; this one
        saves the transposes of every subset's output and their gradients.
        """
        if patched and self.deferred:
            n = z.shape[0]
            h = dense(z, self.inp).reshape(n, -1, self.c_last)                     # (N, P, C)
            for layer in self.layers[:-1]:
                h = dense(h, layer.proj)                                           # (N, P, f^d C')
                h = h.reshape(n, -1, h.shape[-1] // layer.factor ** len(self.base))  # (N, P f^d, C')
            out = dense(jax.nn.silu(h), self.layers[-1].proj).astype(jnp.float32)      # (N, P, f^d)
            return out.reshape(out.shape[:2] + (1,) * (len(self.base) - 1) + out.shape[2:])
        h = self.inp(z).reshape((z.shape[0],) + self.base + (self.c_last,))
        for layer in self.layers[:-1]:
            h = layer(h)
        if self.direct:
            if patched:
                return self.layers[-1].proj(jax.nn.silu(h)).astype(jnp.float32)
            return self.layers[-1](jax.nn.silu(h)).astype(jnp.float32)[..., 0]
        h = self.layers[-1](h)
        return self.out(jax.nn.silu(h)).astype(jnp.float32)[..., 0]


# ---------------------------------------------------------------------------- the kind
def _inputs(batch: dict, m: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x (B, S, *shape) with non-finite values zeroed, series mask (B, S) without the
    non-finite series, count of present series dropped as non-finite ())``."""
    x, sm = batch[f"image/{m}"], batch[f"series_mask/{m}"].astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(x.reshape(x.shape[:2] + (-1,))), axis=-1)
    dropped = jnp.sum((~finite) & (sm > 0)).astype(jnp.int32)
    return jnp.where(jnp.isfinite(x), x, 0.0), sm * finite, dropped


def _targets(dec, batch: dict, m: str, patched: bool) -> tuple[jax.Array, jax.Array]:
    """The likelihood's target ``(B, S, *shape)`` (``patched``: ``(B, S, *coarse, f^d)``, the
    decoder's :meth:`ImageDecoder.patchify` layout) with non-finite values zeroed, and the
    series mask ``(B, S)`` without the non-finite series."""
    x, sm, _ = _inputs(batch, m)
    if patched:
        b, s = x.shape[:2]
        x = dec.patchify(x.reshape((b * s,) + x.shape[2:]))
        x = x.reshape((b, s) + x.shape[1:])
    return x, sm


def _likelihood_targets(model, m: str, batch: dict) -> dict:
    """``{"target/m", "target_mask/m"}`` of :func:`_targets` in the layout the decoder's
    patched output has; none for frozen-feature decoders. Computed once per step before the
    chunked decode loop: inside it, XLA recomputed the zeroing, the finite-series mask and the
    patchify transpose of the 64³ targets in every chunk (0.5 s of a 9.4 s bench step)."""
    if model.spec.image_input == "features":
        return {}
    dec = model.decoders[m]
    x, sm = _targets(dec, batch, m, dec.out_patch is not None)
    return {f"target/{m}": x, f"target_mask/{m}": sm}


class FeatureEncoder(nnx.Module):
    """Frozen features ``(B, S, F)`` (and, with ``pixels``, the images) → Gaussian ``(B, L)``.

    Per series: LayerNorm → MLP(F → hidden → 4L) → SiLU (‖ the conv encoder's 4L-vector of the
    series' pixels when ``pixels`` is given) → dense → (μ, log σ²); series of a case are pooled
    like :class:`ImageEncoder`'s (``poe``: product of the series' Gaussians; ``mean``: masked
    mean of the vectors, then one Gaussian).
    """

    def __init__(self, feature_dim: int, hidden: int, latent_dim: int, *, pixels: ImageEncoder | None = None,
                 set_pooling: str = "poe", dtype=jnp.float32, rngs: nnx.Rngs):
        if set_pooling not in ("poe", "mean"):
            raise ConfigError(f"model.image.set_pooling={set_pooling!r} is not available with feature inputs "
                              "(poe | mean)")
        self.set_pooling = set_pooling
        self.norm = nnx.LayerNorm(feature_dim, rngs=rngs)
        self.mlp = MLP([feature_dim, hidden, 4 * latent_dim], dtype=dtype, rngs=rngs)
        self.pixels = pixels
        self.head = nnx.Linear(4 * latent_dim * (2 if pixels is not None else 1), 2 * latent_dim, rngs=rngs)

    def __call__(self, feats: jax.Array, series_mask: jax.Array, x: jax.Array | None = None) -> fusion.Gaussian:
        b, s = feats.shape[:2]
        h = jax.nn.silu(self.mlp(self.norm(feats.astype(jnp.float32)))).astype(jnp.float32)      # (B, S, 4L)
        if self.pixels is not None:
            h = jnp.concatenate([h, self.pixels.features(x.reshape((b * s,) + x.shape[2:])).reshape(b, s, -1)], -1)
        m = series_mask.astype(jnp.float32)
        if self.set_pooling == "poe":
            mu, lv = jnp.split(self.head(h), 2, axis=-1)
            return fusion.poe(mu, lv, m, prior=False)
        pooled = jnp.sum(h * m[..., None], 1) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1.0)
        mu, lv = jnp.split(self.head(pooled), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


class FeatureDecoder(nnx.Module):
    """``z (N, L)`` → mean ``(N, F)`` of a diagonal Gaussian over the frozen features, with a
    learned per-dimension log σ ``(F,)`` floored at :data:`FEATURE_MIN_LOG_SCALE`."""

    def __init__(self, latent_dim: int, feature_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([latent_dim, hidden, feature_dim], rngs=rngs)
        self.log_scale = nnx.Param(jnp.full((feature_dim,), -1.0, jnp.float32))

    def __call__(self, z: jax.Array, patched: bool = False) -> jax.Array:
        return self.mlp(z).astype(jnp.float32)


# The features are a deterministic function of the pixels: without a floor σ could shrink without
# bound on a small cohort and the image term own the ELBO (as for the report embedding decoder).
FEATURE_MIN_LOG_SCALE = -6.0


def _pixel_encoder(spec, latent: int, dtype, rngs: nnx.Rngs) -> ImageEncoder:
    return ImageEncoder(spec.shape, spec.channels, latent, blocks=spec.blocks, patch=spec.patch,
                        full_res_blocks=spec.full_res_blocks, set_pooling=spec.set_pooling,
                        pooling=spec.pooling, conv=spec.conv, dtype=dtype, rngs=rngs)


def _encoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs) -> ImageEncoder | FeatureEncoder:
    if spec.image_input == "features":
        return FeatureEncoder(spec.feature_dim, spec.feature_hidden, latent, set_pooling=spec.set_pooling,
                              dtype=dtype, rngs=rngs)
    if spec.image_input == "both":
        return FeatureEncoder(spec.feature_dim, spec.feature_hidden, latent, set_pooling=spec.set_pooling,
                              pixels=_pixel_encoder(spec, latent, dtype, rngs), dtype=dtype, rngs=rngs)
    return _pixel_encoder(spec, latent, dtype, rngs)


def _decoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs) -> ImageDecoder | FeatureDecoder:
    if spec.image_input == "features":
        return FeatureDecoder(latent, spec.feature_dim, spec.feature_hidden, rngs=rngs)
    return ImageDecoder(spec.shape, spec.channels, latent, patch=spec.patch,
                        blocks=spec.blocks if spec.decoder_blocks < 0 else spec.decoder_blocks,
                        full_res_blocks=spec.full_res_blocks, full_res_channels=spec.full_res_channels,
                        conv=spec.conv, dtype=dtype, rngs=rngs)


def _feature_inputs(batch: dict, m: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(features (B, S, F) with non-finite values zeroed, series mask without the non-finite
    series, count of present series dropped ())``."""
    f, sm = batch[f"features/{m}"], batch[f"series_mask/{m}"].astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(f), axis=-1)
    dropped = jnp.sum((~finite) & (sm > 0)).astype(jnp.int32)
    return jnp.where(jnp.isfinite(f), f, 0.0), sm * finite, dropped


def _encode(encoder, batch: dict, m: str):
    if isinstance(encoder, FeatureEncoder):
        f, sm, dropped = _feature_inputs(batch, m)
        x = None
        if encoder.pixels is not None:
            x, sm_x, dropped_x = _inputs(batch, m)
            sm, dropped = sm * sm_x, dropped + dropped_x
        return encoder(f, sm, x), (jnp.sum(sm, -1) > 0).astype(jnp.float32), dropped
    x, sm, dropped = _inputs(batch, m)
    return encoder(x, sm), (jnp.sum(sm, -1) > 0).astype(jnp.float32), dropped


def _frozen_features(encoder, batch: dict, m: str, spec) -> jax.Array | None:
    """``(B, F)``: the mean of the present series' frozen features (zeros without any), or None
    when the batch carries none."""
    if f"features/{m}" not in batch:
        return None
    f, sm, _ = _feature_inputs(batch, m)
    return jnp.sum(f * sm[..., None], 1) / jnp.maximum(jnp.sum(sm, 1, keepdims=True), 1.0)


def _log_likelihood(model, m: str, out: jax.Array, batch: dict, reps: int) -> jax.Array:
    """``out (R·B, *shape)`` (or the patched layout; features: ``(R·B, F)``) → ``(R, B)``: mean over
    present series."""
    spec = model.spec
    if spec.image_input == "features":
        f, sm, _ = _feature_inputs(batch, m)
        b = f.shape[0]
        log_scale = jnp.maximum(model.decoders[m].log_scale[...], FEATURE_MIN_LOG_SCALE)
        ll = likelihoods.diagonal_gaussian_log_likelihood(f[None], out.reshape(reps, b, 1, -1), log_scale)
        return jnp.sum(ll * sm[None], -1) / jnp.maximum(jnp.sum(sm, -1), 1.0)[None]
    dec = model.decoders[m]
    # patched output: (R·B, d + 1 axes); plain: (R·B, *shape)
    patched = dec.out_patch is not None and out.ndim == batch[f"image/{m}"].ndim
    pre = batch.get(f"target/{m}")
    if pre is not None and (patched or dec.out_patch is None) and tuple(pre.shape[2:]) == tuple(out.shape[1:]):
        x, sm = pre, batch[f"target_mask/{m}"]                            # _likelihood_targets
    else:
        x, sm = _targets(dec, batch, m, patched)
    b, s = x.shape[:2]
    x_hat = out.reshape((reps, b, 1) + out.shape[1:])
    log_scale = model.log_scale[...][spec.image_modalities.index(m)]
    ll_rs = likelihoods.image_log_likelihood(
        jnp.broadcast_to(x[None], (reps,) + x.shape).reshape((reps * b * s,) + x.shape[2:]),
        jnp.broadcast_to(x_hat, (reps, b, s) + out.shape[1:]).reshape((reps * b * s,) + x.shape[2:]),
        log_scale if spec.learn_scale else jax.lax.stop_gradient(log_scale), spec.likelihood).reshape(reps, b, s)
    return jnp.sum(ll_rs * sm[None], -1) / jnp.maximum(jnp.sum(sm, -1), 1.0)[None]


IMAGE_INPUTS = ("pixels", "features", "both")


def _validate(spec) -> None:
    if not spec.image_modalities:
        return
    if spec.image_input not in IMAGE_INPUTS:
        raise ConfigError(f"model.image.input: unknown {spec.image_input!r}; choose one of {IMAGE_INPUTS}")
    if spec.image_input != "pixels" and spec.feature_dim <= 0:
        raise ConfigError(f"model.image.input={spec.image_input!r} needs the frozen features' size "
                          f"(ModelSpec.feature_dim > 0, from data.features)")
    if spec.image_input != "pixels" and spec.set_pooling not in ("poe", "mean"):
        raise ConfigError(f"model.image.set_pooling={spec.set_pooling!r} is not available with "
                          f"model.image.input={spec.image_input!r} (poe | mean)")
    if spec.image_input == "features":
        return
    if spec.pooling not in POOLINGS:
        raise ConfigError(f"model.image.pooling: unknown {spec.pooling!r}; choose one of {POOLINGS}")
    if spec.conv not in CONV_IMPLS:
        raise ConfigError(f"model.image.conv: unknown {spec.conv!r}; choose one of {CONV_IMPLS}")
    if spec.full_res_channels < -1:
        raise ConfigError(f"model.image.full_res_channels must be -1, 0 or > 0, got {spec.full_res_channels}")
    if spec.patch < 1:
        raise ConfigError(f"model.image.patch must be >= 1, got {spec.patch}")
    if len(spec.shape) not in (2, 3):
        raise ConfigError(f"data.shape must have 2 or 3 axes, got {spec.shape}")
    if spec.channels:
        f = total_factor(spec.channels, spec.patch)
        if any(int(s) % f for s in spec.shape):
            raise ConfigError(f"data.shape {tuple(spec.shape)} must be divisible by {f} = model.image.patch "
                              f"{spec.patch} × 2 ** (len(model.image.channels) {len(spec.channels)} - 1)")


def _batch_keys(spec, m: str) -> dict:
    keys = {f"series_mask/{m}": ((-1,), "float32")}
    if spec.image_input != "features":
        keys[f"image/{m}"] = ((-1,) + tuple(spec.shape), "float32")
    if spec.image_input != "pixels":
        keys[f"features/{m}"] = ((-1, int(spec.feature_dim)), "float32")
    return keys


KIND = Kind(
    name="image", names=lambda spec: tuple(spec.image_modalities), encoder=_encoder, decoder=_decoder,
    encode=_encode, log_likelihood=_log_likelihood, validate=_validate, patched=True,
    batch_keys=_batch_keys, frozen_features=_frozen_features, likelihood_targets=_likelihood_targets,
    size=lambda spec, m: int(spec.feature_dim) if spec.image_input == "features" else int(math.prod(spec.shape)))
