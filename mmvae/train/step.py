"""The jitted train step: loss, gradients, a guarded optimiser update, EMA; the eval step.

State is a plain pytree ``{"params", "opt_state", "step", "nonfinite_steps",
"skipped_total"[, "ema"]}`` so it shards, checkpoints and donates without framework
magic. A non-finite loss or gradient skips the update (parameters, optimiser state and
EMA unchanged), is counted in ``skipped_total`` and in ``nonfinite_steps`` (the
current run of skipped steps, reset by the next finite one).

With ``model.dtype='bfloat16'`` the model computes in bfloat16 while parameters,
gradients, optimiser state and the loss stay float32 (mixed precision).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmvae.objectives.elbo import ObjectiveSpec, elbo_loss
from mmvae.runs.setup import init_state  # noqa: F401  (re-exported: scripts import it from here)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _take_frozen(tree, source, frozen: tuple[str, ...]):
    """``tree`` with the leaves whose path (``a/b/c``) starts with one of ``frozen`` taken from ``source``."""
    if not frozen:
        return tree
    return jax.tree_util.tree_map_with_path(
        lambda p, x, y: y if any(_path_str(p).startswith(f) for f in frozen) else x, tree, source)


def freeze(tree, frozen: tuple[str, ...]):
    """Zero the leaves of ``tree`` whose path (``a/b/c``) starts with one of ``frozen``."""
    if not frozen:
        return tree
    return _take_frozen(tree, jax.tree.map(jnp.zeros_like, tree), frozen)


def make_train_step(graphdef, tx, obj: ObjectiveSpec | None, lr_schedule=None, ema_decay: float = 0.0,
                    frozen: tuple[str, ...] = (), loss: Callable | None = None):
    """Return ``step(state, batch, key) -> (state, metrics)`` (not yet jitted).

    The loss is :func:`~mmvae.objectives.elbo.elbo_loss` under ``obj``, or ``loss(model,
    batch, key, step) -> (scalar, metrics dict)`` (e.g. a baseline's). ``lr_schedule``
    (optional) adds the step's learning rate to the metrics. ``frozen``: parameter path
    prefixes (e.g. ``encoders/report/bert``) whose gradients and updates are zeroed, so
    those parameters never change (weight decay included).
    """
    if loss is None:
        loss = lambda model, batch, key, step: elbo_loss(model, batch, key, step, obj)

    def loss_fn(params, batch, key, step):
        value, metrics = loss(nnx.merge(graphdef, params), batch, key, step)
        return value.astype(jnp.float32), metrics

    def train_step(state, batch, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, key, state["step"])
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        grads = freeze(jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads), frozen)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        updates = freeze(updates, frozen)
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = dict(state)
        out["params"] = keep(new_params, state["params"])
        out["opt_state"] = keep(new_opt, state["opt_state"])
        out["step"] = state["step"] + 1
        out["nonfinite_steps"] = jnp.where(finite, 0, state["nonfinite_steps"] + 1)
        out["skipped_total"] = state.get("skipped_total", jnp.zeros((), jnp.int32)) + (~finite).astype(jnp.int32)
        if "ema" in state:    # frozen parameters: their EMA is the parameter itself (no float32 drift)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], out["params"])
            out["ema"] = keep(_take_frozen(ema, out["params"], frozen), state["ema"])
        metrics = dict(metrics, grad_norm=gnorm, skipped=(~finite).astype(jnp.int32),
                       skipped_total=out["skipped_total"])
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return out, metrics

    return train_step


def make_eval_step(graphdef, obj: ObjectiveSpec):
    """Return ``eval(params, batch, key, step) -> (metrics, experts_mu, experts_logvar, present)``.

    The metrics are :func:`elbo_loss`'s (the subset ELBO terms of the batch); the experts
    (``(B, M, L)``) and presence ``(B, M)`` feed the retrieval evaluation.
    """

    def eval_step(params, batch, key, step):
        model = nnx.merge(graphdef, params)
        _, metrics = elbo_loss(model, batch, key, step, obj)
        experts, present, _ = model.encode(batch)
        metrics = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               metrics)
        return metrics, experts.mu.astype(jnp.float32), experts.logvar.astype(jnp.float32), present

    return eval_step
