"""The multimodal VAE: one encoder (expert) and one decoder per modality, a shared latent.

Each modality's encoder, decoder, likelihood and batch entries come from its kind in the
modality registry (:mod:`mmvae.models.modalities`); this module only places the experts
in the latent layout and fuses them. Batches are dicts of static-shape arrays (see
:mod:`mmvae.data.dataset`), e.g.:

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

import jax
import jax.numpy as jnp
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models import fusion, likelihoods
from mmvae.models.modalities import kinds_of
from mmvae.models.text import BertConfig


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
    conv: str = "auto"                   # 3³ conv implementation (layers.conv_general_dilated); not in the fingerprint
    image_input: str = "pixels"          # what an image expert reads: pixels | features | both (modalities/image.py)
    feature_dim: int = 0                 # F of the frozen image features (features/<m>); 0 without them
    feature_hidden: int = 512            # hidden width of the feature expert's MLPs
    report: bool = True
    bert: BertConfig | None = None
    report_encoder: str = "bert"         # bert | bow (see mmvae.models.modalities.report)
    bow_hidden: int = 128
    report_decoder: str = "bow"          # bow | tokens | embedding
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
    # Modalities of other registered kinds: (name, kind, ((option, value), ...)), e.g.
    # ("labs", "vector", (("size", 12),)). The built-in kinds read the fields above.
    extra: tuple[tuple[str, str, tuple[tuple[str, object], ...]], ...] = ()

    def options(self, modality: str) -> dict:
        """The options of an ``extra`` modality (KeyError if it is not one)."""
        return dict(next(opts for n, _, opts in self.extra if n == modality))

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
        """Every expert of the model, in order: the observed modalities, then the label."""
        return tuple(kinds_of(self))

    @property
    def query_modalities(self) -> tuple[str, ...]:
        """The observed modalities a case or a query is made of (every expert but the label)."""
        return tuple(m for m, k in kinds_of(self).items() if k.observed)

    def batch_keys(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every batch entry the model reads: key → (per-case shape, dtype); -1 in a shape is a
        size the data sets (the series axis S of images, ``data.max_series``)."""
        out = {}
        for m, kind in kinds_of(self).items():
            out.update(kind.batch_keys(self, m))
        return out

    def validate(self) -> None:
        if self.latent_dim <= 0:
            raise ConfigError(f"model.latent_dim must be > 0, got {self.latent_dim}")
        if self.fusion not in fusion.FUSIONS:
            raise ConfigError(f"model.fusion: unknown fusion {self.fusion!r}; choose one of {fusion.FUSIONS}")
        if self.likelihood not in likelihoods.LIKELIHOODS:
            raise ConfigError(f"objective.likelihood: unknown {self.likelihood!r}; choose one of "
                              f"{likelihoods.LIKELIHOODS}")
        kinds = kinds_of(self)
        if not kinds:
            raise ConfigError("no modality configured (data.image_modalities empty, no report, no clinical)")
        if self.private_dim < 0:
            raise ConfigError(f"model.private_dim must be >= 0, got {self.private_dim}")
        if self.private_dim and self.fusion != "poe":
            raise ConfigError(f"model.private_dim > 0 needs model.fusion='poe' (a private block is informed by "
                              f"one expert only; a mixture would sample the others' blocks), got {self.fusion!r}")
        for kind in dict.fromkeys(kinds.values()):
            if kind.validate is not None:
                kind.validate(self)

    def dims(self) -> dict[str, int]:
        """Number of elements per modality (for the default likelihood weights)."""
        return {m: int(kind.size(self, m)) for m, kind in kinds_of(self).items()}


class MultimodalVAE(nnx.Module):
    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        spec.validate()
        self.spec = spec
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
        enc, dec = {}, {}
        for m, kind in kinds_of(spec).items():
            # an observed modality's own dimensions: shared + its private block; the label: shared only
            own = spec.latent_dim + (spec.private_dim if kind.observed else 0)
            enc[m] = kind.encoder(spec, m, own, dtype, rngs)
            dec[m] = kind.decoder(spec, m, own, dtype, rngs)
        self.encoders = nnx.Dict(enc)
        self.decoders = nnx.Dict(dec)
        self.log_scale = nnx.Param(jnp.full((max(1, len(spec.image_modalities)),), spec.init_log_scale, jnp.float32))

    # ------------------------------------------------------------------ encode
    def encode(self, batch: dict) -> tuple[fusion.Gaussian, jax.Array, jax.Array]:
        """Unimodal experts of every modality.

        Returns:
          (experts with fields ``(B, M, E)``, present ``(B, M)`` float, nonfinite ``()``
          count of series/values dropped because they held NaN/Inf). ``E`` =
          ``spec.embedding_dim``; with private blocks an expert's dimensions outside
          :meth:`ModelSpec.ownership` have mean 0 and log-variance ``LOGVAR_MAX``
          (no information: precision e^-10 next to the prior's 1).
        """
        mus, lvs, present = [], [], []
        nonfinite = jnp.zeros((), jnp.int32)
        for m, kind in kinds_of(self.spec).items():
            g, p, dropped = kind.encode(self.encoders[m], batch, m)
            nonfinite += dropped
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

    def frozen_features(self, batch: dict) -> dict[str, jax.Array]:
        """What frozen pretrained networks say of each observed modality that has them:
        ``{m: (B, F_m)}`` (zeros where absent), in expert order; modalities whose kind gives
        none (clinical, a report expert trained from scratch) are left out."""
        out = {}
        for m, kind in kinds_of(self.spec).items():
            if kind.observed and kind.frozen_features is not None:
                f = kind.frozen_features(self.encoders[m], batch, m, self.spec)
                if f is not None:
                    out[m] = f
        return out

    # ------------------------------------------------------------------ decode
    def decode(self, z: jax.Array, patched: bool = False) -> dict:
        """``z (N, E)`` → per-modality outputs (image means, report logits, clinical); each decoder
        reads the shared dimensions and its modality's private block.

        ``patched``: image decoders with an unpatchify head return their patched layout
        (:meth:`~mmvae.models.modalities.image.ImageDecoder.patchify`: space-to-depth, or the
        hierarchical voxel order of a decoder without residual blocks); :meth:`log_likelihoods`
        accepts either.
        """
        return {m: (self.decoders[m](self._own_z(m, z), patched=True) if patched and kind.patched
                    else self.decoders[m](self._own_z(m, z))) for m, kind in kinds_of(self.spec).items()}

    def log_likelihoods(self, outputs: dict, batch: dict, reps: int) -> jax.Array:
        """Log-likelihood of each modality of the batch under decoded outputs.

        Args:
          outputs: from :meth:`decode` of ``z`` with shape ``(reps * B, L)`` (the batch
            repeated ``reps`` times, outer axis first).
        Returns:
          ``(reps, B, M)``; zero where a modality is absent.
        """
        return jnp.stack([kind.log_likelihood(self, m, outputs[m], batch, reps)
                          for m, kind in kinds_of(self.spec).items()], -1)

    def likelihood_targets(self, batch: dict) -> dict:
        """``batch`` plus what :meth:`log_likelihoods` would otherwise derive from it at every
        call (each kind's optional ``likelihood_targets``: e.g. the images in the decoders'
        output layout). Call it once before decoding several latent samples of one batch."""
        extra = {}
        for m, kind in kinds_of(self.spec).items():
            if kind.likelihood_targets is not None:
                extra.update(kind.likelihood_targets(self, m, batch))
        return {**batch, **extra}


def build_model(spec: ModelSpec, seed: int) -> MultimodalVAE:
    return MultimodalVAE(spec, rngs=nnx.Rngs(seed))
