"""The label expert (semi-supervised): ``label/id`` ``(B,)`` int32 class index, ``label/mask`` ``(B,)``.

One more modality whose expert informs the shared latent where a training case has
its label; never part of a query or an embedding (``observed=False``). Likelihood:
categorical over the classes. A batch without the label keys has no label.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models import fusion, likelihoods
from mmvae.models.layers import MLP
from mmvae.models.modalities.kind import Kind

LABEL = "label"


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


# ---------------------------------------------------------------------------- the kind
def label_inputs(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(label/id (B,) int32, presence (B,) float)``; a batch without label keys has none."""
    if "label/id" not in batch:
        b = next(iter(batch.values())).shape[0]
        return jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)
    return batch["label/id"].astype(jnp.int32), batch["label/mask"].astype(jnp.float32)


def _encode(encoder: LabelEncoder, batch: dict, m: str):
    ids, present = label_inputs(batch)
    return encoder(ids), present, jnp.zeros((), jnp.int32)


def _log_likelihood(model, m: str, out: jax.Array, batch: dict, reps: int) -> jax.Array:
    ids, _ = label_inputs(batch)
    logits = out.reshape((reps, -1) + out.shape[1:])                    # (R, B, C)
    return likelihoods.categorical_log_likelihood(jnp.broadcast_to(ids[None], logits.shape[:2]), logits)


def _validate(spec) -> None:
    if spec.label_classes and len(set(spec.label_classes)) != len(spec.label_classes):
        raise ConfigError(f"duplicate label classes: {spec.label_classes}")


KIND = Kind(
    name="label", names=lambda spec: (LABEL,) if spec.label_classes else (), observed=False,
    encoder=lambda spec, m, latent, dtype, rngs: LabelEncoder(len(spec.label_classes), latent, spec.label_hidden,
                                                              rngs=rngs),
    decoder=lambda spec, m, latent, dtype, rngs: LabelDecoder(len(spec.label_classes), latent, spec.label_hidden,
                                                              rngs=rngs),
    encode=_encode, log_likelihood=_log_likelihood, validate=_validate,
    batch_keys=lambda spec, m: {"label/id": ((), "int32"), "label/mask": ((), "float32")},
    size=lambda spec, m: 1)
