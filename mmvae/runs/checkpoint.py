"""Checkpoints with orbax: train state (params, optimiser, EMA, step) + JSON metadata.

Layout: ``<workdir>/checkpoints/<step>/{state/, meta/, metrics/}``.

* ``state``: the train-state pytree (sharded arrays are written shard by shard by
  every process; orbax coordinates multi-process saves itself);
* ``meta``: the input-pipeline position, seed, batch size, model-spec fingerprint,
  the state's layout (key paths, shapes, dtypes), a digest of its values (to detect
  damaged files that still restore) and why the checkpoint was written;
* ``metrics``: the validation metric of checkpoints written at an evaluation (used
  to keep the best ones).

orbax writes each step into a temporary folder and renames it when complete, so a
crash never leaves a half-written step that looks valid, and it deletes old steps
only after the newer one is finalised. A step whose files fail to restore, or whose
restored state does not match its digest, is reported, moved to
``<workdir>/checkpoints_corrupt/`` and the previous one is used.

Retention: the ``keep`` most recent checkpoints plus the ``keep_best`` best by
validation mAP (``metrics/val_map``).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from mmvae.errors import CheckpointError

log = logging.getLogger(__name__)


class _QuietOrbaxNotices(logging.Filter):
    """orbax warns on every save without metrics once best-tracking is on, and on every
    read-only manager; both are by design here."""

    NOISE = ("tracked_metric", "read_only=True, setting", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


logging.getLogger("absl").addFilter(_QuietOrbaxNotices())

BEST_METRIC = "val_map"


def _best_value(metrics) -> float:
    v = (metrics or {}).get(BEST_METRIC)
    return float(v) if v is not None and np.isfinite(v) else -np.inf


def manager(workdir: str | Path, keep: int = 3, *, keep_best: int = 0, async_save: bool = False,
            read_only: bool = False) -> ocp.CheckpointManager:
    """CheckpointManager over ``<workdir>/checkpoints`` keeping the last ``keep`` + ``keep_best`` best."""
    policies = [ocm.LatestN(n=max(1, int(keep)))]
    if keep_best > 0:
        policies.append(ocm.BestN(get_metric_fn=_best_value, reverse=False, n=int(keep_best),
                                  keep_checkpoints_without_metrics=False))
    opts = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        best_fn=_best_value, best_mode="max",          # makes orbax store the per-step metrics
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=opts)


@jax.jit
def _digest_leaves(leaves):
    """Per-leaf uint32 sum of the raw bits: order-independent, so the same on any sharding."""
    out = []
    for x in leaves:
        if x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        elif x.dtype.itemsize == 1:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
        else:   # 8-byte types: fold the two halves
            pair = jax.lax.bitcast_convert_type(x, jnp.uint32)
            bits = pair[..., 0] ^ (pair[..., 1] * jnp.uint32(2654435761))
        idx = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
        out.append(jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def digest(tree: Any) -> str:
    """Hex digest of every array of ``tree`` (position-weighted bit sums, mod 2^32 per leaf).

    Identical bits give identical digests whatever the sharding or device count; any
    changed value changes it with overwhelming probability.
    """
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    if not leaves:
        return ""
    sums = np.asarray(jax.device_get(_digest_leaves(leaves)), np.uint32)
    import hashlib
    return hashlib.sha256(sums.tobytes()).hexdigest()[:32]


def layout(tree: Any) -> str:
    """Hash of the tree's key paths, shapes and dtypes (not values, not shardings)."""
    import hashlib
    items = [(jax.tree_util.keystr(path), tuple(int(d) for d in np.shape(x)), str(np.dtype(x.dtype)))
             for path, x in jax.tree_util.tree_leaves_with_path(tree)]
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict | None = None) -> None:
    """Save ``state`` + ``meta`` at ``step`` (asynchronously if the manager is async).

    ``metrics`` (e.g. ``{"val_map": 0.41}``) ranks the checkpoint for ``keep_best``.
    """
    meta = dict(meta, digest=digest(state), state_layout=layout(state), saved_at=time.time())
    if isinstance(state, dict) and "params" in state:
        meta["params_digest"] = digest(state["params"])
    if step in mgr.all_steps():   # e.g. the final save at a step already checkpointed
        return
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
             metrics=metrics)


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON metadata item of ``step``, restored through the manager (no array is read)."""
    return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def latest_meta(workdir: str | Path) -> tuple[int, dict] | None:
    """``(step, meta)`` of the newest checkpoint with readable metadata, through a read-only
    manager; ``(newest step, {})`` when none is readable (the full restore reports why);
    None without checkpoints."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return None
    mgr = manager(workdir, read_only=True)
    steps = sorted(mgr.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, read_meta(mgr, step)
        except Exception:   # damaged: restore_latest reports it and falls back
            continue
    return (steps[0], {}) if steps else None


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any, *,
                   quarantine: bool = True) -> tuple[int, Any, dict] | None:
    """Restore the newest intact step, falling back to older ones; None if there is none.

    A step that fails to restore or whose state does not match the digest stored in its
    metadata is reported (logged as a warning) and, with ``quarantine``, moved to
    ``checkpoints_corrupt/`` (by process 0) so that a later save of that step number
    cannot collide with it.
    """
    bad = []
    result = None
    want_layout = layout(abstract_state)
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            meta = read_meta(mgr, step)
        except Exception as e:
            log.warning("checkpoint step %d in %s has unreadable metadata (%s: %s); trying an older one",
                        step, mgr.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            bad.append(step)
            continue
        if meta.get("state_layout") not in (None, want_layout):
            # Intact, but of another train-state structure: a config change, not damage.
            raise CheckpointError(
                f"checkpoint step {step} in {mgr.directory} holds a train state of another structure "
                "(model, optimiser or EMA settings changed since it was written); resume with the "
                "original config or use a new --workdir")
        try:
            out = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
            state = out["state"]
            want = meta.get("digest")
            if want and digest(state) != want:
                raise CheckpointError("restored state does not match the digest written with it")
            result = (step, state, meta)
            break
        except Exception as e:  # orbax raises many types for damaged files
            log.warning("checkpoint step %d in %s is unreadable or damaged (%s: %s); trying an older one",
                        step, mgr.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            bad.append(step)
    if bad and quarantine:
        _quarantine(mgr, bad)
    return result


def restore_step(mgr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[int, Any, dict]:
    """Restore one given step (CheckpointError if it is missing or damaged)."""
    if step not in mgr.all_steps():
        raise CheckpointError(f"no checkpoint for step {step} in {mgr.directory} (have {list(mgr.all_steps())})")
    try:
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {mgr.directory} is unreadable: {e}") from e
    meta = dict(out["meta"])
    if meta.get("digest") and digest(out["state"]) != meta["digest"]:
        raise CheckpointError(f"checkpoint step {step} in {mgr.directory} is damaged (digest mismatch)")
    return step, out["state"], meta


def _quarantine(mgr: ocp.CheckpointManager, steps: list[int]) -> None:
    root = Path(str(mgr.directory))
    dest = root.parent / "checkpoints_corrupt"
    if jax.process_index() == 0:
        dest.mkdir(exist_ok=True)
        for s in steps:
            src = root / str(s)
            if src.exists():
                target = dest / f"{s}-{int(time.time())}"
                shutil.move(str(src), str(target))
                log.warning("moved damaged checkpoint %s to %s", src, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mmvae_checkpoint_quarantine")
    mgr.reload()


def check_compatible(meta: dict, fingerprint: str, where: str) -> None:
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {where} was written for a different model configuration "
                              f"(fingerprint {meta.get('model_fingerprint')} vs {fingerprint}); "
                              "its parameter shapes do not match the config")


def abstract(state: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of ``state`` (with ``shardings``, a matching tree, if given)."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
