"""``train_and_evaluate(config, workdir)``: the whole training run.

Data → (cached) preprocessing → model → one jitted, donated train step over a 1-D
``jax.sharding.Mesh`` of every device of every process (axis ``data``):

* the global batch (``train.batch_size``) is sharded along ``data``; each process
  assembles only the rows its own devices hold (:func:`local_rows`) and
  :func:`shard_batch` stitches them into one global array;
* parameters, optimiser state and EMA are replicated, or with ``train.fsdp`` the large
  ones (≥ ``train.fsdp_min_size`` elements, one axis divisible by the device count)
  are sharded along ``data`` on that axis (:func:`state_shardings`; XLA inserts the
  all-gathers / reduce-scatters).

Then: metrics (JSONL + TensorBoard, process 0), periodic validation (subset ELBO
terms and retrieval mAP@k, ``split='val'``), orbax checkpoints with exact resume
(state + seed + input position; per-step keys are ``fold_in(key(seed), step)``).
A non-finite loss skips the update; ``train.max_nonfinite_in_row`` skipped steps in
a row stop the run with a checkpoint of the last good state and an ``MmvaeError``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmvae.atomic import atomic_write_text
from mmvae.config import describe_text, resolve_pretrained_text, validate
from mmvae.data.dataset import (Cohort, read_case_list, split_indices, with_label_supervision,
                                with_listed_labels, write_input_summary)
from mmvae.data.pipeline import eval_batches as eval_batch_stream, Position, train_batches as train_batch_stream
from mmvae.errors import CheckpointError, ConfigError, MmvaeError
from mmvae.models import fusion as F
from mmvae.models.modalities.report import FROZEN_BERT
from mmvae.models.mvae import build_model
from mmvae.models.text import load_hf_bert
from mmvae.progress import progress_bar
from mmvae.retrieval.embed import Embeddings, embedding_kind, frozen_from_batch
from mmvae.runs import checkpoint as ckpt
from mmvae.runs.files import fingerprint, write_run_files
from mmvae.runs.setup import init_state, model_spec, objective_spec, optimizer
from mmvae.runs.trained import load_cohort, special_ids
from mmvae.sharding import (data_mesh, gather, local_rows, maybe_initialize_distributed, place, shard_batch,
                            state_shardings)
from mmvae.train import evaluators as evals
from mmvae.train.evaluators import ValidationPass
from mmvae.train.fit import cache_frozen_report  # noqa: F401  (also imported from here)
from mmvae.train.metrics import MetricWriter
from mmvae.train.step import make_eval_step, make_train_step
# Module-level names (tests substitute them to slow down or poison the stream).

log = logging.getLogger(__name__)

EVAL_KEY_SALT = 0x7EA1   # validation uses fold_in(key(seed), EVAL_KEY_SALT): the same noise every time


def label_supervision(config, train: Cohort) -> tuple[Cohort, tuple[str, ...]]:
    """``data.label_fraction > 0`` or ``data.labelled_cases``: the training cohort with labels
    for the label expert, and its classes (sorted label values of the training cases);
    otherwise ``(train, ())``. ``data.labelled_cases`` (a file of case ids, one per line or a
    CSV with a ``case_id`` column) names exactly which training cases give their label, e.g.
    the annotations of active-learning rounds (``mmvae suggest``)."""
    frac = float(config.data.label_fraction)
    listed = str(config.data.labelled_cases or "")
    if frac <= 0 and not listed:
        return train, ()
    classes = tuple(sorted({v for v in train.label_array(config.data.label) if v}))
    if not classes:
        raise ConfigError(f"data.label_fraction={frac} but no training case has the label "
                          f"{config.data.label!r} (data.label)")
    if listed:
        train = with_listed_labels(train, config.data.label, classes, read_case_list(listed))
    else:
        train = with_label_supervision(train, config.data.label, classes, frac, int(config.data.split_seed))
    log.info("label expert: %d classes, label given on %d of %d training cases", len(classes),
             int(train.label_mask.sum()), len(train))
    return train, classes


# ---------------------------------------------------------------------------- names
def term_names(spec, obj) -> list[str]:
    """Labels of ``elbo_per_term`` (the subset terms J of the objective)."""
    mods = list(spec.modalities)
    if obj.num_subset_samples > 0:
        return [f"sample{i}" for i in range(obj.num_subset_samples)]
    if obj.subsets in ("all", "mopoe"):
        return ["+".join(m for m, r in zip(mods, row) if r > 0) for row in F.all_subsets(len(mods))]
    if obj.subsets == "unimodal":
        return mods
    return ["joint"] + mods + [f"random{i}" for i in range(obj.num_random_subsets)]


def _host_metrics(m: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(m).items()}


# ---------------------------------------------------------------------------- evaluation
def _validation_pass(eval_fn, params, cohort: Cohort, spec, config, mesh, rows: slice, step: int,
                     frozen_fn=None) -> ValidationPass:
    """The eval step over every validation case: ELBO terms averaged over cases + the experts."""
    bs = int(config.train.batch_size)
    sums: dict[str, np.ndarray] = {}
    n_total = 0
    mus, lvs, pres, frozen = [], [], [], {}
    for batch, valid in eval_batch_stream(cohort, bs, rows, prefetch=int(config.data.prefetch)):
        got = frozen_from_batch(batch, spec) if frozen_fn is None else jax.device_get(frozen_fn(params, batch))
        for m, f in got.items():
            frozen.setdefault(m, []).append(np.asarray(f)[valid])
        metrics, mu, lv, present = eval_fn(params, shard_batch(batch, mesh, bs), jnp.int32(step))
        n = int(valid.sum())
        for k, v in _host_metrics(metrics).items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64) * n
        n_total += n
        mu, lv, present = gather((mu, lv, present))
        mus.append(mu[valid]); lvs.append(lv[valid]); pres.append(present[valid])
    emb = Embeddings.from_experts(np.concatenate(mus), np.concatenate(lvs), np.concatenate(pres), cohort, spec,
                                  embedding=embedding_kind(config),
                                  frozen={m: np.concatenate(v) for m, v in frozen.items()})
    if config.retrieval.standardize:
        emb = emb.standardized()
    return ValidationPass({k: v / max(n_total, 1) for k, v in sums.items()}, n_total, emb)


# ---------------------------------------------------------------------------- the run
def _write_layout(workdir: Path, mesh, shardings, state, config, resumed_from) -> None:
    """Add the device layout and launch details to ``run_info.json`` (process 0)."""
    p = workdir / "run_info.json"
    info = json.loads(p.read_text()) if p.exists() else {}
    sharded = [x.size for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)) if s.spec != P()]
    total = sum(int(x.size) for x in jax.tree.leaves(state))
    info.update({
        "mesh": {"axes": list(mesh.axis_names), "shape": [int(s) for s in mesh.devices.shape],
                 "devices": [str(d) for d in mesh.devices.ravel()]},
        "local_device_count": jax.local_device_count(), "platform": jax.devices()[0].platform,
        "batch_size_global": int(config.train.batch_size),
        "batch_size_per_device": int(config.train.batch_size) // jax.device_count(),
        "fsdp": bool(config.train.fsdp), "state_elements": int(total),
        "state_elements_sharded": int(sum(sharded)), "state_arrays_sharded": len(sharded),
        "argv": list(sys.argv), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_step": resumed_from,
    })
    atomic_write_text(p, json.dumps(info, indent=2))


def initial_state(spec, seed: int, tx, ema: float, shardings, *, pretrained_dir: str = ""):
    """A fresh train state, created directly in its ``shardings`` by one jitted init
    (no full copy on one device first, which matters with FSDP). With a pretrained
    report encoder the model is built eagerly, the weights loaded, then placed."""
    if pretrained_dir and spec.report:
        model = build_model(spec, seed)
        _, bert = load_hf_bert(pretrained_dir)
        model.encoders["report"].bert = bert
        return place(init_state(model, tx, ema)[1], shardings)
    return jax.jit(lambda: init_state(build_model(spec, seed), tx, ema)[1], out_shardings=shardings)()


def _check_resumable(config, meta: dict, where: str, fp: str | None = None, obj=None) -> None:
    if fp is not None:
        ckpt.check_compatible(meta, fp, where)
    seed = int(config.seed)
    if meta.get("seed") is not None and int(meta["seed"]) != seed:
        raise ConfigError(f"checkpoint {where} was trained with seed {meta['seed']} but the config has "
                          f"seed {seed}; resuming would not reproduce the run (use --config.seed="
                          f"{meta['seed']} or a new --workdir)")
    if obj is not None and meta.get("objective") is not None:
        now = json.loads(json.dumps(dataclasses.asdict(obj)))
        diff = sorted(k for k in set(now) | set(meta["objective"]) if now.get(k) != meta["objective"].get(k))
        if diff:
            raise ConfigError(f"checkpoint {where} was trained with other objective settings ({', '.join(diff)}: "
                              f"{[meta['objective'].get(k) for k in diff]} then, {[now.get(k) for k in diff]} now); "
                              "resuming would change the loss mid-run (e.g. a changed default): use a new --workdir "
                              "or the checkpoint's settings")
    bs = int(config.train.batch_size)
    if meta.get("batch_size") is not None and int(meta["batch_size"]) != bs:
        log.warning("resuming with train.batch_size %d (checkpoint: %s): the batch order changes", bs,
                    meta["batch_size"])


def _early_resume_checks(config, workdir: Path) -> None:
    """Refuse, before any data is read, a work dir whose checkpoints this config cannot continue."""
    latest = ckpt.latest_meta(workdir)
    if latest is None:
        return
    step, meta = latest
    if not bool(config.train.resume):
        raise ConfigError(f"{workdir} already has checkpoints (latest: step {step}); resume "
                          "(train.resume=true, the default) or use a new --workdir")
    _check_resumable(config, meta, f"{workdir}/checkpoints/{step}")


def train_and_evaluate(config, workdir: str | Path, *, show_progress: bool = True,
                       stop_after: int | None = None, return_state: bool = False) -> dict:
    """Train per ``config`` in ``workdir``, resuming from its latest checkpoint.

    ``stop_after``: stop after this many steps *of this call* (checkpointing there).
    ``return_state``: include the final train state (device arrays) as ``"state"``.
    Returns a summary dict (final step, last metrics, timings, best validation mAP).
    """
    validate(config)
    resolve_pretrained_text(config)
    if config.model.text.freeze and not config.model.text.pretrained_dir and config.data.report:
        log.warning("model.text.freeze=True without model.text.pretrained_dir: the report BERT stays at its "
                    "random initialisation (only the head above it trains)")
    if config.data.report:
        log.info(describe_text(config))
    maybe_initialize_distributed(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    _early_resume_checks(config, workdir)
    bs = int(config.train.batch_size)
    if bs % jax.device_count():
        raise ConfigError(f"train.batch_size {bs} must be divisible by the number of devices {jax.device_count()}")
    cohort, tokenizer, _ = load_cohort(config, workdir, show_progress=show_progress and lead)
    if lead:
        write_input_summary(workdir / "input_summary.json", cohort)
    train_idx, val_idx = split_indices(len(cohort), float(config.data.val_fraction), int(config.data.split_seed))
    train, val = cohort.subset(train_idx), cohort.subset(val_idx)
    vocab = len(tokenizer) if tokenizer is not None else 0
    train, classes = label_supervision(config, train)
    spec = model_spec(config, vocab, special_ids(tokenizer) if tokenizer is not None else (0,), classes)
    obj = objective_spec(config, spec)
    seed = int(config.seed)
    if bs > len(train):
        raise ConfigError(f"train.batch_size {bs} is larger than the training set ({len(train)} cases)")

    tx, lr = optimizer(config)
    ema = float(config.optim.ema_decay)
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(spec, seed)), nnx.Param)[0]
    shapes = jax.eval_shape(lambda: init_state(build_model(spec, seed), tx, ema)[1])

    mesh = data_mesh()
    shardings = state_shardings(shapes, mesh, fsdp=bool(config.train.fsdp), min_size=int(config.train.fsdp_min_size))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    rows = local_rows(mesh, bs)

    fp = fingerprint(spec)
    evaluators = evals.from_config(config)
    # checkpoints and the summary's best value follow the all-modality mAP of the first retrieval evaluator
    best_key = next((f"retrieval/map@{int(e.options.get('k', config.retrieval.k))}/all" for e in evaluators
                     if e.fn is evals.retrieval and e.every > 0), None)
    keep_best = int(config.train.keep_best) if best_key and len(val) else 0
    mgr = ckpt.manager(workdir, int(config.train.keep_checkpoints), keep_best=keep_best,
                       async_save=bool(config.train.async_checkpoint))
    pos = Position()
    restored = None
    if mgr.all_steps():
        latest = ckpt.latest_meta(workdir)
        if latest is not None:   # another model shape: refuse before touching the arrays
            ckpt.check_compatible(latest[1], fp, f"{workdir}/checkpoints/{latest[0]}")
        restored = ckpt.restore_latest(mgr, ckpt.abstract(shapes, shardings))
        if restored is None:
            raise CheckpointError(f"{workdir}/checkpoints has checkpoints but none is readable "
                                  "(damaged ones were moved to checkpoints_corrupt/); use a new --workdir "
                                  "or remove the checkpoints to start over")
    if restored is not None:
        step0, state, meta = restored
        _check_resumable(config, meta, f"{workdir}/checkpoints/{step0}", fp, obj)
        pos = Position(**meta["position"])
        log.info("resumed from step %d", step0)
    else:
        state = initial_state(spec, seed, tx, ema, shardings, pretrained_dir=config.model.text.pretrained_dir)
    start = int(jax.device_get(state["step"]))
    if lead:
        write_run_files(workdir, config, spec, cohort.clinical_stats)
        _write_layout(workdir, mesh, shardings, state, config, start if restored is not None else None)

    frozen = (FROZEN_BERT,) if (spec.report and config.model.text.freeze) else ()
    if frozen and spec.report_encoder == "bert" and jax.process_count() == 1 and start < int(config.train.steps):
        t_cache = time.time()
        report_encoder = nnx.merge(graphdef, state["params"]).encoders["report"]
        train = cache_frozen_report(report_encoder, train)
        if len(val) and any(e.every > 0 for e in evaluators):     # the validation passes' BERT runs too
            val = cache_frozen_report(report_encoder, val)
        log.info("frozen report BERT: mean-pooled outputs of %d training and %d validation cases computed once "
                 "(%.1f s); training runs the head only", len(train), len(val), time.time() - t_cache)
    train_step = make_train_step(graphdef, tx, obj, lr, ema, frozen=frozen)
    base_key = jax.random.key(seed)

    def step_with_key(state, batch):
        return train_step(state, batch, jax.random.fold_in(base_key, state["step"]))

    step_fn = jax.jit(step_with_key, in_shardings=(shardings, batch_sharding),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    if any(e.every for e in evaluators) and not len(val):
        log.warning("validation evaluators are due (train.eval_every / evals) but the validation split is empty "
                    "(data.val_fraction=%s)", config.data.val_fraction)
    evaluators = [e for e in evaluators if e.every > 0] if len(val) else []
    eval_fn = None
    if evaluators:
        eval_step = make_eval_step(graphdef, obj)
        eval_key = jax.random.fold_in(base_key, EVAL_KEY_SALT)
        params_sh = shardings["ema"] if "ema" in state else shardings["params"]
        eval_fn = jax.jit(lambda p, b, s: eval_step(p, b, eval_key, s),
                          in_shardings=(params_sh, batch_sharding, replicated),
                          out_shardings=(replicated, replicated, replicated, replicated))
    # the features kinds' frozen blocks, through the model as embed_cohort computes them (the report's
    # needs the frozen BERT when its pooled output is not cached in the batch)
    frozen_fn = None
    if evaluators and "features" in embedding_kind(config):
        frozen_fn = jax.jit(lambda p, b: nnx.merge(graphdef, p).frozen_features(b))

    writer = MetricWriter(workdir, tensorboard=bool(config.train.tensorboard), resume_step=start)
    total = int(config.train.steps)
    n_steps = max(0, total - start) if stop_after is None else max(0, min(total - start, stop_after))
    batches = train_batch_stream(train, bs, seed, pos, rows, prefetch=int(config.data.prefetch))
    names = {"recon_per_modality": list(spec.modalities), "kl_per_modality": list(spec.modalities),
             "elbo_per_term": term_names(spec, obj)}
    log_every = int(config.train.log_every)
    check_every = max(1, min(log_every, int(config.train.max_nonfinite_in_row)))
    ckpt_every = int(config.train.checkpoint_every)
    max_bad = int(config.train.max_nonfinite_in_row)
    t_start, last, compile_s = time.time(), {}, None
    best = {"step": None, "value": None}
    last_val, val_metric = None, None

    def meta_for(pos_, status="ok"):
        return {"position": vars(pos_), "model_fingerprint": fp, "seed": seed, "batch_size": bs,
                "num_train": len(train), "status": status, "objective": dataclasses.asdict(obj)}

    bar = progress_bar(range(n_steps), total=n_steps, desc="train", enable=show_progress and lead, unit="step")
    t_prev, n_since = time.time(), 0
    done = start
    try:
        for i in bar:
            batch, pos = next(batches)
            step = start + i
            t0 = time.time()
            state, metrics = step_fn(state, shard_batch(batch, mesh, bs))
            if show_progress and lead:   # the bar counts finished steps, not dispatched ones (true rate and ETA)
                jax.block_until_ready(metrics["loss"])
            done = step + 1
            if compile_s is None:
                jax.block_until_ready(metrics["loss"])
                compile_s = time.time() - t0
                t_prev, n_since = time.time(), 0   # throughput excludes compilation
            else:
                n_since += 1
            if done % log_every == 0 or done == total:
                m = _host_metrics(metrics)
                now = time.time()
                if n_since > 0:
                    m["step_time_s"] = np.asarray((now - t_prev) / n_since)
                    m["cases_per_s"] = np.asarray(bs * n_since / max(now - t_prev, 1e-9))
                t_prev, n_since = now, 0
                last = writer.write(done, m, names=names)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{last['loss']:.4g}")
            if done % check_every == 0 or done == total:
                bad = int(jax.device_get(state["nonfinite_steps"]))
                if bad >= max_bad:
                    ckpt.save(mgr, done, state, meta_for(pos, status=f"stopped: {bad} non-finite steps in a row"))
                    mgr.wait_until_finished()
                    raise MmvaeError(
                        f"training stopped at step {done}: {bad} non-finite losses/gradients in a row "
                        f"(train.max_nonfinite_in_row={max_bad}); the updates were skipped, so the checkpoint "
                        f"written at step {done} in {workdir}/checkpoints holds the last good parameters "
                        f"(from step {done - bad}). Lower optim.lr, check the inputs, or raise the limit.")
            val_metric, paused = None, False
            due = [e for e in evaluators if e.due(done, total)]
            if due:
                paused = True
                params = state["ema"] if "ema" in state else state["params"]
                vp = _validation_pass(eval_fn, params, val, spec, config, mesh, rows, done, frozen_fn)
                vm = {}
                for e in due:
                    vm.update(e(vp, spec, config))
                last_val = writer.write(done, vm, split="val", names=names)
                v = last_val.get(best_key) if best_key else None
                if v is not None and np.isfinite(v):
                    val_metric = float(v)
                    if best["value"] is None or val_metric > best["value"]:
                        best = {"step": done, "value": val_metric}
            if done != total and ((ckpt_every and done % ckpt_every == 0) or (val_metric is not None and keep_best)):
                ckpt.save(mgr, done, state, meta_for(pos),
                          metrics={ckpt.BEST_METRIC: val_metric} if val_metric is not None else None)
                paused = True
            if paused:   # step time and throughput exclude evaluation and checkpointing
                t_prev, n_since = time.time(), 0
        final = start + n_steps
        if n_steps > 0 or not mgr.all_steps():
            ckpt.save(mgr, final, state, meta_for(pos),
                      metrics={ckpt.BEST_METRIC: val_metric} if (n_steps > 0 and val_metric is not None) else None)
        mgr.wait_until_finished()
    finally:
        batches.close()
        writer.close()
        if hasattr(bar, "close"):
            bar.close()
    json_safe = lambda d: None if d is None else {k: (v if np.isfinite(v) else None) for k, v in d.items()}
    summary = {"step": final, "metrics": last, "val_metrics": json_safe(last_val), "train_seconds": time.time() - t_start,
               "compile_seconds": compile_s, "num_train": len(train), "num_val": len(val),
               "devices": jax.device_count(), "processes": jax.process_count(),
               "best_val_map": best["value"], "best_step": best["step"],   # of this call's evaluations
               "checkpoints": [int(s) for s in mgr.all_steps()],
               "input": {"cases": len(cohort), "skipped_cases": len(cohort.skipped),
                         **{f"notes_{k}": sum(n["kind"] == k for n in cohort.notes)
                            for k in ("choice", "dropped", "truncated")}}}
    if return_state:
        summary["state"] = state
    return summary
