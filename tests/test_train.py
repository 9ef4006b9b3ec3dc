"""Training system: runs on 1 device, 8 (fake CPU) devices with FSDP and 2 processes; exact
resume after SIGKILL; determinism; validation; non-finite stop; damaged checkpoints.

Every training runs in its own process (``tests/_train_worker.py``: the device count is
fixed before JAX starts) with one shared persistent compilation cache, and the runs that
do not depend on each other run concurrently. The reference run (1 device, 8 steps,
EMA, checkpoints every 2 steps, validation every 4) serves the resume, determinism,
8-device and 2-process comparisons.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
WORKER = str(ROOT / "tests" / "_train_worker.py")
LR = 1e-3   # tiny.py's optim.lr (base default)
# configs/tiny.py with one image resolution level (1/3 less compilation), 8 steps, EMA,
# checkpoints every 2 steps, validation every 4.
COMMON = ["--config.model.image.channels=(8,)", "--config.train.steps=8", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=4", "--config.train.keep_checkpoints=2",
          "--config.optim.ema_decay=0.9"]
TIMING_KEYS = ("step_time_s", "cases_per_s")
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mmvae.data.synth import make_cohort
    base = tmp_path_factory.mktemp("train")
    manifest = make_cohort(base / "cohort", 24, seed=0, shape=(16, 16, 16), spacing=(4., 4., 4.))
    e = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             JAX_PLATFORMS="cpu")
    return SimpleNamespace(base=base, manifest=str(manifest), cache=str(base / "preprocess_cache"), env=e)


def _argv(env, workdir, *extra):
    return ["train", "--config", TINY, "--workdir", str(workdir), "--manifest", env.manifest, "--quiet",
            f"--config.data.cache_dir={env.cache}", *COMMON, *extra]


_PROCS: list = []


def _start(env, name, argv, *worker_args):
    out = open(env.base / f"{name}.log", "w")
    p = subprocess.Popen([sys.executable, WORKER, *map(str, worker_args), "--", *argv], env=env.env,
                         stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    p.log_path = env.base / f"{name}.log"
    p.t0 = time.time()
    _PROCS.append(p)
    return p


def _finish(p, timeout=RUN_TIMEOUT):
    try:
        rc = p.wait(timeout=max(1, timeout - (time.time() - p.t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    return SimpleNamespace(rc=rc, log=Path(p.log_path).read_text(), seconds=time.time() - p.t0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(env):
    """All trainings of this module (~3 min on 2 CPU cores; every compilation is cold)."""
    try:
        yield _all_runs(env)
    finally:
        for p in _PROCS:      # nothing outlives the module, even when a run hangs or fails
            if p.poll() is None:
                p.kill()
                p.wait()


def _all_runs(env):
    b = env.base
    r = SimpleNamespace(ref_dir=b / "ref", fsdp_dir=b / "fsdp8", dist_dir=b / "dist2", kill_dir=b / "killed",
                        nan_dir=b / "nonfinite")
    # Phase A (cold compilations): the reference (1 device), 8 devices + FSDP, 2 processes x 1 device.
    p_ref = _start(env, "ref", _argv(env, r.ref_dir), "--dump", b / "ref.npz")
    p_fsdp = _start(env, "fsdp8", _argv(env, r.fsdp_dir, "--config.train.fsdp=true",
                                        "--config.train.fsdp_min_size=16384", "--config.train.eval_every=0",
                                        "--config.train.checkpoint_every=0"),
                    "--devices", 8, "--dump", b / "fsdp8.npz")
    port = _free_port()
    p_dist = [_start(env, f"dist{i}", _argv(env, r.dist_dir, "--config.train.checkpoint_every=0"),
                     "--num-processes", 2, "--process-id", i,
                     "--port", port, "--dump", b / f"dist{i}.npz") for i in range(2)]
    r.ref = _finish(p_ref)
    # Phase B (the reference's compilations are cached): a run killed with SIGKILL after its first
    # checkpoint, then resumed; a run whose loss turns non-finite.
    p_nan = _start(env, "nonfinite", _argv(env, r.nan_dir, "--config.train.max_nonfinite_in_row=3",
                                           "--config.train.eval_every=0", "--config.train.keep_checkpoints=3"),
                   "--poison-after", 2)
    kill_argv = _argv(env, r.kill_dir, "--config.train.async_checkpoint=true")
    p_kill = _start(env, "killed", kill_argv, "--slow-after", 2, "--slow-seconds", 2.0)
    first = r.kill_dir / "checkpoints" / "2"
    while not first.is_dir() and p_kill.poll() is None and time.time() - p_kill.t0 < RUN_TIMEOUT:
        time.sleep(0.05)
    p_kill.send_signal(signal.SIGKILL)
    r.killed = _finish(p_kill)
    r.killed_steps = sorted(int(x.name) for x in (r.kill_dir / "checkpoints").iterdir() if x.name.isdigit()) \
        if (r.kill_dir / "checkpoints").exists() else []
    r.killed_metrics = _rows(r.kill_dir)
    r.resumed = _finish(_start(env, "resumed", kill_argv, "--dump", b / "resumed.npz"))
    r.nan = _finish(p_nan)
    r.fsdp = _finish(p_fsdp)
    r.dist = [_finish(p) for p in p_dist]
    timings = {k: round(v.seconds, 1) for k, v in vars(r).items() if isinstance(v, SimpleNamespace)}
    timings.update({f"dist{i}": round(d.seconds, 1) for i, d in enumerate(r.dist)})
    print(f"training runs, finished after (s): {timings}", file=sys.stderr)
    return r


def _rows(workdir, split=None, drop_timing=False):
    from mmvae.train.metrics import read_metrics
    rows = read_metrics(workdir, split)
    if drop_timing:
        rows = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]
    return rows


def _meta(workdir, step):
    return json.loads((Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _flat(tree) -> dict:
    import jax
    return {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _ok(run):
    assert run.rc == 0, run.log[-3000:]


def _close(a: dict, b: dict, what: str):
    """Parameters of two runs that differ only in float summation order."""
    keys = [k for k in a if not k.startswith("__")]
    assert keys == [k for k in b if not k.startswith("__")]
    total = sum(a[k].size for k in keys)
    off = sum(int((np.abs(a[k] - b[k]) > 1e-5).sum()) for k in keys)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in keys)
    # Adam normalises updates, so a near-zero gradient of different sign moves a weight by
    # up to ~lr; everything else agrees to float precision.
    assert worst <= 2 * LR, f"{what}: max |diff| {worst}"
    assert off <= 0.005 * total, f"{what}: {off} of {total} values differ by > 1e-5"


# ------------------------------------------------------------------------------ the reference
def test_reference_run_writes_run_files_metrics_and_checkpoints(runs):
    _ok(runs.ref)
    wd = runs.ref_dir
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["train"]["steps"] == 8 and cfg["optim"]["ema_decay"] == 0.9
    info = json.loads((wd / "run_info.json").read_text())
    assert info["mmvae_version"] and "git_commit" in info and info["devices"] and info["jax_version"]
    assert info["mesh"]["axes"] == ["data"] and info["mesh"]["shape"] == [1]
    assert info["batch_size_per_device"] == 8 and info["fsdp"] is False
    train = _rows(wd, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    for row in train:
        for k in ("loss", "grad_norm", "lr", "kl", "elbo_per_term/joint", "elbo_per_term/t1",
                  "kl_per_modality/t1", "kl_per_modality/report", "recon_per_modality/dwi", "skipped"):
            assert np.isfinite(row[k]), k
        assert row["skipped"] == 0
    assert all(r["cases_per_s"] > 0 and r["step_time_s"] > 0 for r in train[1:])   # step 1 is compilation
    lrs = [r["lr"] for r in train]   # warm-up over 2 steps to 1e-3, then cosine decay
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(LR / 2) and lrs[2] == pytest.approx(LR)
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:]))
    val = _rows(wd, "val")
    assert [r["step"] for r in val] == [4, 8]
    for q in ("all", "t1", "t2", "dwi", "report", "clinical"):
        assert 0.0 <= val[-1][f"retrieval/map@10/{q}"] <= 1.0
    assert np.isfinite(val[-1]["elbo"]) and val[-1]["num_cases"] == 5
    assert list((wd / "tb").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir())
    assert steps[-2:] == [6, 8] and set(steps) <= {4, 6, 8}   # last 2 + the best by val mAP (4 or 8)
    meta = _meta(wd, 8)
    assert meta["seed"] == 0 and meta["position"] and meta["digest"] and meta["status"] == "ok"


def test_ema_tracks_the_parameters_with_a_lag(runs, env):
    _ok(runs.ref)
    dump = _npz(env.base / "ref.npz")
    leaves = [k.split("/", 1)[1] for k in dump if k.startswith("init/")]
    assert leaves
    d_params = sum(float(np.sum((dump["params/" + k] - dump["init/" + k]) ** 2)) for k in leaves)
    d_ema = sum(float(np.sum((dump["ema/" + k] - dump["init/" + k]) ** 2)) for k in leaves)
    assert d_ema > 0 and d_params > 0
    assert d_ema < 0.5 * d_params            # the average (decay 0.9, 8 steps) lags behind the parameters
    assert any(not np.array_equal(dump["params/" + k], dump["ema/" + k]) for k in leaves)


# ------------------------------------------------------------------------------ resume, determinism
def test_sigkill_then_resume_ends_exactly_like_the_uninterrupted_run(runs, env):
    _ok(runs.ref)
    assert runs.killed.rc == -signal.SIGKILL, runs.killed.log[-3000:]
    assert 2 in runs.killed_steps and 8 not in runs.killed_steps      # killed mid-run
    _ok(runs.resumed)
    ref, res = _meta(runs.ref_dir, 8), _meta(runs.kill_dir, 8)
    assert res["digest"] == ref["digest"]            # params, optimiser state, EMA, counters: bit-identical
    a, b = _npz(env.base / "ref.npz"), _npz(env.base / "resumed.npz")
    assert str(a["__digest__"]) == str(b["__digest__"])
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The resumed metrics file reads as if the run had never stopped.
    assert _rows(runs.kill_dir, drop_timing=True) == _rows(runs.ref_dir, drop_timing=True)
    info = json.loads((runs.kill_dir / "run_info.json").read_text())
    assert info["resumed_from_step"] in runs.killed_steps


def test_same_seed_and_config_give_the_same_metrics(runs):
    _ok(runs.ref)
    before_kill = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs.killed_metrics]
    assert len(before_kill) >= 2                     # steps 1, 2 ran in a separate process
    ref = _rows(runs.ref_dir, drop_timing=True)
    assert before_kill == ref[:len(before_kill)]
    assert [r["loss"] for r in _rows(runs.kill_dir)] == [r["loss"] for r in _rows(runs.ref_dir)]


# ------------------------------------------------------------------------------ devices, processes
def test_eight_devices_with_fsdp_match_one_device(runs, env):
    _ok(runs.ref)
    _ok(runs.fsdp)
    info = json.loads((runs.fsdp_dir / "run_info.json").read_text())
    assert info["mesh"]["shape"] == [8] and info["batch_size_per_device"] == 1
    assert info["fsdp"] is True and info["state_arrays_sharded"] > 0
    _close(_npz(env.base / "ref.npz"), _npz(env.base / "fsdp8.npz"), "8 devices + FSDP vs 1 device")
    for a, b in zip(_rows(runs.ref_dir, "train"), _rows(runs.fsdp_dir, "train")):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_two_processes_agree_with_each_other_and_with_one_process(runs, env):
    _ok(runs.ref)
    for d in runs.dist:
        _ok(d)
    p0, p1 = _npz(env.base / "dist0.npz"), _npz(env.base / "dist1.npz")
    assert int(p0["__process__"]) == 0 and int(p1["__process__"]) == 1
    assert str(p0["__digest__"]) == str(p1["__digest__"])     # the same replicated parameters
    _close(_npz(env.base / "ref.npz"), p0, "2 processes vs 1 process")
    info = json.loads((runs.dist_dir / "run_info.json").read_text())
    assert info["process_count"] == 2 and info["mesh"]["shape"] == [2] and info["local_device_count"] == 1
    rows = _rows(runs.dist_dir)                   # written once, by process 0
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in _rows(runs.ref_dir)]
    for a, b in zip(_rows(runs.ref_dir), rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # orbax wrote one checkpoint per step from both processes; it restores in one process.
    from mmvae.runs import checkpoint as ckpt
    step, state, meta = ckpt.restore_latest(ckpt.manager(runs.dist_dir, 2, read_only=True),
                                            _abstract_state(runs.dist_dir), quarantine=False)
    assert step == 8 and meta["digest"] == ckpt.digest(state)
    for k, v in _flat({"params": state["params"], "ema": state["ema"]}).items():
        np.testing.assert_array_equal(v, p0[k], err_msg=k)


# ------------------------------------------------------------------------------ non-finite, bf16
def test_nonfinite_losses_stop_the_run_with_a_checkpoint_of_the_last_good_state(runs):
    _ok(runs.ref)
    run = runs.nan
    assert run.rc == 2, run.log[-3000:]
    assert "3 non-finite losses/gradients in a row" in run.log and "last good parameters" in run.log
    rows = _rows(runs.nan_dir, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    ref = _rows(runs.ref_dir, "train")
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref[:2]] and rows[1]["skipped"] == 0
    assert all(r["loss"] in ("nan", "inf", "-inf") and r["skipped"] == 1 for r in rows[2:])
    assert [r["skipped_total"] for r in rows] == [0, 0, 1, 2, 3]
    steps = sorted(int(p.name) for p in (runs.nan_dir / "checkpoints").iterdir())
    assert steps == [2, 4, 5]
    good, stop = _meta(runs.nan_dir, 2), _meta(runs.nan_dir, 5)
    assert stop["status"].startswith("stopped") and good["status"] == "ok"
    assert stop["params_digest"] == good["params_digest"] == _meta(runs.nan_dir, 4)["params_digest"]


def test_bfloat16_computes_in_bf16_with_float32_parameters_and_a_finite_loss():
    import jax
    import jax.numpy as jnp
    from mmvae.config import load_config
    from mmvae.models.mvae import build_model
    from mmvae.runs.setup import model_spec, objective_spec, optimizer
    from mmvae.runs.setup import init_state
    from mmvae.train.step import make_train_step
    c = load_config(TINY, ["--config.model.dtype=bfloat16", "--config.data.shape=(8,8,8)",
                           "--config.model.image.channels=(4,)", "--config.data.text.max_len=8",
                           "--config.model.latent_dim=4", "--config.model.text.hidden=16",
                           "--config.model.text.intermediate=16", "--config.model.report_decoder.hidden=16",
                           "--config.model.clinical.hidden=8"])
    spec = model_spec(c, 40)
    tx, lr = optimizer(c)
    from flax import nnx
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(spec, 0)))
    state = jax.jit(lambda: init_state(build_model(spec, 0), tx)[1])()
    rng = np.random.default_rng(0)
    b = 4
    batch = {"report/ids": rng.integers(5, 40, (b, 8)).astype(np.int32), "report/mask": np.ones((b, 8), np.int32),
             "clinical/num": rng.normal(size=(b, 1)).astype(np.float32), "clinical/num_mask": np.ones((b, 1), np.float32),
             "clinical/cat": np.zeros((b, 1), np.int32), "clinical/cat_mask": np.ones((b, 1), np.float32)}
    for m in spec.image_modalities:
        batch[f"image/{m}"] = rng.normal(size=(b, 1, 8, 8, 8)).astype(np.float32)
        batch[f"series_mask/{m}"] = np.ones((b, 1), np.float32)
    lowered = jax.jit(make_train_step(graphdef, tx, objective_spec(c, spec), lr)).lower(state, batch, jax.random.key(0))
    assert "bf16" in lowered.as_text()                      # the model computes in bfloat16
    step = lowered.compile()
    before = jax.tree.map(np.asarray, state["params"])
    for i in range(2):                                      # step 0 has lr 0 (warm-up)
        state, metrics = step(state, batch, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
        assert metrics["loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))   # parameters stay float32
    assert any(not np.array_equal(a, np.asarray(x)) for a, x in zip(jax.tree.leaves(before),
                                                                    jax.tree.leaves(state["params"])))


def test_bfloat16_loss_stays_within_a_bound_of_float32():
    """bf16 compute (float32 parameters, optimizer and accumulation) against float32 from the
    same initial parameters, batches and keys, on the all-subset objective with decode chunks
    (the fused decode-and-gradient path): the loss differs by < 1 % at every one of 8 steps,
    and the first step's gradient points the same way (cosine > 0.99)."""
    import jax
    import optax
    from mmvae.config import load_config
    from mmvae.models.mvae import build_model
    from mmvae.objectives.elbo import elbo_loss
    from mmvae.runs.setup import init_state, model_spec, objective_spec, optimizer
    from mmvae.train.step import make_train_step
    from flax import nnx
    rng = np.random.default_rng(0)
    b = 4
    batch = {"report/ids": rng.integers(5, 40, (b, 8)).astype(np.int32), "report/mask": np.ones((b, 8), np.int32),
             "clinical/num": rng.normal(size=(b, 1)).astype(np.float32), "clinical/num_mask": np.ones((b, 1), np.float32),
             "clinical/cat": np.zeros((b, 1), np.int32), "clinical/cat_mask": np.ones((b, 1), np.float32)}
    losses, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        c = load_config(TINY, [f"--config.model.dtype={dtype}", "--config.data.shape=(8,8,8)",
                               "--config.model.image.channels=(8,)", "--config.data.text.max_len=8",
                               "--config.model.latent_dim=8", "--config.model.text.hidden=16",
                               "--config.model.text.intermediate=16", "--config.model.report_decoder.hidden=16",
                               "--config.model.clinical.hidden=8", "--config.objective.subsets=all",
                               "--config.objective.num_subset_samples=0", "--config.objective.decode_chunks=3",
                               "--config.optim.warmup_steps=1"])
        spec = model_spec(c, 40)
        obj = objective_spec(c, spec)
        for m in spec.image_modalities:
            batch.setdefault(f"image/{m}", rng.normal(size=(b, 1, 8, 8, 8)).astype(np.float32))
            batch.setdefault(f"series_mask/{m}", np.ones((b, 1), np.float32))
        tx, lr = optimizer(c)
        model = build_model(spec, 0)
        graphdef, state = init_state(model, tx)
        gd, params = nnx.split(model, nnx.Param)
        g = jax.jit(jax.grad(lambda p: elbo_loss(nnx.merge(gd, p), batch, jax.random.key(7), jnp.asarray(5), obj)[0]))(params)
        grads[dtype] = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g)])
        step = jax.jit(make_train_step(graphdef, tx, obj, lr))
        losses[dtype] = []
        for i in range(8):
            state, metrics = step(state, batch, jax.random.key(i))
            losses[dtype].append(float(metrics["loss"]))
    f32, bf16 = np.asarray(losses["float32"]), np.asarray(losses["bfloat16"])
    assert f32[-1] < f32[0]                                  # it trains
    rel = np.abs(bf16 - f32) / np.abs(f32)
    assert np.all(rel < 0.01), rel
    assert np.max(rel) > 0                                   # bf16 did change the numbers
    cos = grads["bfloat16"] @ grads["float32"] / np.linalg.norm(grads["bfloat16"]) / np.linalg.norm(grads["float32"])
    assert cos > 0.99, cos


# ------------------------------------------------------------------------------ damaged checkpoints
def _abstract_state(workdir):
    """The train state's shapes for a trained work dir, without building any array."""
    from mmvae.runs.trained import abstract_train_state
    from mmvae.runs.files import read_run_files
    config, spec, _ = read_run_files(workdir)
    return abstract_train_state(spec, config)[1]


@pytest.mark.parametrize("damage", ["garbage", "digest"])
def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(runs, tmp_path, caplog, damage):
    from mmvae.runs import checkpoint as ckpt
    _ok(runs.ref)
    wd = tmp_path / "wd"
    shutil.copytree(runs.ref_dir, wd, ignore=shutil.ignore_patterns("cache", "tb"))
    newest = max(int(p.name) for p in (wd / "checkpoints").iterdir())
    if damage == "garbage":            # e.g. a disk error / partial copy: files present, content wrong
        for f in (wd / "checkpoints" / str(newest) / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(b"\0garbage" * 7)
    else:                              # bits changed but still readable: caught by the digest
        p = wd / "checkpoints" / str(newest) / "meta" / "metadata"
        meta = json.loads(p.read_text())
        meta["digest"] = "0" * 32
        p.write_text(json.dumps(meta))
    # an interrupted write leaves only a temporary folder, which is not a checkpoint
    (wd / "checkpoints" / "10.orbax-checkpoint-tmp-1234567").mkdir()
    mgr = ckpt.manager(wd, 2)
    assert 10 not in mgr.all_steps()
    with caplog.at_level("WARNING"):
        step, state, meta = ckpt.restore_latest(mgr, _abstract_state(wd))
    assert step == 6 and step < newest
    assert f"checkpoint step {newest}" in caplog.text
    assert list(mgr.all_steps()) == [6]                            # moved aside, so it can be rewritten
    assert list((wd / "checkpoints_corrupt").iterdir())
    assert meta["digest"] == ckpt.digest(state)


def test_a_checkpoint_of_another_state_structure_is_refused_not_discarded(runs, tmp_path):
    from mmvae.errors import CheckpointError
    from mmvae.runs import checkpoint as ckpt
    from mmvae.runs.trained import abstract_train_state
    from mmvae.runs.files import read_run_files
    _ok(runs.ref)
    wd = tmp_path / "wd"
    shutil.copytree(runs.ref_dir / "checkpoints", wd / "checkpoints")
    config, spec, _ = read_run_files(runs.ref_dir)
    config.optim.ema_decay = 0.0                      # the state would have no EMA
    mgr = ckpt.manager(wd, 2)
    before = list(mgr.all_steps())
    with pytest.raises(CheckpointError, match="another structure"):
        ckpt.restore_latest(mgr, abstract_train_state(spec, config)[1])
    assert list(mgr.all_steps()) == before and not (wd / "checkpoints_corrupt").exists()


def test_resume_refuses_another_seed_and_resume_false_before_reading_data(runs, tmp_path, monkeypatch):
    from mmvae.config import load_config
    from mmvae.errors import ConfigError
    from mmvae.train import loop
    _ok(runs.ref)
    wd = tmp_path / "wd"
    shutil.copytree(runs.ref_dir / "checkpoints", wd / "checkpoints")
    monkeypatch.setattr(loop, "load_cohort", lambda *a, **k: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match="trained with seed 0 but the config has seed 1"):
        loop.train_and_evaluate(load_config(TINY, COMMON + ["--config.seed=1"]), wd, show_progress=False)
    with pytest.raises(ConfigError, match="already has checkpoints"):
        loop.train_and_evaluate(load_config(TINY, COMMON + ["--config.train.resume=false"]), wd,
                                show_progress=False)


# ------------------------------------------------------------------------------ pieces
def test_retention_keeps_the_latest_and_the_best(tmp_path):
    import jax.numpy as jnp
    from mmvae.runs import checkpoint as ckpt
    mgr = ckpt.manager(tmp_path, keep=2, keep_best=1)
    vals = {1: 0.2, 2: 0.9, 3: 0.1, 4: None, 5: 0.3, 6: None}
    for s, v in vals.items():
        ckpt.save(mgr, s, {"w": jnp.full((3,), s, jnp.float32)}, {"position": {}},
                  metrics=None if v is None else {ckpt.BEST_METRIC: v})
    mgr.wait_until_finished()
    assert list(mgr.all_steps()) == [2, 5, 6]


def test_fsdp_rule_and_local_rows():
    from jax.sharding import PartitionSpec as P
    from mmvae.sharding import data_mesh, fsdp_spec, local_rows
    from mmvae.train.loop import term_names
    assert fsdp_spec((1024, 256), 8, 1000) == P("data", None)
    assert fsdp_spec((3, 3, 3, 16, 64), 8, 1000) == P(None, None, None, None, "data")
    assert fsdp_spec((30, 7), 8, 10) == P()                   # nothing divisible
    assert fsdp_spec((64, 64), 8, 10 ** 6) == P()             # too small
    assert fsdp_spec((64,), 1, 0) == P()                      # one device
    assert local_rows(data_mesh(), 8) == slice(0, 8)
    from mmvae.config import load_config
    from mmvae.runs.setup import model_spec, objective_spec
    c = load_config(TINY)
    spec = model_spec(c, 50)
    assert term_names(spec, objective_spec(c, spec)) == ["joint", "t1", "t2", "dwi", "report", "clinical",
                                                         "random0"]


def test_truncate_metrics_drops_rows_after_the_resume_step(tmp_path):
    from mmvae.train.metrics import read_metrics, truncate_metrics
    rows = [{"step": s, "split": "train", "loss": 1.0} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "spl')
    assert truncate_metrics(tmp_path, 3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_frozen_parameters_keep_their_value_and_their_ema():
    """``frozen`` path prefixes: no update (weight decay included) and an EMA equal to the
    parameter itself (d·e + (1-d)·p drifts by float32 rounding even when e == p)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from mmvae.runs.setup import init_state
    from mmvae.train.step import make_train_step

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.bert = nnx.Linear(3, 3, rngs=rngs)
            self.head = nnx.Linear(3, 1, rngs=rngs)

    def loss(model, batch, key, step):
        return jnp.mean(model.head(model.bert(batch["x"])) ** 2), {}

    model = Two(nnx.Rngs(0))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    graphdef, state = init_state(model, tx, ema_decay=0.9)
    state["params"] = jax.tree.map(lambda a: a * 1.1, state["params"])   # values d·e + (1-d)·e does not keep
    state["ema"] = jax.tree.map(jnp.copy, state["params"])
    start = jax.tree.map(np.asarray, state["params"])
    step = jax.jit(make_train_step(graphdef, tx, None, ema_decay=0.9, frozen=("bert",), loss=loss))
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)}
    for t in range(5):
        state, _ = step(state, batch, jax.random.key(t))
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(state["params"]["bert"][name][...]), start["bert"][name])
        np.testing.assert_array_equal(np.asarray(state["ema"]["bert"][name][...]), start["bert"][name])
    assert not np.allclose(np.asarray(state["params"]["head"]["kernel"][...]), start["head"]["kernel"])
    assert not np.allclose(np.asarray(state["ema"]["head"]["kernel"][...]), start["head"]["kernel"])


def test_host_lr_optimizer_matches_the_scheduled_one():
    """train.fit's optimiser (runs.setup.optimizer(host_lr=True), the rate set from the schedule on
    the host each step) takes the updates of the training loop's (the schedule inside optax)."""
    import jax
    import jax.numpy as jnp
    import optax
    from mmvae.config import load_config
    from mmvae.runs.setup import optimizer
    from mmvae.train.fit import host_lr_optimizer, set_learning_rate

    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
    config.train.steps, config.optim.warmup_steps = 6, 2
    tx, sched = optimizer(config)
    htx, hsched = host_lr_optimizer(config.optim, 6)
    assert host_lr_optimizer(config.optim, 99)[0] is htx          # one tx whatever the steps
    p = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    s, hs, hp = tx.init(p), htx.init(p), p
    for t in range(6):
        g = jax.tree.map(lambda x: jnp.sin(x * (t + 1)), p)
        hg = jax.tree.map(lambda x: jnp.sin(x * (t + 1)), hp)
        assert float(hsched(t)) == float(sched(t))
        u, s = tx.update(g, s, p)
        hu, hs = htx.update(hg, set_learning_rate(hs, hsched(t)), hp)
        p, hp = optax.apply_updates(p, u), optax.apply_updates(hp, hu)
        for k in p:
            np.testing.assert_allclose(np.asarray(hp[k]), np.asarray(p[k]), rtol=1e-6, atol=1e-7)
