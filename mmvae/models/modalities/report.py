"""The report: token ids + mask ``report/ids``, ``report/mask`` ``(B, T)`` int32.

Encoder (``model.text.encoder``): ``bert`` — BERT (:mod:`mmvae.models.text`) → masked mean
pooling → MLP → Gaussian; ``bow`` — the report's bag of words → MLP → Gaussian, the
inference network of the neural variational document model (NVDM, Miao et al. 2016,
"Neural Variational Inference for Text Processing"); opt-in: it measured worse than
BERT on report-only queries (docs/model.md).
Decoder: a bag-of-words multinomial over the vocabulary (``bow``), per-position token
logits (``tokens``; special tokens are left out of the bag of words), or a Gaussian over the
frozen pretrained BERT's mean-pooled embedding (``embedding``; needs ``model.text.freeze``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models import fusion, likelihoods
from mmvae.models.layers import MLP
from mmvae.models.modalities.kind import Kind
from mmvae.models.text import BertConfig, BertEncoder, sentence_embedding

REPORT = "report"
REPORT_DECODERS = ("bow", "tokens", "embedding")


class ReportEncoder(nnx.Module):
    """BERT encoder → masked mean pooling → dense → Gaussian (mu, logvar).

    ``pooled(ids, mask)`` ``(B, T)`` → ``(B, H)`` float32 and ``from_pooled`` ``(B, H)`` →
    Gaussian ``(B, L)`` are the two halves of ``__call__``: with a frozen BERT the training
    loop computes ``pooled`` once per case (batch entry ``report/pooled``) and trains the head
    on it (:data:`POOLED`).
    """

    def __init__(self, cfg: BertConfig, latent_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.bert = BertEncoder(cfg, dtype=dtype, rngs=rngs)
        self.head = MLP([cfg.hidden_size, 4 * latent_dim, 2 * latent_dim], rngs=rngs)

    def pooled(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return sentence_embedding(self.bert, ids, mask, normalize=False)

    def from_pooled(self, pooled: jax.Array) -> fusion.Gaussian:
        mu, lv = jnp.split(self.head(pooled), 2, axis=-1)
        return fusion.Gaussian(mu, lv)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> fusion.Gaussian:
        return self.from_pooled(self.pooled(ids, mask))


class BagOfWordsEncoder(nnx.Module):
    """Token ids + mask ``(B, T)`` → counts ``c (B, V)`` → ``log(1 + c)`` → MLP → Gaussian (mu, logvar) ``(B, L)``.

    NVDM's inference network (Miao et al. 2016) on log counts; special tokens (padding,
    [CLS], ...) are not counted. Word order is ignored: keyword statistics, as in TF-IDF,
    with a learned word weighting.
    """

    def __init__(self, vocab_size: int, hidden: int, latent_dim: int, special_ids: tuple[int, ...] = (0,), *,
                 rngs: nnx.Rngs):
        self.vocab_size, self.special_ids = int(vocab_size), tuple(int(s) for s in special_ids)
        self.mlp = MLP([vocab_size, hidden, hidden, 2 * latent_dim], rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> fusion.Gaussian:
        counts = likelihoods.bag_of_words_counts(ids, mask, self.vocab_size, self.special_ids)
        mu, lv = jnp.split(self.mlp(jnp.log1p(counts)), 2, axis=-1)
        return fusion.Gaussian(mu, lv)


class BagOfWordsDecoder(nnx.Module):
    """``z (N, L)`` → vocabulary logits ``(N, V)`` of a multinomial over report words."""

    def __init__(self, latent_dim: int, vocab_size: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([latent_dim, hidden, vocab_size], rngs=rngs)

    def __call__(self, z):
        return self.mlp(z)


# Floor of the embedding decoder's learned log σ: the target is a deterministic function of the
# tokens, so on a small cohort σ could shrink without bound and the report term own the ELBO.
# (Measured: after 300 quickstart/MedPix steps log σ stays within -2.2 .. -1.9 from its -2.)
EMBEDDING_MIN_LOG_SCALE = -6.0


class EmbeddingDecoder(nnx.Module):
    """``z (N, L)`` → mean ``(N, H)`` of a diagonal Gaussian over the frozen text model's
    mean-pooled report embedding, with a learned per-dimension log σ ``(H,)`` (a calibrated
    decoder: Rybkin et al. 2021, "Simple and Effective VAE Training with Calibrated Decoders").

    Reconstructing the pretrained embedding instead of the words keeps in the latent what the
    text model knows about which reports are alike.
    """

    def __init__(self, latent_dim: int, hidden_size: int, hidden: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([latent_dim, hidden, hidden_size], rngs=rngs)
        self.log_scale = nnx.Param(jnp.full((hidden_size,), -2.0, jnp.float32))

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


# ---------------------------------------------------------------------------- the kind
REPORT_ENCODERS = ("bert", "bow")


def _encoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs) -> ReportEncoder | BagOfWordsEncoder:
    if spec.report_encoder == "bow":
        return BagOfWordsEncoder(spec.bert.vocab_size, spec.bert.hidden_size, latent, spec.special_ids, rngs=rngs)
    return ReportEncoder(spec.bert, latent, dtype=dtype, rngs=rngs)


def _decoder(spec, m: str, latent: int, dtype, rngs: nnx.Rngs):
    if spec.report_decoder == "embedding":
        return EmbeddingDecoder(latent, spec.bert.hidden_size, spec.bow_hidden, rngs=rngs)
    if spec.report_decoder == "tokens":
        return TokenDecoder(latent, spec.bert.vocab_size, spec.bert.max_position, spec.bow_hidden, rngs=rngs)
    return BagOfWordsDecoder(latent, spec.bert.vocab_size, spec.bow_hidden, rngs=rngs)


# Optional batch entry (B, H) float32: the frozen BERT's mean-pooled output, computed once per
# case by the training loop (mmvae.train.loop.cache_frozen_report) only when model.text.freeze
# holds; the encoder then runs only its head (a batch carrying it for a trainable BERT would skip
# the BERT's gradients: never add it otherwise). Equal to running the BERT
# (tests/test_retrieval_quality.py); never needed at query time.
POOLED = "report/pooled"
# Parameter path of the report expert's BERT inside MultimodalVAE's state: the prefix whose
# gradients and updates are zeroed when model.text.freeze holds (mmvae.train.step.make_train_step).
FROZEN_BERT = "encoders/report/bert"


def _present(batch: dict) -> jax.Array:
    """``(B,)`` 1.0 where the case has a report (a non-empty token mask)."""
    return (jnp.sum(batch["report/mask"], -1) > 0).astype(jnp.float32)


def _encode(encoder: ReportEncoder, batch: dict, m: str):
    mask = batch["report/mask"]
    present = _present(batch)
    if POOLED in batch and isinstance(encoder, ReportEncoder):
        return encoder.from_pooled(batch[POOLED]), present, jnp.zeros((), jnp.int32)
    return encoder(batch["report/ids"], mask), present, jnp.zeros((), jnp.int32)


def _log_likelihood(model, m: str, out: jax.Array, batch: dict, reps: int) -> jax.Array:
    spec = model.spec
    logits = out.reshape((reps, -1) + out.shape[1:])                    # (R, B, [T,] V) or (R, B, H)
    if spec.report_decoder == "embedding":
        target = batch[POOLED] if POOLED in batch else jax.lax.stop_gradient(
            model.encoders[m].pooled(batch["report/ids"], batch["report/mask"]))   # (B, H)
        present = _present(batch)
        log_scale = jnp.maximum(model.decoders[m].log_scale[...], EMBEDDING_MIN_LOG_SCALE)
        return likelihoods.diagonal_gaussian_log_likelihood(target[None], logits, log_scale) * present[None]
    if spec.report_decoder == "tokens":
        return likelihoods.token_log_likelihood(batch["report/ids"][None], batch["report/mask"][None], logits)
    counts = likelihoods.bag_of_words_counts(batch["report/ids"], batch["report/mask"], spec.bert.vocab_size,
                                             spec.special_ids)
    return likelihoods.bag_of_words_log_likelihood(counts[None], logits)


def _frozen_features(encoder, batch: dict, m: str, spec):
    """``(B, H)``: the frozen pretrained text model's sentence embedding (masked mean pooling, L2
    normalised, as sentence-transformers computes it for all-MiniLM-L6-v2), zeros without a report;
    None when the report BERT is not a frozen pretrained one (``report_decoder='embedding'``)."""
    if spec.report_decoder != "embedding" or not isinstance(encoder, ReportEncoder):
        return None
    pooled = batch[POOLED] if POOLED in batch else encoder.pooled(batch["report/ids"], batch["report/mask"])
    pooled = jax.lax.stop_gradient(pooled.astype(jnp.float32))
    norm = jnp.sqrt(jnp.sum(pooled * pooled, -1, keepdims=True))
    return jnp.where(norm > 0, pooled / jnp.maximum(norm, 1e-12), 0.0) * _present(batch)[:, None]


def _validate(spec) -> None:
    if spec.report_encoder not in REPORT_ENCODERS:
        raise ConfigError(f"model.text.encoder: unknown {spec.report_encoder!r}; choose one of {REPORT_ENCODERS}")
    if spec.report_decoder not in REPORT_DECODERS:
        raise ConfigError(f"model.report_decoder.kind: unknown {spec.report_decoder!r}; choose one of "
                          f"{REPORT_DECODERS}")
    if spec.report_decoder == "embedding" and spec.report_encoder != "bert":
        raise ConfigError("model.report_decoder.kind='embedding' reconstructs the report BERT's pooled output: "
                          "it needs model.text.encoder='bert'")
    if spec.report and spec.bert is None:
        raise ConfigError("modality 'report' has no encoder configuration (model.text)")


def _max_len(spec) -> int:
    return spec.bert.max_position if spec.bert else 1


KIND = Kind(
    name="report", names=lambda spec: (REPORT,) if spec.report else (), encoder=_encoder, decoder=_decoder,
    encode=_encode, log_likelihood=_log_likelihood, validate=_validate, frozen_features=_frozen_features,
    batch_keys=lambda spec, m: {"report/ids": ((_max_len(spec),), "int32"), "report/mask": ((_max_len(spec),), "int32")},
    size=lambda spec, m: spec.bert.hidden_size if spec.report_decoder == "embedding" else _max_len(spec))
