"""What the model needs to know about one kind of modality: :class:`Kind`.

A kind (image, report, clinical, label, ...) is one small frozen dataclass of functions;
the registry (:mod:`mmvae.models.modalities`) maps kind names to them, and a model spec
names which modalities of which kind it has. Shapes (B: batch, L: the expert's latent
size, R: decoder repeats of the batch):

* ``encoder(spec, m, L, dtype, rngs)`` → an ``nnx.Module``; ``encode(module, batch, m)`` →
  ``(Gaussian (B, L), present (B,) float 0/1, nonfinite () int32)``: the expert of
  modality ``m`` and which rows have it (masks, never Python branches, decide presence);
* ``decoder(spec, m, L, dtype, rngs)`` → an ``nnx.Module`` mapping ``z (N, L)`` to outputs;
  ``log_likelihood(model, m, outputs, batch, R)`` → ``(R, B)`` log p(x_m | z), zero where absent;
* ``batch_keys(spec, m)`` → ``{key: (per-case shape, dtype)}`` of the batch entries it reads;
* ``size(spec, m)``: elements of one observation (for the likelihood weights);
* ``case_arrays(m, options, metadata)`` (optional): one case's batch entries ``{key: array
  without the batch axis}`` from its manifest metadata (``options``: the modality's entry in
  ``data.other_modalities``), for kinds without a dedicated loader: the data pipeline and
  the query use it;
* ``likelihood_targets(model, m, batch)`` (optional) → ``{key: array}``: batch entries that
  ``log_likelihood`` reads instead of deriving them from the raw batch (the image in the
  decoder's output layout, its finite-series mask); computed once per step, before a chunked
  decode loop, instead of once per chunk (:func:`mmvae.objectives.elbo.subset_log_likelihoods`);
* ``observed``: False for a kind that is never part of a query or an embedding (the label);
* ``frozen_features(encoder, batch, m, spec)`` (optional) → ``(B, F)`` or None: what a frozen
  pretrained network says of the modality (image features, the frozen text model's sentence
  embedding), zeros where absent; the retrieval vectors ``features`` and ``experts+features``
  are made of them (:mod:`mmvae.retrieval.embed`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    encoder: Callable[..., Any]
    decoder: Callable[..., Any]
    encode: Callable[..., Any]
    log_likelihood: Callable[..., Any]
    batch_keys: Callable[..., dict]
    size: Callable[..., int]
    names: Callable[..., tuple] | None = None      # modalities of this kind in a spec; None: from ``spec.extra``
    validate: Callable[..., None] | None = None    # spec checks of this kind (ConfigError)
    case_arrays: Callable[..., dict] | None = None
    observed: bool = True
    patched: bool = False                          # the decoder can return the space-to-depth layout
    frozen_features: Callable[..., Any] | None = None
    likelihood_targets: Callable[..., dict] | None = None

    def modalities(self, spec) -> tuple[str, ...]:
        if self.names is not None:
            return tuple(self.names(spec))
        return tuple(n for n, k, _ in getattr(spec, "extra", ()) if k == self.name)
