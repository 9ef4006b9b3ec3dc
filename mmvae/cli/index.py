"""``mmvae index``: build a FAISS index from embeddings; ``mmvae fit-fusion``: fit its legs' weights."""
from __future__ import annotations


def add(sub) -> None:
    s = sub.add_parser("index", help="build a FAISS index from embeddings")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "ivfpq", "opq-ivfpq", "hnsw", "binary"],
                   help="index kind (default auto: from the number of cases and --max-build-gb, docs/scale.md)")
    s.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    s.add_argument("--max-build-gb", type=float, default=2.0,
                   help="memory budget of the build (default 2): a shard set is indexed streaming within it, "
                        "and a build whose estimate exceeds it is refused before any work")
    s.add_argument("--nlist", type=int, help="IVF lists (default ≈ 4·√N)")
    s.add_argument("--nprobe", type=int, help="IVF lists probed per query (default ≈ 2·√nlist)")
    s.add_argument("--m-pq", type=int, help="PQ sub-quantizers (bytes of code per case)")
    s.add_argument("--train-size", type=int, help="vectors sampled to train IVF/PQ (streaming build; default 64·nlist)")
    s.add_argument("--seed", type=int, default=0, help="seed of the k-means and the training sample")
    s.add_argument("--rerank-factor", type=int,
                   help="searches re-score rerank_factor·k first-pass candidates exactly (default 4; PQ kinds over "
                        "10⁵ cases: more, docs/scale.md)")
    s.add_argument("--lexical", action="store_true",
                   help="add the report's BM25 leg (hybrid retrieval): the reports are read from --manifest, "
                        "default the run's data.manifest; the index keeps their tokens, not the texts")
    s.add_argument("--manifest", help="manifest holding the cases' reports (with --lexical)")
    s.set_defaults(fn=run)
    f = sub.add_parser("fit-fusion", help="fit the weights of an index's legs on labelled cases "
                                          "(cross-validated mAP@k) and store them in the index")
    f.add_argument("--index", required=True, help="index folder (mmvae index)")
    f.add_argument("--label", required=True, help="the label that defines relevance (each label keeps its own weights)")
    f.add_argument("--k", type=int, default=10, help="mAP@k cut-off (default 10)")
    f.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    f.add_argument("--seed", type=int, default=0, help="seed of the folds")
    f.add_argument("--no-default", action="store_true",
                   help="keep the index's current default weight set (default: this label's becomes it)")
    f.set_defaults(fn=run_fit)


def run(a, extra):
    import json

    from mmvae.errors import InputError
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.index.stream import STREAMING_KINDS, build_from_shards, choose_kind, default_rerank_factor
    from mmvae.retrieval.pipeline import index_embeddings, manifest_reports, run_manifest
    from mmvae.retrieval.shards import ShardSet, is_shard_set
    if a.manifest and not a.lexical:
        raise InputError("--manifest is read for the reports of --lexical; add --lexical")
    if is_shard_set(a.embeddings) and not a.lexical and a.kind in ("auto", *STREAMING_KINDS):
        ss = ShardSet(a.embeddings)
        out = build_from_shards(ss, a.out, kind=None if a.kind == "auto" else a.kind, metric=a.metric,
                                max_build_gb=a.max_build_gb, nlist=a.nlist, m_pq=a.m_pq, nprobe=a.nprobe,
                                train_size=a.train_size, seed=a.seed, rerank_factor=a.rerank_factor)
        info = json.loads((out / "index.json").read_text())
        print(f"{info['kind']} index of {info['count']} cases from {len(ss.shards)} shards (streaming build) -> {a.out}")
        return
    from pathlib import Path
    src = Path(a.embeddings)
    size = sum(p.stat().st_size for p in src.glob("shard-*.npz")) if src.is_dir() else \
        (src.stat().st_size if src.is_file() else 0)
    if 2 * size > a.max_build_gb * 1e9:          # the file in memory, and the index's copy of the vectors
        raise InputError(f"the embeddings ({size / 1e9:.1f} GB) do not fit --max-build-gb={a.max_build_gb:g} in "
                         "memory: raise it, or write a shard set (mmvae embed --out FOLDER) and index it "
                         "streaming (without --lexical)", path=a.embeddings)
    emb = Embeddings.load(a.embeddings)
    n, width = emb.mu.shape
    kind = choose_kind(n, width, a.max_build_gb) if a.kind == "auto" else a.kind
    rerank_factor = a.rerank_factor or (default_rerank_factor(kind, n) if kind in ("ivfpq", "opq-ivfpq") else None)
    reports = None
    if a.lexical:
        reports = manifest_reports(a.manifest or run_manifest(emb), emb.case_ids)
        if not any(reports):
            raise InputError("--lexical: no case of the embeddings has a report in the manifest",
                             path=a.manifest or run_manifest(emb))
    index_embeddings(emb, a.out, kind=kind, metric=a.metric, reports=reports,
                     options=dict(nlist=a.nlist, nprobe=a.nprobe, m_pq=a.m_pq, seed=a.seed,
                                  rerank_factor=rerank_factor))
    extra_note = f", lexical leg over {sum(r is not None for r in reports)} reports" if reports is not None else ""
    print(f"{kind} index of {len(emb.case_ids)} cases{extra_note} -> {a.out}")


def run_fit(a, extra):
    from mmvae.errors import InputError
    from mmvae.retrieval.hybrid.fit import fit_fusion, legs_table
    from mmvae.retrieval.index import load_index
    if a.k < 1 or a.folds < 2:
        raise InputError(f"--k must be ≥ 1 and --folds ≥ 2 (got {a.k}, {a.folds})")
    ix = load_index(a.index)
    entry = fit_fusion(ix, a.label, k=a.k, folds=a.folds, seed=a.seed, default=not a.no_default)
    ix.save(a.index)
    print(legs_table(entry))
    cv = entry["cv"]
    print(f"fitted on {entry['n_queries']} labelled cases in {entry['seconds']:.1f} s; cross-validated mAP@{a.k}: "
          f"fitted {cv['fitted']['map']:.3f} vs uniform {cv['uniform']['map']:.3f}; weights stored in "
          f"{a.index}/fusion.json as label {a.label!r}" + ("" if a.no_default else " (the index's default)"))
