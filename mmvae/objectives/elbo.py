r"""Subset ELBOs for multimodal VAEs, in one static-shape function.

For a case with present modalities P and a subset :math:`S\subseteq P`, the subset
term reconstructs *every* present modality from the subset's posterior (cross-modal
terms included):

.. math::
    \mathcal L_S = \mathbb E_{q_S(z)}\Big[\sum_{m\in P} \lambda_m \log p(x_m\mid z)\Big]
                  - \beta_t\, \mathrm{KL}(q_S(z)\,\|\,\mathcal N(0, I)),

with :math:`q_S` the PoE of the experts in S and the prior. The loss is
:math:`-\frac1{|J|}\sum_{S\in J}\mathcal L_S` averaged over cases, over a family J of
subsets (``objective.subsets``):

* ``mvae``: the joint P, each unimodal {m}, and k random subsets of P (Wu & Goodman 2018);
* ``all``: every non-empty subset of P (all :math:`2^{|P|}-1` terms);
* ``unimodal``: each {m} (the MMVAE / MoE objective with stratified sampling,
  Shi et al. 2019, KL to the prior per component);
* ``mopoe``: same terms as ``all``; with ``num_subset_samples = n`` each case instead
  draws n subsets uniformly from the family (the stochastic mixture estimate of MoPoE,
  Sutter et al. 2021). Averaging component KLs upper-bounds the mixture's KL, so this is
  still a lower bound on the log-likelihood.

:math:`\beta_t = \beta\min(1, t / T_{\text{warm-up}})` (KL annealing). With
``iw_samples = K > 1`` each term is the importance-weighted bound
:math:`\log\frac1K\sum_k \frac{p(x,z_k)}{q_S(z_k)}` (Burda et al. 2016) with
:math:`\beta` applied to :math:`\log p(z) - \log q(z)`.

Optional alignment (``alignment_weight > 0``): symmetric InfoNCE between the unimodal
posterior means of every pair of modalities, over the cases of the batch that have
both (CLIP, Radford et al. 2021), temperature ``alignment_temperature``.

Optional self-supervision within a modality (``ssl_weight > 0``): each image of the
batch gets a second, randomly perturbed view (:mod:`mmvae.data.augment`: gain, bias
field, noise, flip, shift); the same symmetric InfoNCE pairs each image modality's
expert mean of a case with that of its view, against the other cases of the batch
(SimCLR, Chen et al. 2020), temperature ``ssl_temperature``. It rewards expert means
that identify a case under scanner-like changes, i.e. its anatomy and findings, not its
intensity scale or bias field.

Optional supervised contrast (``supcon_weight > 0``, needs labels in the batch, i.e.
``data.label_fraction > 0``): the subset posterior means :math:`\mu_{S,i}` of all drawn
subsets S of the labelled cases i are pulled towards those of other cases with the same
label and away from the rest (SupCon, Khosla et al. 2020, temperature
``supcon_temperature``): :math:`-\frac1{|P(a)|}\sum_{p\in P(a)} \log \frac{e^{s_{ap}/\tau}}{\sum_{b\ne a} e^{s_{ab}/\tau}}`
over anchors a, with cosine similarities s and positives P(a) the other views with the
anchor's label (including other subsets of the same case).

Memory: every subset term decodes every modality, so a step decodes K·J·B cases.
``decode_chunks = n > 1`` decodes the J terms in n sequential chunks (``lax.scan``):
only one chunk's decoder activations are alive at a time. With ``iw_samples = 1`` the
loss is linear in the log-likelihoods, :math:`\partial\,\text{loss}/\partial \log p(x_m\mid z_{j,b})
= -\lambda_m\,[m\in P_b]\,\text{valid}_{j,b}/(|J_b|\,N)` (N: the cases with any modality) is known before decoding, so each
chunk's value and gradient are computed in one forward + backward pass
(:func:`fused_subset_reconstruction`); otherwise each chunk is rematerialised
(``jax.checkpoint``) and its forward pass runs twice. On the fused path the loss is
differentiable with respect to the model's ``nnx.Param`` variables only: gradients with respect
to the batch (the images) are zero there.

Subsets are always masks (data): which modalities are present and which subsets are
drawn never changes the compiled program.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from mmvae.data.augment import augment_batch
from mmvae.errors import ConfigError
from mmvae.models import fusion

SUBSET_FAMILIES = ("mvae", "all", "unimodal", "mopoe")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    subsets: str = "mvae"
    num_random_subsets: int = 1
    num_subset_samples: int = 0
    beta: float = 1.0
    kl_warmup_steps: int = 0
    iw_samples: int = 1
    weights: tuple[float, ...] = ()
    alignment_weight: float = 0.0
    alignment_temperature: float = 0.1
    decode_chunks: int = 1
    ssl_weight: float = 0.0
    ssl_temperature: float = 0.1
    supcon_weight: float = 0.0
    supcon_temperature: float = 0.1

    def validate(self):
        if self.subsets not in SUBSET_FAMILIES:
            raise ConfigError(f"objective.subsets: unknown {self.subsets!r}; choose one of {SUBSET_FAMILIES}")
        if self.iw_samples < 1:
            raise ConfigError("objective.iw_samples must be >= 1")
        if self.num_subset_samples < 0 or self.num_random_subsets < 0:
            raise ConfigError("objective.num_subset_samples / num_random_subsets must be >= 0")
        if self.decode_chunks < 1:
            raise ConfigError(f"objective.decode_chunks must be >= 1, got {self.decode_chunks}")


def num_terms(spec: ObjectiveSpec, num_modalities: int) -> int:
    """Static number J of subset terms per case."""
    if spec.num_subset_samples > 0:
        return spec.num_subset_samples
    if spec.subsets == "mvae":
        return 1 + num_modalities + spec.num_random_subsets
    if spec.subsets == "unimodal":
        return num_modalities
    return 2 ** num_modalities - 1


def random_subsets(key: jax.Array, present: jax.Array, family: jax.Array, num: int) -> jax.Array:
    """Draw ``num`` subsets per case uniformly among the family rows inside ``present``.

    present: ``(B, M)``; family ``(F, M)`` → ``(num, B, M)`` (all-zero where no row fits).
    """
    inside = jnp.all(family[None] <= present[:, None, :], axis=-1)          # (B, F)
    logits = jnp.where(inside, 0.0, -jnp.inf)
    safe = jnp.where(jnp.any(inside, -1, keepdims=True), logits, 0.0)
    idx = jax.random.categorical(key, safe, axis=-1, shape=(num, present.shape[0]))
    picked = family[idx]                                                     # (num, B, M)
    return picked * jnp.any(inside, -1)[None, :, None]


def draw_subsets(key: jax.Array, present: jax.Array, spec: ObjectiveSpec) -> jax.Array:
    """Subset masks ``(J, B, M)`` for a batch with presence ``(B, M)``."""
    m = present.shape[-1]
    all_rows = jnp.asarray(fusion.all_subsets(m))
    if spec.num_subset_samples > 0:
        family = all_rows if spec.subsets in ("all", "mopoe", "mvae") else jnp.eye(m, dtype=jnp.float32)
        return random_subsets(key, present, family, spec.num_subset_samples)
    if spec.subsets in ("all", "mopoe"):
        return jnp.broadcast_to(all_rows[:, None, :], (all_rows.shape[0],) + present.shape) * present[None]
    eye = jnp.broadcast_to(jnp.eye(m, dtype=present.dtype)[:, None, :], (m,) + present.shape) * present[None]
    if spec.subsets == "unimodal":
        return eye
    joint = present[None]
    if spec.num_random_subsets == 0:
        return jnp.concatenate([joint, eye], 0)
    rand = random_subsets(key, present, all_rows, spec.num_random_subsets)
    return jnp.concatenate([joint, eye, rand], 0)


def kl_weight(spec: ObjectiveSpec, step: jax.Array) -> jax.Array:
    """β_t = β · min(1, step / kl_warmup_steps)."""
    if spec.kl_warmup_steps <= 0:
        return jnp.asarray(spec.beta, jnp.float32)
    return spec.beta * jnp.minimum(1.0, step.astype(jnp.float32) / spec.kl_warmup_steps)


def unit(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis, with a finite gradient at ``x = 0``.

    (The gradient of ``jnp.linalg.norm`` at 0 is NaN, and an absent expert's zero mean then
    made the whole step's gradient NaN — the step was skipped — even where its rows were
    masked out.)
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def info_nce(mu: jax.Array, present: jax.Array, temperature: float) -> jax.Array:
    """Mean symmetric InfoNCE over modality pairs.

    mu: ``(B, M, L)`` unimodal means; present ``(B, M)``. For each pair (a, b) the
    cases having both are positives on the diagonal of the cosine-similarity matrix;
    cases lacking either are removed from rows and columns. Pairs with < 2 such cases
    contribute nothing.
    """
    b, m, _ = mu.shape
    total, count = jnp.zeros(()), jnp.zeros(())
    for a in range(m):
        for c in range(a + 1, m):
            loss, use = paired_info_nce(mu[:, a], mu[:, c], present[:, a] * present[:, c], temperature)
            total, count = total + use * loss, count + use
    return total / jnp.maximum(count, 1.0)


def paired_info_nce(a: jax.Array, b: jax.Array, both: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` ``(B, L)`` (cosine / temperature).

    Row i of ``a`` and row i of ``b`` are positives; rows with ``both (B,)`` = 0 are left
    out. Returns ``(loss, use)``: ``use`` is 1.0 when at least 2 pairs exist, else 0.0
    (and the loss is then meaningless).
    """
    za, zb = unit(a), unit(b)
    logits = za @ zb.T / temperature                                         # (B, B)
    valid = both[:, None] * both[None, :]
    logits = jnp.where(valid > 0, logits, -1e9)
    diag = jnp.diagonal(logits)
    row = jax.nn.logsumexp(logits, axis=1) - diag
    col = jax.nn.logsumexp(logits, axis=0) - diag
    n = jnp.sum(both)
    loss = jnp.sum((row + col) * 0.5 * both) / jnp.maximum(n, 1.0)
    return loss, (n >= 2).astype(jnp.float32)


def self_supervised_nce(model, batch: dict, experts: fusion.Gaussian, present: jax.Array, key: jax.Array,
                        temperature: float) -> jax.Array:
    """Mean over image modalities of :func:`paired_info_nce` between each expert mean and
    that of a perturbed view of the same images (:func:`mmvae.data.augment.augment_batch`)."""
    images = model.spec.image_modalities
    if not images:
        return jnp.zeros(())
    view, view_present, _ = model.encode(augment_batch(key, batch, images))
    total, count = jnp.zeros(()), jnp.zeros(())
    for i in range(len(images)):
        loss, use = paired_info_nce(experts.mu[:, i], view.mu[:, i], present[:, i] * view_present[:, i], temperature)
        total, count = total + use * loss, count + use
    return total / jnp.maximum(count, 1.0)


def supervised_contrastive(views: jax.Array, labels: jax.Array, valid: jax.Array, temperature: float) -> jax.Array:
    """SupCon loss (Khosla et al. 2020) over views ``(V, L)`` with integer ``labels (V,)``;
    ``valid (V,)`` 0 leaves a view out. Anchors without a positive contribute nothing;
    0 when no anchor has one."""
    z = unit(views)
    n = views.shape[0]
    eye = jnp.eye(n, dtype=bool)
    ok = (valid[:, None] > 0) & (valid[None, :] > 0) & ~eye
    logits = jnp.where(ok, z @ z.T / temperature, -1e9)
    log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    pos = ok & (labels[:, None] == labels[None, :])
    n_pos = jnp.sum(pos, 1)
    per = -jnp.sum(jnp.where(pos, log_prob, 0.0), 1) / jnp.maximum(n_pos, 1)
    use = (n_pos > 0) & (valid > 0)
    return jnp.sum(jnp.where(use, per, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def _to_chunks(x: jax.Array, chunks: int) -> jax.Array:
    """``(K, J, B, ...)`` → ``(chunks, K, c, B, ...)``, ``c = ⌈J / chunks⌉``, the J axis padded
    with zeros to ``chunks · c``."""
    kk, j = x.shape[:2]
    c = -(-j // chunks)
    pad = [(0, 0), (0, c * chunks - j)] + [(0, 0)] * (x.ndim - 2)
    return jnp.moveaxis(jnp.pad(x, pad).reshape((kk, chunks, c) + x.shape[2:]), 1, 0)


def _from_chunks(y: jax.Array, j: int) -> jax.Array:
    """Inverse of :func:`_to_chunks` for ``(chunks, K, c, B, M)``: ``(K, J, B, M)``."""
    chunks, kk, c = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape((kk, chunks * c) + y.shape[3:])[:, :j]


def _decode_and_score(m, zi: jax.Array, batch: dict) -> jax.Array:
    """One chunk ``zi (K, c, B, L)`` decoded and scored: ``(K, c, B, M)``."""
    kk, c, b, l = zi.shape
    return m.log_likelihoods(m.decode(zi.reshape(kk * c * b, l), patched=True), batch, kk * c).reshape(kk, c, b, -1)


def subset_log_likelihoods(model, z: jax.Array, batch: dict, chunks: int = 1) -> jax.Array:
    """Decode ``z (K, J, B, L)`` and score the batch: ``(K, J, B, M)`` log-likelihoods.

    ``chunks > 1``: the J axis is padded to a multiple of ``chunks`` and decoded one
    chunk at a time in a rematerialised scan (same values, less memory).
    """
    j = z.shape[1]
    batch = model.likelihood_targets(batch)        # once, not once per chunk
    if chunks <= 1 or j == 1:
        return _decode_and_score(model, z, batch)
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def one(state, batch, zi):
        return _decode_and_score(nnx.merge(graphdef, state), zi, batch)

    _, ll = jax.lax.scan(lambda carry, zi: (carry, one(state, batch, zi)), None, _to_chunks(z, min(chunks, j)))
    return _from_chunks(ll, j)


def _zero_cotangent(x):
    x = jnp.asarray(x)
    return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(graphdef, params, rest, zc, cc, batch):
    """``(Σ cc · ll, ll)`` over the chunks; see :func:`fused_subset_reconstruction`. Its VJP
    ignores the cotangent of ``ll`` (callers must stop ``ll``'s gradient) and gives zero
    cotangents to ``rest`` (non-Param variables) and ``batch``."""
    return _fused_fwd(graphdef, params, rest, zc, cc, batch)[0]


def _fused_fwd(graphdef, params, rest, zc, cc, batch):
    def body(acc, xs):
        zi, ci = xs

        def weighted(p, zi):
            ll = _decode_and_score(nnx.merge(graphdef, p, rest), zi, batch)
            return jnp.sum(ll * ci), ll

        (tot, ll), (gp, gz) = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(params, zi)
        return (acc[0] + tot, jax.tree.map(jnp.add, acc[1], gp)), (ll, gz)

    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (total, gparams), (ll, gz) = jax.lax.scan(body, init, (zc, cc))
    return (total, ll), (gparams, gz, ll, rest, batch)


def _fused_bwd(graphdef, res, g):
    gparams, gz, ll, rest, batch = res
    gt = g[0]                        # the log-likelihoods' own cotangent is ignored: callers stop it
    return (jax.tree.map(lambda x: (gt * x).astype(x.dtype), gparams), jax.tree.map(_zero_cotangent, rest),
            (gt * gz).astype(gz.dtype), gt * ll, jax.tree.map(_zero_cotangent, batch))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _float_non_params(rest) -> bool:
    return any(jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) for x in jax.tree.leaves(rest))


def fused_subset_reconstruction(model, z: jax.Array, batch: dict, coef: jax.Array, chunks: int):
    """``(Σ coef · ll, ll)`` for ``ll = subset_log_likelihoods(model, z, batch, chunks)``,
    ``z (K, J, B, L)``, ``coef (K, J, B, M)`` → ``(() float32, (K, J, B, M))``, with the gradient
    of the sum computed chunk by chunk *in the forward pass* (one forward + backward pass per
    chunk, a ``lax.scan`` over ``chunks`` chunks of the J axis; only one chunk's activations
    are alive at a time).

    For a loss linear in ``ll`` with coefficients known before decoding (the subset ELBO with
    ``iw_samples = 1``) this gives the same value and gradients as differentiating
    :func:`subset_log_likelihoods`, whose rematerialised chunks run the decoders' forward pass
    twice. ``ll`` is returned with its gradient stopped: differentiate through the sum only.
    Gradients flow to the model's ``nnx.Param`` variables, ``z`` and ``coef``."""
    j = z.shape[1]
    batch = model.likelihood_targets(batch)
    chunks = max(1, min(chunks, j))
    zc, cc = _to_chunks(z, chunks), _to_chunks(coef, chunks)                       # padded terms weigh 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if _float_non_params(rest):
        raise ValueError("fused_subset_reconstruction differentiates nnx.Param variables only, and this "
                         "model has other float variables; use subset_log_likelihoods")
    total, ll = _fused(graphdef, params, rest, zc, cc, batch)
    return total, jax.lax.stop_gradient(_from_chunks(ll, j))


def elbo_loss(model, batch: dict, key: jax.Array, step: jax.Array, spec: ObjectiveSpec):
    """Negative subset ELBO (+ alignment), averaged over cases.

    Returns:
      (loss scalar, metrics dict of scalars and small arrays).
    """
    experts, present, nonfinite = model.encode(batch)
    b, m, l = experts.mu.shape
    k_sub, k_z = jax.random.split(key)
    subsets = draw_subsets(k_sub, present, spec)                             # (J, B, M)
    q, valid = fusion.subset_posteriors(experts.mu, experts.logvar, present, subsets)  # (J,B,L), (J,B)
    j = subsets.shape[0]
    kk = spec.iw_samples
    z = fusion.sample(k_z, q, kk)                                            # (K, J, B, L)
    weights = jnp.asarray(spec.weights, jnp.float32) if spec.weights else jnp.ones((m,), jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid, 0), 1.0)                            # (B,)
    has_any = (jnp.sum(present, -1) > 0).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(has_any), 1.0)
    fused = jnp.zeros(())
    if kk == 1 and spec.decode_chunks > 1 and j > 1 and not _float_non_params(nnx.state(model, nnx.Not(nnx.Param))):
        # ∂loss/∂ll, known before decoding: the decoders' value and gradient in one pass per chunk;
        # `fused - stop_gradient(fused)` is 0 and carries that gradient (ll itself is stopped)
        coef = jax.lax.stop_gradient(
            -(weights * present[None] * (valid / n_valid)[..., None] * (has_any / denom)[None, :, None]))
        fused, ll = fused_subset_reconstruction(model, z, batch, coef[None], spec.decode_chunks)
        fused = fused - jax.lax.stop_gradient(fused)
    else:
        ll = subset_log_likelihoods(model, z, batch, spec.decode_chunks)     # (K, J, B, M)
    rec = jnp.sum(ll * weights * present, axis=-1)                           # (K, J, B)
    beta = kl_weight(spec, step)
    if kk == 1:
        kl = fusion.kl_to_standard_normal(q)                                 # (J, B)
        term = rec[0] - beta * kl
    else:
        log_pz = -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi), -1)
        log_qz = fusion.gaussian_log_density(z, fusion.Gaussian(q.mu[None], q.logvar[None]))
        log_w = rec + beta * (log_pz - log_qz)
        term = jax.nn.logsumexp(log_w, axis=0) - jnp.log(kk)
        kl = jnp.mean(log_qz - log_pz, 0)
    per_case = jnp.sum(term * valid, 0) / n_valid
    elbo = jnp.sum(per_case * has_any) / denom
    loss = -elbo + fused
    align = jnp.zeros(())
    if spec.alignment_weight > 0:
        align = info_nce(experts.mu[..., : model.spec.latent_dim], present, spec.alignment_temperature)
        loss = loss + spec.alignment_weight * align
    supcon = jnp.zeros(())
    if spec.supcon_weight > 0 and "label/id" in batch:
        lab = jnp.broadcast_to(batch["label/id"][None], (j, b)).reshape(-1)
        # views whose subset holds the label expert are left out: their posterior would
        # cluster by the label encoder, not by the observed modalities
        no_label = 1.0 - subsets[..., -1] if "label" in model.spec.modalities else 1.0
        ok = (valid * no_label * batch["label/mask"][None]).reshape(-1)
        supcon = supervised_contrastive(q.mu.reshape(j * b, l), lab, ok, spec.supcon_temperature)
        loss = loss + spec.supcon_weight * supcon
    ssl = jnp.zeros(())
    if spec.ssl_weight > 0:
        ssl = self_supervised_nce(model, batch, experts, present, jax.random.fold_in(key, 0x55A), spec.ssl_temperature)
        loss = loss + spec.ssl_weight * ssl
    # Diagnostics: per-modality reconstruction (averaged over terms and cases where
    # present) and each unimodal expert's KL.
    rec_m = jnp.sum(ll[0] * valid[..., None] * present[None], (0, 1)) / jnp.maximum(
        jnp.sum(valid[..., None] * present[None], (0, 1)), 1.0)
    own = jnp.asarray(model.spec.ownership())                               # (M, E): dims each expert informs
    lv_uni = fusion.clamp_logvar(experts.logvar)
    kl_uni = 0.5 * jnp.sum(own * (jnp.exp(lv_uni) + experts.mu ** 2 - 1.0 - lv_uni), -1)   # (B, M)
    kl_m = jnp.sum(kl_uni * present, 0) / jnp.maximum(jnp.sum(present, 0), 1.0)
    term_mean = jnp.sum(term * valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1.0)   # (J,)
    metrics = {
        "loss": loss, "elbo": elbo, "kl": jnp.sum(jnp.sum(kl * valid, 0) / n_valid * has_any) / denom,
        "beta": beta, "alignment": align, "self_supervised": ssl, "supcon": supcon, "nonfinite_inputs": nonfinite,
        "recon_per_modality": rec_m, "kl_per_modality": kl_m, "elbo_per_term": term_mean,
    }
    return loss, metrics
