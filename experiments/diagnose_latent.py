"""Diagnose a trained run's latent space: is the class signal in it, and what else is?

    python experiments/diagnose_latent.py --workdir RUN [--manifest M] [--label class] [--out DIR]

For the run's held-out split (the training run's own split) and the whole cohort:

* retrieval mAP@k (held-out queries against every case, the shared protocol) of the
  all-modality query and of each single-modality query, next to the chance level
  (random rankings under the same protocol);
* linear-probe accuracy (5-fold logistic regression) of the fused posterior mean and of
  each unimodal expert's mean, next to the majority-class rate;
* the share of latent variance that the clinical fields (e.g. age, sex) explain;
* the same retrieval on the concatenated unimodal expert means (each standardised with
  the training cases' mean and sd, L2-normalised, absent experts zero), with and without
  the clinical expert: how much the product of experts itself loses;
* on a synthetic cohort (``synth_truth.jsonl`` beside the manifest): for each image
  modality, the lesion-minus-white-matter contrast (z units, true masks carried through
  the preprocessing) of the input and of the reconstruction from the fused posterior
  mean, and their correlation and slope over the cases (does the decoder learn the
  lesion?).

Writes ``diagnostics.json`` and ``diagnostics.md`` into ``--out`` (default the work dir)
and prints the Markdown table. Exit 2 on bad arguments (a missing work dir, an unknown
label).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROG = "diagnose_latent.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="trained run (mmvae train --workdir)")
    p.add_argument("--manifest", default="", help="cohort manifest (default: the run's data.manifest)")
    p.add_argument("--label", default="", help="label to probe and retrieve (default: the run's data.label)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default="", help="output folder (default: the work dir)")
    return p


def diagnose(workdir: Path, manifest: str = "", label: str = "", k: int = 10, show_progress: bool = False) -> dict:
    from mmvae.experiments.diagnose import clinical_covariates, linear_probe, variance_explained
    from mmvae.experiments.protocol import held_out
    from mmvae.retrieval.evaluate import chance_map, evaluate
    from mmvae.retrieval.embed import embed_cohort
    from mmvae.runs.trained import load_cohort, load_trained

    config, spec, model, tokenizer = load_trained(workdir)
    label = label or config.data.label
    cohort, _, _ = load_cohort(config, workdir, manifest or None, tokenizer=tokenizer, show_progress=show_progress)
    emb = embed_cohort(model, cohort, show_progress=show_progress)
    labels = cohort.label_array(label)
    if not np.any(labels != ""):
        from mmvae.errors import ConfigError
        raise ConfigError(f"no case has the label {label!r}")
    _, q_idx = held_out(len(cohort), config)
    mods = list(emb.modalities)
    m = len(mods)
    subsets = [np.ones(m, np.float32)] + [np.eye(m, dtype=np.float32)[i] for i in range(m)]
    rows = evaluate(emb, label, k, query_idx=q_idx, subsets=subsets, metric=config.retrieval.metric, n_boot=1000)
    out = {"workdir": str(workdir), "label": label, "k": k, "num_cases": len(cohort), "num_queries_heldout": len(q_idx),
           "chance_map": chance_map(labels, q_idx, k), "retrieval": {}, "probe": {}}
    for name, r in zip(["all"] + mods, rows):
        out["retrieval"][name] = {"map": r.get(f"map@{k}"), "lo": r.get(f"map@{k}_lo"), "hi": r.get(f"map@{k}_hi"),
                                  "num_queries": r["num_queries"]}
    out["probe"]["fused"] = linear_probe(emb.mu, labels)
    for j, name in enumerate(mods):
        have = emb.present[:, j] > 0
        out["probe"][name] = linear_probe(emb.experts_mu[have, j], labels[have])
    tr_idx, _ = held_out(len(cohort), config)
    from mmvae.experiments.protocol import BlockEmbeddings
    e = emb.experts_mu
    mean, sd = e[tr_idx].mean(0), e[tr_idx].std(0) + 1e-6
    blocks = (e - mean) / sd * emb.present[..., None]
    for name, keep in (("experts", mods), ("experts_no_clinical", [x for x in mods if x != "clinical"])):
        idx = [mods.index(x) for x in keep]
        be = BlockEmbeddings(list(emb.case_ids), keep, blocks[:, idx], emb.present[:, idx], list(emb.labels))
        r = evaluate(be, label, k, query_idx=q_idx, subsets=[np.ones(len(keep), np.float32)], metric="cosine", n_boot=1000)[0]
        out["retrieval"][name] = {"map": r.get(f"map@{k}"), "lo": r.get(f"map@{k}_lo"), "hi": r.get(f"map@{k}_hi"),
                                  "num_queries": r["num_queries"]}
    out["lesion_contrast"] = lesion_contrast(config, spec, model, cohort, emb, manifest or config.data.manifest)
    cov, cov_names = clinical_covariates(cohort)
    out["clinical_fields"] = cov_names
    out["clinical_variance_explained"] = variance_explained(emb.mu, cov) if cov.shape[1] else None
    return out


def lesion_contrast(config, spec, model, cohort, emb, manifest: str, max_cases: int = 120) -> dict | None:
    """Per image modality: input vs reconstructed lesion-minus-WM contrast agreement (synthetic cohorts)."""
    from mmvae.data.dataset import preprocess_config
    from mmvae.data.io import load_nifti
    from mmvae.data.manifest import group_cases, read_manifest
    from mmvae.data.preprocess import preprocess_with_maps
    from mmvae.data.synth import read_truth, tissue_maps
    from mmvae.experiments.diagnose import contrast_agreement, region_contrast

    folder = Path(manifest).parent
    if not (folder / "synth_truth.jsonl").is_file() or int(config.data.spatial_dims) != 3 or not spec.image_modalities:
        return None
    truth = read_truth(folder)
    params = json.loads((folder / "synth_params.json").read_text()) if (folder / "synth_params.json").is_file() else {}
    shape, spacing = params.get("shape", list(config.data.shape)), params.get("spacing", list(config.data.spacing))
    cases = {c.case_id: c for c in group_cases(read_manifest(manifest), None)}
    cfg = preprocess_config(config.data)
    index = {cid: i for i, cid in enumerate(emb.case_ids)}
    rows = [index[c] for c in emb.case_ids if c in truth][:max_cases]
    z = np.asarray(emb.mu[rows], np.float32)
    recon = model.decode(z)
    out = {}
    for m in spec.image_modalities:
        xin, xout = [], []
        for r, i in enumerate(rows):
            case = cases.get(emb.case_ids[i])
            if case is None or not case.images.get(m):
                continue
            maps = tissue_maps(truth[emb.case_ids[i]], shape, spacing)
            x, warped = preprocess_with_maps(load_nifti(case.images[m][0]), cfg,
                                             {"lesion": maps["lesion"], "wm": maps["wm"]})
            les, wm = warped["lesion"] > 0.5, warped["wm"] > 0.5
            xin.append(region_contrast(x, les, wm))
            xout.append(region_contrast(np.asarray(recon[m][r]), les, wm))
        out[m] = dict(contrast_agreement(xin, xout), input_sd=float(np.nanstd(xin)) if xin else float("nan"))
    return out


def markdown(d: dict) -> str:
    k = d["k"]
    lines = [f"Label `{d['label']}`, {d['num_cases']} cases, {d['num_queries_heldout']} held-out queries; "
             f"chance mAP@{k} = {d['chance_map']:.3f}.", "",
             f"| embedding | mAP@{k} held-out [95% CI] | probe accuracy (5-fold) | majority |", "|---|---|---|---|"]
    for name in ["all"] + [x for x in d["retrieval"] if x != "all"]:
        r = d["retrieval"][name]
        p = d["probe"].get("fused" if name == "all" else name)
        mp = "n/a" if r["map"] is None else f"{r['map']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        title = {"all": "fused posterior (all modalities)", "experts": "experts concatenated (z-scored)",
                 "experts_no_clinical": "experts concatenated, no clinical"}.get(name, f"{name} expert")
        probe = f"{p['accuracy']:.3f} ± {p['sd']:.3f} | {p['majority']:.3f}" if p else "– | –"
        lines.append(f"| {title} | {mp} | {probe} |")
    if d.get("lesion_contrast"):
        lines += ["", "Lesion reconstruction (synthetic cohort; lesion minus white-matter contrast of the "
                  "reconstruction from the fused posterior mean vs. that of the input, over cases):", "",
                  "| modality | correlation | slope | cases | input contrast sd |", "|---|---:|---:|---:|---:|"]
        for m, v in d["lesion_contrast"].items():
            lines.append(f"| {m} | {v['r']:.2f} | {v['slope']:.3f} | {v['n']} | {v['input_sd']:.2f} |")
    ve = d["clinical_variance_explained"]
    lines += ["", "Latent variance explained by the clinical fields "
              f"({', '.join(d['clinical_fields']) or 'none'}): " + ("n/a" if ve is None else f"{100 * ve:.1f} %")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    wd = Path(args.workdir)
    if not (wd / "model_spec.json").is_file():
        print(f"{PROG}: error: {wd} is not a trained work dir (no model_spec.json)", file=sys.stderr)
        return 2
    from mmvae.atomic import atomic_write_text
    from mmvae.errors import MmvaeError
    try:
        d = diagnose(wd, args.manifest, args.label, args.k)
    except MmvaeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or wd)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diagnostics.json", json.dumps(d, indent=2))
    md = markdown(d)
    atomic_write_text(out / "diagnostics.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
