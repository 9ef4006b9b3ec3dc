"""Run artifacts: everything a trained work dir holds besides checkpoints.

``<workdir>/config.json`` (resolved config), ``run_info.json`` (package version, git
commit, devices), ``model_spec.json``, ``tokenizer/`` (the report tokenizer) and
``clinical_stats.json`` (standardisation of numeric clinical fields). With these a
model can be rebuilt and its checkpoint restored without the original config file.

A run's ``config.json`` is read merged onto :func:`mmvae.config.base_config` once
(:func:`merge_run_config`), so code reading a run's config reads every field directly,
never ``config.x.get(key, default)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
from pathlib import Path

import jax
import ml_collections

import mmvae
from mmvae.atomic import atomic_write_text
from mmvae.config import FREE_FORM_GROUPS, base_config
from mmvae.errors import CheckpointError
from mmvae.models.mvae import ModelSpec
from mmvae.models.text import BertConfig


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> ModelSpec:
    d = dict(d)
    if d.get("bert") is not None:
        d["bert"] = BertConfig(**d["bert"])
    for k in ("image_modalities", "shape", "channels", "special_ids", "clinical_numeric", "label_classes"):
        if k in d:
            d[k] = tuple(d[k])
    d["clinical_categorical"] = tuple((k, tuple(v)) for k, v in d["clinical_categorical"])
    d["extra"] = tuple((n, k, tuple((o, tuple(v) if isinstance(v, list) else v) for o, v in opts))
                       for n, k, opts in d.get("extra", ()))
    return ModelSpec(**d)


# Spec fields added after runs existed, with the value that reproduces the older model:
# at that value they stay out of the fingerprint, so older checkpoints still load.
_NEUTRAL_LATER_FIELDS = {"full_res_channels": -1, "pooling": "flatten", "label_classes": (), "label_hidden": 64,
                         "private_dim": 0, "extra": (), "report_encoder": "bert", "image_input": "pixels",
                         "feature_dim": 0, "feature_hidden": 512}


# Fields that choose how the same function is computed, not which function: never fingerprinted.
_IMPLEMENTATION_FIELDS = ("conv",)


def fingerprint(spec: ModelSpec) -> str:
    d = {k: v for k, v in spec_to_dict(spec).items()
         if _NEUTRAL_LATER_FIELDS.get(k, object()) != v and k not in _IMPLEMENTATION_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_files(workdir: Path, config: ml_collections.ConfigDict, spec: ModelSpec,
                    clinical_stats: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list))
    atomic_write_text(workdir / "model_spec.json", json.dumps(spec_to_dict(spec), indent=2))
    atomic_write_text(workdir / "clinical_stats.json", json.dumps(clinical_stats))
    info = {
        "mmvae_version": mmvae.__version__, "git_commit": git_commit(), "jax_version": jax.__version__,
        "python": platform.python_version(), "host": platform.node(),
        "process_count": jax.process_count(), "process_index": jax.process_index(),
        "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
        "model_fingerprint": fingerprint(spec),
    }
    atomic_write_text(workdir / "run_info.json", json.dumps(info, indent=2))


# Config fields a run's config.json may lack (the run predates them) whose base default is not
# what such a run did: the value that keeps it behaving as it was trained and used. The one
# place these live (merge_run_config). A field added later is listed here only when its base
# default differs from the older behaviour and some value reproduces that behaviour; every other
# field added since the first run files was added at the behaviour it had (a neutral default:
# label_fraction, private_dim, other_modalities, features, image.input, text.encoder, ...), or
# stands for a behaviour the older code had no value for (data.dwi_b_value: the older loader
# kept every volume of a DICOM folder), or is a setting of the session rather than of the run
# (train.*, distributed.*, serve.*, data.max_voxels): those take the base default.
# retrieval.standardize is not listed on purpose: it was applied to older runs' embeddings
# when it came (indexes of older runs are built standardised), as the base default does.
LEGACY_DEFAULTS: dict[str, object] = {
    "retrieval.embedding": "fused",        # 'experts' became the default with the key (515566a)
    "model.image.pooling": "flatten",      # the key came as 'flatten' (f72b66c), later 'multiscale'
    "model.image.full_res_blocks": True,   # the key came as False (7e7635f); earlier stage 0 had blocks
}


def merge_run_config(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config (``config.json`` as a dict) merged onto :func:`base_config`.

    Rule: a field the run saved keeps its saved value; a field of the base config the run
    lacks (it was added after the run was trained) gets the value of :data:`LEGACY_DEFAULTS`
    when listed there (the behaviour the run was trained and used with, where the base
    default changed since: e.g. ``retrieval.embedding``, 'fused' before 'experts' became the
    default), else the base default. A free-form group (``data.clinical.categorical``,
    ``data.other_modalities``, ``evals``: its keys are data) is taken whole from the run when
    saved, never mixed with the base's entries. Fields the run saved that the base no longer
    has are kept. The result is unlocked, as ``ConfigDict(saved)`` was.
    """
    def merge(base: dict, run: dict, prefix: str) -> dict:
        out = {}
        for k, b in base.items():
            key = f"{prefix}{k}"
            if k not in run:
                out[k] = LEGACY_DEFAULTS.get(key, b)
            elif isinstance(b, dict) and isinstance(run[k], dict) and key not in FREE_FORM_GROUPS:
                out[k] = merge(b, run[k], key + ".")
            else:
                out[k] = run[k]
        out.update({k: v for k, v in run.items() if k not in base})
        return out

    return ml_collections.ConfigDict(merge(base_config().to_dict(), dict(saved), ""))


def read_run_files(workdir: Path) -> tuple[ml_collections.ConfigDict, ModelSpec, dict]:
    """``(config, spec, clinical stats)`` of a trained work dir; the config is its
    ``config.json`` merged onto the base config (:func:`merge_run_config`)."""
    workdir = Path(workdir)
    for name in ("config.json", "model_spec.json", "clinical_stats.json"):
        if not (workdir / name).is_file():
            raise CheckpointError(f"{workdir} is not a trained work dir: {name} is missing")
    config = merge_run_config(json.loads((workdir / "config.json").read_text()))
    spec = spec_from_dict(json.loads((workdir / "model_spec.json").read_text()))
    stats = json.loads((workdir / "clinical_stats.json").read_text())
    return config, spec, stats
