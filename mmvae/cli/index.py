"""``mmvae index``: build a FAISS index from embeddings."""
from __future__ import annotations


def add(sub) -> None:
    s = sub.add_parser("index", help="build a FAISS index from embeddings")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--kind", default="flat", choices=["flat", "ivf", "ivfpq", "hnsw", "binary"])
    s.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.pipeline import index_embeddings
    emb = Embeddings.load(a.embeddings)
    index_embeddings(emb, a.out, kind=a.kind, metric=a.metric)
    print(f"{a.kind} index of {len(emb.case_ids)} cases -> {a.out}")
