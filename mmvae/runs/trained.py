"""A run as others use it: its cohort, its tokenizer and its trained model.

:func:`load_trained` rebuilds the model of a trained work dir from its run files
(:mod:`mmvae.runs.files`) and a checkpoint (:mod:`mmvae.runs.checkpoint`);
:func:`load_cohort` prepares a manifest with the run's preprocessing cache and report
tokenizer. Training (:mod:`mmvae.train`), retrieval and experiments all load runs through
here, so retrieval never imports the training loop. :func:`weights_digest` names the exact
parameters of a model (embeddings files and indexes record it, and a run whose weights have
moved on refuses an index built from older ones: :mod:`mmvae.retrieval.query`).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mmvae.data.cache import PreprocessCache
from mmvae.data.dataset import prepare_cohort
from mmvae.data.manifest import read_manifest
from mmvae.data.text import build_word_tokenizer, load_tokenizer
from mmvae.data.io import load_report
from mmvae.errors import CheckpointError, ConfigError, InputError
from mmvae.models.features import needs_features
from mmvae.models.modalities import KINDS
from mmvae.models.mvae import build_model
from mmvae.runs import checkpoint as ckpt
from mmvae.runs.files import fingerprint, read_run_files
from mmvae.runs.setup import init_state, optimizer, other_modalities
from mmvae.sharding import barrier

log = logging.getLogger(__name__)


def get_tokenizer(config, workdir: Path, texts):
    """The report tokenizer: ``data.text.tokenizer_dir``, the pretrained model's, or one
    built from the training reports into ``<workdir>/tokenizer`` (reused when present;
    built by process 0 while the others wait)."""
    t = config.data.text
    if t.tokenizer_dir:
        return load_tokenizer(t.tokenizer_dir)
    if config.model.text.pretrained_dir:
        return load_tokenizer(config.model.text.pretrained_dir)
    out = workdir / "tokenizer"
    texts = [x for x in texts if x]
    if not (out / "vocab.txt").exists() and jax.process_index() == 0:
        if not texts:   # harmless when the cohort has no report at all (the report expert is never present)
            log.warning("data.report is on but the cohort has no readable report: the tokenizer in %s holds "
                        "special tokens only, so a report given later would be all [UNK] (set "
                        "data.report=False for an image-only cohort)", out)
        build_word_tokenizer(texts, out, max_vocab=int(t.vocab_max))
    barrier("mmvae_tokenizer")
    tok = load_tokenizer(out)
    if texts and len(tok.get_vocab()) <= len(special_ids(tok)) + 1:
        # e.g. a run made before report files were read (or before its reports existed): the run's
        # vocabulary is fixed with its model, so it cannot be rebuilt here
        log.warning("the tokenizer in %s holds special tokens only while the cohort has %d report(s): every "
                    "report word is [UNK] for this run; train in a new work directory", out, len(texts))
    return tok


def special_ids(tokenizer) -> tuple[int, ...]:
    return tuple(sorted({i for i in tokenizer.all_special_ids if i is not None}))


def case_builders(config) -> dict:
    """``m -> builder(case) -> {batch key: per-case array}`` for ``data.other_modalities`` (their
    kind's ``case_arrays`` on the case's manifest metadata)."""
    out = {}
    for name, kind_name, opts in other_modalities(config):
        kind = KINDS.get(kind_name)
        if kind is None or kind.case_arrays is None:
            raise ConfigError(f"data.other_modalities.{name}: kind {kind_name!r} is not registered or has no "
                              f"case_arrays (registered: {sorted(KINDS)})")
        out[name] = (lambda case, kind=kind, name=name, opts=dict(opts): kind.case_arrays(name, opts, case.metadata))
    return out


def report_texts(manifest: str | Path, on_error: str = "raise", empty_report: str = "drop") -> list[str]:
    """Every report of a manifest: inline ``text`` or the file at ``path`` (as the cohort reads them).

    ``on_error='raise'``: an unreadable report file raises :class:`InputError` naming the case
    and file before any tokenizer is written (a vocabulary built without it would be reused
    after the file is fixed); ``'skip'``: it is left out (the cohort then drops that report).
    A blank report has no words to add: with ``empty_report='drop'`` (``data.empty_report``) it
    is left out here and the cohort keeps the case without it, saying so; ``'error'`` raises.
    Reports given as files were once left out of the tokenizer altogether, which made every
    word of them [UNK].
    """
    texts = []
    for e in read_manifest(manifest):
        if e.modality != "report":
            continue
        if e.text is not None:
            texts.append(e.text)
        elif e.path:
            try:
                texts.append(load_report(e.path))
            except InputError as err:
                if err.reason == "empty report" and empty_report == "drop":
                    continue
                if on_error == "raise":
                    raise InputError(err.reason, case_id=e.case_id, modality="report", path=err.path) from None
    return texts


def load_cohort(config, workdir: Path, manifest: str | None = None, *, tokenizer=None,
                clinical_stats=None, show_progress=True, features: bool | None = None):
    """Prepare the cohort of ``manifest`` (default ``data.manifest``) with the run's cache.

    ``features``: add the frozen pretrained image features ``features/<m>`` ``(N, S, F)``
    (:func:`mmvae.models.features.cohort_features`); default: when the config reads them
    (:func:`~mmvae.models.features.needs_features`)."""
    manifest = manifest or config.data.manifest
    if not manifest:
        raise ConfigError("data.manifest is empty: give a cohort manifest")
    cache = PreprocessCache(config.data.cache_dir or (workdir / "cache"))
    if tokenizer is None and config.data.report:
        # Reports first (cheap), to build the tokenizer before tokenising.
        tokenizer = get_tokenizer(config, workdir, report_texts(manifest, config.data.on_error,
                                                             config.data.empty_report))
    cohort = prepare_cohort(manifest, config.data, cache, tokenizer, clinical_stats=clinical_stats,
                            show_progress=show_progress, builders=case_builders(config))
    if features if features is not None else needs_features(config):
        cohort = with_features(cohort, config, manifest, cache, show_progress=show_progress)
    return cohort, tokenizer, cache


def with_features(cohort, config, manifest, cache: PreprocessCache, *, show_progress: bool = True):
    """``cohort`` with its frozen pretrained image features ``features/<m>`` (cached in ``cache``)."""
    import dataclasses
    from mmvae.data.manifest import group_cases
    from mmvae.models.features import FeatureConfig, FeatureExtractor, cohort_features
    d = config.data
    cases = {c.case_id: c for c in group_cases(read_manifest(manifest))}   # the paths prepare_cohort read
    extractor = FeatureExtractor.get(FeatureConfig.from_config(config))
    failed: dict | None = {} if d.on_error == "skip" else None
    arrays = cohort_features(cohort, cases, cache, extractor, spatial_dims=int(d.spatial_dims),
                             b_value=d.dwi_b_value, show_progress=show_progress,
                             workers=int(d.workers), failed=failed)
    images, notes = {m: list(v) for m, v in cohort.images.items()}, list(cohort.notes)
    for path, err in (failed or {}).items():     # data.on_error='skip': the modality leaves the case, noted
        for m in cohort.image_modalities:
            for i, cid in enumerate(cohort.case_ids):
                if path in cases[cid].images.get(m, []) and images[m][i] is not None:
                    images[m][i] = None
                    notes.append({"case_id": cid, "modality": m, "kind": "dropped", "message": str(err),
                                  "path": path})
    return dataclasses.replace(cohort, images=images, notes=notes, arrays={**cohort.arrays, **arrays})



def abstract_train_state(spec, config, sharding=None):
    """``(graphdef, ShapeDtypeStructs of the train state)`` for a model spec and config, without
    creating any array; every leaf gets ``sharding`` (default: the first local device)."""
    seed, ema = int(config.seed), float(config.optim.ema_decay)
    tx, _ = optimizer(config)
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(spec, seed)), nnx.Param)[0]
    shapes = jax.eval_shape(lambda: init_state(build_model(spec, seed), tx, ema)[1])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def load_trained(workdir: str | Path, *, use_ema: bool = True, step: int | None = None,
                 return_step: bool = False):
    """Rebuild the model of a trained work dir with a checkpoint's parameters.

    ``step``: that checkpoint (default the newest intact one; a damaged newer one is
    reported and skipped). Returns ``(config, spec, model, tokenizer)``, plus the step
    actually restored with ``return_step=True``.
    """
    workdir = Path(workdir)
    config, spec, _ = read_run_files(workdir)
    graphdef, abstract = abstract_train_state(spec, config)
    mgr = ckpt.manager(workdir, int(config.train.keep_checkpoints), read_only=True)
    if step is None:
        restored = ckpt.restore_latest(mgr, abstract, quarantine=False)
    else:
        restored = ckpt.restore_step(mgr, step, abstract)
    if restored is None:
        raise CheckpointError(f"{workdir} has no readable checkpoint")
    step, state, meta = restored
    ckpt.check_compatible(meta, fingerprint(spec), f"{workdir}/checkpoints/{step}")
    params = state["ema"] if (use_ema and "ema" in state) else state["params"]
    model = nnx.merge(graphdef, params)
    tokenizer = load_tokenizer(workdir / "tokenizer") if (workdir / "tokenizer").exists() else (
        load_tokenizer(config.data.text.tokenizer_dir or config.model.text.pretrained_dir)
        if spec.report else None)
    if return_step:
        return config, spec, model, tokenizer, step
    return config, spec, model, tokenizer


def _param_path(path) -> str:
    """``decoders/clinical/mlp/layers/0/bias``: a leaf's key path, without the Variable's own
    ``.value`` attribute (whose presence differs between flax versions)."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(name))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def weights_digest(model) -> str:
    """SHA-256 (hex) of a model's parameters: every ``nnx.Param`` leaf in order of its key
    path, each as path, dtype, shape and little-endian bytes.

    The same parameters give the same digest in any process and on any device; any changed
    value, shape or dtype changes it. The model fingerprint (:func:`mmvae.runs.files.fingerprint`)
    names the configuration; this names the weights (checkpoint step and EMA choice included).
    """
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    items = sorted(((_param_path(path), x) for path, x in leaves), key=lambda t: t[0])
    values = jax.device_get([x for _, x in items])
    h = hashlib.sha256()
    for (path, _), x in zip(items, values):
        a = np.asarray(x)
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a)
        h.update(f"{path}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()
