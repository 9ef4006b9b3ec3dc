"""Frozen pretrained feature extraction (EfficientNet-Lite0, :mod:`mmvae.models.features`).

Two numbers:

* **network**: images/s of the jitted network alone on 224 px pictures at ``--batch``
  (median of ``--repeats`` calls after a warm-up call that compiles);
* **key images end to end**: ``--images`` PNG key images of mixed sizes (grey and RGB, 256–640 px,
  written to a temporary folder) through :func:`mmvae.models.features.source_vectors` into an
  empty cache — reading, percentile scaling, aspect-kept resizing and padding, the network in
  batches, the atomic cache writes — and a second pass that only reads the cache.

    python experiments/benchmarks/bench_features.py [--images 1000] [--out experiments/benchmarks/results/features.json]

With ``--peer-python PYTHON`` (an environment with torch, see ``peer_efficientnet_torch.py``) it
measures only the network against PyTorch eager on the same weights and the same seeded input
(``--peer-batch 64`` images of 224 px): ``--rounds`` alternating rounds (JAX first, then PyTorch;
then the other way round), each side timing ``--repeats`` calls after a warm-up; JAX runs each of
its paths (``folded`` f32, ``folded`` bf16, ``module`` f32), PyTorch NCHW and channels-last. It
prints images/s per side (median over all timed calls) and the ratio JAX / PyTorch of each JAX path
against PyTorch's faster layout, and checks that both sides' features agree::

    python experiments/benchmarks/bench_features.py --peer-python /tmp/tv/bin/python \
        --out experiments/benchmarks/results/features_vs_torch.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from PIL import Image

from common import machine, median_seconds, write_json
from mmvae.data.cache import PreprocessCache
from mmvae.models import features as feat


def write_pngs(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(256, 641, 2))
        yy, xx = np.mgrid[:h, :w]
        img = 120 + 80 * np.sin(xx / (10 + i % 7)) * np.cos(yy / (13 + i % 5)) + rng.normal(0, 10, (h, w))
        img = np.clip(img, 0, 255).astype(np.uint8)
        p = folder / f"k{i:05d}.png"
        (Image.fromarray(img).convert("RGB") if i % 3 == 0 else Image.fromarray(img)).save(p)
        paths.append(str(p))
    return paths


class _Peer:
    def __init__(self, python: str):
        script = Path(__file__).resolve().parent / "peer_efficientnet_torch.py"
        self.p = subprocess.Popen([python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit("the PyTorch side died (see its output above)")
        return json.loads(line)

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()


def peer_ab(a) -> int:
    import jax
    import jax.numpy as jnp
    from peer_efficientnet_torch import inputs
    from mmvae.models import vision

    net = vision.load_efficientnet_lite0()
    x = inputs(a.peer_batch, 224)
    paths = {"jax folded f32": dict(path="folded"), "jax folded bf16": dict(path="folded", dtype=jnp.bfloat16),
             "jax module f32": dict(path="module")}
    fns = {k: vision.compiled_features(net, **kw) for k, kw in paths.items()}
    feats = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        feats[k] = np.asarray(fn(x))
        print(f"{k}: first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
    peer = _Peer(a.peer_python)
    try:
        print("PyTorch side:", peer.info, flush=True)
        times = {k: [] for k in list(fns) + ["torch nchw", "torch channels-last"]}
        torch_first = {}
        for r in range(a.rounds):
            order = ["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]
            for side in order:
                if side == "jax":
                    for k, fn in fns.items():
                        for _ in range(a.repeats + 1):
                            t = time.perf_counter()
                            jax.block_until_ready(fn(x))
                            times[k].append(time.perf_counter() - t)
                        times[k].pop(-a.repeats - 1)          # the warm-up call of this round
                else:
                    for k, layout in (("torch nchw", "nchw"), ("torch channels-last", "cl")):
                        ans = peer.ask(op="run", batch=a.peer_batch, size=224, repeats=a.repeats, layout=layout)
                        times[k] += ans["times"]
                        torch_first[k] = ans
            print(f"round {r}: " + ", ".join(f"{k} {np.median(v[-a.repeats:]):.2f} s" for k, v in times.items()), flush=True)
    finally:
        peer.close()
    ips = {k: a.peer_batch / float(np.median(v)) for k, v in times.items()}
    best_torch = max(ips["torch nchw"], ips["torch channels-last"])
    ref = feats["jax module f32"].astype(np.float64)
    res = {"machine": machine(), "batch": a.peer_batch, "size": 224, "rounds": a.rounds, "repeats": a.repeats,
           "torch": peer.info, "images_per_s": ips, "times_s": times,
           "ratio_vs_best_torch": {k: ips[k] / best_torch for k in fns},
           "max_abs_diff_vs_module_f32": {k: float(np.max(np.abs(v - ref))) for k, v in feats.items()},
           "torch_feature_sum": torch_first["torch nchw"]["sum"], "jax_module_feature_sum": float(ref.sum()),
           "torch_first_features": torch_first["torch nchw"]["first"],
           "jax_first_features": [float(v) for v in ref[0, :8]]}
    print(f"\n{'side':22s} {'images/s':>9s} {'/ best torch':>13s}")
    for k, v in ips.items():
        print(f"{k:22s} {v:9.1f} {v / best_torch:13.3f}")
    print("max |features - module f32|:", {k: f"{v:.2e}" for k, v in res["max_abs_diff_vs_module_f32"].items()})
    print(f"feature sums: torch {res['torch_feature_sum']:.4f}, jax {res['jax_module_feature_sum']:.4f}")
    if a.out:
        write_json(a.out, res)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--peer-python", default="", help="python of an environment with torch: A/B of the network only")
    ap.add_argument("--peer-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    if a.peer_python:
        return peer_ab(a)
    cfg = feat.FeatureConfig(batch_size=a.batch)
    ex = feat.FeatureExtractor.get(cfg)
    x = np.random.default_rng(0).random((a.batch, cfg.size, cfg.size), np.float32)
    t0 = time.perf_counter()
    ex.vectors(x)
    compile_s = time.perf_counter() - t0
    net_s = median_seconds(ex.vectors, x, repeats=a.repeats)
    res = {"machine": machine(), "batch": a.batch, "network_images_per_s": a.batch / net_s,
           "first_call_s": compile_s}
    print(f"network: {a.batch / net_s:.1f} images/s at batch {a.batch}, 224 px, float32 "
          f"(first call incl. compile {compile_s:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_pngs(tmp, a.images)
        cache = PreprocessCache(tmp / "cache")
        t0 = time.perf_counter()
        feat.source_vectors(paths, cache, ex, spatial_dims=2, show_progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        feat.source_vectors(paths, PreprocessCache(tmp / "cache"), ex, spatial_dims=2, show_progress=False)
        warm = time.perf_counter() - t0
    res.update(key_images=a.images, extract_s=cold, extract_images_per_s=a.images / cold, cached_read_s=warm)
    print(f"{a.images} key images end to end into an empty cache: {cold:.1f} s ({a.images / cold:.1f} images/s); "
          f"read back from the cache: {warm:.1f} s")
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
