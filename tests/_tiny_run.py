"""One tiny trained run + its flat index, shared by the query and review-page tests."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def train_tiny_indexed(tmp: Path, cases: int = 40):
    """Train configs/tiny.py on a synthetic cohort (16³ volumes, 4 mm), embed it and build the
    exact (flat, cosine) index as the quickstart does. Returns ``(config, workdir, embeddings,
    index_dir)``."""
    from mmvae.config import load_config
    from mmvae.data.synth import make_cohort
    from mmvae.retrieval.embed import embed_cohort, embedding_kind
    from mmvae.retrieval.index import build_index
    from mmvae.runs.files import fingerprint
    from mmvae.runs.trained import load_cohort, load_trained
    from mmvae.train.loop import train_and_evaluate

    c = load_config(TINY)
    c.data.manifest = str(make_cohort(tmp / "data", cases, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0)))
    wd = tmp / "run"
    train_and_evaluate(c, wd, show_progress=False)
    config, spec, model, tok = load_trained(wd)
    stats = json.loads((wd / "clinical_stats.json").read_text())
    cohort, _, _ = load_cohort(config, wd, c.data.manifest, tokenizer=tok, clinical_stats=stats,
                               show_progress=False)
    emb = embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec)}, show_progress=False,
                       embedding=embedding_kind(config))      # the default retrieval vectors (experts)
    meta = [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]
    index = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind="flat", metric="cosine",
                        identity=dict(emb.identity))
    return c, wd, emb, index.save(tmp / "index")


def files_digest(folder: Path) -> dict:
    """SHA-256 of every file under ``folder`` (relative path → digest): "nothing was written"."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def faiss_one_thread():
    """FAISS on one thread for the block (2 shared cores)."""
    import faiss
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)
