"""Which unlabelled cases an expert should annotate next (active learning), with the reason.

Strategies over the pool (the cases of an :class:`~mmvae.retrieval.embed.Embeddings` without a
label yet), each returning ``budget`` cases in the order chosen:

* ``random`` — uniform without replacement (seeded): the baseline every strategy must beat.
* ``uncertainty`` — the most uncertain cases: the label expert's predicted-label entropy when the
  model has one (semi-supervised), else the fused posterior's mean variance
  (:mod:`mmvae.retrieval.uncertainty`).
* ``disagreement`` — the largest mean pairwise symmetrised KL between the case's unimodal
  experts (cases with one modality rank last).
* ``coreset`` — k-center greedy (Sener & Savarese, ICLR 2018): repeatedly the case farthest
  (Euclidean, on the standardised posterior means) from every labelled or already chosen case,
  i.e. a 2-approximation of the cover that minimises the largest distance to a labelled case.
* ``hybrid`` — uncertainty among diverse cases: k-means++ seeding weighted by uncertainty
  (in the spirit of BADGE, Ash et al., ICLR 2020): each next case is drawn with probability
  ∝ u_i · D(x_i)², with u the ``uncertainty`` score rescaled to [0.05, 1] and D the distance to the
  nearest labelled or chosen case (seeded).
"""
from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from mmvae.errors import InputError
from mmvae.retrieval.uncertainty import case_uncertainty

__all__ = ["STRATEGIES", "suggest", "k_center_greedy", "read_labelled", "suggestions_csv"]

STRATEGIES = ("random", "uncertainty", "disagreement", "coreset", "hybrid")



def _means(emb) -> np.ndarray:
    """The standardised fused posterior means ``(N, E)`` the diversity strategies measure distance on
    (per-expert retrieval vectors would make a distance depend on which modalities a case has)."""
    if getattr(emb, "embedding", "fused") == "fused":
        return np.asarray(emb.mu)
    return emb.as_embedding("fused").standardized().mu

def k_center_greedy(x: np.ndarray, centers: Sequence[int], budget: int, pool: Sequence[int]) -> list[tuple[int, float]]:
    """Greedy k-center: ``budget`` rows of ``pool`` chosen one at a time, each the farthest from
    its nearest center (``centers`` plus those already chosen). ``x (N, D)``. Returns ``[(row,
    distance when chosen)]``; with no center, the first pick is the pool point farthest from the
    pool's mean."""
    x = np.asarray(x, np.float64)
    pool = np.asarray(list(pool), int)
    if len(centers):
        c = x[np.asarray(list(centers), int)]
        d = np.sqrt(((x[pool, None, :] - c[None]) ** 2).sum(-1)).min(1)
    else:
        d = np.sqrt(((x[pool] - x[pool].mean(0)) ** 2).sum(-1))
    out = []
    alive = np.ones(len(pool), bool)
    for _ in range(budget):
        i = int(np.argmax(np.where(alive, d, -np.inf)))
        out.append((int(pool[i]), float(d[i])))
        alive[i] = False
        d = np.minimum(d, np.sqrt(((x[pool] - x[pool[i]]) ** 2).sum(-1)))
    return out


def _uncertainty_score(unc: dict) -> tuple[np.ndarray, str]:
    if "label_entropy" in unc:
        return unc["label_entropy"], "predicted-label entropy {:.3f} nats"
    return unc["mean_variance"], "posterior mean variance {:.3f}"


def suggest(emb, budget: int, strategy: str, labelled: Sequence[str] = (), *, seed: int = 0) -> list[dict]:
    """The ``budget`` pool cases to annotate next: ``[{"rank", "case_id", "strategy", "score",
    "reason"}]`` in the order chosen (module doc for the strategies).

    Args:
      emb: embeddings of the candidate cases (standardised means are used for distances).
      labelled: case ids already labelled (not suggested; the centers of coreset/hybrid).

    Raises:
      InputError: unknown strategy, a budget < 1 or larger than the unlabelled pool, or a
        labelled case id that is not in the embeddings.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; use one of {list(STRATEGIES)}")
    row = {c: i for i, c in enumerate(emb.case_ids)}
    unknown = [c for c in labelled if c not in row]
    if unknown:
        raise InputError(f"{len(unknown)} labelled case(s) are not in the embeddings (e.g. {unknown[0]!r})")
    lab_set = {row[c] for c in labelled}
    lab = sorted(lab_set)
    pool = [i for i in range(len(emb.case_ids)) if i not in lab_set]
    if isinstance(budget, bool) or int(budget) < 1:
        raise InputError(f"budget must be ≥ 1 (got {budget!r})")
    if int(budget) > len(pool):
        raise InputError(f"budget {budget} is larger than the unlabelled pool ({len(pool)} cases)")
    budget = int(budget)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    unc = case_uncertainty(emb)
    out: list[tuple[int, float, str]] = []
    if strategy == "random":
        for i in rng.choice(pool, size=budget, replace=False):
            out.append((int(i), float("nan"), "drawn at random"))
    elif strategy in ("uncertainty", "disagreement"):
        if strategy == "uncertainty":
            score, fmt = _uncertainty_score(unc)
        else:
            score, fmt = unc["disagreement"], "expert disagreement {:.3f} nats (mean pairwise symmetric KL)"
        s = np.where(np.isnan(score), -np.inf, score)
        order = sorted(pool, key=lambda i: (-s[i], emb.case_ids[i]))
        for i in order[:budget]:
            out.append((i, float(score[i]), fmt.format(score[i]) if np.isfinite(score[i]) else
                        "fewer than two modalities: no disagreement"))
    elif strategy == "coreset":
        for i, d in k_center_greedy(_means(emb), lab, budget, pool):
            out.append((i, d, f"distance {d:.3f} to the nearest labelled or chosen case"))
    else:   # hybrid
        score, fmt = _uncertainty_score(unc)
        s = np.nan_to_num(np.asarray(score, np.float64), nan=0.0)
        lo, hi = s[pool].min(), s[pool].max()
        u = 0.05 + 0.95 * ((s - lo) / (hi - lo) if hi > lo else np.ones_like(s))
        x = np.asarray(_means(emb), np.float64)
        centers = list(lab)
        left = list(pool)
        if centers:
            d2 = ((x[left, None, :] - x[centers][None]) ** 2).sum(-1).min(1)
        else:
            d2 = ((x[left] - x[left].mean(0)) ** 2).sum(-1)
        for _ in range(budget):
            w = u[left] * d2
            p = w / w.sum() if w.sum() > 0 else np.full(len(left), 1 / len(left))
            j = int(rng.choice(len(left), p=p))
            i = left[j]
            out.append((i, float(u[i] * d2[j]), fmt.format(s[i]) + f"; squared distance {d2[j]:.3f} to the "
                                                                  "nearest labelled or chosen case"))
            d2 = np.minimum(np.delete(d2, j), ((x[np.delete(left, j)] - x[i]) ** 2).sum(-1))
            left.pop(j)
    return [{"rank": r + 1, "case_id": emb.case_ids[i], "strategy": strategy, "score": sc, "reason": why}
            for r, (i, sc, why) in enumerate(out)]


def read_labelled(path, emb, classes: Sequence[str] | None = None, label: str = "class") -> dict[str, str]:
    """A labels CSV (``case_id`` column, plus the label column ``label`` when checking classes)
    → case id → label. Unknown case ids, or label values outside ``classes`` (the model's), are
    an InputError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read the labels file ({e.strerror})", path=str(path)) from None
    if rows and "case_id" not in rows[0]:
        raise InputError(f"labels file needs a 'case_id' column (has {list(rows[0])})", path=str(path))
    known = set(emb.case_ids)
    out = {}
    for r in rows:
        cid = (r.get("case_id") or "").strip()
        if not cid:
            continue
        if cid not in known:
            raise InputError(f"case {cid!r} is not in the embeddings", path=str(path))
        value = (r.get(label) or "").strip()
        if classes is not None and value and value not in classes:
            raise InputError(f"case {cid!r}: class {value!r} is not one the model was built with {list(classes)}",
                             path=str(path))
        out[cid] = value
    return out


def suggestions_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rank", "case_id", "strategy", "score", "reason"])
    w.writeheader()
    for r in rows:
        w.writerow({**r, "score": "" if r["score"] != r["score"] else f"{r['score']:.6g}"})
    return buf.getvalue()
