r"""Diagnostics of a latent space: what the case embeddings encode, beside retrieval.

Pure functions on host arrays, and :func:`diagnose` / :func:`markdown` of a trained run
(``experiments/diagnose_latent.py``, ``experiments/make_report.py``):

* :func:`linear_probe` — k-fold accuracy of a multinomial logistic regression from the
  embedding to a label (is the class signal *in* the latent, linearly?);
* :func:`variance_explained` — the share of the latent's total variance a linear
  regression on covariates (e.g. age, sex) explains,
  :math:`1 - \sum_j \operatorname{Var}(r_j) / \sum_j \operatorname{Var}(x_j)` with
  :math:`r` the least-squares residuals (the pooled :math:`R^2` over latent dimensions);
* :func:`chance_map` — the mAP@k of random rankings under the same protocol and labels
  (the floor every method is compared with; it depends on the class balance and k);
* :func:`region_contrast` and :func:`contrast_agreement` — does a reconstruction keep a
  finding's contrast against its surroundings (lesion minus white matter, z units)?
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np



def linear_probe(x: np.ndarray, y: Sequence, *, folds: int = 5, seed: int = 0) -> dict:
    """Stratified k-fold accuracy of a standardised multinomial logistic regression.

    Args:
      x: ``(N, D)`` embeddings; y: ``N`` labels (cases with an empty label are dropped).
    Returns:
      ``{"accuracy": mean over folds, "sd": sd over folds, "majority": accuracy of the
      majority class, "n": cases used, "classes": number of classes}``. Classes with fewer
      cases than ``folds`` reduce the number of folds to their count (at least 2).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray([str(v) for v in y], dtype=object)
    keep = y != ""
    x, y = np.asarray(x, np.float64)[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True)
    n_folds = int(min(folds, counts.min())) if len(classes) > 1 else 0
    out = {"n": int(len(y)), "classes": int(len(classes)),
           "majority": float(counts.max() / max(len(y), 1)) if len(y) else float("nan")}
    if n_folds < 2:
        return dict(out, accuracy=float("nan"), sd=float("nan"))
    accs = []
    for tr, te in StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        clf.fit(x[tr], y[tr])
        accs.append(float(np.mean(clf.predict(x[te]) == y[te])))
    return dict(out, accuracy=float(np.mean(accs)), sd=float(np.std(accs)))


def variance_explained(x: np.ndarray, covariates: np.ndarray) -> float:
    r"""Pooled R² of a least-squares regression (with intercept) of ``x (N, D)`` on ``covariates (N, F)``.

    Returns the fraction of :math:`\sum_j \operatorname{Var}(x_j)` explained, in [0, 1]
    (0 for a constant ``x`` or no covariates).
    """
    x = np.asarray(x, np.float64)
    c = np.asarray(covariates, np.float64)
    if c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise ValueError(f"covariates {c.shape} do not match embeddings {x.shape}")
    xc = x - x.mean(0)
    total = float(np.sum(xc ** 2))
    if total <= 0 or c.shape[1] == 0:
        return 0.0
    a = np.concatenate([np.ones((len(c), 1)), c], 1)
    coef, *_ = np.linalg.lstsq(a, x, rcond=None)
    resid = x - a @ coef
    return float(np.clip(1.0 - np.sum(resid ** 2) / total, 0.0, 1.0))


def clinical_covariates(cohort) -> tuple[np.ndarray, list[str]]:
    """Numeric fields (standardised, 0 where missing) and one-hot categorical fields of a
    :class:`mmvae.data.dataset.Cohort`: ``(N, F)`` and the column names."""
    cols, names = [], []
    num = np.where(cohort.clinical_num_mask > 0, np.nan_to_num(cohort.clinical_num), 0.0)
    for j in range(num.shape[1]):
        cols.append(num[:, j]); names.append(f"num{j}")
    for j in range(cohort.clinical_cat.shape[1]):
        vals = cohort.clinical_cat[:, j]
        m = cohort.clinical_cat_mask[:, j] > 0
        for v in np.unique(vals[m])[1:]:
            cols.append(((vals == v) & m).astype(np.float64)); names.append(f"cat{j}={v}")
    if not cols:
        return np.zeros((len(cohort), 0)), []
    return np.stack(cols, 1), names


def region_contrast(x: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    """``mean(x[region]) - mean(x[reference])`` (NaN when either region is empty)."""
    r, ref = np.asarray(region, bool), np.asarray(reference, bool)
    if not r.any() or not ref.any():
        return float("nan")
    return float(np.mean(x[r]) - np.mean(x[ref]))


def contrast_agreement(inputs: Sequence[float], recons: Sequence[float]) -> dict:
    """Pearson correlation and least-squares slope of reconstruction contrasts on input
    contrasts, over the cases where both are finite: ``{"r", "slope", "n"}``."""
    a, b = np.asarray(inputs, np.float64), np.asarray(recons, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return {"r": float("nan"), "slope": float("nan"), "n": int(len(a))}
    return {"r": float(np.corrcoef(a, b)[0, 1]), "slope": float(np.polyfit(a, b, 1)[0]), "n": int(len(a))}


# --------------------------------------------------------------------------- a trained run
def diagnose(workdir: Path, manifest: str = "", label: str = "", k: int = 10, show_progress: bool = False) -> dict:
    """Retrieval (all-modality and single-modality queries, concatenated experts), linear probes,
    clinical variance share and lesion contrast of a trained run (``experiments/diagnose_latent.py``)."""
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
    """The Markdown table of :func:`diagnose`'s result."""
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
