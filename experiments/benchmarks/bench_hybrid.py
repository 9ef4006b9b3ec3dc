"""Benchmark of hybrid retrieval (mmvae.retrieval.hybrid): fused query latency, fit-fusion time.

* A flat index of ``--n`` synthetic cases (default 100,000) with the quickstart's layout
  (``experts`` vectors: 5 modalities × 8 dimensions, cosine) and a lexical leg over synthetic
  reports (12–60 words from a 5,000-word vocabulary, Zipf-distributed): build time, BM25 build
  time, then single fused queries (every dense leg + BM25, uniform weights, k = 10): p50 / p99
  latency over ``--queries`` queries, one at a time, FAISS on one thread.
* ``fit-fusion`` (5-fold cross-validated coordinate ascent) on ``--fit-n`` labelled cases
  (default 1,000) of the same layout: wall time.

    python experiments/benchmarks/bench_hybrid.py                 # 100k-case index, 1,000 labelled cases
    python experiments/benchmarks/bench_hybrid.py --n 20000 --queries 50
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from mmvae.retrieval.hybrid import HybridQuery, hybrid_search
from mmvae.retrieval.hybrid.fit import fit_fusion
from mmvae.retrieval.index import build_index

MODS = ["t1", "t2", "dwi", "report", "clinical"]


def synthetic(n: int, seed: int, classes: int = 8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, 40))
    mu = (centers[y] + 1.5 * rng.normal(size=(n, 40))).astype(np.float32)
    vocab = np.array([f"w{i}" for i in range(5000)])
    p = 1.0 / np.arange(1, 5001)
    p /= p.sum()
    topic = [rng.choice(5000, 20, replace=False) for _ in range(classes)]
    reports = []
    for i in range(n):
        words = list(vocab[rng.choice(5000, rng.integers(12, 60), p=p)]) + list(vocab[rng.choice(topic[y[i]], 4)])
        reports.append(" ".join(words))
    meta = [{"modalities": MODS, "labels": {"y": str(v)}} for v in y]
    return mu, reports, meta, y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--fit-n", type=int, default=1000)
    a = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    mu, reports, meta, _ = synthetic(a.n, 0)
    ident = {"embedding": "experts", "modalities": MODS, "weights_digest": "bench"}
    t0 = time.perf_counter()
    ix = build_index(mu, np.zeros_like(mu), [f"c{i}" for i in range(a.n)], meta, identity=ident, reports=reports)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ix.lexical.scores(["w1"])                      # builds the BM25 matrix
    t_bm25 = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    qs = rng.integers(0, a.n, a.queries)
    hybrid_search(ix, HybridQuery(mu[0], MODS, reports[0].split()[:8]), 10)    # warm caches
    lat = []
    for i in qs:
        q = HybridQuery(mu[i] + 0.1 * rng.normal(size=40).astype(np.float32), MODS, reports[i].split()[:8])
        t0 = time.perf_counter()
        hybrid_search(ix, q, 10, exclude=[f"c{i}"])
        lat.append(time.perf_counter() - t0)
    lat = 1e3 * np.array(lat)
    print(f"fused query, {a.n:,} cases, {len(MODS)} dense legs + BM25 (8 query words), k=10: "
          f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms "
          f"(index build {t_build:.1f} s incl. tokenising, BM25 matrix {t_bm25:.1f} s)")
    mu2, rep2, meta2, _ = synthetic(a.fit_n, 2)
    ix2 = build_index(mu2, np.zeros_like(mu2), [f"c{i}" for i in range(a.fit_n)], meta2, identity=ident, reports=rep2)
    t0 = time.perf_counter()
    e = fit_fusion(ix2, "y", k=10, folds=5)
    t_fit = time.perf_counter() - t0
    print(f"fit-fusion, {a.fit_n:,} labelled cases, {len(e['weights'])} legs, 5 folds: {t_fit:.1f} s "
          f"(cv mAP@10 fitted {e['cv']['fitted']['map']:.3f} vs uniform {e['cv']['uniform']['map']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
