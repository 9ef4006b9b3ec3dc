"""Input pipeline throughput (cases/s): preprocessed cache → device, and raw NIfTI → cache.

    python experiments/benchmarks/bench_pipeline.py --out experiments/benchmarks/results/pipeline.json
    python experiments/benchmarks/bench_pipeline.py --data /tmp/bench-cohort      # reuse a synthetic cohort
    python experiments/benchmarks/bench_pipeline.py --quick                       # smoke run

Data: the config's synthetic cohort (``configs/bench.py``: 3 imaging modalities at
1 x 64³, 2 mm, + a 128-token report; 256 cases, some modalities missing), generated into
``--data`` (default: a temporary folder) by :func:`mmvae.quickstart.synthesize`, and,
when present, the real BraTS 2018 sample (``--brats``; 240×240×155 at 1 mm, int16;
the model's ``t1``/``t2`` take the BraTS T1/T2 and ``dwi`` takes FLAIR).

(a) **cache → device**, the training input path: the cohort is prepared once with
:func:`mmvae.train.loop.load_cohort` (memory-mapped cache entries, tokenised reports),
then :func:`mmvae.data.pipeline.train_batches` (background prefetch thread,
``data.prefetch`` batches ahead) yields ``batch_size`` batches and each is moved with
``jax.device_put`` and blocked on. Also timed, to show where the time goes: the same
stream without the prefetch thread; :meth:`Cohort.batch` alone (gathering the memory
maps into one batch); ``jax.device_put`` of one ready batch alone; and the prefetched
stream over one epoch right after the cache files were dropped from the page cache
(``posix_fadvise(DONTNEED)``: the cold-disk case of a cohort larger than RAM).

(b) **raw NIfTI → cache**, what :func:`mmvae.data.dataset.prepare_cohort` does on first
use (hash → load → RAS → resample to ``data.spacing`` → foreground mask → crop/pad →
normalise → write the cache entry), per case with
:func:`mmvae.data.dataset.load_case_images` into a fresh cache, with N workers. The
project's code uses **threads** (``ThreadPoolExecutor(data.workers)`` in
``prepare_cohort``); processes (spawn, pool started and warmed before timing) are
measured with the same work function for comparison. Plus the per-step seconds of one
volume (single thread) and the project's own ``prepare_cohort`` on the synthetic cohort.

Reports medians over ``--repeats`` runs, the load average (the machine may be shared),
and the peak resident memory of this process and of the largest worker process.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))   # jax-free at import: spawned workers import this module


# --------------------------------------------------------------------------- raw → cache (workers)
def _warm(_):
    import mmvae.data.dataset  # noqa: F401 - import numpy/scipy/nibabel before timing
    return os.getpid()


def _hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ``RUSAGE_CHILDREN`` it does not
    count the parent's pages a spawned child held between fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def raw_case(job) -> tuple[int, float]:
    """One case: every modality through ``load_case_images`` into the cache at ``job[2]``.
    Returns (volumes preprocessed, peak RSS MB of the worker's process). Same function for
    threads and processes."""
    from mmvae.data.cache import PreprocessCache
    from mmvae.data.dataset import load_case_images
    from mmvae.data.manifest import CaseEntries
    from mmvae.data.preprocess import PreprocessConfig
    case_id, images, cache_root, cfg, spatial_dims = job
    cache = PreprocessCache(cache_root)
    cfg = PreprocessConfig.from_dict(cfg)
    case = CaseEntries(case_id, images, None, None, {}, {})
    n = 0
    for m, paths in images.items():
        arr = load_case_images(case, m, paths, cache, cfg, spatial_dims, None)
        n += int(arr.shape[0])
    return n, _hwm_mb()


def time_raw(cases, cfg_dict, spatial_dims, kind: str, workers: int, repeats: int, tmp: str) -> dict:
    """cases/s and volumes/s of ``raw_case`` over ``cases`` with ``workers`` threads or processes."""
    import multiprocessing as mp
    if kind == "thread":
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        list(pool.map(_warm, range(4 * workers)))   # start and warm every worker before timing
    times, vols, hwm = [], 0, 0.0
    try:
        for r in range(repeats):
            root = tempfile.mkdtemp(prefix=f"bench-raw-{kind}{workers}-{r}-", dir=tmp)
            jobs = [(cid, imgs, root, cfg_dict, spatial_dims) for cid, imgs in cases]
            t = time.perf_counter()
            out = list(pool.map(raw_case, jobs))
            times.append(time.perf_counter() - t)
            vols = sum(n for n, _ in out)
            hwm = max([hwm] + [m for _, m in out])
            shutil.rmtree(root, ignore_errors=True)
    finally:
        pool.shutdown()
    med = float(np.median(times))
    return {"kind": kind, "workers": workers, "cases": len(cases), "volumes": vols, "times_s": times,
            "median_s": med, "cases_per_s": len(cases) / med, "volumes_per_s": vols / med,
            "peak_rss_mb": hwm if kind == "process" else None}


# --------------------------------------------------------------------------- cache → device
def stream_rate(cohort, batch_size: int, seed: int, n_batches: int, prefetch: int, device_put: bool) -> float:
    """cases/s of ``train_batches`` (+ ``jax.device_put``, blocked) over ``n_batches``,
    timed from a fresh stream (the prefetch queue starts empty)."""
    import jax
    from mmvae.data.pipeline import Position, train_batches
    it = train_batches(cohort, batch_size, seed, Position(), prefetch=prefetch)
    try:
        t = time.perf_counter()
        for _ in range(n_batches):
            batch, _ = next(it)
            if device_put:
                jax.block_until_ready(jax.device_put(batch))
        dt = time.perf_counter() - t
    finally:
        it.close()
    return n_batches * batch_size / dt


def assemble_rate(cohort, batch_size: int, seed: int, n_batches: int) -> float:
    from mmvae.data.pipeline import Position, batch_indices
    pos = Position()
    t = time.perf_counter()
    for _ in range(n_batches):
        idx, pos = batch_indices(len(cohort), batch_size, seed, pos)
        cohort.batch(idx)
    return n_batches * batch_size / (time.perf_counter() - t)


def device_put_rate(batch: dict, batch_size: int, n: int) -> float:
    import jax
    t = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(jax.device_put(batch))
    return n * batch_size / (time.perf_counter() - t)


def reopen_evicted(cohort):
    """Drop the cohort's memory maps, evict their files from the page cache, map them again."""
    from common import evict_page_cache
    if any(a is not None and getattr(a, "filename", None) is None for lst in cohort.images.values() for a in lst):
        return None, 0   # an entry is not a plain memory map (several series concatenated)
    names = {m: [None if a is None else a.filename for a in lst] for m, lst in cohort.images.items()}
    cohort.images = {m: [None] * len(lst) for m, lst in cohort.images.items()}
    gc.collect()
    files = [f for lst in names.values() for f in lst if f]
    evicted = evict_page_cache(files)
    cohort.images = {m: [None if f is None else np.load(f, mmap_mode="r") for f in lst] for m, lst in names.items()}
    return cohort, evicted


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/bench.py", help="config (shapes, batch, prefetch, workers)")
    ap.add_argument("--data", help="synthetic cohort folder to (re)use; default: a temporary folder")
    ap.add_argument("--brats", default=None, help="BraTS sample folder (default /work/shared/data/brats18-sample "
                                                  "when present; '' to skip)")
    ap.add_argument("--batches", type=int, default=96, help="batches per timed stream run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per cache→device measurement (median)")
    ap.add_argument("--raw-repeats", type=int, default=3, help="runs per raw-NIfTI measurement (median)")
    ap.add_argument("--raw-cases", type=int, default=64, help="synthetic cases preprocessed per raw run")
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default 1,2,data.workers)")
    ap.add_argument("--kinds", default="thread,process", help="worker kinds for (b): thread,process")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 cases, fewer batches and repeats")
    ap.add_argument("--tmp", default=None, help="scratch folder (caches)")
    ap.add_argument("--out", help="write the results as JSON")
    a, extra = ap.parse_known_args(argv)

    import jax

    from common import (BRATS_DIR, brats_cases, load_average, machine, peak_rss_mb,
                        preprocess_stage_times, write_json)
    from mmvae.config import load_config
    from mmvae.data.dataset import preprocess_config
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.quickstart import synthesize
    from mmvae.runs.trained import get_tokenizer, load_cohort, report_texts

    spec = a.config + (":cases=32" if a.quick and ":" not in a.config else "")
    config = load_config(spec, extra)
    if a.quick:
        a.batches, a.repeats, a.raw_repeats, a.raw_cases = 16, 2, 1, 16
    d = config.data
    bs, seed = int(config.train.batch_size), int(config.seed)
    prefetch, cfg_workers = int(d.prefetch), int(d.workers)
    workers = sorted({int(x) for x in a.workers.split(",")}) if a.workers else sorted({1, 2, cfg_workers})
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    info = machine()
    info["load_average_start"] = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} on {info['device_kind']} "
          f"({info['backend']}); load average {info['load_average_start']}", flush=True)
    result = {"date": started.isoformat(timespec="seconds"),
              "command": " ".join(["python", "experiments/benchmarks/bench_pipeline.py"]
                                  + list(sys.argv[1:] if argv is None else argv)),
              "machine": info, "config": a.config, "overrides": extra, "batch_size": bs,
              "shape": list(d.shape), "spacing": list(d.spacing), "modalities": list(d.image_modalities),
              "report_tokens": int(d.text.max_len) if d.report else 0, "prefetch": prefetch,
              "config_workers": cfg_workers, "project_worker_kind": "thread"}

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir=a.tmp) as tmp:
        data_dir = Path(a.data) if a.data else Path(tmp) / "data"
        t = time.perf_counter()
        manifest = synthesize(config, data_dir, show_progress=False)
        synth_s = time.perf_counter() - t
        with config.unlocked():
            config.data.cache_dir = str(Path(tmp) / "cache")
        work = Path(tmp) / "work"
        tokenizer = get_tokenizer(config, work, report_texts(manifest)) if d.report else None   # built before the timing
        t = time.perf_counter()
        cohort, _, _ = load_cohort(config, work, str(manifest), tokenizer=tokenizer, show_progress=False)
        prepare_s = time.perf_counter() - t
        n_vol = sum(a_ is not None for lst in cohort.images.values() for a_ in lst)
        cache_bytes = sum(p.stat().st_size for p in (Path(tmp) / "cache").rglob("*.npy"))
        print(f"cohort: {len(cohort)} cases, {n_vol} volumes of {tuple(d.shape)} ({synth_s:.0f}s to synthesize "
              f"or check); prepare_cohort with {cfg_workers} threads into an empty cache: {prepare_s:.1f}s "
              f"= {len(cohort) / prepare_s:.1f} cases/s (incl. reading the manifest and tokenising); "
              f"cache {cache_bytes / 2**20:.0f} MiB", flush=True)
        result["cohort"] = {"cases": len(cohort), "volumes": n_vol, "cache_mib": cache_bytes / 2 ** 20,
                            "synthesize_s": synth_s, "data_dir": None if not a.data else str(data_dir),
                            "prepare_cohort_s": prepare_s, "prepare_cohort_cases_per_s": len(cohort) / prepare_s,
                            "prepare_cohort_workers": cfg_workers}

        # ---------------------------------------------------------------- (a) cache → device
        nb = a.batches
        batch0 = cohort.batch(np.arange(bs) % len(cohort))
        batch_mib = sum(v.nbytes for v in batch0.values()) / 2 ** 20
        jax.block_until_ready(jax.device_put(batch0))     # first transfer outside the timings
        stream_rate(cohort, bs, seed, 2, prefetch, True)   # page in the cache files
        runs = {"prefetch": [], "no_prefetch": [], "assemble_only": [], "device_put_only": []}
        for _ in range(a.repeats):
            runs["prefetch"].append(stream_rate(cohort, bs, seed, nb, prefetch, True))
            runs["no_prefetch"].append(stream_rate(cohort, bs, seed, nb, 0, True))
            runs["assemble_only"].append(assemble_rate(cohort, bs, seed, nb))
            runs["device_put_only"].append(device_put_rate(batch0, bs, nb))
        cold, evicted = [], 0
        per_epoch = len(cohort) // bs
        for _ in range(max(1, min(3, a.repeats))):
            c2, evicted = reopen_evicted(cohort)
            if c2 is None:
                break
            cohort = c2
            cold.append(stream_rate(cohort, bs, seed, per_epoch, prefetch, True))
        a_res = {k: {"cases_per_s_median": float(np.median(v)), "runs": v} for k, v in runs.items()}
        if cold:
            a_res["prefetch_cold_page_cache"] = {"cases_per_s_median": float(np.median(cold)), "runs": cold,
                                                 "batches": per_epoch, "evicted_mib": evicted / 2 ** 20}
        a_res.update({"batches_per_run": nb, "batch_mib": batch_mib,
                      "note": "device_put onto " + info["device_kind"]})
        result["cache_to_device"] = a_res
        print(f"(a) cache → device, batch {bs} ({batch_mib:.1f} MiB), {nb} batches x {a.repeats} runs, median "
              f"cases/s: prefetch={prefetch} {a_res['prefetch']['cases_per_s_median']:.0f}, "
              f"no prefetch {a_res['no_prefetch']['cases_per_s_median']:.0f}, Cohort.batch alone "
              f"{a_res['assemble_only']['cases_per_s_median']:.0f}, device_put alone "
              f"{a_res['device_put_only']['cases_per_s_median']:.0f}"
              + (f", cold page cache {a_res['prefetch_cold_page_cache']['cases_per_s_median']:.0f}" if cold else ""),
              flush=True)

        # ---------------------------------------------------------------- (b) raw NIfTI → cache
        cfg = preprocess_config(d)
        cfg_dict = cfg.to_dict()
        sd = int(d.spatial_dims)
        mods = list(d.image_modalities)
        synth_cases = [(c.case_id, {m: c.images[m] for m in mods if c.images.get(m)})
                       for c in group_cases(read_manifest(manifest), mods + ["report"])][: a.raw_cases]
        brats_root = BRATS_DIR if a.brats is None else a.brats
        sources = {"synthetic": synth_cases}
        bc = brats_cases(brats_root, mods)
        if bc:
            sources["brats"] = [(cid, {m: [p] for m, p in files.items()}) for cid, files in bc]
            result["brats"] = {"folder": brats_root, "cases": [c for c, _ in bc],
                               "mapping": {m: Path(p).name.split("_")[-1].split(".")[0]
                                           for m, p in bc[0][1].items()}}
        else:
            print(f"BraTS sample not found at {brats_root!r}: raw-NIfTI timing on the synthetic cohort only")
        raw = {}
        for name, cases in sources.items():
            rows = []
            for kind in kinds:
                for w in workers:
                    r = time_raw(cases, cfg_dict, sd, kind, w, a.raw_repeats, tmp)
                    rows.append(r)
                    print(f"(b) raw {name}: {kind:7s} x{w}: {r['cases_per_s']:.2f} cases/s, "
                          f"{r['volumes_per_s']:.2f} volumes/s ({r['cases']} cases, {r['volumes']} volumes, "
                          f"median of {len(r['times_s'])}: {r['median_s']:.1f}s)", flush=True)
            paths = [p for _, imgs in cases for ps in imgs.values() for p in ps]
            steps = [preprocess_stage_times(p, cfg, sd) for p in paths[: min(len(paths), 18)]]
            keys = [k for k in steps[0] if k != "native_shape"]
            stage = {k: float(np.median([s[k] for s in steps])) for k in keys}
            raw[name] = {"runs": rows, "native_shape": steps[0]["native_shape"], "cases": len(cases),
                         "step_seconds_median_per_volume": stage, "step_volumes": len(steps)}
            print(f"    per-volume steps ({name}, native {steps[0]['native_shape']}, median of {len(steps)}): "
                  + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in stage.items()), flush=True)
        result["raw_to_cache"] = raw

    result["load_average_end"] = load_average()
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_rss_worker_mb"] = max([0.0] + [r["peak_rss_mb"] or 0.0 for v in raw.values() for r in v["runs"]])
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB (largest worker process {result['peak_rss_worker_mb']:.0f} MB); "
          f"load average at the end {result['load_average_end']}")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
