"""Cross-modal generation: decode any modality from any subset of the others.

``generate(model, batch, given)`` fuses the experts of the modalities in ``given``
(a mask over ``model.spec.modalities``, intersected with what each case has), takes the
posterior mean (or a sample) and decodes every modality: a missing sequence is
synthesised from the present ones, and the report's bag-of-words decoder yields the
most likely report terms from images alone (:func:`top_report_terms`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmvae.errors import ConfigError
from mmvae.models import fusion


def subset_mask(model, given: Sequence[str]) -> np.ndarray:
    """``(M,)`` 0/1 mask of the named modalities; unknown names raise ConfigError."""
    known = list(model.spec.modalities)
    bad = [g for g in given if g not in known]
    if bad:
        raise ConfigError(f"unknown modality {bad}; known: {known}")
    return np.asarray([1.0 if m in given else 0.0 for m in known], np.float32)


def generate(model, batch: dict, given: Sequence[str], *, key: jax.Array | None = None) -> dict:
    """Decode every modality from the posterior of the modalities in ``given``.

    Returns the decoder outputs (image means ``(B, *spatial)``, report logits ``(B, V)``,
    clinical predictions); ``key`` draws z from the posterior instead of using its mean.
    """
    mask = jnp.asarray(subset_mask(model, given))
    experts, present, _ = model.encode(batch)
    g = fusion.fuse(experts.mu, experts.logvar, present * mask[None], model.spec.fusion)
    z = g.mu if key is None else fusion.sample(key, g)
    return model.decode(z)


def top_report_terms(model, batch: dict, tokenizer, given: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable report words per case given ``given`` (e.g. images only).

    Special tokens are excluded. Returns ``[(word, probability), ...]`` per case.
    """
    if "report" not in model.spec.modalities:
        raise ConfigError("this model has no report modality")
    if model.spec.report_decoder == "embedding":
        raise ConfigError("this model's report decoder predicts the report's sentence embedding "
                          "(model.report_decoder.kind='embedding'), not words: it has no report terms")
    logits = np.asarray(generate(model, batch, given)["report"], np.float64)
    if logits.ndim == 3:   # token-level decoder: average the per-position distributions
        p = np.exp(logits - logits.max(-1, keepdims=True))
        logits = np.log((p / p.sum(-1, keepdims=True)).mean(1))
    logits[:, list(model.spec.special_ids)] = -np.inf
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    vocab = tokenizer.convert_ids_to_tokens(list(range(probs.shape[1])))
    out = []
    for row in probs:
        top = np.argsort(-row)[:k]
        out.append([(vocab[i], float(row[i])) for i in top])
    return out
