"""Archive scale: the streaming index build over a shard set of 10⁶ cases, and sharded embedding.

Part ``index`` (default N = 1,000,000): a shard set of N synthetic cases at the default retrieval
width (the quickstart's ``experts`` vectors: 5 modalities × 40 dimensions = 200), written once with
:func:`mmvae.retrieval.shards.write_shard_set` (shards of 4,096 cases). The experts of a case are
its cluster's centre (1,000 clusters per modality) plus Gaussian noise; each modality but the first
is missing with probability 0.2; 1,000 queries are fresh draws with every modality. For each kind,
in a fresh process (``mmvae index --embeddings SHARDSET`` as a function:
:func:`mmvae.retrieval.index.stream.build_from_shards`, default parameters unless given):

* build time (s) and build peak RSS (``VmHWM`` of the process, and its growth over the process
  after imports);
* bytes per case: of ``index.faiss`` (the faiss structure a query server holds), of the whole folder
  on disk (+ the float means and log-variances kept for exact re-scoring, metadata), and the RSS
  growth of loading it (``load_index``: faiss index, memory-mapped floats, ids, metadata);
* single-query latency p50 / p99 (ms) of ``CaseIndex.search(q, 10)`` (one thread, exact
  re-scoring included) and recall@10 against exact cosine search over the same standardised
  vectors.

Part ``embed``: ``mmvae embed`` into a shard set with 1 process pinned to one core, then 2
processes (a ``jax.distributed`` job on 127.0.0.1) pinned to one core each, after one unmeasured
pass that fills the run's preprocessing cache (both measured runs read it); cases/s of each process
after its first shard (model load and compilation excluded), whether the 2-process set equals
the 1-process set, and XLA's FLOP count of one encoder call per case. Needs a trained work dir and a manifest (``--embed-workdir``,
``--embed-manifest``).

    python experiments/benchmarks/bench_scale.py --out experiments/benchmarks/results/scale_1m.json \\
        --embed-workdir RUN --embed-manifest MANIFEST
    python experiments/benchmarks/bench_scale.py --n 50000 --parts index          # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
KINDS = ("flat", "ivf", "ivfpq", "opq-ivfpq")
M, E = 5, 40


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------- data
def _part(rng, centres, n: int, first_id: int, all_present: bool = False):
    from mmvae.retrieval.embed import Embeddings
    lab = rng.integers(0, centres.shape[1], n)
    mu = (centres[:, lab].transpose(1, 0, 2) + 0.6 * rng.standard_normal((n, M, E), dtype=np.float32))
    lv = rng.uniform(-3.0, -1.0, (n, M, E)).astype(np.float32)
    present = np.ones((n, M), np.float32) if all_present else (rng.random((n, M)) > 0.2).astype(np.float32)
    present[:, 0] = 1
    ids = [f"c{first_id + i:08d}" for i in range(n)]
    return Embeddings(case_ids=ids, modalities=["t1", "t2", "dwi", "report", "clinical"],
                      experts_mu=mu.astype(np.float32), experts_logvar=lv, present=present, mu=mu, logvar=lv,
                      labels=[{"cluster": int(x)} for x in lab], fusion="poe",
                      identity={"shared_dim": E, "private_dim": 0, "weights_digest": "synthetic-bench"}
                      ).as_embedding("experts")


def make_shard_set(data: Path, n: int, shard: int, seed: int):
    from mmvae.retrieval.shards import ShardSet, write_shard_set
    folder = data / f"set-{n}"
    if (folder / "shardset.json").is_file():
        return ShardSet(folder)
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((M, 1000, E), dtype=np.float32)
    np.save(data / "centres.npy", centres)
    t0 = time.perf_counter()
    ss = write_shard_set((_part(rng, centres, min(shard, n - s), s) for s in range(0, n, shard)), folder,
                         source="bench_scale synthetic")
    _part(np.random.default_rng(seed + 1), centres, 1000, 10 ** 9, all_present=True).save(data / f"queries-{n}.npz")
    print(f"shard set of {n} cases in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return ss


def ground_truth(ix_dir: Path, q: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k rows of ``q`` over the index's stored (standardised) means, in chunks."""
    import faiss
    from mmvae.retrieval.index.inputs import normalise
    emb = np.load(ix_dir / "embeddings.npy", mmap_mode="r")
    qn = normalise(q)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for s in range(0, emb.shape[1], 1 << 18):
        x = normalise(np.asarray(emb[0, s:s + (1 << 18)]))
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        d, i = flat.search(qn, k)
        d2, i2 = np.concatenate([best_s, d], 1), np.concatenate([best_i, i + s], 1)
        order = np.argsort(-d2, 1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(d2, order, 1), np.take_along_axis(i2, order, 1)
    return best_i


# --------------------------------------------------------------------------- one kind (fresh process)
def bench_kind(kind: str, data: str, n: int, args: dict) -> dict:
    import faiss
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.index import load_index
    from mmvae.retrieval.index.stream import build_from_shards
    from mmvae.retrieval.shards import ShardSet
    data = Path(data)
    ss = ShardSet(data / f"set-{n}")
    ss.shard(0).vectors_with(None)
    out = data / f"ix-{kind}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    rss0 = status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    opts = {k: args[k] for k in ("nlist", "m_pq", "train_size") if args.get(k)}
    build_from_shards(ss, out, kind=kind, seed=int(args["seed"]), show_progress=False,
                      max_build_gb=float(args["max_build_gb"]), **opts)
    build_s = time.perf_counter() - t0
    peak_kb, growth_kb = status_kb("VmHWM"), status_kb("VmHWM") - rss0
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    rss1 = status_kb("VmRSS")
    t0 = time.perf_counter()
    ix = load_index(out)
    load_s = time.perf_counter() - t0
    loaded_kb = status_kb("VmRSS") - rss1
    q = Embeddings.load(data / f"queries-{n}.npz")
    qmu, _ = q.vectors_with(ix.identity.get("standardize"))
    gt_path = data / f"gt-{n}.npy"
    if not gt_path.is_file():
        np.save(gt_path, ground_truth(out, qmu, 10))
    gt = np.load(gt_path)
    faiss.omp_set_num_threads(1)

    def measure(nq, rf=None):
        ix.search(qmu[0], 10, rerank_factor=rf)
        lat, got = [], []
        for i in range(nq):
            t = time.perf_counter()
            res = ix.search(qmu[i], 10, rerank_factor=rf)[0]
            lat.append(time.perf_counter() - t)
            got.append([int(r.case_id[1:]) for r in res])
        recall = float(np.mean([len(set(a) & set(b.tolist())) / 10 for a, b in zip(got, gt)]))
        return recall, np.array(lat) * 1e3

    recall, lat = measure(len(qmu))
    sweep = []
    if ix.backend.approximate:            # the first pass re-scored exactly: recall / latency trade-off
        for rf in (4, 8, 16, 32, 64):
            r_, l_ = measure(300, rf)
            sweep.append({"rerank_factor": rf, "recall@10": round(r_, 4),
                          "latency_ms_p50": round(float(np.percentile(l_, 50)), 3),
                          "latency_ms_p99": round(float(np.percentile(l_, 99)), 3)})
    result = {"kind": kind, "n": n, "params": ix.params, "build_s": round(build_s, 1),
              "build_peak_rss_mb": round(peak_kb / 1024, 1), "build_rss_growth_mb": round(growth_kb / 1024, 1),
              "faiss_bytes_per_case": round(files["index.faiss"] / n, 1),
              "folder_bytes_per_case": round(sum(files.values()) / n, 1),
              "loaded_rss_bytes_per_case": round(loaded_kb * 1024 / n, 1), "load_s": round(load_s, 1),
              "files_bytes": files, "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
              "latency_ms_p99": round(float(np.percentile(lat, 99)), 3), "queries": len(qmu),
              "recall@10": round(recall, 4), "rerank_sweep_300_queries": sweep}
    if not args.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return result


def run_kind(kind, data, n, args) -> dict:
    from common import run_fresh
    try:
        return run_fresh(bench_kind, kind, str(data), n, args)
    except RuntimeError as e:
        return {"kind": kind, "n": n, "error": str(e)}


# --------------------------------------------------------------------------- embedding throughput
_EMBED_WORKER = r"""
import json, sys, time
workdir, manifest, out, shard, batch, pid, nproc, port = sys.argv[1:9]
import jax
if int(nproc) > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc),
                               process_id=int(pid))
from mmvae.retrieval import shards as S
times = []
r = S.embed_shards(workdir, manifest, out, shard_size=int(shard), batch_size=int(batch), show_progress=False,
                   on_shard=lambda i, n, s: times.append((n, s)))
print(json.dumps({"encoded": r.encoded, "times": times, "seconds": r.seconds}))
"""


def bench_embed(workdir: str, manifest: str, data: Path, shard: int, batch: int, cases: int = 0,
                warm: bool = True) -> dict:
    from mmvae.data.manifest import group_cases, read_manifest, write_manifest
    from mmvae.retrieval.embed import Embeddings
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cases:               # the first `cases` cases of the manifest
        entries = read_manifest(manifest)
        keep = {c.case_id for c in group_cases(entries)[:cases]}
        manifest = str(write_manifest([e for e in entries if e.case_id in keep], data / f"embed-{cases}.jsonl"))

    def launch(nproc: int, out: Path):
        shutil.rmtree(out, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(["taskset", "-c", str(i), sys.executable, "-c", _EMBED_WORKER, workdir, manifest,
                                   str(out), str(shard), str(batch), str(i), str(nproc), str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in range(nproc)]
        res = []
        for p in procs:
            o, e = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(e[-3000:])
            res.append(json.loads(o.strip().splitlines()[-1]))
        return res

    def rate(r):            # cases/s after the process's first shard (load + compile excluded)
        t = r["times"][1:]
        return sum(n for n, _ in t) / max(sum(s for _, s in t), 1e-9)

    if warm:
        launch(1, data / "embed-warm")      # fills the run's preprocessing cache: both runs below read it
    one = launch(1, data / "embed-1p")
    two = launch(2, data / "embed-2p")
    a, b = Embeddings.load(data / "embed-1p"), Embeddings.load(data / "embed-2p")
    same = (a.case_ids == b.case_ids and all(np.array_equal(getattr(a, f), getattr(b, f))
                                             for f in ("experts_mu", "experts_logvar", "present", "mu", "logvar")))
    r1, r2 = rate(one[0]), [rate(x) for x in two]
    return {"cases": len(a.case_ids), "shard_size": shard, "batch_size": batch,
            "one_process_cases_per_s": round(r1, 1), "two_processes_cases_per_s": [round(x, 1) for x in r2],
            "two_process_speedup": round(sum(r2) / r1, 2), "two_process_set_equals_one": bool(same),
            "one_process_total_s": round(one[0]["seconds"], 1),
            "two_process_total_s": round(max(x["seconds"] for x in two), 1)}


def encode_flops(workdir: str, manifest: str, batch: int) -> dict:
    """XLA's FLOP count of one jitted encoder call (experts + frozen features) on ``batch`` cases of
    ``manifest``, per case: what the embedding time at archive scale is estimated from."""
    import jax
    from flax import nnx
    from mmvae.data.pipeline import eval_batches
    from mmvae.runs.trained import load_cohort, load_trained
    config, spec, model, tok = load_trained(workdir)
    stats = json.loads((Path(workdir) / "clinical_stats.json").read_text())
    cohort, _, _ = load_cohort(config, Path(workdir), manifest, tokenizer=tok, clinical_stats=stats,
                               show_progress=False)
    b, _ = next(iter(eval_batches(cohort, batch)))
    graphdef, state = nnx.split(model)

    def encode(state, b):
        m = nnx.merge(graphdef, state)
        experts, present, _ = m.encode(b)
        return experts.mu, experts.logvar, present, m.frozen_features(b)

    cost = jax.jit(encode).lower(state, b).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    return {"batch": batch, "flops_per_case": flops / batch, "image_shape": list(spec.shape),
            "modalities": list(spec.query_modalities)}


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--parts", default="index,embed")
    ap.add_argument("--data", default="/tmp/mmvae-bench-scale", help="shard set and queries (kept between runs)")
    ap.add_argument("--shard", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nlist", type=int)
    ap.add_argument("--m-pq", type=int)
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--max-build-gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep the built index folders")
    ap.add_argument("--embed-workdir")
    ap.add_argument("--embed-manifest")
    ap.add_argument("--embed-shard", type=int, default=64)
    ap.add_argument("--embed-batch", type=int, default=32)
    ap.add_argument("--embed-cases", type=int, default=0, help="the manifest's first N cases (0: all)")
    ap.add_argument("--embed-no-warm", action="store_true",
                    help="skip the pass that fills the preprocessing cache (when it is already filled)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from common import machine, write_json
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
              "machine": machine(), "n": a.n, "width": M * E, "results": []}
    parts = a.parts.split(",")
    if "index" in parts:
        make_shard_set(data, a.n, a.shard, a.seed)
        args = {"seed": a.seed, "nlist": a.nlist, "m_pq": a.m_pq, "train_size": a.train_size,
                "max_build_gb": a.max_build_gb, "keep": a.keep}
        for kind in a.kinds.split(","):
            r = run_kind(kind, data, a.n, args)
            print(json.dumps(r), flush=True)
            result["results"].append(r)
    if "embed" in parts:
        if not (a.embed_workdir and a.embed_manifest):
            result["embed"] = {"skipped": "give --embed-workdir and --embed-manifest (a trained run and its cases)"}
        else:
            result["embed"] = bench_embed(a.embed_workdir, a.embed_manifest, data, a.embed_shard, a.embed_batch,
                                          a.embed_cases, not a.embed_no_warm)
            result["embed"]["encode_cost"] = encode_flops(a.embed_workdir, a.embed_manifest, a.embed_batch)
            print(json.dumps(result["embed"]), flush=True)
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
