"""The end-to-end quickstart: synth → preprocess → train → embed → index → evaluate.

Everything runs offline on the synthetic cohort; results land in the work dir:
``retrieval.csv`` and ``retrieval.md`` (mAP@10, P@10, R@10, nDCG@10 with 95% bootstrap
CIs for every non-empty query subset), ``embeddings.npz`` and ``index/``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mmvae.atomic import atomic_write_text
from mmvae.config import describe_text
from mmvae.data.synth import make_cohort
from mmvae.errors import ConfigError
from mmvae.progress import progress_bar
from mmvae.retrieval.evaluate import chance_map
from mmvae.retrieval.pipeline import embed_run, evaluate_embeddings, index_embeddings, write_tables
from mmvae.train.loop import train_and_evaluate


def synthesize(config, out_dir: Path, *, show_progress: bool = True) -> Path:
    """Write the config's synthetic cohort into ``out_dir`` unless the same one is there."""
    s, d = config.synth, config.data
    params = {"cases": int(s.cases), "seed": int(s.seed), "shape": list(d.shape), "spacing": list(d.spacing),
              "modalities": list(d.image_modalities), "missing_prob": float(s.missing_prob),
              "report_missing_prob": float(s.report_missing_prob), "spatial_dims": int(d.spatial_dims)}
    stamp = out_dir / "synth_params.json"
    manifest = out_dir / "manifest.jsonl"
    if manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return manifest
    bar = progress_bar(range(params["cases"]), total=params["cases"], desc="synth", enable=show_progress)
    done = [0]

    def tick(n):
        if hasattr(bar, "update"):
            bar.update(n - done[0])
        done[0] = n

    manifest = make_cohort(out_dir, params["cases"], seed=params["seed"], shape=tuple(params["shape"]),
                           spacing=tuple(params["spacing"]), modalities=tuple(params["modalities"]),
                           missing_prob=params["missing_prob"], report_missing_prob=params["report_missing_prob"],
                           spatial_dims=params["spatial_dims"], progress=tick)
    if hasattr(bar, "close"):
        bar.close()
    atomic_write_text(stamp, json.dumps(params))
    return Path(manifest)


def run_quickstart(config, workdir: str | Path, *, show_progress: bool = True, log=print) -> list[dict]:

    workdir = Path(workdir)
    if float(config.data.get("label_fraction", 0.0)) > 0:
        raise ConfigError("the quickstart scores leave-one-out over every case, so with data.label_fraction > 0 "
                          "the queries' own labels would be in training; train with `mmvae train` and score the "
                          "held-out cases with experiments/diagnose_latent.py")
    t0 = time.time()
    manifest = synthesize(config, workdir / "data", show_progress=show_progress)
    log(f"[1/5] synthetic cohort: {config.synth.cases} cases -> {manifest} ({time.time() - t0:.0f}s)")
    with config.unlocked():
        config.data.manifest = str(manifest)
    summary = train_and_evaluate(config, workdir, show_progress=show_progress)
    text = describe_text(config) if config.data.report else "no report"
    log(f"[2/5] trained {summary['step']} steps on {summary['num_train']} cases in {summary['train_seconds']:.0f}s "
        f"(first step incl. compile {summary['compile_seconds'] or 0:.1f}s); "
        f"final loss {summary['metrics'].get('loss', float('nan')):.1f}; " + text)
    run = embed_run(workdir, manifest, out=workdir / "embeddings.npz", show_progress=show_progress)
    emb, spec = run.embeddings, run.spec
    vectors = (f"the {len(emb.modalities)} experts' standardised means concatenated ({emb.mu.shape[1]} dims)"
               if emb.embedding == "experts" else f"the fused posterior mean ({emb.mu.shape[1]} dims)")
    log(f"[3/5] embedded {len(emb.case_ids)} cases (latent {spec.embedding_dim}, fusion {spec.fusion}; "
        f"retrieval vectors: {vectors})")
    index_embeddings(emb, workdir / "index", kind="flat", metric=config.retrieval.metric)
    log(f"[4/5] exact FAISS index of {len(emb.case_ids)} cases -> {workdir / 'index'}")
    k = int(config.retrieval.k)
    rows, table = evaluate_embeddings(emb, config.data.label, k, metric=config.retrieval.metric)
    labels = [lab.get(config.data.label, "") for lab in emb.labels]
    chance = chance_map(labels, list(range(len(labels))), k)
    all_row = next((r for r in rows if r["query"] == "+".join(emb.modalities)), rows[0])
    log(f"[5/5] leave-one-out retrieval, every query subset (label '{config.data.label}'); "
        f"{time.time() - t0:.0f}s since the start:\n")
    log(table)
    log(f"\nAll-modality mAP@{k} {all_row.get(f'map@{k}', float('nan')):.3f}; "
        f"chance level (random ranking) {chance:.3f}.")
    write_tables(workdir / "retrieval", rows,
                 f"# Leave-one-case-out retrieval of `{config.data.label}` (synthetic cohort)\n\n"
                 f"Model: {spec.fusion} fusion, embedding dimension {spec.embedding_dim}, {summary['step']} steps; "
                 f"{text}. Retrieval vectors: {vectors}.\n\n"
                 + table + f"\nChance mAP@{k} (random ranking, same protocol): {chance:.3f}\n")
    log(f"Tables: {workdir / 'retrieval.md'}, {workdir / 'retrieval.csv'}")
    return rows
