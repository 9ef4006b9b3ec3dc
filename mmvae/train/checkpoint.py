"""Checkpoints with orbax: train state (params, optimiser, step) + JSON metadata.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``. ``meta`` holds the input
pipeline position, the validation metric and the model-spec fingerprint, so a resumed
run continues exactly and a checkpoint of another model is refused by name.
orbax writes each step into a temporary folder and renames it when complete, so a
crash never leaves a half-written step that looks valid; a step whose files fail to
restore is reported and the previous one is used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mmvae.errors import CheckpointError

log = logging.getLogger(__name__)


def manager(workdir: str | Path, keep: int = 3, *, async_save: bool = False) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=opts)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restore the newest readable step, falling back to older ones; None if there is none."""
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            out = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            return step, out["state"], dict(out["meta"])
        except Exception as e:  # orbax raises many types for damaged files
            log.warning("checkpoint step %d is unreadable (%s); trying an older one", step, e)
    return None


def check_compatible(meta: dict, fingerprint: str, where: str) -> None:
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {where} was written for a different model configuration "
                              f"(fingerprint {meta.get('model_fingerprint')} vs {fingerprint}); "
                              "its parameter shapes do not match the config")


def abstract(state: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
