r"""Random MR-like perturbations of preprocessed images, in JAX (on device, inside jit).

Used for self-supervision within a modality (two views of one case, SimCLR, Chen et al.
2020): a view keeps the anatomy and findings of the case and changes what varies between
scanners and sessions. For a z-scored image ``x`` with foreground :math:`F = \{x \ne 0\}`
(preprocessing zeroes the background) each case and sequence independently gets

.. math::
    x' = \operatorname{shift}\big(\operatorname{flip}\big([\,g\,x\,b(u) + o + \sigma\epsilon\,]\cdot 1_F\big)\big)

* gain :math:`g = e^{a}`, :math:`a\sim U(-\text{gain}, \text{gain})`; offset
  :math:`o\sim U(-\text{gain}/2, \text{gain}/2)` (z units);
* a smooth multiplicative bias field :math:`b(u) = \exp(\sum_i c_i u_i + d_i u_i^2)` over
  normalised coordinates :math:`u\in[-1, 1]^d`, :math:`c_i, d_i \sim U(-\text{bias}, \text{bias})`
  (the low-order polynomial model of intensity inhomogeneity, as in TorchIO's RandomBiasField);
* Gaussian noise :math:`\sigma\sim U(0, \text{noise})` on the foreground;
* a flip of the first (left-right in RAS) axis with probability 1/2;
* a circular shift by an integer number of voxels, uniform in
  :math:`[-\lfloor \text{shift}\cdot n_i\rfloor, \lfloor \text{shift}\cdot n_i\rfloor]` per axis.

Frozen pretrained features ``features/<m>`` (an expert on ``model.image.input`` features | both)
are a fixed function of the pixels, so their view is made in feature space
(:func:`augment_features`): each feature is kept with probability ``1 − drop`` (rescaled by
``1/(1 − drop)``, inverted dropout) and multiplied by a log-normal gain per series, as in
feature-space augmentation (DeVries & Taylor 2017, "Dataset augmentation in feature space").

Same key, same views (deterministic); different keys per case.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    gain: float = 0.3
    bias: float = 0.3
    noise: float = 0.2
    flip: bool = True
    shift: float = 0.125


def _one(key: jax.Array, x: jax.Array, spec: AugmentSpec) -> jax.Array:
    """One image ``x (*spatial)`` → its perturbed view (same shape)."""
    d = x.ndim
    k = jax.random.split(key, 7)
    fg = (x != 0).astype(x.dtype)
    g = jnp.exp(jax.random.uniform(k[0], (), minval=-spec.gain, maxval=spec.gain))
    o = jax.random.uniform(k[1], (), minval=-spec.gain / 2, maxval=spec.gain / 2)
    c = jax.random.uniform(k[2], (2, d), minval=-spec.bias, maxval=spec.bias)
    logb = jnp.zeros(x.shape, x.dtype)
    for i, n in enumerate(x.shape):
        u = jnp.linspace(-1.0, 1.0, n, dtype=x.dtype).reshape([n if j == i else 1 for j in range(d)])
        logb = logb + c[0, i] * u + c[1, i] * u * u
    sigma = jax.random.uniform(k[3], (), minval=0.0, maxval=spec.noise)
    y = (g * x * jnp.exp(logb) + o + sigma * jax.random.normal(k[4], x.shape, x.dtype)) * fg
    if spec.flip:
        y = jnp.where(jax.random.bernoulli(k[5]), jnp.flip(y, 0), y)
    if spec.shift > 0:
        lim = jnp.asarray([int(spec.shift * n) for n in x.shape])
        s = jax.random.randint(k[6], (d,), -lim, lim + 1)
        y = jnp.roll(y, s, axis=tuple(range(d)))
    return y


def augment_images(key: jax.Array, x: jax.Array, spec: AugmentSpec = AugmentSpec()) -> jax.Array:
    """Perturb a batch of images ``x (B, S, *spatial)``: one independent draw per image.

    Returns an array of the same shape and dtype. Zero (absent) images stay zero.
    """
    b, s = x.shape[:2]
    flat = x.reshape((b * s,) + x.shape[2:])
    keys = jax.random.split(key, b * s)
    return jax.vmap(lambda k, v: _one(k, v, spec))(keys, flat).reshape(x.shape)


def augment_features(key: jax.Array, f: jax.Array, drop: float = 0.2, gain: float = 0.2) -> jax.Array:
    """A view of frozen features ``f (B, S, F)``: inverted dropout (keep probability ``1 − drop``)
    and a gain ``e^a``, ``a ~ U(−gain, gain)``, per series. Zero (absent) rows stay zero."""
    k1, k2 = jax.random.split(key)
    keep = jax.random.bernoulli(k1, 1.0 - drop, f.shape).astype(f.dtype) / (1.0 - drop)
    g = jnp.exp(jax.random.uniform(k2, f.shape[:2] + (1,), minval=-gain, maxval=gain)).astype(f.dtype)
    return f * keep * g


def augment_batch(key: jax.Array, batch: dict, image_modalities) -> dict:
    """The batch with every ``image/<m>`` replaced by :func:`augment_images` of it, and every
    ``features/<m>`` by :func:`augment_features`."""
    out = dict(batch)
    for i, m in enumerate(image_modalities):
        if f"image/{m}" in batch:
            out[f"image/{m}"] = augment_images(jax.random.fold_in(key, i), batch[f"image/{m}"])
        if f"features/{m}" in batch:
            out[f"features/{m}"] = augment_features(jax.random.fold_in(key, 1000 + i), batch[f"features/{m}"])
    return out
