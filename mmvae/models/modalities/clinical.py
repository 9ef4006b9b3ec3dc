"""Clinical fields: numeric ``clinical/num``, ``clinical/num_mask`` ``(B, Fn)`` (z-scored) and
categorical ``clinical/cat`` (int32 class index), ``clinical/cat_mask`` ``(B, Fc)``.

Likelihood: unit-variance Gaussian on present numeric fields + categorical on present
categorical fields (:func:`mmvae.models.likelihoods.metadata_log_likelihood`). A
non-finite numeric value is treated as missing (counted in ``nonfinite``).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.models import fusion, likelihoods
from mmvae.models.layers import MLP
from mmvae.models.modalities.kind import Kind

CLINICAL = "clinical"


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


# ---------------------------------------------------------------------------- the kind
def _cards(spec) -> list[int]:
    return [len(v) for _, v in spec.clinical_categorical]


def _encoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs) -> ClinicalEncoder:
    return ClinicalEncoder(len(spec.clinical_numeric), _cards(spec), latent, spec.clinical_hidden, rngs=rngs)


def _decoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs) -> ClinicalDecoder:
    return ClinicalDecoder(len(spec.clinical_numeric), _cards(spec), latent, spec.clinical_hidden, rngs=rngs)


def _numeric(batch: dict) -> tuple[jax.Array, jax.Array]:
    """Numeric values with non-finite ones zeroed, and their mask without them."""
    num = batch["clinical/num"]
    finite = jnp.isfinite(num)
    return jnp.where(finite, num, 0.0), batch["clinical/num_mask"] * finite


def _encode(encoder: ClinicalEncoder, batch: dict, m: str):
    num, nm = _numeric(batch)
    dropped = jnp.sum((~jnp.isfinite(batch["clinical/num"])) & (batch["clinical/num_mask"] > 0)).astype(jnp.int32)
    cm = batch["clinical/cat_mask"]
    present = ((jnp.sum(nm, -1) + jnp.sum(cm, -1)) > 0).astype(jnp.float32)
    return encoder(num, nm, batch["clinical/cat"], cm), present, dropped


def _log_likelihood(model, m: str, out, batch: dict, reps: int) -> jax.Array:
    num_pred, cat_logits = out
    num, nm = _numeric(batch)
    b = num.shape[0]
    return likelihoods.metadata_log_likelihood(
        jnp.tile(num, (reps, 1)), jnp.tile(nm, (reps, 1)), num_pred,
        jnp.tile(batch["clinical/cat"], (reps, 1)), jnp.tile(batch["clinical/cat_mask"], (reps, 1)),
        cat_logits).reshape(reps, b)


KIND = Kind(
    name="clinical", names=lambda spec: (CLINICAL,) if (spec.clinical_numeric or spec.clinical_categorical) else (),
    encoder=_encoder, decoder=_decoder, encode=_encode, log_likelihood=_log_likelihood,
    batch_keys=lambda spec, m: {"clinical/num": ((len(spec.clinical_numeric),), "float32"),
                                "clinical/num_mask": ((len(spec.clinical_numeric),), "float32"),
                                "clinical/cat": ((len(spec.clinical_categorical),), "int32"),
                                "clinical/cat_mask": ((len(spec.clinical_categorical),), "float32")},
    size=lambda spec, m: len(spec.clinical_numeric) + len(spec.clinical_categorical))
