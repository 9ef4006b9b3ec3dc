"""``mmvae evaluate``: leave-one-case-out retrieval metrics of embeddings, per query subset."""
from __future__ import annotations


def add(sub) -> None:
    s = sub.add_parser("evaluate", help="leave-one-case-out retrieval metrics for query subsets")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--label", help="relevance = same value of this label (default: the run's data.label)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--own", action="store_true",
                   help="each case queries with the modalities of the subset it has (at least one), as "
                        "docs/results.md's real-cohort tables; default: only cases that have all of them")
    s.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    s.add_argument("--subsets", nargs="*", help="e.g. t2 t1+t2 (default: every non-empty subset)")
    s.add_argument("--multilabel", action="store_true", help="labels hold several values joined by '|'")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    s.add_argument("--out", help="write OUT.csv and OUT.md")
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.evaluate import parse_subset
    from mmvae.retrieval.pipeline import evaluate_embeddings, evaluation_label
    emb = Embeddings.load(a.embeddings)
    label = evaluation_label(emb, a.label)
    subsets = [parse_subset(s, emb.modalities) for s in a.subsets] if a.subsets else None
    _, table = evaluate_embeddings(emb, label, a.k, out=a.out or None, subsets=subsets, metric=a.metric,
                                   multilabel=a.multilabel, n_boot=a.bootstrap, own=a.own, chance=True)
    queries = ("each case queries with the modalities of the subset it has" if a.own
               else "queries: the cases that have every modality of the subset")
    print(f"label {label!r}; {queries}; leave-one-out over {len(emb.case_ids)} cases")
    print(table)
