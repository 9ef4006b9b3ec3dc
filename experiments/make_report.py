"""Regenerate docs/results.md: the synthetic-cohort grid, the BraTS sample, targets, figures.

    python experiments/make_report.py [--out runs/report] [--docs docs/results.md]
        [--config configs/quickstart.py] [--seeds 0,1,2] [--fusions poe,moe,mopoe]
        [--baselines raw_pca,handcrafted,report_minilm,clip,supervised]
        [--brats ../shared/data/brats18-sample | --no-brats] [--brats-set KEY=VALUE ...]
        [--set KEY=VALUE ...]

1. Synthetic cohort (``--config``, its default generator and seed): the full-modality
   VAE for each fusion × seed plus the baselines, through the ablation grid
   (``mmvae.experiments.grid``; cells live under ``--out/synthetic`` and are reused
   when the command is rerun with the same settings, so an ablation run made with
   ``experiments/ablate_modalities.py --out RUNS/synthetic`` feeds the report too).
   Every query subset is evaluated on the held-out cases against the whole cohort.
   The issue's targets are checked and a miss is reported with its size.
2. Latent-space figures of the first fusion's seed-0 run (``visualize_latent.py``).
   With ``--hybrid`` (default) each VAE cell's hybrid rankings too (each leg alone, fused,
   fitted weights, simulated relevance feedback; :func:`mmvae.experiments.grid.hybrid_rows`),
   for the synthetic cohort, MedPix and BraTS.
3. BraTS sample (``--brats``; skipped with a reason when absent): a manifest with the
   ``grade`` label (grades.csv) and a ``tumour_volume`` tertile label computed from each
   case's ``*_seg`` (voxels with a tumour label × voxel volume); the VAE and the
   image baselines; six cases are too few to hold any out, so every case queries the
   other five (leave-one-out; labels are never used to train the VAE).

``docs/results.md`` and its figures (``docs/results/*.png``, ``docs/results/*.csv``) are
written atomically. Heavy by default (about 1.5 h on 2 CPU cores, most of it the nine
VAE runs); the test suite runs it on ``configs/tiny.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.errors import MmvaeError
from mmvae.experiments import grid as G
from mmvae.experiments import report as R
from mmvae.experiments.brats import brats_manifest

ROOT = Path(__file__).resolve().parents[1]

# BraTS defaults for a 2-core CPU: 6 mm voxels (32³ covers 192 mm), 300 steps, batch 4,
# two sampled subsets per step.
# configs/brats.py:sample=1 is the small CPU recipe (32³ at 6 mm, 300 steps, batch 4, no periodic
# evaluation or checkpoints); the report trains fewer ELBO subsets on top of it.
BRATS_DEFAULTS = ["objective.subsets=mvae", "objective.num_subset_samples=2"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", default="runs/report", help="grid folders (reused on rerun)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.py"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of --config")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fusions", default="poe,moe,mopoe")
    p.add_argument("--baselines", default="raw_pca,handcrafted,pretrained,report_minilm,report_tfidf,clip,supervised,"
                                          "logreg_tfidf,late_fusion",
                   help="late_fusion runs for the first seed only")
    p.add_argument("--semi", default="labels20,labels100",
                   help="semi-supervised objective variants run for the first fusion ('' for none)")
    p.add_argument("--ablation", default="singletons,drop-one",
                   help="training subsets of the heat maps, first fusion and seed ('' for none)")
    p.add_argument("--brats", default=str(ROOT.parent / "shared" / "data" / "brats18-sample"))
    p.add_argument("--no-brats", action="store_true")
    p.add_argument("--brats-config", default=str(ROOT / "configs" / "brats.py") + ":sample=1")
    p.add_argument("--brats-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the BraTS config (after the report's CPU defaults)")
    p.add_argument("--brats-baselines", default="raw_pca,handcrafted,pretrained")
    p.add_argument("--medpix", default=str(ROOT.parent / "shared" / "data" / "medpix-dev"))
    p.add_argument("--no-medpix", action="store_true")
    p.add_argument("--medpix-config", default=str(ROOT / "configs" / "medpix.py"))
    p.add_argument("--medpix-set", action="append", default=[], metavar="KEY=VALUE")
    # report_minilm needs the `text` extra (its cells fail, saying so, without it); on MedPix it is
    # the strongest report baseline (leave-one-out mAP@10 0.154 category / 0.640 location, seed-free).
    p.add_argument("--medpix-baselines", default="report_tfidf,report_minilm,raw_pca,handcrafted,pretrained")
    p.add_argument("--medpix-seeds", default="0,1,2")
    p.add_argument("--figures", default="pca,tsne", help="projections of the latent-space figures ('' for none)")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="skip diagnose_latent on the first seed's VAE cells")
    p.add_argument("--no-hybrid", dest="hybrid", action="store_false",
                   help="skip the VAE cells' hybrid rankings (legs, fused, fitted, feedback)")
    p.add_argument("--jobs", type=int, default=1)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- parts
def _cells(mods, fusions, seeds, baselines, ablation: str = "", semi: Sequence[str] = ()):
    """Full-modality VAE per fusion × seed, baselines per seed; late fusion (one unimodal
    VAE per modality, so as many runs as modalities) and the training-subset ablation
    (``ablation``, e.g. ``drop-one,singletons``) for the first fusion and seed only."""
    cells = G.build_cells(mods, [tuple(mods)], fusions, ["default"], seeds, [b for b in baselines if b != "late_fusion"])
    if semi:   # semi-supervised variants (label expert on a fraction of training cases), first fusion
        cells += G.build_cells(mods, [tuple(mods)], fusions[:1], list(semi), seeds, [])
    if ablation:
        cells += G.build_cells(mods, G.training_subsets(ablation, mods), fusions[:1], ["default"], seeds[:1], [])
    if "late_fusion" in baselines:
        cells += G.build_cells(mods, [], fusions, ["default"], seeds[:1], ["late_fusion"])
    return list(dict.fromkeys(cells))


def run_synthetic(args, log) -> dict:
    ctx = G.GridContext(args.config, list(args.set), Path(args.out) / "synthetic", "", hybrid=args.hybrid)
    base = ctx.base_config()
    ctx.label = str(base.data.label)
    mods = G.all_modalities(base)
    fusions = [f for f in args.fusions.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    baselines = [b for b in args.baselines.split(",") if b]
    semi = [v for v in args.semi.split(",") if v]
    cells = _cells(mods, fusions, seeds, baselines, args.ablation, semi)
    results = G.run_grid(ctx, cells, jobs=args.jobs, log=log)
    out = G.write_outputs(results, mods, ctx.out, "map@10", ctx.labels)
    return {"ctx": ctx, "modalities": mods, "fusions": fusions, "seeds": seeds, "results": results, **out,
            "cells": cells}


def run_diagnostics(syn: dict, log) -> list[tuple[str, str]]:
    """``diagnose_latent`` of the first seed's full-modality VAE of each objective variant."""
    from mmvae.experiments.diagnose import diagnose, markdown
    out = []
    for cell in syn["cells"]:
        if cell.method != "vae" or cell.seed != syn["seeds"][0] or cell.fusion != syn["fusions"][0]:
            continue
        if tuple(cell.train_subset) != tuple(syn["modalities"]):
            continue
        res = next((r for r in syn["results"] if r["cell"] == cell.id), None)
        if res is None or res["status"] != "ok":
            continue
        log(f"diagnostics: {cell.id}")
        d = diagnose(syn["ctx"].cell_dir(cell))
        out.append((cell.objective, markdown(d), d))
    return out


def diagnosis_sentence(d: dict) -> str:
    """What one run's diagnostics say, in words (numbers from ``diagnose_latent.diagnose``)."""
    fused, probe = d["retrieval"]["all"], d["probe"]["fused"]
    parts = [f"the fused posterior's 5-fold probe reaches {probe['accuracy']:.2f} accuracy (majority class "
             f"{probe['majority']:.2f}) while its held-out mAP@{d['k']} is {fused['map']:.3f} (chance "
             f"{d['chance_map']:.3f})"]
    ex, exn = d["retrieval"].get("experts"), d["retrieval"].get("experts_no_clinical")
    if ex and exn and ex["map"] is not None:
        parts.append(f"the experts' means concatenated instead of multiplied retrieve at {ex['map']:.3f} "
                     f"({exn['map']:.3f} without the clinical expert)")
    lc = d.get("lesion_contrast")
    if lc:
        slopes = ", ".join(f"{m} {v['slope']:.3f}" for m, v in lc.items())
        parts.append(f"the reconstruction keeps a fraction {slopes} of the input's lesion-minus-white-matter "
                     "contrast (slope; 1 = all of it), i.e. the decoder does not draw the lesion")
    if d.get("clinical_variance_explained") is not None:
        parts.append(f"the clinical fields explain {100 * d['clinical_variance_explained']:.0f} % of the latent variance")
    return "; ".join(parts) + "."


def run_figures(args, syn: dict, assets: Path, log) -> list[Path]:
    if not args.figures:
        return []
    first = next((c for c in syn["cells"] if c.method == "vae"), None)
    res = next((r for r in syn["results"] if first and r["cell"] == first.id), None)
    if res is None or res["status"] != "ok":
        log("figures: no finished VAE cell; skipped")
        return []
    from mmvae.experiments.latent_figures import run as visualize
    fig_dir = syn["ctx"].cell_dir(first) / "figures"
    try:
        visualize(syn["ctx"].cell_dir(first), fig_dir, methods=args.figures, cases=3)
    except MmvaeError as e:
        raise MmvaeError(f"visualize_latent failed on {syn['ctx'].cell_dir(first)}: {e}") from e
    wanted = [f"projection_{m}.png" for m in args.figures.split(",")] + ["posteriors.png", "trajectory.png"]
    wanted += sorted(p.name for p in fig_dir.glob("generation_*.png"))[:1]
    out = []
    for name in wanted:
        if (fig_dir / name).exists():
            out.append(_copy(fig_dir / name, assets / f"synthetic_{name}"))
    return out


def medpix_manifest(root: Path, path: Path) -> Path:
    from mmvae.data.manifest import write_manifest
    from mmvae.data.scan import scan_folder
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(scan_folder(root, layout="keyimages"), path)
    return path


def run_medpix(args, log) -> dict | None:
    """MedPix-style key images + reports: the VAE (no labels) and the baselines, leave-one-out,
    labels ``category`` and ``location``."""
    root = Path(args.medpix)
    if args.no_medpix:
        return {"skipped": "--no-medpix given"}
    if not (root / "labels.csv").exists():
        return {"skipped": f"MedPix sample not found at {root}"}
    out = Path(args.out) / "medpix"
    manifest = medpix_manifest(root, out / "manifest.jsonl")
    overrides = [f"data.manifest={manifest}"] + list(args.medpix_set)
    ctx = G.GridContext(args.medpix_config, overrides, out, "category,location", k=10, queries="all",
                        hybrid=args.hybrid)
    mods = G.all_modalities(ctx.base_config())
    baselines = [b for b in args.medpix_baselines.split(",") if b]
    cells = _cells(mods, ["poe"], [int(s) for s in args.medpix_seeds.split(",") if s], baselines)
    results = G.run_grid(ctx, cells, jobs=1, log=log)
    res = G.write_outputs(results, mods, out, "map@10", ctx.labels)
    vae_dirs = [ctx.cell_dir(c) for c in cells if c.method == "vae"
                and (ctx.cell_dir(c) / "embeddings.npz").exists()]
    return {"ctx": ctx, "modalities": mods, "results": results, "overrides": overrides[1:],
            "own": medpix_own_modalities(vae_dirs, manifest, ctx.labels, int(ctx.k)), **res}


def medpix_own_modalities(vae_dirs: Sequence[Path], manifest: Path, labels: Sequence[str], k: int) -> list[dict]:
    """The query a radiologist makes: every case with the image sequences it has (and its
    report), not only the cases that have all of a subset's modalities — mAP@k of the VAE
    cells (mean ± sd over seeds) and of the TF-IDF report baseline on the same queries
    (fitted on every report, as the ``report_tfidf`` cells are). One row per label × query."""
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.experiments.baselines import tfidf_vectors
    from mmvae.retrieval.evaluate import chance_map, evaluate
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.metrics import retrieval_metrics
    if not vae_dirs:
        return []
    embs = [Embeddings.load(Path(d) / "embeddings.npz") for d in vae_dirs]
    ids, mods = embs[0].case_ids, list(embs[0].modalities)
    if "report" not in mods:
        return []
    cases = {c.case_id: c for c in group_cases(read_manifest(manifest), None)}
    reports = [cases[c].read_report() if c in cases else None for c in ids]
    tf = np.asarray(tfidf_vectors(reports, np.arange(len(ids)))[1].todense(), np.float32)
    img = np.asarray([m not in ("report", "clinical") for m in mods], np.float32)
    rep = np.asarray([m == "report" for m in mods], np.float32)
    present = embs[0].present
    rows = []
    for label in labels:
        lab = np.asarray([x.get(label, "") for x in embs[0].labels], dtype=object)
        for name, subset in (("images", img), ("images + report", img + rep)):
            ok = (present[:, img > 0].sum(1) > 0) & (lab != "")
            if subset @ rep > 0:
                ok &= present[:, rep > 0].sum(1) > 0
            q = np.nonzero(ok)[0]
            if not len(q):
                continue
            per_seed = []
            for e in embs:
                if e.case_ids != ids:
                    raise MmvaeError(f"MedPix cells embed different cases: {vae_dirs[0]} vs another cell")
                r = evaluate(e, label, k, query_idx=q, subsets=[subset], own=True)[0]
                per_seed.append((r[f"map@{k}"], r[f"map@{k}_lo"], r[f"map@{k}_hi"]))
            t = retrieval_metrics(tf[q], tf, lab[q], lab, k, exclude=q)
            n_q = int(t["num_queries"])          # a query whose label no other case has does not count
            t = t[f"map@{k}"]
            v = np.asarray([x[0] for x in per_seed])
            rows.append({"label": label, "query": name, "num_queries": n_q, "chance": chance_map(lab, q, k),
                         "mean": float(v.mean()),
                         "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "seed_cis": [x[1:] for x in per_seed],
                         "tfidf": tuple(float(x) for x in t)})
    return rows


def run_brats(args, log) -> dict | None:
    root = Path(args.brats)
    if args.no_brats:
        return {"skipped": "--no-brats given"}
    if not (root / "grades.csv").exists():
        return {"skipped": f"BraTS sample not found at {root}"}
    out = Path(args.out) / "brats"
    manifest, info = brats_manifest(root, out / "manifest.jsonl")
    overrides = [f"data.manifest={manifest}"] + BRATS_DEFAULTS + list(args.brats_set)
    effective = {o.split("=", 1)[0]: o for o in overrides[1:]}          # the last setting of a key wins
    ctx = G.GridContext(args.brats_config, overrides, out, "grade,tumour_volume", k=5, queries="all",
                        hybrid=args.hybrid)
    mods = G.all_modalities(ctx.base_config())
    baselines = [b for b in args.brats_baselines.split(",") if b]
    cells = _cells(mods, ["poe"], [0], baselines)
    results = G.run_grid(ctx, cells, jobs=1, log=log)
    res = G.write_outputs(results, mods, out, "map@5", ctx.labels)
    return {"ctx": ctx, "modalities": mods, "results": results, "cases": info, "overrides": list(effective.values()),
            **res}


def medpix_chance(ctx) -> tuple[dict[str, float], int]:
    """Chance mAP@k of each label under leave-one-out (random rankings), and the number of cases."""
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.retrieval.evaluate import chance_map
    cfg = ctx.base_config()
    cases = group_cases(read_manifest(cfg.data.manifest), None)
    out = {}
    for label in ctx.labels:
        labels = [c.labels.get(label, "") for c in cases]
        out[label] = chance_map(labels, list(range(len(labels))), int(ctx.k))
    return out, len(cases)


# --------------------------------------------------------------------------- rendering
def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return dst


def _machine() -> str:
    return R.machine_line()


def _cost_table(results) -> str:
    groups: dict[str, list[float]] = {}
    for r in results:
        if r["status"] == "ok":
            name = G.method_label(r)
            groups.setdefault(name.rsplit(" [", 1)[0], []).append(float(r.get("seconds", 0.0)))
    lines = ["| method | cells | median seconds per cell (train + embed + evaluate) |", "|---|---:|---:|"]
    lines += [f"| {k} | {len(v)} | {np.median(v):.0f} |" for k, v in groups.items()]
    return "\n".join(lines) + "\n"


def hybrid_section(part: dict, protocol: str) -> str:
    """The hybrid rankings of the full-modality VAE cells with the default objective (one table
    per label and fusion; ``--hybrid``), or nothing when they were not evaluated."""
    full = "+".join(part["modalities"])
    rows = [s for s in part.get("hybrid_summary", []) if s["method"] == "vae" and s["objective"] == "default"
            and s["train_subset"] == full]
    if not rows:
        return ""
    return ("### Hybrid rankings\n\nThe same VAE cells as an index with one leg per expert block (and BM25 on the "
            "report's words): each leg alone, fused with uniform weights, RRF and fitted weights, and the "
            "simulated-feedback protocol (3 marks per round by the hidden label; Rocchio alone, Rocchio + the leg "
            "weights a round teaches), next to chance. " + protocol + " `mmvae.retrieval.hybrid.evaluate`; every "
            "cell's rows in `hybrid.csv` of the grid folder.\n" + G.hybrid_markdown(rows) + "\n")


def _rel(path: Path, docs: Path) -> str:
    return path.resolve().relative_to(docs.parent.resolve()).as_posix()


def render(args, syn: dict, figs: list[Path], brats: dict | None, assets: Path, docs: Path,
           medpix: dict | None = None, diags: Sequence[tuple[str, str, dict]] = ()) -> str:
    mods = syn["modalities"]
    full = "+".join(mods)
    summary = syn["summary"]
    targets = R.check_targets(summary, mods, fusion=syn["fusions"][0])
    singles = [m for m in mods]
    images = [m for m in mods if m not in ("report", "clinical")]
    compact = singles + ["+".join(images), "+".join(images + ["report"]), full]
    compact = list(dict.fromkeys(q for q in compact if any(s["query"] == q for s in summary)))
    n_fail = sum(r["status"] != "ok" for r in syn["results"])
    k = syn["ctx"].k
    L = []
    L.append("# Results\n")
    L.append("_Generated by `python experiments/make_report.py` "
             f"({datetime.date.today().isoformat()}; {_machine()}). Do not edit by hand: rerun the script._\n")
    L.append("## Synthetic cohort\n")
    L.append(f"Config `{Path(args.config).name}`{' with ' + ', '.join(args.set) if args.set else ''}: "
             f"modalities {', '.join(mods)}; label `{syn['ctx'].labels[0]}`; seeds {', '.join(map(str, syn['seeds']))}. "
             "Each VAE cell trains the config's short run on all modalities, embeds the cohort, and is "
             "queried with every non-empty modality subset. Queries are the held-out cases of the "
             "training split; the database is the whole cohort minus the query. Metric: mAP@10 "
             f"(mean ± sd over seeds; {len(syn['results'])} cells, {n_fail} failed). "
             f"Full tidy results with 95% bootstrap CIs and all four metrics: "
             f"[`results/synthetic_results.csv`](results/synthetic_results.csv).\n")
    if len(syn["seeds"]) == 1:
        L.append("**One seed only** in this regeneration (session time): no between-seed spread is shown and "
                 "the 95% CIs in the CSV are the only uncertainty (±0.05–0.12 on mAP@10 with 60 queries). The "
                 "issue's targets are defined over 3 seeds: `python experiments/make_report.py --seeds 0,1,2`.\n")
    L.append("Baselines, on the same split and metric (`mmvae/experiments/baselines.py`): `raw_pca` — PCA "
             "of the downsampled preprocessed volumes; `handcrafted` — per-sequence intensity histogram and "
             "texture statistics inside the foreground; `pretrained` — zero-shot frozen ImageNet EfficientNet-Lite0 "
             "features of each sequence (2.5-D for volumes) + all-MiniLM-L6-v2 on the report, each block "
             "standardised, nothing trained (docs/model.md); `report_minilm` — mean-pooled all-MiniLM-L6-v2 "
             "embedding of the report; `clip` — CLIP-style InfoNCE image and report encoders, no VAE; "
             "`supervised` — penultimate layer of a classifier trained on the training cases' labels (an "
             "upper reference: it sees labels, the unsupervised VAEs do not); `report_tfidf` — TF-IDF of the "
             "report (keyword search); `logreg_tfidf` — class probabilities of a logistic regression on "
             "hand-crafted features + report TF-IDF (a shallow supervised reference); `late_fusion` — one VAE per modality, "
             "L2-normalised posterior means concatenated (first seed only: one run per modality). A "
             "baseline's full query uses every modality it has.\n")
    kind = G.embedding_kind(G.load_config(args.config, list(args.set)))
    L.append(f"The VAE rows retrieve with `retrieval.embedding={kind}`: "
             + ("each case is the concatenation of its experts' standardised means, and a query is compared with "
                "the cases on the blocks of the modalities it has (`mmvae/retrieval/embed.py`); the fused-posterior "
                "alternative is compared in docs/model.md (Retrieval vectors)." if kind == "experts" else
                "each case is its fused posterior mean, standardised (`mmvae/retrieval/embed.py`).") + "\n")
    L.append("### Targets\n")
    L.append(R.targets_table(targets))
    missed = [t for t in targets if t.met is False]
    if missed:
        L.append(f"{len(missed)} of {len(targets)} targets are missed, by the gaps listed. The generator was not "
                 "tuned to pass them.\n")
    if diags:
        L.append("### Diagnostics (first seed, `experiments/diagnose_latent.py`)\n")
        L.append("Is the class signal in the latent? Held-out retrieval of the fused posterior and of each "
                 "expert alone, a 5-fold logistic-regression probe of the whole cohort's embeddings (for the "
                 "semi-supervised variants the training cases' embeddings were trained with their labels, so "
                 "their probe is optimistic; the held-out mAP is not), the share of latent variance the "
                 "clinical fields explain, and whether the decoder reproduces the lesion contrast.\n")
        for objective, md, d in diags:
            L.append(f"#### Objective `{objective}`\n")
            L.append("In words: " + diagnosis_sentence(d) + "\n")
            L.append(md)
    L.append("### Fusion\n")
    L.append(R.fusion_table(summary, mods, syn["fusions"]))
    L.append("### Methods × main query subsets\n")
    L.append(G.markdown(summary, compact, f"map@{k}"))
    queries = [q for q in ("+".join(s) for s in G.nonempty_subsets(mods)) if any(s["query"] == q for s in summary)]
    L.append("<details><summary>Every query subset</summary>\n\n" + G.markdown(summary, queries, f"map@{k}")
             + "\n</details>\n")
    L.append(hybrid_section(syn, "Queries as above; the database is every case that carries the label (here all); "
                                 "fitted weights fitted on the training split's cases only (never on a held-out query)."))
    heat = [h for h in syn["heatmaps"]]
    if heat:
        L.append("### Heat maps (training subset × query subset)\n")
        L.append("mAP@10 of a VAE trained on the row's modalities and queried with the column's (mean over the "
                 "seeds run: the full-modality row has every seed, the ablation rows the first seed only). "
                 "Read a column down to see what training on more modalities does for that query; a row "
                 "across to see which query subsets a model answers.\n")
        for h in heat:
            dst = _copy(h, assets / f"synthetic_{h.name}")
            L.append(f"![{h.stem}]({_rel(dst, docs)})\n")
    L.append("### Cost\n")
    L.append(_cost_table(syn["results"]))
    failed = [r for r in syn["results"] if r["status"] != "ok"]
    if failed:
        L.append("### Failed cells\n")
        L.append("\n".join(f"- `{r['cell']}`: {r.get('error', '')}" for r in failed) + "\n")
    if figs:
        L.append("### Latent space (first fusion, seed 0)\n")
        L.append("Projections of the fused posterior means (colour: label, marker: modalities present), unimodal "
                 "and joint posteriors with 1-σ ellipses, the trajectory of one case as modalities are added, "
                 "and a cross-modal generation grid (middle axial slices). The HTML page with every figure: "
                 "`experiments/visualize_latent.py --workdir <cell dir>`.\n")
        for f in figs:
            L.append(f"![{f.stem}]({_rel(f, docs)})\n")
    L.append("## BraTS 2018 sample\n")
    if brats is None or "skipped" in brats:
        L.append(f"Skipped: {brats['skipped'] if brats else 'not run'}.\n")
    else:
        L.append("Six BraTS 2018 training cases (4 HGG, 2 LGG) from `../shared/data/brats18-sample` "
                 "(data: Menze et al. 2015, Bakas et al. 2017/2018; sample via koriavinash1/DeepBrainSeg). "
                 "Labels: `grade` (grades.csv) and `tumour_volume` — tertiles of the tumour volume from the "
                 "segmentation (non-zero labels × voxel volume). Config "
                 f"`{Path(args.brats_config.split(':', 1)[0]).name}"
                 f"{':' + args.brats_config.split(':', 1)[1] if ':' in args.brats_config else ''}` with "
                 f"{', '.join('`' + o + '`' for o in brats['overrides'])}. Six cases are too few to hold "
                 "out: every case queries the other five (leave-one-out); the VAE never sees labels, the "
                 "image baselines are fitted on all six. Metric: mAP@5 (the whole ranking of five). With "
                 "so few queries the CIs are wide; read these as a smoke test of the real-data path, not as "
                 "evidence.\n")
        L.append("| case | grade | tumour (mL) | tertile |\n|---|---|---:|---|")
        L.append("\n".join(f"| {c} | {v['grade']} | {v['tumour_ml']} | {v['tumour_volume']} |"
                           for c, v in brats["cases"].items()) + "\n")
        L.append(brats["markdown"].read_text())
        L.append(hybrid_section(brats, "Leave-one-out; fitted weights by cross-validation over the six cases."))
        L.append(_cost_table(brats["results"]))
    L.append("## MedPix key images + reports\n")
    if medpix is None or "skipped" in medpix:
        L.append(f"Skipped: {medpix['skipped'] if medpix else 'not run'}.\n")
    else:
        n_cases = medpix.get("num_cases", 0)
        L.append(f"{n_cases} MR teaching cases from MedPix 2.0 (`../shared/data/medpix-dev`; U.S. National Library of "
                 "Medicine; Siragusa et al., MedPix 2.0, Data Science and Engineering 2025): 2-D key images per "
                 "sequence (T1, T1c, T2, FLAIR; each image's foreground resized whole to the model's field of "
                 "view, `data.crop='fit'`), the report text (history and findings) and age/sex. Labels "
                 "`category` (e.g. 'Neoplasm, glial', 'Vascular') and `location` (body region). Config "
                 f"`configs/medpix.py`{' with ' + ', '.join(medpix['overrides']) if medpix['overrides'] else ''}; "
                 f"the VAE never sees labels. Every case queries the other {n_cases - 1} (leave-one-out), with the modalities "
                 "of the query subset it has; metric mAP@10 (mean ± sd over seeds). Chance (random ranking, same "
                 "protocol): " + ", ".join(f"`{k}` {v:.3f}" for k, v in medpix.get("chance", {}).items()) + ".\n")
        mods = medpix["modalities"]
        images = [m for m in mods if m not in ("report", "clinical")]
        compact = mods + ["+".join(images), "+".join(images + ["report"]), "+".join(mods)]
        rows = G.tidy_rows(medpix["results"], default_label=medpix["ctx"].labels[0])
        for label in medpix["ctx"].labels:
            s_label = G.summarise(rows, "map@10", label)
            queries = [q for q in dict.fromkeys(compact) if any(s["query"] == q for s in s_label)]
            L.append(f"### Label `{label}` (chance {medpix.get('chance', {}).get(label, float('nan')):.3f})\n")
            L.append(G.markdown(s_label, queries, "map@10", show_queries=True))
        L.append("`n` = queries (cases with a label and every modality of the column): few cases have all four "
                 "sequences, so the multi-sequence columns rest on a handful of queries. "
                 "Every query subset, with 95% CIs: [`results/medpix_results.csv`](results/medpix_results.csv).\n")
        own = medpix.get("own") or []
        if own:
            L.append("### Each case queried with the modalities it has\n")
            L.append("The columns above count only the cases that have every modality of the column. A radiologist's "
                     "query is a case with whatever sequences it has: here every labelled case (whose label another "
                     "case shares) queries with all its "
                     "image sequences (and its report), and TF-IDF on the report alone is scored on the same queries "
                     f"(mAP@{int(medpix['ctx'].k)}; VAE mean ± sd over seeds, each seed's 95% bootstrap CI).\n")
            L.append("| label | query (each case's own) | n | VAE | VAE per-seed 95% CI | TF-IDF report, same queries "
                     "[95% CI] | chance, same queries |\n|---|---|---:|---:|---|---:|---:|")
            for r in own:
                t = r["tfidf"]
                cis = ", ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in r["seed_cis"])
                L.append(f"| `{r['label']}` | {r['query']} | {r['num_queries']} | {r['mean']:.3f} ± {r['sd']:.3f} | "
                         f"{cis} | {t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] | {r['chance']:.3f} |")
            L.append("")
            for r in own:
                if r["query"] != "images + report":
                    continue
                gap = r["mean"] - r["tfidf"][0]
                L.append(f"- MedPix target, `{r['label']}`: image + text queries above TF-IDF on the report — "
                         + ("met" if gap > 0 else f"**missed** by {-gap:.3f}") + f" ({r['mean']:.3f} vs "
                         f"{r['tfidf'][0]:.3f}, {r['num_queries']} queries).")
            for r in own:
                if r["query"] != "images":
                    continue
                ch = r["chance"]
                lo = min(c[0] for c in r["seed_cis"])
                L.append(f"- MedPix target, `{r['label']}`: image-only queries above chance — "
                         + ("met (every seed's CI above chance)" if lo > ch else "**missed** (a seed's CI reaches chance)")
                         + f" ({r['mean']:.3f} vs chance {ch:.3f}).")
            L.append("")
        L.append(hybrid_section(medpix, "Leave-one-out; fitted weights by 5-fold cross-validation (never fitted on "
                                        "the query)."))
        L.append(_cost_table(medpix["results"]))
    L.append("## Reproduce\n")
    L.append("```\npython experiments/make_report.py --out runs/report\n```\n"
             "Cells finished before are reused (same folder, same settings). A wider ablation (drop-one, "
             "singletons, objective variants) runs with `experiments/ablate_modalities.py`.\n")
    return "\n".join(L)


def main(argv=None) -> int:
    args = parse(argv)
    log = print
    docs = Path(args.docs)
    assets = docs.parent / "results"
    try:
        syn = run_synthetic(args, log)
        _copy(syn["csv"], assets / "synthetic_results.csv")
        figs = run_figures(args, syn, assets, log)
        diags = run_diagnostics(syn, log) if args.diagnostics else []
        brats = run_brats(args, log)
        if brats and "csv" in brats:
            _copy(brats["csv"], assets / "brats_results.csv")
        medpix = run_medpix(args, log)
        if medpix and "csv" in medpix:
            _copy(medpix["csv"], assets / "medpix_results.csv")
            medpix["chance"], medpix["num_cases"] = medpix_chance(medpix["ctx"])
        text = render(args, syn, figs, brats, assets, docs, medpix, diags)
    except MmvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if docs.exists():        # sections other scripts own (experiments/active_learning.py) are kept
        for title in ("Active learning", "Uncertainty"):
            body = R.extract_section(docs.read_text(), title)
            if body:
                text = R.replace_section(text, title, body)
    atomic_write_text(docs, text)
    print(f"wrote {docs} ({len(text)} characters, {len(figs)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
