"""Experiment configuration: ``ml_collections.ConfigDict`` files with ``get_config(arg)``.

A config file is a Python file in ``configs/`` whose ``get_config(arg=None)`` returns a
locked ConfigDict built on :func:`base_config`. ``FILE:ARGS`` passes ``ARGS`` (e.g.
``fusion=mopoe,latent=64``) to ``get_config``. Command-line overrides
``--config.optim.lr=3e-4`` address any field; unknown keys and values of the wrong
type are rejected before anything runs.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from mmvae.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    """Every field mmvae reads, with its default. Config files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        manifest="",                  # cohort manifest (.csv/.jsonl); '' = synthesise (see synth)
        cache_dir="",                 # preprocessed-array cache; '' = <workdir>/cache
        image_modalities=["t1", "t2", "dwi"],
        report=True,                  # use the 'report' modality
        spatial_dims=3,
        shape=(32, 32, 32),           # fixed preprocessed shape (voxels)
        spacing=(2.0, 2.0, 2.0),      # target voxel size in mm; () keeps the native spacing
        max_series=1,                 # series kept per modality (padded set dimension)
        crop="foreground",
        clip_percentiles=(0.5, 99.5),
        normalize="zscore",
        reference_modality="",        # resample every series onto this modality's grid first
        label="class",                # label used as retrieval ground truth
        val_fraction=0.2,
        split_seed=0,
        on_error="raise",             # raise | skip
        extra_modalities="error",     # manifest modality not in the config: error | ignore
        text=dict(max_len=64, tokenizer_dir="", vocab_max=4096),
        clinical=dict(numeric=[], categorical={}),   # e.g. numeric=['age'], categorical={'sex': ['F','M']}
        prefetch=2,
        workers=2,
    )
    c.synth = dict(cases=300, seed=0, missing_prob=0.15, report_missing_prob=0.1)
    c.model = dict(
        latent_dim=32,
        fusion="poe",                 # poe | moe | mopoe
        dtype="float32",              # float32 | bfloat16 (compute; params stay float32)
        image=dict(channels=(16, 32, 64), blocks=1, full_res_blocks=False, set_pooling="poe"),
        text=dict(hidden=64, layers=2, heads=2, intermediate=128, pretrained_dir=""),
        report_decoder=dict(hidden=128),
        clinical=dict(hidden=64),
    )
    c.objective = dict(
        subsets="mvae",               # mvae | all | unimodal | mopoe
        num_random_subsets=1,
        num_subset_samples=0,         # >0: draw this many subsets per case instead of all terms
        beta=1.0,
        kl_warmup_steps=0,
        iw_samples=1,
        likelihood="laplace",         # gaussian | laplace
        learn_scale=False,
        init_log_scale=0.0,
        weights="dimension",          # 'dimension' (D_max / D_m) | 'uniform'
        alignment_weight=0.0,
        alignment_temperature=0.1,
    )
    c.optim = dict(lr=1e-3, warmup_steps=50, schedule="cosine", end_lr_factor=0.05,
                   weight_decay=0.0, clip_norm=1.0, ema_decay=0.0)
    c.train = dict(batch_size=16, steps=500, log_every=10, eval_every=0, checkpoint_every=0,
                   keep_checkpoints=3, max_nonfinite_in_row=20)
    c.retrieval = dict(k=10, metric="cosine", rocchio=dict(alpha=1.0, beta=0.75, gamma=0.25))
    return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.lock()
    return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:ARGS]`` and apply ``--config.a.b=value`` overrides."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"_mmvae_config_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report, don't crash deep inside
        raise ConfigError(f"config file {path} failed to import: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg=None)")
    config = module.get_config(arg or None)
    config.lock()
    for o in overrides:
        apply_override(config, o)
    return config


def parse_arg(arg: str | None) -> dict[str, str]:
    """``'fusion=mopoe,latent=64'`` → ``{'fusion': 'mopoe', 'latent': '64'}``."""
    out = {}
    for part in (arg or "").split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise ConfigError(f"config argument {part!r} must be key=value")
        out[k.strip()] = v.strip()
    return out


def _convert(value: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {value!r}")
    if isinstance(current, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}: cannot parse {value!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    if isinstance(current, (list, tuple)) and isinstance(parsed, (list, tuple)):
        return type(current)(parsed)
    if current is not None and not isinstance(parsed, type(current)):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__}, got {value!r}")
    return parsed


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one ``[--config.]a.b=value`` override in place; unknown keys raise."""
    text = override[len("--config."):] if override.startswith("--config.") else override
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} must look like --config.a.b=value")
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[p]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group, not a field")
    with node.unlocked():
        node[leaf] = _convert(value, current, key)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
