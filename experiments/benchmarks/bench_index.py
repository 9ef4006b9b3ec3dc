"""Benchmark of the FAISS case index (mmvae.retrieval.index) on synthetic embeddings.

For each index kind (flat, ivf, ivfpq, hnsw, binary), built with
:func:`mmvae.retrieval.index.build_index` (cosine metric, default parameters unless
given) on N seeded, clustered 64-d embeddings:

* build time (s): ``build_index`` (faiss training + adding + the Python bookkeeping);
* memory per case: ``index.faiss`` bytes / N (the faiss structure alone), the whole
  saved index folder / N (+ the float32 means and log-variances kept for exact
  re-scoring, metadata, ids), and the RSS growth of the process / N (everything the
  loaded ``CaseIndex`` holds, Python objects included);
* single-query latency p50/p99 (ms) of ``CaseIndex.search(q, k)`` over ``--queries``
  queries, one at a time;
* batched throughput (queries/s) of one ``search`` call with ``--batch`` queries;
* recall@k of the batched queries against exact (brute-force cosine) search.

Each kind runs in a fresh process (so RSS deltas are not blurred by memory freed by
the previous kind). Queries are fresh draws from the same clusters (not in the index).

    python experiments/benchmarks/bench_index.py --out bench_index.json            # N = 1,000,000
    python experiments/benchmarks/bench_index.py --quick                            # N = 20,000 smoke run
    python experiments/benchmarks/bench_index.py --kinds hnsw --n-hnsw 200000       # one kind, smaller N
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("flat", "ivf", "ivfpq", "hnsw", "binary")


# --------------------------------------------------------------------------- data
def make_data(n: int, dim: int, clusters: int, nq: int, seed: int, spread: float):
    """Clustered Gaussian embeddings: ``n`` database means (+ log-variances) and ``nq`` queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    mu = np.empty((n, dim), np.float32)
    step = 1 << 18
    for s in range(0, n, step):
        e = min(n, s + step)
        lab = rng.integers(0, clusters, e - s)
        mu[s:e] = centres[lab] + spread * rng.standard_normal((e - s, dim), dtype=np.float32)
    logvar = rng.uniform(-3.0, -1.0, (n, dim)).astype(np.float32)
    qlab = rng.integers(0, clusters, nq)
    q = centres[qlab] + spread * rng.standard_normal((nq, dim), dtype=np.float32)
    return mu, logvar, q.astype(np.float32)


def exact_topk(q: np.ndarray, mu: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact top-k cosine neighbours (faiss brute force)."""
    import faiss
    x = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    ix = faiss.IndexFlatIP(mu.shape[1])
    ix.add(np.ascontiguousarray(x, np.float32))
    _, idx = ix.search(np.ascontiguousarray(qn, np.float32), k)
    return idx


# --------------------------------------------------------------------------- machine
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "memory_gib": mem, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import faiss
        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    try:
        import jax
        info["jax_device_kind"] = jax.devices()[0].device_kind
        info["jax_backend"] = jax.default_backend()
    except Exception as e:  # noqa: BLE001 - informational only
        info["jax_device_kind"] = f"unavailable ({type(e).__name__})"
    return info


# --------------------------------------------------------------------------- one kind
def bench_kind(kind: str, n: int, data_dir: str, args: dict) -> dict:
    """Build and measure one index kind (runs in a fresh process)."""
    import faiss
    from mmvae.retrieval.index import build_index
    default_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(args["build_threads"]) or default_threads)
    d = Path(data_dir)
    mu = np.load(d / "mu.npy")[:n].copy()
    logvar = np.load(d / "logvar.npy")[:n].copy()
    q = np.load(d / "queries.npy")
    gt = np.load(d / f"gt_{n}.npy")
    nq_single, k = int(args["queries"]), int(args["k"])
    single, batch = q[:nq_single], q[nq_single:]
    ids = [f"c{i:07d}" for i in range(n)]
    params = {}
    if kind in ("ivf", "ivfpq") and args.get("nlist"):
        params["nlist"] = int(args["nlist"])
    if kind == "binary" and args.get("nbits"):
        params["nbits"] = int(args["nbits"])
    if kind == "hnsw":
        params = {"hnsw_m": args["hnsw_m"], "ef_construction": args["ef_construction"],
                  "ef_search": args["ef_search"]}
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    ix = build_index(mu, logvar, ids, None, kind=kind, metric="cosine", seed=int(args["seed"]),
                     identity={"benchmark": "synthetic"}, **params)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_delta = rss_bytes() - rss0

    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=args.get("tmp")))
    try:
        t0 = time.perf_counter()
        ix.save(out_dir / "index")
        save_s = time.perf_counter() - t0
        files = {p.name: p.stat().st_size for p in (out_dir / "index").iterdir()}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    faiss.omp_set_num_threads(int(args["threads"]) or default_threads)
    ix.search(single[0], k)       # warm-up
    lat = []
    for i in range(len(single)):
        t0 = time.perf_counter()
        ix.search(single[i], k)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = ix.search(batch, k)
    batch_s = time.perf_counter() - t0
    row = {c: i for i, c in enumerate(ids)}
    got = np.array([[row[r.case_id] for r in rr] for rr in res])
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, gt[nq_single:])]))
    lat = np.array(lat) * 1e3
    return {
        "kind": kind, "n": n, "params": ix.params, "build_s": build_s, "save_s": save_s,
        "build_threads": int(args["build_threads"]) or default_threads,
        "search_threads": faiss.omp_get_max_threads(),
        "faiss_bytes_per_case": files["index.faiss"] / n,
        "folder_bytes_per_case": sum(files.values()) / n,
        "rss_bytes_per_case": rss_delta / n,
        "files_bytes": files,
        "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
        "latency_ms_mean": float(lat.mean()), "single_queries": len(single),
        "batch_size": len(batch), "batch_s": batch_s, "batch_qps": len(batch) / batch_s,
        f"recall@{k}": recall,
    }


def run_in_process(kind, n, data_dir, args) -> dict:
    from common import run_fresh
    try:
        return run_fresh(bench_kind, kind, n, data_dir, args)
    except RuntimeError as e:
        raise RuntimeError(f"{kind}: {e}") from None


# --------------------------------------------------------------------------- report
def markdown(results: list[dict], k: int) -> str:
    head = (f"| kind | N | build (s) | index.faiss B/case | folder B/case | RSS B/case | p50 (ms) | p99 (ms) "
            f"| batch qps | recall@{k} | parameters |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in results:
        p = ", ".join(f"{a}={b}" for a, b in r["params"].items() if a != "seed")
        lines.append(f"| {r['kind']} | {r['n']:,} | {r['build_s']:.1f} | {r['faiss_bytes_per_case']:.0f} | "
                     f"{r['folder_bytes_per_case']:.0f} | {r['rss_bytes_per_case']:.0f} | "
                     f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['batch_qps']:,.0f} | "
                     f"{r[f'recall@{k}']:.3f} | {p} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="database size (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n = 20,000")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.5, help="within-cluster standard deviation")
    ap.add_argument("--queries", type=int, default=200, help="single queries timed one at a time")
    ap.add_argument("--batch", type=int, default=1000, help="queries of the batched search")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--n-hnsw", type=int, default=None, help="smaller N for hnsw only (slow to build)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists for ivf/ivfpq (default: the index's "
                                                              "default_nlist(N) = min(4·sqrt(N), N/39))")
    ap.add_argument("--nbits", type=int, default=None, help="binary code length (default: latent size rounded "
                                                              "up to a multiple of 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="faiss OpenMP threads while searching (default 1: on a shared machine OpenMP barriers "
                         "make single-query latency erratic; 0 = faiss default)")
    ap.add_argument("--build-threads", type=int, default=0, help="faiss OpenMP threads while building "
                                                                 "(0 = faiss default, all cores)")
    ap.add_argument("--tmp", default=None, help="scratch folder for the saved indexes")
    ap.add_argument("--out", help="write the results as JSON")
    a = ap.parse_args(argv)
    n = 20_000 if a.quick else a.n
    kinds = [x.strip() for x in a.kinds.split(",") if x.strip()]
    bad = [x for x in kinds if x not in KINDS]
    if bad:
        ap.error(f"unknown kind(s) {bad}")
    sizes = {kind: (min(n, a.n_hnsw) if kind == "hnsw" and a.n_hnsw else n) for kind in kinds}

    info = machine_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['affinity_cores']} usable), "
          f"{info.get('memory_gib')} GiB, faiss {info.get('faiss')} ({info.get('faiss_threads')} threads), "
          f"jax device {info.get('jax_device_kind')}", flush=True)
    args = {"queries": a.queries, "k": a.k, "seed": a.seed, "hnsw_m": a.hnsw_m, "ef_construction": a.ef_construction,
            "ef_search": a.ef_search, "threads": a.threads, "build_threads": a.build_threads, "nlist": a.nlist,
            "nbits": a.nbits,
            "tmp": a.tmp}
    with tempfile.TemporaryDirectory(prefix="bench-index-data-", dir=a.tmp) as data_dir:
        t0 = time.perf_counter()
        mu, logvar, q = make_data(n, a.dim, a.clusters, a.queries + a.batch, a.seed, a.spread)
        np.save(Path(data_dir) / "mu.npy", mu)
        np.save(Path(data_dir) / "logvar.npy", logvar)
        np.save(Path(data_dir) / "queries.npy", q)
        for size in sorted(set(sizes.values())):
            np.save(Path(data_dir) / f"gt_{size}.npy", exact_topk(q, mu[:size], a.k))
        del mu, logvar
        print(f"data: {n:,} x {a.dim} embeddings in {a.clusters} clusters, {len(q)} queries, exact top-{a.k} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        results = []
        for kind in kinds:
            t0 = time.perf_counter()
            r = run_in_process(kind, sizes[kind], data_dir, args)
            results.append(r)
            print(f"{kind:7s} n={r['n']:,} build {r['build_s']:.1f}s, faiss {r['faiss_bytes_per_case']:.0f} B/case, "
                  f"folder {r['folder_bytes_per_case']:.0f} B/case, RSS {r['rss_bytes_per_case']:.0f} B/case, "
                  f"p50 {r['latency_ms_p50']:.2f} ms, p99 {r['latency_ms_p99']:.2f} ms, "
                  f"batch {r['batch_qps']:,.0f} q/s, recall@{a.k} {r[f'recall@{a.k}']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s total)", flush=True)
    print()
    print(markdown(results, a.k))
    command = " ".join(["python", "experiments/benchmarks/bench_index.py"] + list(sys.argv[1:] if argv is None else argv))
    doc = {"date": started.isoformat(timespec="seconds"), "command": command,
           "machine": info, "n": n, "dim": a.dim, "clusters": a.clusters, "spread": a.spread, "k": a.k,
           "seed": a.seed, "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
