r"""Diagnostics of a latent space: what the case embeddings encode, beside retrieval.

Pure functions on host arrays, used by ``experiments/diagnose_latent.py``:

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
