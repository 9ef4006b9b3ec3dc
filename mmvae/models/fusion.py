r"""Fusion of per-modality Gaussian experts into one posterior over the shared latent.

All functions are pure and work on stacked experts:

* ``mu``, ``logvar``: ``(..., M, L)`` — the M modality experts' means and
  log-variances over the L-dimensional latent;
* ``mask``: ``(..., M)`` in {0, 1} — 1 where the expert is present.

Product of experts (MVAE, Wu & Goodman 2018) with a standard-normal prior expert:

.. math::
    T_0 = 1,\quad T_m = e^{-\ell_m}\,[\text{mask}_m],\qquad
    \sigma^{-2} = T_0 + \sum_m T_m,\qquad
    \mu = \sigma^2 \sum_m T_m \mu_m .

It is evaluated in log space: :math:`\log\sigma^2 = -\operatorname{LSE}(0, -\ell_1, …, -\ell_M)`
with absent experts at :math:`-\infty`, and the weights
:math:`w_m = \exp(-\ell_m - \operatorname{LSE})` are a softmax, so no precision is ever
formed explicitly (the log-sum-exp form is also used by MultiVae). Log-variances are
first clamped to ``[LOGVAR_MIN, LOGVAR_MAX]`` = [-10, 10] (σ from 0.0067 to 148), which keeps
outputs and gradients finite even for inputs of ±80. An absent expert contributes zero
precision, so masking it equals leaving it out, and with every expert absent the result
is the prior N(0, I).

Mixture of experts (MMVAE, Shi et al. 2019) and mixture of products of experts
(MoPoE, Sutter et al. 2021) are mixtures with equal weights over the present
unimodal experts, resp. over the PoEs of the non-empty subsets of present experts.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOGVAR_MIN = -10.0
LOGVAR_MAX = 10.0
FUSIONS = ("poe", "moe", "mopoe")


class Gaussian(NamedTuple):
    """Diagonal Gaussian: ``mu`` and ``logvar`` of shape ``(..., L)``."""

    mu: jax.Array
    logvar: jax.Array


def clamp_logvar(logvar: jax.Array) -> jax.Array:
    """Clamp log-variances to [LOGVAR_MIN, LOGVAR_MAX]; NaN is not produced from ±inf."""
    return jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def poe(mu: jax.Array, logvar: jax.Array, mask: jax.Array, *, prior: bool = True) -> Gaussian:
    """Product of the present experts (and of a N(0, I) prior expert when ``prior``).

    Args:
      mu, logvar: ``(..., M, L)``.
      mask: ``(..., M)``, 1 = present.
      prior: include the standard-normal expert. Without it an all-absent input gives
        N(0, I) as well (by convention), so the function is total.
    Returns:
      Gaussian with fields of shape ``(..., L)``.
    """
    logvar = clamp_logvar(logvar)
    present = (mask > 0)[..., None]                                   # (..., M, 1)
    neg_lv = jnp.where(present, -logvar, -jnp.inf)                     # log precisions
    # Safe mu: absent experts may hold garbage (even NaN); zero them before weighting.
    mu = jnp.where(present, mu, 0.0)
    if prior:
        zeros = jnp.zeros(neg_lv.shape[:-2] + (1,) + neg_lv.shape[-1:], neg_lv.dtype)
        neg_lv = jnp.concatenate([zeros, neg_lv], axis=-2)
        mu = jnp.concatenate([jnp.zeros_like(zeros), mu], axis=-2)
    else:
        any_present = jnp.any(present, axis=-2, keepdims=True)
        # All absent: pretend a single unit expert at 0 so the result is N(0, I).
        first = jnp.arange(neg_lv.shape[-2])[:, None] == 0
        neg_lv = jnp.where(any_present, neg_lv, jnp.where(first, 0.0, -jnp.inf))
    lse = jax.nn.logsumexp(neg_lv, axis=-2)                            # (..., L) = log total precision
    weights = jax.nn.softmax(neg_lv, axis=-2)                          # T_m / sum T
    joint_mu = jnp.sum(weights * mu, axis=-2)
    return Gaussian(joint_mu, -lse)


def block_mask(shared_dim: int, private_dim: int, num_blocks: int, owned) -> np.ndarray:
    """0/1 mask ``(shared_dim + private_dim · num_blocks,)`` of a latent made of a shared block
    and one private block per modality: 1 on the shared block and on the private blocks
    whose indices are in ``owned``."""
    mask = np.zeros(shared_dim + private_dim * num_blocks, np.float32)
    mask[:shared_dim] = 1.0
    for i in owned:
        mask[shared_dim + i * private_dim: shared_dim + (i + 1) * private_dim] = 1.0
    return mask


def all_subsets(num_experts: int) -> np.ndarray:
    """All non-empty subsets of ``num_experts`` as a ``(2^M - 1, M)`` 0/1 float32 matrix.

    Ordered by size, then lexicographically (singletons first, the full set last).
    """
    rows = []
    for size in range(1, num_experts + 1):
        for combo in itertools.combinations(range(num_experts), size):
            row = np.zeros(num_experts, np.float32)
            row[list(combo)] = 1.0
            rows.append(row)
    return np.stack(rows)


def subset_posteriors(mu: jax.Array, logvar: jax.Array, mask: jax.Array,
                      subsets: jax.Array) -> tuple[Gaussian, jax.Array]:
    """PoE posterior of each subset of the present experts.

    Args:
      mu, logvar: ``(B, M, L)``; mask: ``(B, M)``; subsets: ``(S, M)`` or ``(S, B, M)``.
    Returns:
      (Gaussian with fields ``(S, B, L)``, valid ``(S, B)``): valid is 1 where the
      subset is non-empty after intersecting with the mask.
    """
    sub = subsets if subsets.ndim == 3 else jnp.broadcast_to(subsets[:, None, :], (subsets.shape[0],) + mask.shape)
    eff = sub * mask[None]
    g = poe(mu[None], logvar[None], eff)
    return g, (jnp.sum(eff, axis=-1) > 0).astype(mu.dtype)


def mixture_moments(mus: jax.Array, logvars: jax.Array, weights: jax.Array) -> Gaussian:
    """Moment-matched Gaussian of a mixture (used to summarise MoE/MoPoE posteriors).

    Args:
      mus, logvars: ``(K, ..., L)`` components; weights: ``(K, ...)`` non-negative, not
        necessarily normalised (an all-zero weight vector gives N(0, I)).
    Returns:
      Gaussian ``(..., L)`` with the mixture's mean and per-dimension variance
      :math:`\\sum_k w_k(\\sigma_k^2 + \\mu_k^2) - \\mu^2`.
    """
    total = jnp.sum(weights, axis=0)
    w = weights / jnp.where(total > 0, total, 1.0)
    w = w[..., None]
    mean = jnp.sum(w * mus, axis=0)
    second = jnp.sum(w * (jnp.exp(clamp_logvar(logvars)) + mus ** 2), axis=0)
    var = jnp.maximum(second - mean ** 2, jnp.exp(LOGVAR_MIN))
    empty = (total <= 0)[..., None]
    return Gaussian(jnp.where(empty, 0.0, mean), jnp.where(empty, 0.0, jnp.log(var)))


def fuse(mu: jax.Array, logvar: jax.Array, mask: jax.Array, fusion: str) -> Gaussian:
    """Summary posterior of a case given its present experts, for embedding and retrieval.

    ``poe``: the PoE with prior. ``moe``: moment-matched mixture of the present unimodal
    experts. ``mopoe``: moment-matched mixture of the PoEs of all non-empty subsets of
    the present experts. Shapes: ``(B, M, L)``, ``(B, M)`` → ``(B, L)``.
    """
    if fusion == "poe":
        return poe(mu, logvar, mask)
    if fusion == "moe":
        mus = jnp.moveaxis(mu, -2, 0)
        lvs = jnp.moveaxis(clamp_logvar(logvar), -2, 0)
        return mixture_moments(jnp.where(mask.T[..., None] > 0, mus, 0.0), lvs, jnp.moveaxis(mask, -1, 0))
    if fusion == "mopoe":
        subsets = jnp.asarray(all_subsets(mu.shape[-2]))
        g, valid = subset_posteriors(mu, logvar, mask, subsets)
        # Identical subsets after masking are counted once each, as in MoPoE's mixture
        # over subsets of the *present* modalities: keep a subset only if it lies
        # entirely inside the mask.
        inside = jnp.all((subsets[:, None, :] <= mask[None]), axis=-1).astype(mu.dtype)
        return mixture_moments(g.mu, g.logvar, valid * inside)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")


def kl_to_standard_normal(g: Gaussian) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last axis, in nats."""
    lv = clamp_logvar(g.logvar)
    return 0.5 * jnp.sum(jnp.exp(lv) + g.mu ** 2 - 1.0 - lv, axis=-1)


def gaussian_log_density(z: jax.Array, g: Gaussian) -> jax.Array:
    """log N(z; mu, exp(logvar)) summed over the last axis."""
    lv = clamp_logvar(g.logvar)
    return -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + lv + (z - g.mu) ** 2 * jnp.exp(-lv), axis=-1)


def sample(key: jax.Array, g: Gaussian, num: int | None = None) -> jax.Array:
    """Reparameterised sample(s) ``mu + sigma * eps``; shape ``(num, ..., L)`` if ``num``."""
    shape = g.mu.shape if num is None else (num,) + g.mu.shape
    eps = jax.random.normal(key, shape, g.mu.dtype)
    return g.mu + jnp.exp(0.5 * clamp_logvar(g.logvar)) * eps
