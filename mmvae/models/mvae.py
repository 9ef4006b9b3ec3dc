"""The multimodal VAE: one encoder and one decoder per modality, a shared latent.

Batches are dicts of static-shape arrays (see :mod:`mmvae.data.pipeline`):

* ``image/<m>``: ``(B, S, *spatial)`` float32, ``series_mask/<m>``: ``(B, S)``
* ``report/ids``, ``report/mask``: ``(B, T)`` int32
* ``clinical/num``, ``clinical/num_mask``: ``(B, Fn)``; ``clinical/cat``, ``clinical/cat_mask``: ``(B, Fc)``
* ``label/id`` ``(B,)`` int32 class index, ``label/mask`` ``(B,)`` (only with a label expert;
  a batch without these keys has no label)

Which modalities a case has is data (masks), never Python control flow, so one
compiled function serves every presence pattern.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models import fusion, likelihoods
from mmvae.models.encoders import (BagOfWordsDecoder, ClinicalDecoder, ClinicalEncoder, ImageDecoder, ImageEncoder,
                                   LabelDecoder, LabelEncoder, POOLINGS, ReportEncoder, TokenDecoder, total_factor)
from mmvae.models.layers import space_to_depth
from mmvae.models.text import BertConfig

REPORT = "report"
REPORT_DECODERS = ("bow", "tokens")
CLINICAL = "clinical"
LABEL = "label"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the model; derived from the config and the data."""

    image_modalities: tuple[str, ...]
    shape: tuple[int, ...]
    latent_dim: int
    fusion: str = "poe"
    channels: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    full_res_blocks: bool = False
    patch: int = 2                       # stem down-sampling factor (see ImageEncoder)
    decoder_blocks: int = -1             # residual blocks per decoder stage; -1: same as blocks
    full_res_channels: int = -1          # decoder's full-resolution channels; 0: unpatchify head (ImageDecoder)
    set_pooling: str = "poe"
    pooling: str = "flatten"             # spatial pooling of the last feature map (see ImageEncoder)
    report: bool = True
    bert: BertConfig | None = None
    bow_hidden: int = 128
    report_decoder: str = "bow"          # bow | tokens
    special_ids: tuple[int, ...] = (0,)
    clinical_numeric: tuple[str, ...] = ()
    clinical_categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    clinical_hidden: int = 64
    likelihood: str = "laplace"
    learn_scale: bool = False
    init_log_scale: float = 0.0
    dtype: str = "float32"
    label_classes: tuple[str, ...] = ()  # non-empty: a label expert over these classes (semi-supervised)
    label_hidden: int = 64
    private_dim: int = 0                 # > 0: a private latent block of this size per observed modality (PoE)

    @property
    def embedding_dim(self) -> int:
        """Size of the fused posterior: shared ``latent_dim`` + one private block per observed modality."""
        return self.latent_dim + self.private_dim * len(self.query_modalities)

    def ownership(self) -> "np.ndarray":
        """``(M, embedding_dim)`` 0/1: which latent dimensions each expert informs (all share
        the first ``latent_dim``; observed modality i also owns private block i)."""
        import numpy as np
        n = len(self.query_modalities)
        return np.stack([fusion.block_mask(self.latent_dim, self.private_dim, n, [i] if i < n else [])
                         for i in range(len(self.modalities))])

    @property
    def modalities(self) -> tuple[str, ...]:
        """Every expert of the model: image modalities, 'report', 'clinical', then 'label'."""
        out = list(self.query_modalities)
        if self.label_classes:
            out.append(LABEL)
        return tuple(out)

    @property
    def query_modalities(self) -> tuple[str, ...]:
        """The observed modalities a case or a query is made of (every expert but the label)."""
        out = list(self.image_modalities)
        if self.report:
            out.append(REPORT)
        if self.clinical_numeric or self.clinical_categorical:
            out.append(CLINICAL)
        return tuple(out)

    def validate(self) -> None:
        if self.latent_dim <= 0:
            raise ConfigError(f"model.latent_dim must be > 0, got {self.latent_dim}")
        if self.fusion not in fusion.FUSIONS:
            raise ConfigError(f"model.fusion: unknown fusion {self.fusion!r}; choose one of {fusion.FUSIONS}")
        if self.likelihood not in likelihoods.LIKELIHOODS:
            raise ConfigError(f"objective.likelihood: unknown {self.likelihood!r}; choose one of "
                              f"{likelihoods.LIKELIHOODS}")
        if not self.modalities:
            raise ConfigError("no modality configured (data.image_modalities empty, no report, no clinical)")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"duplicate modality names: {self.modalities}")
        if self.report_decoder not in REPORT_DECODERS:
            raise ConfigError(f"model.report_decoder.kind: unknown {self.report_decoder!r}; choose one of "
                              f"{REPORT_DECODERS}")
        if self.report and self.bert is None:
            raise ConfigError("modality 'report' has no encoder configuration (model.text)")
        if self.private_dim < 0:
            raise ConfigError(f"model.private_dim must be >= 0, got {self.private_dim}")
        if self.private_dim and self.fusion != "poe":
            raise ConfigError(f"model.private_dim > 0 needs model.fusion='poe' (a private block is informed by "
                              f"one expert only; a mixture would sample the others' blocks), got {self.fusion!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"model.image.pooling: unknown {self.pooling!r}; choose one of {POOLINGS}")
        if self.label_classes and len(set(self.label_classes)) != len(self.label_classes):
            raise ConfigError(f"duplicate label classes: {self.label_classes}")
        if self.full_res_channels < -1:
            raise ConfigError(f"model.image.full_res_channels must be -1, 0 or > 0, got {self.full_res_channels}")
        if self.patch < 1:
            raise ConfigError(f"model.image.patch must be >= 1, got {self.patch}")
        if self.image_modalities and len(self.shape) not in (2, 3):
            raise ConfigError(f"data.shape must have 2 or 3 axes, got {self.shape}")
        if self.image_modalities and self.channels:
            f = total_factor(self.channels, self.patch)
            if any(int(s) % f for s in self.shape):
                raise ConfigError(f"data.shape {tuple(self.shape)} must be divisible by {f} = model.image.patch "
                                  f"{self.patch} × 2 ** (len(model.image.channels) {len(self.channels)} - 1)")

    def dims(self) -> dict[str, int]:
        """Number of elements per modality (for the default likelihood weights)."""
        vox = 1
        for s in self.shape:
            vox *= s
        out = {m: vox for m in self.image_modalities}
        if self.report:
            out[REPORT] = self.bert.max_position if self.bert else 1
        if CLINICAL in self.modalities:
            out[CLINICAL] = len(self.clinical_numeric) + len(self.clinical_categorical)
        if LABEL in self.modalities:
            out[LABEL] = 1
        return out


class MultimodalVAE(nnx.Module):
    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        spec.validate()
        self.spec = spec
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
        L = spec.latent_dim + spec.private_dim    # an observed modality's own dimensions: shared + private
        enc, dec = {}, {}
        for m in spec.image_modalities:
            enc[m] = ImageEncoder(spec.shape, spec.channels, L, blocks=spec.blocks, patch=spec.patch,
                                  full_res_blocks=spec.full_res_blocks, set_pooling=spec.set_pooling,
                                  pooling=spec.pooling, dtype=dtype, rngs=rngs)
            dec[m] = ImageDecoder(spec.shape, spec.channels, L, patch=spec.patch,
                                  blocks=spec.blocks if spec.decoder_blocks < 0 else spec.decoder_blocks,
                                  full_res_blocks=spec.full_res_blocks, full_res_channels=spec.full_res_channels,
                                  dtype=dtype, rngs=rngs)
        if spec.report:
            enc[REPORT] = ReportEncoder(spec.bert, L, dtype=dtype, rngs=rngs)
            if spec.report_decoder == "tokens":
                dec[REPORT] = TokenDecoder(L, spec.bert.vocab_size, spec.bert.max_position, spec.bow_hidden, rngs=rngs)
            else:
                dec[REPORT] = BagOfWordsDecoder(L, spec.bert.vocab_size, spec.bow_hidden, rngs=rngs)
        if CLINICAL in spec.modalities:
            cards = [len(v) for _, v in spec.clinical_categorical]
            enc[CLINICAL] = ClinicalEncoder(len(spec.clinical_numeric), cards, L, spec.clinical_hidden, rngs=rngs)
            dec[CLINICAL] = ClinicalDecoder(len(spec.clinical_numeric), cards, L, spec.clinical_hidden, rngs=rngs)
        if spec.label_classes:
            enc[LABEL] = LabelEncoder(len(spec.label_classes), spec.latent_dim, spec.label_hidden, rngs=rngs)
            dec[LABEL] = LabelDecoder(len(spec.label_classes), spec.latent_dim, spec.label_hidden, rngs=rngs)
        self.encoders = nnx.Dict(enc)
        self.decoders = nnx.Dict(dec)
        self.log_scale = nnx.Param(jnp.full((max(1, len(spec.image_modalities)),), spec.init_log_scale, jnp.float32))

    # ------------------------------------------------------------------ encode
    def encode(self, batch: dict) -> tuple[fusion.Gaussian, jax.Array, jax.Array]:
        """Unimodal experts of every modality.

        Returns:
          (experts with fields ``(B, M, E)``, present ``(B, M)`` float, nonfinite ``()``
          count of series/reports dropped because they held NaN/Inf). ``E`` =
          ``spec.embedding_dim``; with private blocks an expert's dimensions outside
          :meth:`ModelSpec.ownership` have mean 0 and log-variance ``LOGVAR_MAX``
          (no information: precision e^-10 next to the prior's 1).
        """
        mus, lvs, present = [], [], []
        nonfinite = jnp.zeros((), jnp.int32)
        for m in self.spec.modalities:
            if m == LABEL:
                ids, p = _label_inputs(batch)
                g = self.encoders[m](ids)
            elif m == REPORT:
                mask = batch["report/mask"]
                g = self.encoders[m](batch["report/ids"], mask)
                p = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
            elif m == CLINICAL:
                nm, cm = batch["clinical/num_mask"], batch["clinical/cat_mask"]
                num = batch["clinical/num"]
                finite = jnp.isfinite(num)
                nonfinite += jnp.sum((~finite) & (nm > 0)).astype(jnp.int32)
                nm = nm * finite
                num = jnp.where(finite, num, 0.0)
                g = self.encoders[m](num, nm, batch["clinical/cat"], cm)
                p = ((jnp.sum(nm, -1) + jnp.sum(cm, -1)) > 0).astype(jnp.float32)
            else:
                x, sm = batch[f"image/{m}"], batch[f"series_mask/{m}"].astype(jnp.float32)
                finite = jnp.all(jnp.isfinite(x.reshape(x.shape[:2] + (-1,))), axis=-1)
                nonfinite += jnp.sum((~finite) & (sm > 0)).astype(jnp.int32)
                sm = sm * finite
                x = jnp.where(jnp.isfinite(x), x, 0.0)
                g = self.encoders[m](x, sm)
                p = (jnp.sum(sm, -1) > 0).astype(jnp.float32)
            mu, lv = self._place(m, g.mu, fusion.clamp_logvar(g.logvar))
            mus.append(mu)
            lvs.append(lv)
            present.append(p)
        return fusion.Gaussian(jnp.stack(mus, 1), jnp.stack(lvs, 1)), jnp.stack(present, 1), nonfinite

    def _place(self, m: str, mu: jax.Array, lv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """An expert's own dimensions ``(B, L [+ P])`` → the full ``(B, E)`` layout."""
        P = self.spec.private_dim
        if not P:
            return mu, lv
        L, obs = self.spec.latent_dim, self.spec.query_modalities
        i = obs.index(m) if m in obs else -1
        b = mu.shape[0]
        mus, lvs = [mu[:, :L]], [lv[:, :L]]
        for j in range(len(obs)):
            if j == i:
                mus.append(mu[:, L:]); lvs.append(lv[:, L:])
            else:
                mus.append(jnp.zeros((b, P), mu.dtype)); lvs.append(jnp.full((b, P), fusion.LOGVAR_MAX, lv.dtype))
        return jnp.concatenate(mus, -1), jnp.concatenate(lvs, -1)

    def _own_z(self, m: str, z: jax.Array) -> jax.Array:
        """The part of ``z (N, E)`` modality ``m``'s decoder reads: shared (+ its private block)."""
        P = self.spec.private_dim
        if not P:
            return z
        L, obs = self.spec.latent_dim, self.spec.query_modalities
        if m not in obs:
            return z[:, :L]
        i = obs.index(m)
        return jnp.concatenate([z[:, :L], z[:, L + i * P: L + (i + 1) * P]], -1)

    def posterior(self, batch: dict, mask: jax.Array | None = None) -> fusion.Gaussian:
        """The case posterior under the configured fusion: ``(B, L)``.

        ``mask (B, M)`` restricts the experts further (e.g. a query subset)."""
        experts, present, _ = self.encode(batch)
        if mask is not None:
            present = present * mask
        return fusion.fuse(experts.mu, experts.logvar, present, self.spec.fusion)

    # ------------------------------------------------------------------ decode
    def decode(self, z: jax.Array, patched: bool = False) -> dict:
        """``z (N, E)`` → per-modality outputs (image means, report logits, clinical); each decoder
        reads the shared dimensions and its modality's private block.

        ``patched``: image decoders with an unpatchify head return the space-to-depth
        layout (see :class:`ImageDecoder`); :meth:`log_likelihoods` accepts either.
        """
        return {m: (self.decoders[m](self._own_z(m, z), patched=True) if patched and m in self.spec.image_modalities
                    else self.decoders[m](self._own_z(m, z))) for m in self.spec.modalities}

    def log_likelihoods(self, outputs: dict, batch: dict, reps: int) -> jax.Array:
        """Log-likelihood of each modality of the batch under decoded outputs.

        Args:
          outputs: from :meth:`decode` of ``z`` with shape ``(reps * B, L)`` (the batch
            repeated ``reps`` times, outer axis first).
        Returns:
          ``(reps, B, M)``; zero where a modality is absent.
        """
        cols = []
        for i, m in enumerate(self.spec.modalities):
            out = outputs[m]
            if m == LABEL:
                ids, _ = _label_inputs(batch)
                logits = out.reshape((reps, -1) + out.shape[1:])                # (reps, B, C)
                ll = likelihoods.categorical_log_likelihood(jnp.broadcast_to(ids[None], logits.shape[:2]), logits)
            elif m == REPORT and self.spec.report_decoder == "tokens":
                logits = out.reshape((reps, -1) + out.shape[1:])               # (reps, B, T, V)
                ll = likelihoods.token_log_likelihood(batch["report/ids"][None], batch["report/mask"][None], logits)
            elif m == REPORT:
                counts = likelihoods.bag_of_words_counts(batch["report/ids"], batch["report/mask"],
                                                         self.spec.bert.vocab_size, self.spec.special_ids)
                logits = out.reshape((reps, -1) + out.shape[1:])
                ll = likelihoods.bag_of_words_log_likelihood(counts[None], logits)
            elif m == CLINICAL:
                num, cat_logits = out
                b = batch["clinical/num"].shape[0]
                num_v = jnp.where(jnp.isfinite(batch["clinical/num"]), batch["clinical/num"], 0.0)
                num_m = batch["clinical/num_mask"] * jnp.isfinite(batch["clinical/num"])
                ll = likelihoods.metadata_log_likelihood(
                    jnp.tile(num_v, (reps, 1)), jnp.tile(num_m, (reps, 1)), num,
                    jnp.tile(batch["clinical/cat"], (reps, 1)), jnp.tile(batch["clinical/cat_mask"], (reps, 1)),
                    cat_logits).reshape(reps, b)
            else:
                x = batch[f"image/{m}"]                                   # (B, S, *sp)
                sm = batch[f"series_mask/{m}"].astype(jnp.float32)
                finite = jnp.all(jnp.isfinite(x.reshape(x.shape[:2] + (-1,))), axis=-1)
                sm = sm * finite
                x = jnp.where(jnp.isfinite(x), x, 0.0)
                b, s = x.shape[:2]
                f = self.decoders[m].out_patch
                if f is not None and out.shape[1:] != x.shape[2:]:       # patched decoder output
                    x = space_to_depth(x.reshape((b * s,) + x.shape[2:] + (1,)), f)
                    x = x.reshape((b, s) + x.shape[1:])
                x_hat = out.reshape((reps, b, 1) + out.shape[1:])
                ll_rs = likelihoods.image_log_likelihood(
                    jnp.broadcast_to(x[None], (reps,) + x.shape).reshape((reps * b * s,) + x.shape[2:]),
                    jnp.broadcast_to(x_hat, (reps, b, s) + out.shape[1:]).reshape((reps * b * s,) + x.shape[2:]),
                    self.log_scale[...][i] if self.spec.learn_scale else jax.lax.stop_gradient(self.log_scale[...][i]),
                    self.spec.likelihood).reshape(reps, b, s)
                ll = jnp.sum(ll_rs * sm[None], -1) / jnp.maximum(jnp.sum(sm, -1), 1.0)[None]
            cols.append(ll)
        return jnp.stack(cols, -1)


def _label_inputs(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(label/id (B,) int32, presence (B,) float)``; a batch without label keys has none."""
    if "label/id" not in batch:
        b = next(iter(batch.values())).shape[0]
        return jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)
    return batch["label/id"].astype(jnp.int32), batch["label/mask"].astype(jnp.float32)


def build_model(spec: ModelSpec, seed: int) -> MultimodalVAE:
    return MultimodalVAE(spec, rngs=nnx.Rngs(seed))
