"""Real cohorts with pretrained foundations: which retrieval vectors serve each cohort.

    python experiments/real_cohorts.py [--out runs/real] [--seeds 0,1,2]
        [--cohorts medpix-dev,medpix-ct-dev,brats] [--data ../shared/data]
        [--docs docs/results.md] [--csv docs/results/real_cohorts.csv]

For each cohort the cohort's recipe (``configs/medpix.py`` for the MR and CT key-image
cohorts, ``configs/brats.py`` for the BraTS volumes, with its small CPU settings) trains one
VAE per seed; every case is embedded once and evaluated under each kind of retrieval vector
(``retrieval.embedding``: ``experts``, ``fused``, ``features``, ``experts+features``;
:mod:`mmvae.retrieval.embed`), next to baselines on the same queries: the zero-shot
``pretrained`` baseline (frozen EfficientNet-Lite0 image features + all-MiniLM-L6-v2,
:func:`mmvae.experiments.baselines.pretrained`), TF-IDF and MiniLM on the report, and the
BraTS image baselines. Protocol: leave-one-out mAP@k, each case queried with the modalities
of the query it has (``evaluate(own=True)``; MedPix ``images``, ``report``,
``images + report``; BraTS every sequence), relevance = same label; chance on the same queries.
No label reaches training. Nothing here is tuned to these cohorts: the recipes are the
configs' defaults (see docs/model.md for how the defaults were chosen).

Writes a markdown section between ``<!-- real-cohorts:begin -->`` and
``<!-- real-cohorts:end -->`` of ``--docs`` (appended when absent) and the long-format CSV.
About 15 min on 2 CPU cores for the three cohorts × 3 seeds (feature extraction cached in
``--out``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import logging
import time
from pathlib import Path

import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.config import load_config
from mmvae.data.manifest import write_manifest
from mmvae.data.scan import scan_folder
from mmvae.data.text import find_minilm_dir
from mmvae.experiments import baselines as B
from mmvae.experiments.brats import brats_manifest
from mmvae.experiments.report import splice_section
from mmvae.retrieval.embed import EMBEDDINGS, embed_cohort
from mmvae.retrieval.evaluate import chance_map, evaluate
from mmvae.runs.trained import load_cohort, load_trained
from mmvae.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("real_cohorts")
BEGIN, END = "<!-- real-cohorts:begin -->", "<!-- real-cohorts:end -->"


def cohorts(data: Path) -> dict[str, dict]:
    """name → how to build its manifest, its recipe, labels, k and query subsets."""
    return {
        "medpix-dev": dict(root=data / "medpix-dev", layout="keyimages", k=10, labels=("location", "category"),
                           config=str(ROOT / "configs" / "medpix.py"), overrides=["data.on_error=skip"]),
        "medpix-ct-dev": dict(root=data / "medpix-ct-dev", layout="keyimages", k=10,
                              labels=("location", "category"),
                              config=str(ROOT / "configs" / "medpix.py") + ":sequences=ct+ctc",
                              # 3 of its reports are empty, as real exports are: dropped with a note
                              overrides=["data.on_error=skip"]),
        "brats": dict(root=data / "brats18-sample", layout="brats", k=5, labels=("grade", "tumour_volume"),
                      config=str(ROOT / "configs" / "brats.py") + ":sample=1", overrides=[]),
    }


def manifest(name: str, spec: dict, out: Path) -> Path:
    path = out / name / "manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec["layout"] == "brats":
        return brats_manifest(spec["root"], path)[0]      # the grade + tumour-volume tertile labels
    write_manifest(scan_folder(spec["root"], layout=spec["layout"]), path)
    return path


def queries(modalities) -> list[tuple[str, np.ndarray]]:
    img = np.asarray([m not in ("report", "clinical") for m in modalities], np.float32)
    rep = np.asarray([m == "report" for m in modalities], np.float32)
    if rep.sum() == 0:
        return [("all sequences", img)]
    if img.sum() == 0:
        return [("report", rep)]
    return [("images", img), ("report", rep), ("images + report", img + rep)]


def run_cohort(name: str, spec: dict, out: Path, seeds: list[int]) -> list[dict]:
    """Long rows ``{cohort, method, label, query, seed, map, n, chance}``."""
    man = manifest(name, spec, out)
    cache = out / name / "cache"
    rows: list[dict] = []
    cohort = None
    for seed in seeds:
        cfg = load_config(spec["config"], [f"data.manifest={man}", f"data.cache_dir={cache}", f"seed={seed}"]
                          + spec["overrides"])
        wd = out / name / f"vae-seed{seed}"
        t0 = time.time()
        if not (wd / "real_cohorts.done").exists():
            train_and_evaluate(cfg, wd, show_progress=False)
            (wd / "real_cohorts.done").write_text("trained\n")
        log.info("%s seed %d: trained in %.0f s", name, seed, time.time() - t0)
        config_t, spec_m, model, tok = load_trained(wd)
        cohort, _, _ = load_cohort(config_t, wd, str(man), tokenizer=tok, show_progress=False, features=True)
        base = embed_cohort(model, cohort, show_progress=False, standardize=False, embedding="experts")
        for kind in EMBEDDINGS:
            if "features" in kind and base.frozen is None:
                continue
            emb = base.as_embedding(kind).standardized()
            rows += _eval(emb, name, f"VAE, {kind} vectors", spec, seed)
    # baselines (nothing trained on labels; the same queries)
    names = ["pretrained"] + (["report_minilm"] if find_minilm_dir() else []) + ["report_tfidf"]
    if spec["layout"] == "brats":
        names = ["pretrained", "raw_pca", "handcrafted"]
    all_rows = np.arange(len(cohort))
    for b in names:
        if b == "report_minilm":
            emb = B.report_minilm(cohort)
        elif b == "report_tfidf":
            emb = B.report_tfidf(cohort, all_rows)
        elif b == "pretrained":
            emb = B.pretrained(cohort, all_rows)
        elif b == "raw_pca":
            emb = B.raw_intensity_pca(cohort, all_rows, dim=min(64, len(cohort) - 1))
        else:
            emb = B.handcrafted_features(cohort, all_rows)
        rows += _eval(emb, name, f"baseline {b}", spec, None)
    return rows


def _eval(emb, cohort: str, method: str, spec: dict, seed) -> list[dict]:
    out = []
    mods = list(emb.modalities)
    for label in spec["labels"]:
        lab = np.asarray([x.get(label, "") for x in emb.labels], dtype=object)
        for qname, s in queries(mods):        # a report-only baseline answers the report query only
            r = evaluate(emb, label, spec["k"], subsets=[s], own=True, n_boot=0, seed=seed or 0)[0]
            if not r["num_queries"]:
                continue
            has = np.nonzero((emb.present[:, s > 0].sum(1) > 0) & (lab != ""))[0]
            out.append({"cohort": cohort, "method": method, "label": label, "query": qname,
                        "seed": "" if seed is None else seed, "k": spec["k"],
                        "map": r[f"map@{spec['k']}"], "n": r["num_queries"],
                        "chance": chance_map(lab, has, spec["k"])})
    return out


def render(rows: list[dict], seeds, elapsed: float) -> str:
    L = [BEGIN, "", "## Real cohorts: pretrained foundations and the retrieval vectors", "",
         f"Generated by `python experiments/real_cohorts.py` on {datetime.date.today()} "
         f"(seeds {','.join(map(str, seeds))}; {elapsed / 60:.0f} min on this machine). Leave-one-out mAP@k, "
         "each case queried with the modalities of the query it has; VAE rows mean ± sd over seeds; "
         "baselines fit nothing on labels and are seed-free. `pretrained` is the zero-shot baseline "
         "(frozen ImageNet EfficientNet-Lite0 features of each sequence + all-MiniLM-L6-v2 on the report, "
         "each block standardised). Data: MedPix 2.0 (Siragusa et al. 2025, U.S. NLM teaching files), "
         "BraTS 2018 (Menze et al. 2015; Bakas et al. 2017/2018).", ""]
    for cohort in dict.fromkeys(r["cohort"] for r in rows):
        rs = [r for r in rows if r["cohort"] == cohort]
        k = rs[0]["k"]
        cols = list(dict.fromkeys((r["label"], r["query"]) for r in rs))
        L.append(f"### {cohort} (mAP@{k})")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab}: {q}" for lab, q in cols) + " |")
        L.append("|---|" + "---:|" * len(cols))
        for method in dict.fromkeys(r["method"] for r in rs):
            cells = []
            for lab, q in cols:
                v = [r["map"] for r in rs if r["method"] == method and r["label"] == lab and r["query"] == q]
                if not v:
                    cells.append("–")
                elif len(v) > 1:
                    cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}")
                else:
                    cells.append(f"{v[0]:.3f}")
            L.append(f"| {method} | " + " | ".join(cells) + " |")
        ch = []
        for lab, q in cols:
            x = [r for r in rs if r["label"] == lab and r["query"] == q and r["method"].startswith("VAE")]
            ch.append(f"{x[0]['chance']:.3f} (n={x[0]['n']})" if x else "–")
        L.append("| chance (queries) | " + " | ".join(ch) + " |")
        L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cohorts", default="medpix-dev,medpix-ct-dev,brats")
    p.add_argument("--docs", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--csv", default=str(ROOT / "docs" / "results" / "real_cohorts.csv"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mmvae", "absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    out = Path(a.out)
    t0 = time.time()
    rows = []
    for name, spec in cohorts(Path(a.data)).items():
        if name not in a.cohorts.split(","):
            continue
        if not spec["root"].exists():
            log.warning("%s: not found at %s, skipped", name, spec["root"])
            continue
        rows += run_cohort(name, spec, out, seeds)
        log.info("%s done (%.0f s so far)", name, time.time() - t0)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["cohort", "method", "label", "query", "seed", "k", "map", "n", "chance"])
    w.writeheader()
    w.writerows(rows)
    Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.csv, buf.getvalue())
    section = render(rows, seeds, time.time() - t0)
    print(section)
    if a.docs:
        splice_section(Path(a.docs), section, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
