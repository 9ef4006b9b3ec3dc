"""``fit``: a small model trained with a custom loss, outside the VAE's training run.

The CLIP and supervised baselines (:mod:`mmvae.experiments.baselines`) train their encoders
here: the project's guarded train step (:func:`mmvae.train.step.make_train_step`, non-finite
steps skipped), the optimiser of :func:`mmvae.runs.setup.optimizer` and per-step keys
``fold_in(key(seed), t)`` as in :func:`mmvae.train.loop.train_and_evaluate`. Also the one
frozen-BERT cache (:func:`cache_frozen_report`) that the loop and the baselines share.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmvae.data.dataset import Cohort
from mmvae.errors import ConfigError
from mmvae.models.modalities.report import POOLED
from mmvae.runs.setup import init_state, optimizer
from mmvae.train.step import make_train_step

__all__ = ["fit", "FitResult", "host_lr_optimizer", "set_learning_rate", "cache_frozen_report"]


@dataclasses.dataclass
class FitResult:
    """``params`` after the last step, ``losses (steps,)`` (the loss's ``"loss"`` metric per
    step), ``step_fn`` the jitted step (``step_fn._cache_size()`` counts its compilations)."""
    params: object
    losses: np.ndarray
    step_fn: Callable


def _schedule_config(optim, steps: int):
    return ml_collections.ConfigDict({"optim": optim.to_dict() if hasattr(optim, "to_dict") else dict(optim),
                                      "train": {"steps": int(steps)}})


@functools.lru_cache(maxsize=8)
def _host_lr_tx(optim_json: str):
    return optimizer(_schedule_config(json.loads(optim_json), 1), host_lr=True)[0]


def host_lr_optimizer(optim, steps: int):
    """``(tx, schedule)`` of :func:`mmvae.runs.setup.optimizer` for the settings ``optim``
    (``config.optim``) over ``steps``, with the learning rate a value in the optimiser state
    that the host sets each step (:func:`set_learning_rate`): ``tx`` does not depend on
    ``steps`` and is cached per ``optim`` (as JSON), so fits with any number of steps share
    one compiled step."""
    cfg = _schedule_config(optim, steps)
    return (_host_lr_tx(json.dumps(cfg.optim.to_dict(), sort_keys=True, default=list)),
            optimizer(cfg)[1])


def set_learning_rate(opt_state, lr: float):
    """The optimiser state of a :func:`host_lr_optimizer` with its learning rate set to ``lr``."""
    inner = opt_state[-1]
    hp = dict(inner.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
    return tuple(opt_state[:-1]) + (inner._replace(hyperparams=hp),)


@functools.lru_cache(maxsize=8)
def _step_fn(graphdef, tx, loss: Callable, frozen: tuple[str, ...]):
    return jax.jit(make_train_step(graphdef, tx, None, loss=loss, frozen=frozen))


def fit(model: nnx.Module, loss: Callable, optim, batches: Iterable[dict], *, steps: int, seed: int,
        frozen: tuple[str, ...] = ()) -> FitResult:
    """Train ``model``'s parameters for ``steps`` guarded steps of ``loss``.

    ``loss(model, batch, key, step) -> (scalar, metrics with "loss")`` (as
    :func:`~mmvae.train.step.make_train_step` takes it; pass the same object for every fit to
    share the compiled step); ``optim``: ``config.optim`` (AdamW, warm-up + schedule over
    ``steps``, clipping; :func:`host_lr_optimizer`); ``batches``: an iterator of batches (e.g.
    the first items of :func:`mmvae.data.pipeline.train_batches`), ``steps`` of them are
    drawn; step t's key is ``fold_in(key(seed), t)``; ``frozen``: parameter path prefixes
    whose values never change. The step is jitted once per model structure, loss, optimiser
    settings and frozen set (and batch shape).
    
    Note: the learning rate follows the loop index ``t``: a step skipped as non-finite still
    advances the schedule (in the VAE loop, optax's own count does not advance).
    """
    steps = int(steps)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    tx, sched = host_lr_optimizer(optim, steps)
    graphdef, state = init_state(model, tx)
    step = _step_fn(graphdef, tx, loss, tuple(frozen))
    base = jax.random.key(int(seed))
    losses = np.zeros(steps, np.float32)
    it = iter(batches)
    for t in range(steps):
        state["opt_state"] = set_learning_rate(state["opt_state"], sched(t))
        state, metrics = step(state, next(it), jax.random.fold_in(base, t))
        losses[t] = float(metrics["loss"])
    return FitResult(state["params"], losses, step)


def cache_frozen_report(encoder, cohort: Cohort, batch_size: int = 32) -> Cohort:
    """Add the batch entry ``report/pooled`` ``(N, H)`` float32 to ``cohort``: the frozen report
    BERT's mean-pooled output of every case (zeros where the report is absent).

    ``encoder``: the model's report expert (:class:`~mmvae.models.modalities.report.ReportEncoder`).
    With ``model.text.freeze`` the BERT never changes and has no dropout, so its output is a
    fixed function of the tokens: computing it once here and training only the head above it
    (:func:`mmvae.models.modalities.report._encode` uses the entry when a batch has it) gives the
    same loss as running the BERT at every step (tests/test_retrieval_quality.py), without its
    forward and backward passes. Only for a frozen BERT: with a trainable one the entry would be
    stale. Single-process (the output is gathered on the host). Used by the VAE's training loop
    and the trained baselines.
    """
    enc_def, enc_state = nnx.split(encoder)
    fn = jax.jit(lambda st, ids, mask: nnx.merge(enc_def, st).pooled(ids, mask))
    ids, mask = cohort.arrays["report/ids"], cohort.arrays["report/mask"]
    out = []
    for i in range(0, len(cohort), batch_size):
        b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
        n = len(b_ids)
        if n < batch_size:   # one compiled shape
            pad = ((0, batch_size - n), (0, 0))
            b_ids, b_mask = np.pad(b_ids, pad), np.pad(b_mask, pad)
        out.append(np.asarray(fn(enc_state, b_ids, b_mask))[:n])
    pooled = np.concatenate(out, 0) if out else np.zeros((0, 1), np.float32)
    pooled *= (mask.sum(-1, keepdims=True) > 0)
    return dataclasses.replace(cohort, arrays={**cohort.arrays, POOLED: pooled.astype(np.float32)})
