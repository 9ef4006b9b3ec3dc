"""Frozen pretrained feature extraction (EfficientNet-Lite0, :mod:`mmvae.models.features`).

Two numbers:

* **network**: images/s of the jitted network alone on 224 px pictures at ``--batch``
  (median of ``--repeats`` calls after a warm-up call that compiles);
* **key images end to end**: ``--images`` PNG key images of mixed sizes (grey and RGB, 256–640 px,
  written to a temporary folder) through :func:`mmvae.models.features.source_vectors` into an
  empty cache — reading, percentile scaling, aspect-kept resizing and padding, the network in
  batches, the atomic cache writes — and a second pass that only reads the cache.

    python experiments/benchmarks/bench_features.py [--images 1000] [--out experiments/benchmarks/results/features.json]
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
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
