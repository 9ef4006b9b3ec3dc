"""Training and embedding throughput of a config, with FLOPs, MFU and compile counts.

    python experiments/benchmarks/bench_train.py --config configs/bench.py [--steps 10] [--out r.json]
    python experiments/benchmarks/bench_train.py --config configs/bench.py --config.data.shape='(32,32,32)'

Random batches of the config's shapes (the input pipeline has its own benchmark), so the
numbers are the model's. Reports: first-step compile time, step time p50, cases/s, FLOPs per
step from XLA's cost analysis, achieved FLOP/s, MFU = achieved / peak where the peak is a large
f32 matmul measured in the same process just before, the number of compilations across every
modality-presence pattern, embedding throughput, and peak resident memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

from common import machine, median_seconds, peak_matmul_flops, peak_rss_mb, write_json
from mmvae.config import load_config
from mmvae.models.mvae import build_model
from mmvae.objectives.elbo import fused_subset_reconstruction, subset_log_likelihoods
from mmvae.retrieval.embed import make_encode_fn
from mmvae.runs.setup import model_spec, objective_spec, optimizer
from mmvae.runs.setup import init_state
from mmvae.train.step import make_train_step


def random_batch(spec, config, b, pattern, rng):
    batch, shape, t = {}, tuple(config.data.shape), int(config.data.text.max_len)
    s = int(config.data.max_series)
    for i, m in enumerate(spec.image_modalities):
        batch[f"image/{m}"] = rng.normal(size=(b, s) + shape).astype(np.float32)
        batch[f"series_mask/{m}"] = np.full((b, s), float(pattern[i]), np.float32)
    on = int(pattern[len(spec.image_modalities)]) if spec.report else 0
    batch["report/ids"] = rng.integers(5, max(6, spec.bert.vocab_size if spec.bert else 6), size=(b, t)).astype(np.int32)
    batch["report/mask"] = np.full((b, t), on, np.int32)
    fn, fc = len(spec.clinical_numeric), len(spec.clinical_categorical)
    batch["clinical/num"] = np.zeros((b, fn), np.float32)
    batch["clinical/num_mask"] = np.ones((b, fn), np.float32)
    batch["clinical/cat"] = np.zeros((b, fc), np.int32)
    batch["clinical/cat_mask"] = np.ones((b, fc), np.float32)
    return batch


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def model_flops(spec, obj, tx, lr, ema_decay, state, batch, key) -> float:
    """Model FLOPs of one train step: XLA's cost analysis of the same step compiled (never
    run) in one decode pass and with XLA's own 3-D convolutions. XLA counts a while loop's
    body once (so no decode chunks, and no remat), and the conv implementation only changes
    how the same products are computed (model.image.conv=depth2d counts its zero padding
    differently): both sides of an A/B comparison share one count."""
    gd, _ = init_state(build_model(dataclasses.replace(spec, conv="xla"), 0), tx, ema_decay)
    one = make_train_step(gd, tx, dataclasses.replace(obj, decode_chunks=1), lr)
    return _flops(jax.jit(one).lower(state, batch, key).compile())


def component_profile(model, batch, num_subsets: int, chunks: int, repeats: int = 3) -> dict:
    """Forward + backward time, XLA FLOPs and FLOP/s of the step's two big parts.

    ``encode``: every encoder (images, report, clinical) → experts. ``decode``: every
    decoder and likelihood for ``num_subsets`` latent samples per case (the subset ELBO's
    reconstruction terms), through the step's chunked path (:func:`fused_subset_reconstruction`
    when chunked). The rest of the step (fusion, KL, optimizer) is the difference; each part
    timed alone includes its own overheads, so the difference can come out near zero.
    """
    from flax import nnx
    gd, params = nnx.split(model, nnx.Param)
    b = next(v for k, v in batch.items() if k.startswith("image/")).shape[0]
    z = jax.random.normal(jax.random.key(0), (1, num_subsets, b, model.spec.latent_dim))

    def enc(p):
        experts, _, _ = nnx.merge(gd, p).encode(batch)
        return jnp.sum(experts.mu) + jnp.sum(experts.logvar)

    def dec(p):
        m = nnx.merge(gd, p)
        if chunks > 1 and num_subsets > 1:      # the step's path (iw_samples = 1): one pass per chunk
            coef = jnp.ones(z.shape[:3] + (len(m.spec.modalities),), jnp.float32)
            return fused_subset_reconstruction(m, z, batch, coef, chunks)[0]
        return jnp.sum(subset_log_likelihoods(m, z, batch, chunks))

    out = {}
    for name, f in (("encode", enc), ("decode", dec)):
        g = jax.jit(jax.grad(f)).lower(params).compile()
        t = median_seconds(g, params, repeats=repeats)
        # a chunked decode is a loop, whose body XLA's cost analysis counts once
        fl = _flops(g) if chunks <= 1 or name == "encode" else float("nan")
        out[name] = {"seconds": t, "flops": fl, "gflops_per_s": fl / t / 1e9}
    return out


def trace_summary(folder: str, steps: int, top: int = 25) -> dict:
    """Per-op time of the XLA program in a ``jax.profiler`` trace (the newest
    ``*.trace.json.gz`` under ``folder``), in ms per step: XLA CPU names each thunk after its
    HLO instruction (``fusion.12``, ``transpose_copy_fusion.3``, ``convolution.5``, ...). Ops are
    also summed by kind (the name without its number). Prints both tables; returns them."""
    import gzip
    import json
    import re
    files = sorted(Path(folder).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {folder}: the profiler wrote no trace")
    events = json.loads(gzip.open(files[-1]).read())["traceEvents"]
    per_op: dict = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "PjitFunction", "ThunkExecutor")):
            per_op[e["name"]] = per_op.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
    kinds: dict = {}
    for name, ms in per_op.items():
        k = re.sub(r"[._]\d+$", "", name)
        kinds[k] = kinds.get(k, 0.0) + ms
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    kinds_sorted = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
    print(f"trace {files[-1]}: ms per step, top {top} ops")
    for name, ms in ops:
        print(f"  {ms:9.1f}  {name}")
    print("by kind:")
    for name, ms in kinds_sorted:
        print(f"  {ms:9.1f}  {name}")
    return {"ops_ms_per_step": dict(ops), "kinds_ms_per_step": dict(kinds_sorted), "file": str(files[-1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench.py")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--patterns", action="store_true", help="also count compilations over all presence patterns")
    p.add_argument("--profile", action="store_true",
                   help="time the encode and decode (all subset terms) parts separately, with their FLOP/s")
    p.add_argument("--trace", default="",
                   help="folder: record a jax.profiler trace of 2 more steps and print the ops' time per step")
    p.add_argument("--top", type=int, default=25, help="with --trace: how many ops to list")
    p.add_argument("--out")
    args, extra = p.parse_known_args(argv)
    config = load_config(args.config, extra)
    spec = model_spec(config, args.vocab, (0, 1, 2, 3, 4))
    obj = objective_spec(config, spec)
    b = int(config.train.batch_size)
    rng = np.random.default_rng(0)
    peak = peak_matmul_flops()

    model = build_model(spec, 0)
    tx, lr = optimizer(config)
    graphdef, state = init_state(model, tx, float(config.optim.ema_decay))
    step = jax.jit(make_train_step(graphdef, tx, obj, lr), donate_argnums=0)
    full = random_batch(spec, config, b, (1,) * len(spec.modalities), rng)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, full, key).compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(spec, obj, tx, lr, float(config.optim.ema_decay), state, full, key)
    state, m = step(state, full, key)
    jax.block_until_ready(m["loss"])
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, full, jax.random.key(i + 1))
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    p50 = float(np.median(times))
    result = {
        "machine": machine(), "config": args.config, "overrides": extra, "batch_size": b,
        "shape": list(config.data.shape), "modalities": list(spec.modalities),
        "objective": {"subsets": obj.subsets, "terms": None if obj.num_subset_samples else obj.subsets,
                      "num_subset_samples": obj.num_subset_samples},
        "peak_matmul_gflops": peak / 1e9, "compile_s": compile_s, "step_p50_s": p50,
        "step_times_s": times, "cases_per_s": b / p50, "flops_per_step": flops,
        "achieved_gflops": flops / p50 / 1e9, "mfu": flops / p50 / peak,
    }
    if args.trace:
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            for i in range(2):
                state, m = step(state, full, jax.random.key(100 + i))
                jax.block_until_ready(m["loss"])
        result["trace"] = trace_summary(args.trace, steps=2, top=args.top)
    if args.profile:
        from flax import nnx
        from mmvae.objectives.elbo import draw_subsets
        j = int(draw_subsets(jax.random.key(0), jnp.ones((b, len(spec.modalities))), obj).shape[0])
        parts = component_profile(nnx.merge(graphdef, state["params"]), full, j, obj.decode_chunks)
        parts["rest"] = {"seconds": p50 - parts["encode"]["seconds"] - parts["decode"]["seconds"]}
        result["profile"] = parts
    if args.patterns:
        n_patterns = 0
        for pattern in itertools.product([0, 1], repeat=len(spec.modalities)):
            if sum(pattern):
                state, m = step(state, random_batch(spec, config, b, pattern, rng), key)
                n_patterns += 1
        jax.block_until_ready(m["loss"])
        result["presence_patterns"] = n_patterns
        result["compilations_across_patterns"] = step._cache_size()
    # embedding throughput with the trained-shape model
    model = jax.tree.map(lambda x: x, build_model(spec, 0))
    encode = make_encode_fn(model)
    eb = 64
    batch = random_batch(spec, config, eb, (1,) * len(spec.modalities), rng)
    jax.block_until_ready(encode(batch))
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(encode(batch))
    result["embed_cases_per_s"] = 3 * eb / (time.perf_counter() - t)
    result["peak_rss_mb"] = peak_rss_mb()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
