"""From a config (and the data's tokenizer) to model, objective and optimiser specs, and the train state's layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmvae.errors import ConfigError
from mmvae.models.features import FeatureConfig
from mmvae.models.mvae import ModelSpec
from mmvae.models.text import BertConfig
from mmvae.models import likelihoods
from mmvae.objectives.elbo import ObjectiveSpec


def model_spec(config, vocab_size: int = 0, special_ids: tuple[int, ...] = (0,),
               label_classes: tuple[str, ...] = ()) -> ModelSpec:
    """Build the :class:`ModelSpec` a config describes.

    ``vocab_size``: the tokenizer's size (needed when ``data.report``). ``label_classes``:
    the classes of the label expert (from the training cases; empty: no label expert). When
    ``model.text.pretrained_dir`` is set the BERT shape is read from its config.json.
    """
    d, m, o = config.data, config.model, config.objective
    bert = None
    if d.report:
        if m.text.pretrained_dir:
            bert = BertConfig.from_hf_json(m.text.pretrained_dir)
            if bert.max_position < d.text.max_len:
                raise ConfigError(f"data.text.max_len {d.text.max_len} exceeds the pretrained model's "
                                  f"max_position {bert.max_position}")
        else:
            if vocab_size <= 0:
                raise ConfigError("modality 'report' needs a tokenizer (vocab size unknown)")
            bert = BertConfig(vocab_size=int(vocab_size), hidden_size=int(m.text.hidden),
                              num_layers=int(m.text.layers), num_heads=int(m.text.heads),
                              intermediate_size=int(m.text.intermediate), max_position=int(d.text.max_len))
    if d.image_modalities and len(d.shape) != int(d.spatial_dims):
        raise ConfigError(f"data.shape {tuple(d.shape)} must have data.spatial_dims={d.spatial_dims} axes")
    image_input = str(m.image.input)
    spec = ModelSpec(
        image_modalities=tuple(d.image_modalities), shape=tuple(int(s) for s in d.shape),
        latent_dim=int(m.latent_dim), fusion=m.fusion, channels=tuple(int(c) for c in m.image.channels),
        blocks=int(m.image.blocks), full_res_blocks=bool(m.image.full_res_blocks),
        patch=int(m.image.patch), decoder_blocks=int(m.image.decoder_blocks),
        full_res_channels=int(m.image.full_res_channels), set_pooling=m.image.set_pooling, report=bool(d.report), bert=bert,
        report_encoder=str(m.text.encoder),
        bow_hidden=int(m.report_decoder.hidden), report_decoder=m.report_decoder.kind, special_ids=tuple(special_ids),
        clinical_numeric=tuple(d.clinical.numeric),
        clinical_categorical=tuple((k, tuple(v)) for k, v in dict(d.clinical.categorical).items()),
        clinical_hidden=int(m.clinical.hidden), likelihood=o.likelihood, learn_scale=bool(o.learn_scale),
        init_log_scale=float(o.init_log_scale), dtype=m.dtype,
        pooling=m.image.pooling, conv=m.image.conv, label_classes=tuple(label_classes),
        label_hidden=int(m.label.hidden), private_dim=int(m.private_dim),
        extra=other_modalities(config), image_input=image_input,
        feature_dim=FeatureConfig.from_config(config).dim(int(d.spatial_dims)) if image_input != "pixels" else 0,
        feature_hidden=int(m.image.feature_hidden))
    spec.validate()
    return spec


def other_modalities(config) -> tuple[tuple[str, str, tuple[tuple[str, object], ...]], ...]:
    """``data.other_modalities`` as :attr:`ModelSpec.extra`: ``(name, kind, sorted options)``."""
    out = []
    for name, opts in sorted(dict(config.data.other_modalities).items()):
        opts = dict(opts)
        kind = opts.pop("kind")
        out.append((str(name), str(kind), tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                                                       for k, v in opts.items()))))
    return tuple(out)


def objective_spec(config, spec: ModelSpec) -> ObjectiveSpec:
    o = config.objective
    mods = spec.query_modalities
    if o.weights in ("dimension", "sqrt"):
        dims = spec.dims()
        w = likelihoods.default_weights({m: dims[m] for m in mods})
        weights = [w[m] ** (0.5 if o.weights == "sqrt" else 1.0) for m in mods]
    elif o.weights == "uniform":
        weights = [1.0 for _ in mods]
    else:
        raise ConfigError(f"objective.weights must be 'dimension', 'sqrt' or 'uniform', got {o.weights!r}")
    if float(o.max_weight) > 0:
        weights = [min(w, float(o.max_weight)) for w in weights]
    if spec.label_classes:
        weights.append(float(o.label_weight))
    weights = tuple(weights)
    obj = ObjectiveSpec(subsets=o.subsets, num_random_subsets=int(o.num_random_subsets),
                        num_subset_samples=int(o.num_subset_samples), beta=float(o.beta),
                        kl_warmup_steps=int(o.kl_warmup_steps), iw_samples=int(o.iw_samples),
                        weights=weights, alignment_weight=float(o.alignment_weight),
                        alignment_temperature=float(o.alignment_temperature),
                        decode_chunks=int(o.decode_chunks),
                        ssl_weight=float(o.ssl_weight),
                        ssl_temperature=float(o.ssl_temperature),
                        supcon_weight=float(o.supcon_weight),
                        supcon_temperature=float(o.supcon_temperature))
    obj.validate()
    return obj


def optimizer(config, *, host_lr: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up + cosine (or constant) schedule and global-norm clipping.

    Returns ``(transformation, learning-rate schedule)``. EMA of the parameters
    (``optim.ema_decay``) is applied by the train step, not here. ``host_lr``: AdamW's learning
    rate is a value in the optimiser state (``optax.inject_hyperparams``, initially 0) that the
    caller sets from the schedule each step (:func:`mmvae.train.fit.set_learning_rate`), so the
    transformation does not depend on ``train.steps`` (:func:`mmvae.train.fit.fit`).
    """
    o, steps = config.optim, int(config.train.steps)
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(1, int(o.warmup_steps)), max(steps, int(o.warmup_steps) + 1),
                                                end_value=o.lr * o.end_lr_factor)
    elif o.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(1, int(o.warmup_steps))),
                                   optax.constant_schedule(o.lr)], [max(1, int(o.warmup_steps))])
    else:
        raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    if host_lr:
        parts.append(optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=float(o.weight_decay)))
    else:
        parts.append(optax.adamw(lr, weight_decay=o.weight_decay))
    return optax.chain(*parts), lr


def init_state(model: nnx.Module, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    """``(graphdef, state)``: the train state ``{"params", "opt_state", "step", "nonfinite_steps",
    "skipped_total"[, "ema"]}`` of ``model`` (what checkpoints hold; see :mod:`mmvae.train.step`)."""
    graphdef, params = nnx.split(model, nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "nonfinite_steps": jnp.zeros((), jnp.int32), "skipped_total": jnp.zeros((), jnp.int32)}
    if ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, state
