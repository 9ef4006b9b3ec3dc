r"""Per-modality log-likelihoods, summed over a modality's elements.

Images: Gaussian :math:`\log\mathcal N(x;\hat x,\sigma^2)` or Laplace
:math:`-\log(2b) - |x-\hat x|/b`, with a fixed scale or a learned one (one scalar
log-scale per modality, a model parameter). Report: bag-of-words multinomial
:math:`\sum_w c_w \log\operatorname{softmax}(\text{logits})_w` over the token counts
:math:`c_w` (special tokens excluded). Clinical metadata: Gaussian for numeric fields
(unit scale, standardised values) and categorical cross-entropy, masked per field.

Likelihood weights: by default a modality with :math:`D_m` elements gets weight
:math:`D_{\max}/D_m` (the rescaling of MoPoE-VAE, Sutter et al. 2021), so a 64³ volume
and a 128-token report weigh the same in the ELBO. ``D`` of an image is its voxel
count, of a report its ``max_len`` (the pooled embedding's size H with the ``embedding`` report
decoder), of metadata its number of fields.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

LIKELIHOODS = ("gaussian", "laplace")


def image_log_likelihood(x: jax.Array, x_hat: jax.Array, log_scale: jax.Array, kind: str) -> jax.Array:
    """Sum of per-voxel log densities over all non-batch axes.

    Args:
      x, x_hat: ``(B, ...)`` with the same shape (any number of trailing axes).
      log_scale: scalar, log of σ (Gaussian) or b (Laplace).
      kind: 'gaussian' or 'laplace'.
    Returns:
      ``x.shape[:1]`` log-likelihoods: sums over every axis but the first.
    """
    axes = tuple(range(1, x.ndim))
    if kind == "gaussian":
        per = _gaussian_log_density(x, x_hat, log_scale)
    elif kind == "laplace":
        per = -jnp.abs(x - x_hat) * jnp.exp(-log_scale) - log_scale - math.log(2.0)
    else:
        raise ValueError(f"unknown likelihood {kind!r}; choose one of {LIKELIHOODS}")
    return jnp.sum(per, axis=axes)


def diagonal_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """``log N(x; mean, diag(σ²))`` summed over the last axis: ``(..., H)`` → ``(...)``.

    ``log_scale`` is log σ, broadcastable to ``x`` (e.g. ``(H,)`` per dimension).
    """
    return jnp.sum(_gaussian_log_density(x, mean, log_scale), axis=-1)


def _gaussian_log_density(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Elementwise ``log N(x; mean, σ²)`` with ``log_scale = log σ`` (broadcasting)."""
    r = (x - mean) * jnp.exp(-log_scale)
    return -0.5 * r * r - log_scale - 0.5 * math.log(2 * math.pi)


def bag_of_words_counts(tokens: jax.Array, token_mask: jax.Array, vocab_size: int,
                        special_ids: Sequence[int] = ()) -> jax.Array:
    """Token counts ``(B, V)`` of the unmasked, non-special tokens of ``tokens (B, T)``."""
    keep = token_mask.astype(jnp.float32)
    for s in special_ids:
        keep = keep * (tokens != s)
    return jnp.zeros((tokens.shape[0], vocab_size), jnp.float32).at[
        jnp.arange(tokens.shape[0])[:, None], tokens].add(keep)


def bag_of_words_log_likelihood(counts: jax.Array, logits: jax.Array) -> jax.Array:
    """Multinomial log-likelihood (without the count-permutation constant): ``(B,)``."""
    return jnp.sum(counts * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def token_log_likelihood(ids: jax.Array, mask: jax.Array, logits: jax.Array) -> jax.Array:
    """Token-level categorical log-likelihood Σ_t mask_t log softmax(logits_t)[ids_t].

    ids, mask: ``(..., T)``; logits ``(..., T, V)`` → ``(...)``.
    """
    lp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(lp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(picked * mask, axis=-1)


def categorical_log_likelihood(ids: jax.Array, logits: jax.Array) -> jax.Array:
    """``log softmax(logits)[ids]``: ids ``(...)`` int, logits ``(..., C)`` → ``(...)``."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(lp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def metadata_log_likelihood(num_values: jax.Array, num_mask: jax.Array, num_pred: jax.Array,
                            cat_targets: jax.Array, cat_mask: jax.Array,
                            cat_logits: Sequence[jax.Array]) -> jax.Array:
    """Masked metadata log-likelihood ``(B,)``.

    Args:
      num_values, num_mask, num_pred: ``(B, Fn)`` standardised numeric fields.
      cat_targets, cat_mask: ``(B, Fc)`` integer class per categorical field.
      cat_logits: one ``(B, C_f)`` array per categorical field.
    """
    ll = jnp.sum(num_mask * (-0.5 * (num_values - num_pred) ** 2 - 0.5 * math.log(2 * math.pi)), axis=-1)
    for f, logits in enumerate(cat_logits):
        lp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(lp, cat_targets[:, f:f + 1].astype(jnp.int32), axis=-1)[:, 0]
        ll = ll + cat_mask[:, f] * picked
    return ll


def default_weights(dims: dict[str, int]) -> dict[str, float]:
    """``D_max / D_m`` per modality (see module docstring)."""
    d_max = max(dims.values())
    return {m: float(d_max) / float(d) for m, d in dims.items()}
