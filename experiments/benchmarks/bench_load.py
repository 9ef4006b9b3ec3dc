"""Load test of the review page: concurrent clients against a real ``mmvae serve`` on 127.0.0.1.

    python experiments/benchmarks/bench_load.py --out experiments/benchmarks/results/load.json
    python experiments/benchmarks/bench_load.py --workdir RUN --index IDX   # an existing run

``--clients`` (8) threads send requests for ``--seconds`` (60), each picking per request:
an indexed-case query (``POST /api/query``, 50 %), a feedback round on its latest session
(``POST /api/feedback``, 30 %), or an upload query (``POST /api/query/upload`` with one
case's three NIfTI files and its report, 20 %). The server is ``mmvae serve`` in its own
process (its own TMPDIR), so the clients' threads do not share its interpreter. Default model:
``configs/tiny.py`` trained on a 40-case synthetic cohort (16³ volumes), as the tests do.

Reported: per kind and overall p50 / p99 latency (ms) and count, errors (any non-200 or
failed request; the target is 0), throughput, the server's RSS sampled every second (start
after warm-up, end, max: stable means end ≈ start), and what is left in its temporary folder
after the load (request folders: none) and after SIGTERM (nothing).
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

MIX = (("case_query", 0.5), ("feedback", 0.3), ("upload", 0.2))


def train_tiny(tmp: Path, cases: int = 40) -> tuple[Path, Path]:
    """configs/tiny.py on a synthetic cohort, embedded and indexed (flat, cosine)."""
    from mmvae.config import load_config
    from mmvae.data.synth import make_cohort
    from mmvae.retrieval.embed import embed_cohort, embedding_kind
    from mmvae.retrieval.index import build_index
    from mmvae.runs.files import fingerprint
    from mmvae.runs.trained import load_cohort, load_trained
    from mmvae.train.loop import train_and_evaluate
    import json

    c = load_config(str(ROOT / "configs" / "tiny.py"))
    c.data.manifest = str(make_cohort(tmp / "data", cases, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0)))
    wd = tmp / "run"
    train_and_evaluate(c, wd, show_progress=False)
    config, spec, model, tok = load_trained(wd)
    stats = json.loads((wd / "clinical_stats.json").read_text())
    cohort, _, _ = load_cohort(config, wd, c.data.manifest, tokenizer=tok, clinical_stats=stats, show_progress=False)
    emb = embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec)}, show_progress=False,
                       embedding=embedding_kind(config))
    meta = [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]
    index = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind="flat", metric="cosine",
                        identity=dict(emb.identity))
    return wd, index.save(tmp / "index")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir")
    ap.add_argument("--index")
    ap.add_argument("--manifest", help="default: the run's data.manifest")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    import requests
    from common import load_average, machine, write_json
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.serve import free_port

    info = machine()
    info["load_average_start"] = load_average()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "experiments/benchmarks/bench_load.py"]
                                  + list(sys.argv[1:] if argv is None else argv)),
              "machine": info, "clients": a.clients, "seconds": a.seconds, "mix": dict(MIX)}
    print(f"machine: {info['cpu']}, {info['cores']} cores; load average {info['load_average_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=a.tmp) as tmp:
        tmp = Path(tmp)
        if a.workdir:
            wd, idx = Path(a.workdir), Path(a.index)
        else:
            t = time.perf_counter()
            wd, idx = train_tiny(tmp)
            print(f"set-up: tiny run trained and indexed in {time.perf_counter() - t:.0f}s", flush=True)
        from mmvae.runs.files import read_run_files
        manifest = a.manifest or read_run_files(wd)[0].data.manifest
        cases = [ce for ce in group_cases(read_manifest(manifest)) if len(ce.images) == 3 and ce.report_text]
        served_tmp = tmp / "server-tmp"
        served_tmp.mkdir()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mmvae.cli", "serve", "--workdir", str(wd), "--index", str(idx),
               "--manifest", str(manifest), "--port", str(port)]
        proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(served_tmp)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            t0 = time.perf_counter()
            while True:
                try:
                    ids = requests.get(url + "/api/cases", params={"limit": 100000}, timeout=2).json()["cases"]
                    break
                except requests.ConnectionError:
                    if proc.poll() is not None or time.perf_counter() - t0 > 180:
                        print(proc.stdout.read(), file=sys.stderr)
                        return 2
                    time.sleep(0.2)
            # warm-up: compile the encoder, fill the case views
            ce = cases[0]
            files = [(f"file_{m}", (Path(p[0]).name, Path(p[0]).read_bytes())) for m, p in ce.images.items()]
            requests.post(url + "/api/query/upload", files=files, data={"report": ce.report_text},
                          timeout=120).raise_for_status()
            requests.post(url + "/api/query", json={"case_id": ids[0]}, timeout=60).raise_for_status()
            uploads = [[(f"file_{m}", (Path(p[0]).name, Path(p[0]).read_bytes())) for m, p in c.images.items()]
                       + [("report", (None, c.report_text))] for c in cases]
            lat: dict[str, list[float]] = {k: [] for k, _ in MIX}
            errors: list[str] = []
            rss: list[tuple[float, float]] = []
            lock = threading.Lock()
            stop = time.perf_counter() + a.seconds

            def client(i: int) -> None:
                rng = random.Random(a.seed * 1000 + i)
                http = requests.Session()
                session, last = None, []
                while time.perf_counter() < stop:
                    kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
                    if kind == "feedback" and session is None:
                        kind = "case_query"
                    t = time.perf_counter()
                    try:
                        if kind == "case_query":
                            r = http.post(url + "/api/query", json={"case_id": rng.choice(ids)}, timeout=120)
                        elif kind == "feedback":
                            r = http.post(url + "/api/feedback", json={"session": session, "relevant": [last[1]],
                                                                        "nonrelevant": [last[0]]}, timeout=120)
                        else:
                            r = http.post(url + "/api/query/upload", files=rng.choice(uploads), timeout=120)
                        dt = time.perf_counter() - t
                        if r.status_code != 200:
                            raise RuntimeError(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
                        doc = r.json()
                        session, last = doc["session"], [x["case_id"] for x in doc["results"]]
                        with lock:
                            lat[kind].append(dt)
                    except Exception as e:      # noqa: BLE001 — counted and shown
                        with lock:
                            errors.append(str(e)[:300])

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
            t_start = time.perf_counter()
            rss.append((0.0, rss_mb(proc.pid)))
            for th in threads:
                th.start()
            while any(th.is_alive() for th in threads):
                time.sleep(1.0)
                rss.append((time.perf_counter() - t_start, rss_mb(proc.pid)))
            wall = time.perf_counter() - t_start
            left = [p.name for d in served_tmp.glob("mmvae-serve-*") for p in (d / "requests").iterdir()]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        left_after_stop = [p.name for p in served_tmp.iterdir()]

    def pct(v):
        v = np.asarray(v) * 1e3
        return {"n": int(v.size), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                "max_ms": float(v.max())} if v.size else {"n": 0}

    allv = [x for v in lat.values() for x in v]
    rss_v = [r for _, r in rss if r is not None]
    result.update({"latency": {k: pct(v) for k, v in lat.items()}, "overall": pct(allv),
                   "requests_per_s": len(allv) / wall, "errors": len(errors), "error_examples": errors[:5],
                   "server_rss_mb": {"start": rss_v[0], "end": rss_v[-1], "max": max(rss_v),
                                     "samples": [[round(t, 1), round(r, 1)] for t, r in rss if r is not None]},
                   "request_folders_left": left, "tmp_left_after_sigterm": left_after_stop,
                   "load_average_end": load_average()})
    for k, v in list(result["latency"].items()) + [("overall", result["overall"])]:
        if v["n"]:
            print(f"{k:>11}: n {v['n']:5d}  p50 {v['p50_ms']:7.1f} ms  p99 {v['p99_ms']:7.1f} ms  max {v['max_ms']:7.1f} ms")
    r = result["server_rss_mb"]
    print(f"{len(allv)} requests in {wall:.0f}s ({result['requests_per_s']:.1f}/s), errors {len(errors)}; server RSS "
          f"{r['start']:.0f} → {r['end']:.0f} MB (max {r['max']:.0f}); request folders left {len(left)}, "
          f"after SIGTERM {left_after_stop}")
    write_json(a.out, result)
    return 0 if not errors and not left and not left_after_stop else 1


if __name__ == "__main__":
    sys.exit(main())
