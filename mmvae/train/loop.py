"""``train_and_evaluate(config, workdir)``: the whole training run.

Data → (cached) preprocessing → model → jitted, donated, data-parallel train step over
a ``jax.sharding.Mesh`` of all devices (batch sharded along ``data``, parameters
replicated) → metrics (JSONL + TensorBoard) → orbax checkpoints with exact resume.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmvae.data.cache import PreprocessCache
from mmvae.data.dataset import Cohort, prepare_cohort, split_indices
from mmvae.data.pipeline import Position, train_batches
from mmvae.errors import ConfigError, MmvaeError
from mmvae.models.mvae import build_model
from mmvae.models.text import build_word_tokenizer, load_tokenizer
from mmvae.progress import progress_bar
from mmvae.train import checkpoint as ckpt
from mmvae.train.metrics import MetricWriter
from mmvae.train.run import fingerprint, write_run_files
from mmvae.train.setup import model_spec, objective_spec, optimizer
from mmvae.train.step import init_state, make_train_step

log = logging.getLogger(__name__)


def data_mesh() -> jax.sharding.Mesh:
    """1-D mesh over every device (all processes), axis name ``data``."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict, mesh) -> dict:
    """Place a host batch on the mesh, split along the batch axis."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def get_tokenizer(config, workdir: Path, texts):
    """The report tokenizer: ``data.text.tokenizer_dir``, the pretrained model's, or one
    built from the training reports into ``<workdir>/tokenizer`` (reused when present)."""
    t = config.data.text
    if t.tokenizer_dir:
        return load_tokenizer(t.tokenizer_dir)
    if config.model.text.pretrained_dir:
        return load_tokenizer(config.model.text.pretrained_dir)
    out = workdir / "tokenizer"
    if not (out / "vocab.txt").exists():
        build_word_tokenizer([x for x in texts if x], out, max_vocab=int(t.vocab_max))
    return load_tokenizer(out)


def special_ids(tokenizer) -> tuple[int, ...]:
    return tuple(sorted({i for i in tokenizer.all_special_ids if i is not None}))


def load_cohort(config, workdir: Path, manifest: str | None = None, *, tokenizer=None,
                clinical_stats=None, show_progress=True):
    """Prepare the cohort of ``manifest`` (default ``data.manifest``) with the run's cache."""
    manifest = manifest or config.data.manifest
    if not manifest:
        raise ConfigError("data.manifest is empty: give a cohort manifest")
    cache = PreprocessCache(config.data.cache_dir or (workdir / "cache"))
    if tokenizer is None and config.data.report:
        # Reports first (cheap), to build the tokenizer before tokenising.
        from mmvae.data.manifest import read_manifest
        texts = [e.text for e in read_manifest(manifest) if e.modality == "report" and e.text]
        tokenizer = get_tokenizer(config, workdir, texts)
    cohort = prepare_cohort(manifest, config.data, cache, tokenizer, clinical_stats=clinical_stats,
                            show_progress=show_progress)
    return cohort, tokenizer, cache


def _host_metrics(m: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(m).items()}


def train_and_evaluate(config, workdir: str | Path, *, show_progress: bool = True,
                       stop_after: int | None = None) -> dict:
    """Train per ``config`` in ``workdir`` (resuming from its latest checkpoint).

    ``stop_after``: stop after this many steps *of this call* (for tests of resume).
    Returns a summary dict (final step, last metrics, timings).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cohort, tokenizer, _ = load_cohort(config, workdir, show_progress=show_progress)
    train_idx, val_idx = split_indices(len(cohort), float(config.data.val_fraction), int(config.data.split_seed))
    train = cohort.subset(train_idx)
    vocab = len(tokenizer) if tokenizer is not None else 0
    spec = model_spec(config, vocab, special_ids(tokenizer) if tokenizer is not None else (0,))
    obj = objective_spec(config, spec)
    write_run_files(workdir, config, spec, cohort.clinical_stats)
    model = build_model(spec, int(config.seed))
    if config.model.text.pretrained_dir and spec.report:
        from mmvae.models.text import load_hf_bert
        _, bert = load_hf_bert(config.model.text.pretrained_dir)
        model.encoders["report"].bert = bert
    tx, lr = optimizer(config)
    ema = float(config.optim.ema_decay)
    graphdef, state = init_state(model, tx, ema)

    mesh = data_mesh()
    bs = int(config.train.batch_size)
    if bs % jax.device_count():
        raise ConfigError(f"train.batch_size {bs} must be divisible by the number of devices {jax.device_count()}")
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    mgr = ckpt.manager(workdir, int(config.train.keep_checkpoints))
    pos = Position()
    fp = fingerprint(spec)
    restored = ckpt.restore_latest(mgr, ckpt.abstract(state)) if mgr.all_steps() else None
    if restored is not None:
        step0, state, meta = restored
        ckpt.check_compatible(meta, fp, f"{workdir}/checkpoints/{step0}")
        pos = Position(**meta["position"])
        state = jax.device_put(state, replicated)
        log.info("resumed from step %d", step0)

    step_fn = jax.jit(make_train_step(graphdef, tx, obj, lr, ema), donate_argnums=0)
    writer = MetricWriter(workdir)
    base_key = jax.random.key(int(config.seed))
    total = int(config.train.steps)
    start = int(jax.device_get(state["step"]))
    n_steps = total - start if stop_after is None else min(total - start, stop_after)
    batches = train_batches(train, bs, int(config.seed), pos, prefetch=int(config.data.prefetch))
    metric_names = {"recon_per_modality": list(spec.modalities), "kl_per_modality": list(spec.modalities)}
    t_start, last, compile_s = time.time(), {}, None
    log_every = max(1, int(config.train.log_every))
    ckpt_every = int(config.train.checkpoint_every)
    bar = progress_bar(range(n_steps), total=n_steps, desc="train", enable=show_progress, unit="step")
    t_prev = time.time()
    for i in bar:
        batch, pos = next(batches)
        step = start + i
        key = jax.random.fold_in(base_key, step)
        t0 = time.time()
        state, metrics = step_fn(state, shard_batch(batch, mesh), key)
        if compile_s is None:
            jax.block_until_ready(metrics["loss"])
            compile_s = time.time() - t0
        done = step + 1
        if done % log_every == 0 or done == total:
            m = _host_metrics(metrics)
            now = time.time()
            m["step_time_s"] = np.asarray((now - t_prev) / log_every)
            m["cases_per_s"] = np.asarray(bs * log_every / max(now - t_prev, 1e-9))
            t_prev = now
            last = writer.write(done, m, names=metric_names)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{last['loss']:.1f}")
            bad = int(jax.device_get(state["nonfinite_steps"]))
            if bad >= int(config.train.max_nonfinite_in_row):
                writer.close()
                raise MmvaeError(f"training stopped at step {done}: {bad} non-finite losses in a row "
                                 f"(last good state is in {workdir}/checkpoints)")
        if ckpt_every and done % ckpt_every == 0 and done != total:
            ckpt.save(mgr, done, state, {"position": vars(pos), "model_fingerprint": fp})
    final = start + n_steps
    if n_steps > 0 or not mgr.all_steps():
        ckpt.save(mgr, final, state, {"position": vars(pos), "model_fingerprint": fp})
    mgr.wait_until_finished()
    writer.close()
    return {"step": final, "metrics": last, "train_seconds": time.time() - t_start,
            "compile_seconds": compile_s, "num_train": len(train), "num_val": len(val_idx)}


def load_trained(workdir: str | Path, *, use_ema: bool = True):
    """Rebuild the model of a trained work dir with its latest checkpoint's parameters.

    Returns (config, spec, model, tokenizer).
    """
    from mmvae.train.run import read_run_files
    workdir = Path(workdir)
    config, spec, _ = read_run_files(workdir)
    model = build_model(spec, int(config.seed))
    tx, _ = optimizer(config)
    graphdef, state = init_state(model, tx, float(config.optim.ema_decay))
    mgr = ckpt.manager(workdir, int(config.train.keep_checkpoints))
    restored = ckpt.restore_latest(mgr, ckpt.abstract(state))
    if restored is None:
        from mmvae.errors import CheckpointError
        raise CheckpointError(f"{workdir} has no readable checkpoint")
    step, state, meta = restored
    ckpt.check_compatible(meta, fingerprint(spec), f"{workdir}/checkpoints/{step}")
    params = state["ema"] if (use_ema and "ema" in state) else state["params"]
    model = nnx.merge(graphdef, params)
    tokenizer = load_tokenizer(workdir / "tokenizer") if (workdir / "tokenizer").exists() else (
        load_tokenizer(config.data.text.tokenizer_dir or config.model.text.pretrained_dir)
        if spec.report else None)
    return config, spec, model, tokenizer
