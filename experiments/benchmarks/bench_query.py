"""End-to-end query latency: three 240×240×155 NIfTI volumes → preprocess → encode → search 100,000 cases.

    python experiments/benchmarks/bench_query.py --out experiments/benchmarks/results/query_100k.json
    python experiments/benchmarks/bench_query.py --workdir runs/bench        # a trained run instead
    python experiments/benchmarks/bench_query.py --quick                     # smoke run (10,000 cases)

What is timed is what ``mmvae query`` / :class:`mmvae.retrieval.query.Retriever` does:

* **load** (once): ``Retriever.load(workdir, index)``: model rebuilt and its checkpoint
  restored, tokenizer, index folder read and verified (sha256 of every file).
* per query, with a fresh preprocessing cache (every query is a new case):
  **preprocess** = ``Retriever.query_batch`` (for each modality: hash the file, load the
  NIfTI, RAS, resample to ``data.spacing``, foreground mask, crop/pad, normalise, write the
  cache entry; then the one-case batch), **encode** = the jitted encoder on the batch +
  ``device_get`` + the fusion of the experts (``Retriever.encode`` minus the preprocessing),
  **search** = ``Retriever.search_embedding(mu, logvar, k)`` (faiss + exact re-scoring +
  ``Result`` objects). The first query (jit compilation) is reported apart; the same queries
  are also run through the public ``Retriever.search(images, k=k)`` to check the total.
* **search alone**: ``search_embedding`` for single queries drawn from the index's
  distribution, for each index kind, with faiss' default threads (what ``mmvae query``
  uses) and with 1 thread, with recall@k against the flat (exact) index.

Query volumes: the real BraTS 2018 sample (``--brats``; per case the model's ``t1``/``t2``
take BraTS T1/T2 and ``dwi`` takes FLAIR — a stand-in with the same size and type), cycled
to ``--queries`` queries; without it (or with ``--synthetic``), synthetic 240×240×155 1 mm
volumes written as NIfTI by :func:`mmvae.data.synth.make_cohort`.

Model: ``--workdir`` (a trained run of the config), else an **untrained** model of
``--config`` (default ``configs/bench.py``): ``train_and_evaluate`` with ``train.steps=0``
on a small synthetic cohort writes the run dir (config, tokenizer, clinical statistics)
and a step-0 checkpoint of the initial parameters. Same architecture, same shapes, same
compiled code: the latency of a trained model is the same.

Index: ``--n`` (100,000) seeded clustered embeddings of the model's latent size (the
generator of ``bench_index.py``: 1000 Gaussian clusters, s.d. 0.5; log-variances in
[-3, -1]), with per-case modalities and a label, built by ``build_index`` (cosine) with the
model's identity so ``Retriever.load`` accepts it. ``flat`` (exact; ``mmvae index``'s
default) is the end-to-end kind; ``ivf`` and ``hnsw`` (default parameters) are timed too.
Index building and run-dir creation happen in a separate process, so the peak resident
memory reported is that of a process serving queries.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGET_E2E_P50_S = 1.5
TARGET_SEARCH_MS = 5.0


# --------------------------------------------------------------------------- setup (child process)
def synthetic_volumes(out: Path, n_cases: int, modalities, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """Synthetic 240×240×155 volumes at 1 mm written as NIfTI (the fallback query cases)."""
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.data.synth import make_cohort
    manifest = make_cohort(out, n_cases, seed=seed, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0),
                           modalities=tuple(modalities), missing_prob=0.0, with_report=False)
    return [(c.case_id, {m: c.images[m][0] for m in modalities}) for c in group_cases(read_manifest(manifest))]


def setup(args: dict) -> dict:
    """Run dir (untrained, unless given) and one saved index per kind. Returns their paths."""
    import faiss

    from bench_index import make_data
    from mmvae.config import load_config
    from mmvae.quickstart import synthesize
    from mmvae.retrieval.index import build_index
    from mmvae.retrieval.query import model_identity
    from mmvae.train.loop import train_and_evaluate
    from mmvae.runs.files import read_run_files
    tmp = Path(args["tmp"])
    out = {}
    if args["workdir"]:
        workdir = Path(args["workdir"])
        out["model"] = "trained run " + str(workdir)
    else:
        config = load_config(args["config"] + ":steps=0,cases=24", args["overrides"])
        with config.unlocked():
            config.data.manifest = str(synthesize(config, tmp / "run-data", show_progress=False))
        workdir = tmp / "run"
        t = time.perf_counter()
        train_and_evaluate(config, workdir, show_progress=False)
        out["model"] = "untrained (step-0 checkpoint of the initial parameters)"
        out["run_dir_s"] = time.perf_counter() - t
    out["workdir"] = str(workdir)
    config, spec, _ = read_run_files(workdir)
    n, L = int(args["n"]), int(spec.latent_dim)
    mu, logvar, q = make_data(n, L, args["clusters"], args["search_queries"], args["seed"], 0.5)
    rng = np.random.default_rng(args["seed"] + 1)
    mods = list(spec.modalities)
    present = rng.random((n, len(mods))) > 0.15
    present[np.arange(n), rng.integers(0, len(mods), n)] = True
    classes = ["glioma", "metastasis", "meningioma", "abscess", "lymphoma", "normal"]
    lab = rng.integers(0, len(classes), n)
    meta = [{"modalities": [m for m, p in zip(mods, row) if p], "labels": {"class": classes[c]}}
            for row, c in zip(present, lab)]
    ids = [f"case{i:06d}" for i in range(n)]
    ident = model_identity(spec)
    np.save(tmp / "search_queries.npy", q)
    out["indexes"], out["build_s"] = {}, {}
    for kind in args["kinds"]:
        t = time.perf_counter()
        ix = build_index(mu, logvar, ids, meta, kind=kind, metric="cosine", seed=args["seed"], identity=ident)
        out["build_s"][kind] = time.perf_counter() - t
        ix.save(tmp / f"index-{kind}")
        out["indexes"][kind] = {"path": str(tmp / f"index-{kind}"), "params": ix.params}
        del ix
    out["faiss_default_threads"] = faiss.omp_get_max_threads()
    if args["synthetic"]:
        t = time.perf_counter()
        out["cases"] = synthetic_volumes(tmp / "query-volumes", args["synthetic_cases"],
                                         spec.image_modalities, args["seed"])
        out["synthetic_s"] = time.perf_counter() - t
    return out


def _child(conn, args):
    try:
        conn.send(("ok", setup(args)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_setup(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, args))
    p.start()
    child.close()
    status, value = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(f"setup failed: {value}")
    return value


# --------------------------------------------------------------------------- timing
def timed_query(r, images: dict, k: int, cache_dir: Path):
    """(stage seconds, results) of one query with a fresh preprocessing cache."""
    import jax

    from mmvae.data.cache import PreprocessCache
    from mmvae.retrieval.embed import case_vectors
    r.cache = PreprocessCache(cache_dir)   # a new case: nothing cached
    t0 = time.perf_counter()
    batch = r.query_batch(images)
    t1 = time.perf_counter()
    emu, elv, present = jax.device_get(r._encode(batch))   # as Retriever.encode
    m = len(r.spec.query_modalities)
    present = np.asarray(present)
    mu, lv = case_vectors(np.asarray(emu)[:, :m], np.asarray(elv)[:, :m], present[:, :m], r.spec.fusion,
                          r.embedding, r._stats(), r.spec.private_dim)
    used = [x for x, p in zip(r.modalities, present[0]) if p > 0]
    t2 = time.perf_counter()
    res = r.search_embedding(mu[0], lv[0], k=k, modalities=used)
    t3 = time.perf_counter()
    return {"preprocess": t1 - t0, "encode": t2 - t1, "search": t3 - t2, "total": t3 - t0}, (mu[0], lv[0]), res


def search_times(r, mus, lvs, k: int, reps: int = 1) -> tuple[list[float], list[list[str]]]:
    times, ids = [], []
    r.search_embedding(mus[0], lvs[0], k=k)   # warm-up
    for _ in range(reps):
        for mu, lv in zip(mus, lvs):
            t = time.perf_counter()
            res = r.search_embedding(mu, lv, k=k)
            times.append(time.perf_counter() - t)
            ids.append([x.case_id for x in res])
    return times, ids


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/bench.py", help="config of the untrained model (no --workdir)")
    ap.add_argument("--workdir", default=None, help="a trained run dir to use instead of an untrained model")
    ap.add_argument("--n", type=int, default=100_000, help="cases in the index")
    ap.add_argument("--kinds", default="flat,ivf,hnsw", help="index kinds; the first is the end-to-end one")
    ap.add_argument("--queries", type=int, default=12, help="timed end-to-end queries (after one warm-up)")
    ap.add_argument("--search-queries", type=int, default=300, help="single queries of the search-alone timing")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--brats", default=None, help="BraTS sample folder (default /work/shared/data/brats18-sample)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic 240×240×155 volumes even if BraTS is there")
    ap.add_argument("--synthetic-cases", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: 10,000 cases, 3 queries, flat only")
    ap.add_argument("--tmp", default=None, help="scratch folder (run dir, indexes, caches)")
    ap.add_argument("--out", help="write the results as JSON")
    a, extra = ap.parse_known_args(argv)
    if a.quick:
        a.n, a.queries, a.search_queries, a.kinds = 10_000, 3, 50, "flat"
    kinds = [x.strip() for x in a.kinds.split(",") if x.strip()]

    from common import BRATS_DIR, brats_cases, load_average, machine, peak_rss_mb, preprocess_stage_times, stats, \
        write_json

    info = machine()
    info["load_average_start"] = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} on {info['device_kind']} "
          f"({info['backend']}); load average {info['load_average_start']}", flush=True)
    result = {"date": started.isoformat(timespec="seconds"),
              "command": " ".join(["python", "experiments/benchmarks/bench_query.py"]
                                  + list(sys.argv[1:] if argv is None else argv)),
              "machine": info, "n": a.n, "k": a.k, "kinds": kinds,
              "targets": {"end_to_end_p50_s": TARGET_E2E_P50_S, "search_ms": TARGET_SEARCH_MS}}

    with tempfile.TemporaryDirectory(prefix="bench-query-", dir=a.tmp) as tmp:
        tmp = Path(tmp)
        brats_root = BRATS_DIR if a.brats is None else a.brats
        t = time.perf_counter()
        from mmvae.runs.files import read_run_files
        probe_mods = None
        if a.workdir:
            probe_mods = list(read_run_files(Path(a.workdir))[1].image_modalities)
        else:
            from mmvae.config import load_config
            probe_mods = list(load_config(a.config, extra).data.image_modalities)
        cases = [] if a.synthetic else brats_cases(brats_root, probe_mods)
        setup_args = {"tmp": str(tmp), "workdir": a.workdir, "config": a.config, "overrides": extra, "n": a.n,
                      "kinds": kinds, "clusters": a.clusters, "search_queries": a.search_queries, "seed": a.seed,
                      "synthetic": not cases, "synthetic_cases": a.synthetic_cases}
        s = run_setup(setup_args)
        print(f"setup ({time.perf_counter() - t:.0f}s, separate process): model {s['model']}; "
              + ", ".join(f"{k} index of {a.n:,} built in {v:.1f}s" for k, v in s["build_s"].items()), flush=True)
        if not cases:
            cases = s["cases"]
            source = f"synthetic 240x240x155 1 mm NIfTI ({len(cases)} cases, make_cohort)"
        else:
            source = f"BraTS 2018 sample {brats_root} ({len(cases)} cases)"
        result.update({"model": s["model"], "workdir": a.workdir, "query_source": source,
                       "query_mapping": {m: Path(p).name for m, p in cases[0][1].items()},
                       "index_build_s": s["build_s"], "index_params": {k: v["params"] for k, v in s["indexes"].items()},
                       "faiss_default_threads": s["faiss_default_threads"]})
        print(f"queries: {source}; modalities {result['query_mapping']}", flush=True)

        import faiss

        from mmvae.retrieval.index import load_index
        from mmvae.retrieval.query import Retriever, model_identity

        main_kind = kinds[0]
        t = time.perf_counter()
        r = Retriever.load(s["workdir"], s["indexes"][main_kind]["path"])
        load_s = time.perf_counter() - t
        print(f"load: Retriever.load (model + {main_kind} index of {a.n:,}) {load_s:.2f}s", flush=True)

        queries = [{m: [p] for m, p in cases[i % len(cases)][1].items()} for i in range(a.queries)]
        first, _, _ = timed_query(r, queries[0], a.k, tmp / "qcache-warm")
        print("first query (incl. jit compile): " + ", ".join(f"{k} {v:.2f}s" for k, v in first.items()), flush=True)
        rows, embs = [], []
        for i, images in enumerate(queries):
            st, emb, res = timed_query(r, images, a.k, tmp / f"qcache-{i}")
            rows.append(st)
            embs.append(emb)
        public = []
        for i, images in enumerate(queries):
            from mmvae.data.cache import PreprocessCache
            r.cache = PreprocessCache(tmp / f"qcache-public-{i}")
            t = time.perf_counter()
            r.search(images, k=a.k)
            public.append(time.perf_counter() - t)
        stages = {k: stats([row[k] for row in rows]) for k in ("preprocess", "encode", "search", "total")}
        e2e = {"load_s": load_s, "first_query_s": first, "per_query_s": rows, "stages_s": stages,
               "public_search_s": stats(public), "queries": len(queries)}
        print(f"end-to-end over {len(rows)} queries ({main_kind}): p50 {stages['total']['p50']:.3f}s, "
              f"p90 {stages['total']['p90']:.3f}s [preprocess p50 {stages['preprocess']['p50']:.3f}s, encode "
              f"{stages['encode']['p50']:.3f}s, search {1e3 * stages['search']['p50']:.2f} ms]; "
              f"Retriever.search p50 {np.median(public):.3f}s", flush=True)

        # preprocessing per step (one volume at a time, single thread)
        vols = sorted({p for c in cases for p in c[1].values()})
        steps = [preprocess_stage_times(p, r.preprocess, int(r.config.data.spatial_dims)) for p in vols]
        keys = [k for k in steps[0] if k != "native_shape"]
        per_vol = {k: float(np.median([x[k] for x in steps])) for k in keys}
        e2e["preprocess_steps_median_per_volume_s"] = per_vol
        e2e["preprocess_volumes"] = len(steps)
        e2e["native_shape"] = steps[0]["native_shape"]
        e2e["volumes_per_query"] = len(queries[0])
        print(f"preprocess steps per volume (median of {len(steps)}, native {steps[0]['native_shape']}): "
              + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in per_vol.items()), flush=True)
        result["end_to_end"] = e2e

        # search alone, every kind, default and 1 faiss thread
        q = np.load(tmp / "search_queries.npy")
        qlv = np.full_like(q, -2.0)
        default_threads = faiss.omp_get_max_threads()
        search, truth = {}, None
        qmu_real = [e[0] for e in embs]
        qlv_real = [e[1] for e in embs]
        for kind in kinds:
            if kind != main_kind:
                t = time.perf_counter()
                r.index = load_index(s["indexes"][kind]["path"], expect_identity=model_identity(r.spec))
                kload = time.perf_counter() - t
            else:
                kload = None
            row = {"index_load_s": kload, "params": s["indexes"][kind]["params"]}
            for threads in sorted({default_threads, 1}, reverse=True):
                faiss.omp_set_num_threads(threads)
                times, ids = search_times(r, list(q), list(qlv), a.k)
                real_times, _ = search_times(r, qmu_real, qlv_real, a.k, reps=max(1, 100 // len(qmu_real)))
                row[f"threads_{threads}"] = {"random_queries_ms": stats(times, 1e3),
                                             "model_queries_ms": stats(real_times, 1e3)}
                if threads == default_threads:
                    if kind == "flat":
                        truth = ids
                    if truth is not None:
                        row[f"recall@{a.k}"] = float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids, truth)]))
            faiss.omp_set_num_threads(default_threads)
            if kind != main_kind:   # the end-to-end total with this kind's search, query by query
                comp = [row_["preprocess"] + row_["encode"] for row_ in rows]
                st, _ = search_times(r, qmu_real, qlv_real, a.k)
                row["end_to_end_composed_s"] = stats([c + x for c, x in zip(comp, st)])
            search[kind] = row
            d = row[f"threads_{default_threads}"]["random_queries_ms"]
            o = row["threads_1"]["random_queries_ms"]
            print(f"search alone {kind:5s} ({a.search_queries} queries): p50 {d['p50']:.2f} ms, p90 {d['p90']:.2f} ms "
                  f"({default_threads} faiss threads); 1 thread p50 {o['p50']:.2f} ms, p90 {o['p90']:.2f} ms"
                  + (f"; recall@{a.k} {row[f'recall@{a.k}']:.3f}" if f"recall@{a.k}" in row else ""), flush=True)
        result["search_alone"] = search
        result["peak_rss_mb"] = peak_rss_mb()   # a process serving queries (before the second load below)

        # the load stage split (a second load, files now in the page cache)
        from mmvae.runs.trained import load_trained
        t = time.perf_counter()
        load_trained(s["workdir"])
        model_s = time.perf_counter() - t
        t = time.perf_counter()
        load_index(s["indexes"][main_kind]["path"], expect_identity=model_identity(r.spec))
        index_s = time.perf_counter() - t
        result["end_to_end"]["load_split_second_load_s"] = {"model (load_trained)": model_s,
                                                             f"{main_kind} index (load_index)": index_s}
        print(f"load split (second load): model {model_s:.2f}s, {main_kind} index {index_s:.2f}s", flush=True)
        r.close()

    result["load_average_end"] = load_average()
    tot = result["end_to_end"]["stages_s"]["total"]["p50"]
    srch = result["search_alone"][main_kind][f"threads_{default_threads}"]["random_queries_ms"]["p50"]
    result["verdict"] = {"end_to_end_p50_s": tot, "end_to_end_met": tot <= TARGET_E2E_P50_S,
                         "search_p50_ms": srch, "search_met": srch <= TARGET_SEARCH_MS}
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; load average at the end {result['load_average_end']}; "
          f"end-to-end p50 {tot:.3f}s (target ≤ {TARGET_E2E_P50_S}s), search p50 {srch:.2f} ms "
          f"(target ≤ {TARGET_SEARCH_MS} ms)")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
