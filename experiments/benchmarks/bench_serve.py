"""Review-page latency: what a radiologist waits for in ``mmvae serve``, over real HTTP.

    python experiments/benchmarks/bench_serve.py --out experiments/benchmarks/results/serve.json
    python experiments/benchmarks/bench_serve.py --quick        # smoke run (10,000 cases, 3 queries)

Same model, index and query volumes as ``bench_query.py`` (its set-up, in a separate
process): an untrained ``configs/bench.py`` model (same shapes and compiled code as a trained
one; ``--workdir`` for a trained run), a flat index of ``--n`` cases, and per query three
real 240×240×155 BraTS 2018 NIfTI volumes (T1 → ``t1``, T2 → ``t2``, FLAIR standing in for
``dwi``). The app (:func:`mmvae.serve.app.create_app`) is served by uvicorn on a loopback port
in this process; a ``requests`` client times, per request, from sending to the parsed JSON:

* **upload query**: ``POST /api/query/upload`` with the three ``.nii.gz`` files — upload,
  preprocessing, encoding, search, thumbnails of the query's images; a fresh preprocessing
  cache per query, so every query is a new case. The first (jit compilation) is apart.
* **indexed-case query**: ``POST /api/query`` with a case id (its stored posterior).
* **feedback round**: ``POST /api/feedback`` with two marks (Rocchio + search).
* **thumbnail**: ``thumbnail_png`` of one BraTS volume (load, RAS, middle slice, PNG), uncached.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGET_P50_S = 1.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/bench.py")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--brats", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--out")
    a, extra = ap.parse_known_args(argv)
    if a.quick:
        a.n, a.queries = 10_000, 3

    import requests
    from bench_query import run_setup
    from common import BRATS_DIR, brats_cases, load_average, machine, peak_rss_mb, stats, write_json

    info = machine()
    info["load_average_start"] = load_average()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "experiments/benchmarks/bench_serve.py"]
                                  + list(sys.argv[1:] if argv is None else argv)),
              "machine": info, "n": a.n, "k": a.k, "target_upload_query_p50_s": TARGET_P50_S}
    print(f"machine: {info['cpu']}, {info['cores']} cores; load average {info['load_average_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=a.tmp) as tmp:
        tmp = Path(tmp)
        from mmvae.config import load_config
        from mmvae.runs.files import read_run_files
        mods = (list(read_run_files(Path(a.workdir))[1].image_modalities) if a.workdir
                else list(load_config(a.config, extra).data.image_modalities))
        cases = brats_cases(BRATS_DIR if a.brats is None else a.brats, mods)
        if not cases:
            print("no BraTS sample: nothing to time", file=sys.stderr)
            return 2
        s = run_setup({"tmp": str(tmp), "workdir": a.workdir, "config": a.config, "overrides": extra, "n": a.n,
                       "kinds": ["flat"], "clusters": 1000, "search_queries": 10, "seed": a.seed,
                       "synthetic": False, "synthetic_cases": 0})
        from mmvae.data.cache import PreprocessCache
        from mmvae.serve import BackgroundServer
        from mmvae.serve.app import create_app
        from mmvae.serve.service import ReviewService
        from mmvae.serve.thumbnails import thumbnail_png

        t = time.perf_counter()
        service = ReviewService.load(s["workdir"], s["indexes"]["flat"]["path"], manifest=None, settings={"k": a.k})
        load_s = time.perf_counter() - t
        live = BackgroundServer(create_app(service))
        print(f"load: ReviewService.load (model + flat index of {a.n:,}) {load_s:.2f}s; serving {live.url}", flush=True)

        def upload(i):
            service.retriever.cache = PreprocessCache(tmp / f"qcache-{i}")    # a new case each time
            files = [(f"file_{m}", (Path(p).name, open(p, "rb"))) for m, p in cases[i % len(cases)][1].items()]
            t0 = time.perf_counter()
            r = requests.post(live.url + "/api/query/upload", files=files, timeout=120)
            dt = time.perf_counter() - t0
            for _, (_, f) in files:
                f.close()
            r.raise_for_status()
            return dt, r.json()

        first, doc = upload(0)
        print(f"first upload query (incl. jit compile): {first:.2f}s", flush=True)
        up = [upload(i + 1)[0] for i in range(a.queries)]
        case_q, fb = [], []
        ids = service.retriever.index.case_ids
        rng = np.random.default_rng(a.seed)
        for i in range(a.queries):
            cid = ids[int(rng.integers(len(ids)))]
            t0 = time.perf_counter()
            d = requests.post(live.url + "/api/query", json={"case_id": cid}, timeout=60).json()
            case_q.append(time.perf_counter() - t0)
            res = [x["case_id"] for x in d["results"]]
            t0 = time.perf_counter()
            requests.post(live.url + "/api/feedback", json={"session": d["session"], "relevant": [res[2]],
                                                              "nonrelevant": [res[0]]}, timeout=60).raise_for_status()
            fb.append(time.perf_counter() - t0)
        vols = sorted({p for c in cases for p in c[1].values()})
        th = []
        for p in vols:
            t0 = time.perf_counter()
            thumbnail_png(p)
            th.append(time.perf_counter() - t0)
        live.stop()
        service.close()
    result.update({"model": s["model"], "load_s": load_s, "first_upload_query_s": first,
                   "upload_query_s": stats(up), "case_query_s": stats(case_q), "feedback_s": stats(fb),
                   "thumbnail_s": stats(th), "volumes_per_query": len(cases[0][1]),
                   "peak_rss_mb": peak_rss_mb(), "load_average_end": load_average()})
    u = result["upload_query_s"]
    print(f"upload query (3 volumes, {a.queries} queries): p50 {u['p50']:.3f}s, p90 {u['p90']:.3f}s "
          f"(target ≤ {TARGET_P50_S}s); indexed-case query p50 {1e3 * result['case_query_s']['p50']:.1f} ms; "
          f"feedback round p50 {1e3 * result['feedback_s']['p50']:.1f} ms; one thumbnail p50 "
          f"{1e3 * result['thumbnail_s']['p50']:.0f} ms; peak RSS {result['peak_rss_mb']:.0f} MB; "
          f"load average at the end {result['load_average_end']}")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
