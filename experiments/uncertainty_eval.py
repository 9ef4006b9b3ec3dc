"""Is the model's uncertainty informative, and does a posterior-aware ranking help?

    python experiments/uncertainty_eval.py --workdir RUN [--workdir RUN2 ...] [--embeddings E.npz ...]
        [--label class] [--k 10] [--out docs/results/uncertainty.csv]

For each run (e.g. one per seed), on the held-out cases of its training split (queries; the
database is the whole cohort minus the query, as in docs/results.md), all modalities:

1. **Ranking**: mAP@k of cosine on the (standardised) posterior means vs the two posterior-aware
   re-rankers of :class:`~mmvae.retrieval.index.CaseIndex` — Bhattacharyya coefficient and
   expected likelihood kernel between the query's and each case's Gaussian posterior, exact
   over the whole (flat) index.
2. **Informative uncertainty**: Spearman rank correlation between each query's uncertainty
   (posterior mean variance; expert disagreement; label entropy when present —
   :mod:`mmvae.retrieval.uncertainty`) and its retrieval error ``1 − AP@k`` (cosine), with a
   95 % bootstrap CI over queries (1000 resamples).

``--embeddings`` gives the run's embeddings (default ``RUN/embeddings.npz``; an ablation-grid
cell has one). Prints a markdown table and writes the rows as CSV.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def spearman_ci(x, y, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    from scipy.stats import spearmanr
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        r = spearmanr(x[i], y[i]).statistic
        if np.isfinite(r):
            boots.append(r)
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    return rho, float(lo), float(hi)


def evaluate_run(workdir: Path, emb_path: Path, label: str, k: int) -> list[dict]:
    from mmvae.experiments.protocol import held_out
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.index import build_index
    from mmvae.retrieval.metrics import average_precision_at_k
    from mmvae.retrieval.uncertainty import case_uncertainty
    from mmvae.runs.files import read_run_files
    config, _, _ = read_run_files(workdir)
    emb = Embeddings.load(emb_path)
    _, q_idx = held_out(len(emb.case_ids), config)
    labels = [lab.get(label, "") for lab in emb.labels]
    q_idx = [int(i) for i in q_idx if labels[i] and emb.present[i].sum() > 0]
    meta = [{"modalities": [], "labels": lab} for lab in emb.labels]
    index = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind="flat", metric="cosine")
    unc = case_uncertainty(emb)
    n_rel = {c: sum(1 for x in labels if x == c) for c in set(labels)}
    rows, ap_cos = [], None
    for rerank in (None, "bhattacharyya", "expected_likelihood"):
        aps = []
        for i in q_idx:
            res = index.search(emb.mu[i][None], k, query_logvar=emb.logvar[i][None], exclude=[emb.case_ids[i]],
                               rerank=rerank, dims=emb.query_dims(emb.present[i]))[0]
            rel = np.array([[r.labels.get(label) == labels[i] for r in res]])
            aps.append(float(average_precision_at_k(rel, np.array([n_rel[labels[i]] - 1]), k)[0]))
        aps = np.array(aps)
        if rerank is None:
            ap_cos = aps
        rows.append({"run": str(workdir), "what": f"ranking: {rerank or 'cosine on means'}", "value": aps.mean(),
                     "lo": np.nan, "hi": np.nan, "n": len(aps)})
    for field in ("mean_variance", "disagreement", "label_entropy"):
        if field not in unc:
            continue
        rho, lo, hi = spearman_ci(unc[field][q_idx], 1.0 - ap_cos)
        rows.append({"run": str(workdir), "what": f"Spearman({field}, 1 - AP@{k})", "value": rho, "lo": lo, "hi": hi,
                     "n": int(np.isfinite(unc[field][q_idx]).sum())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", action="append", required=True)
    p.add_argument("--embeddings", action="append", default=[])
    p.add_argument("--label", default="class")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out")
    p.add_argument("--docs", help="write the table as the 'Uncertainty' section of this markdown file (docs/results.md)")
    a = p.parse_args(argv)
    embs = a.embeddings or [str(Path(w) / "embeddings.npz") for w in a.workdir]
    if len(embs) != len(a.workdir):
        p.error("give one --embeddings per --workdir (or none)")
    rows = []
    for w, e in zip(a.workdir, embs):
        rows += evaluate_run(Path(w), Path(e), a.label, a.k)
    whats = list(dict.fromkeys(r["what"] for r in rows))
    lines = ["| measure (every held-out case, with the modalities it has) | per run [95% CI] | mean over runs |",
             "|---|---|---:|"]
    for w in whats:
        rs = [r for r in rows if r["what"] == w]
        per = ", ".join(f"{r['value']:.3f}" + (f" [{r['lo']:.2f}, {r['hi']:.2f}]" if np.isfinite(r["lo"]) else "")
                        for r in rs)
        lines.append(f"| {w} | {per} | {np.mean([r['value'] for r in rs]):.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.docs:
        from mmvae.atomic import atomic_write_text
        from mmvae.experiments.report import replace_section
        runs = ", ".join(f"`{Path(w).name}`" for w in a.workdir)
        from mmvae.retrieval.embed import Embeddings
        kinds = "/".join(sorted({Embeddings.load(e).embedding for e in embs}))
        n_q = ", ".join(str(r["n"]) for r in rows if r["what"] == "ranking: cosine on means")
        body = (f"`python experiments/uncertainty_eval.py` on {runs}: mAP@{a.k} of the held-out queries ({n_q} "
                "per run: every held-out case, with all the modalities it has — unlike the targets table's "
                "all-modality column, which counts only the cases that have every modality) ranked by cosine on "
                f"the retrieval vectors (`retrieval.embedding={kinds}`, compared on the query's modalities) and by "
                "the two posterior-aware re-rankers on the same vectors' Gaussians "
                "(exact over the flat index), and the Spearman correlation between a query's uncertainty and its "
                f"retrieval error 1 − AP@{a.k} (cosine), 95 % bootstrap CI over queries "
                "(docs/model.md for the measures).\n\n" + table)
        doc = Path(a.docs)
        atomic_write_text(doc, replace_section(doc.read_text() if doc.exists() else "# Results\n", "Uncertainty", body))
    if a.out:
        from mmvae.atomic import atomic_write_text
        import io
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=["run", "what", "value", "lo", "hi", "n"])
        wr.writeheader()
        wr.writerows(rows)
        atomic_write_text(Path(a.out), buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
