"""``mmvae suggest``: which unlabelled cases to annotate next (active learning)."""
from __future__ import annotations

from pathlib import Path


def add(sub) -> None:
    s = sub.add_parser("suggest", help="which unlabelled cases to annotate next (active learning), as CSV",
                       description="Rank the unlabelled cases of EMB.npz for annotation: random, uncertainty "
                                   "(predicted-label entropy or posterior spread), disagreement (between the "
                                   "case's unimodal experts), coreset (k-center greedy) or hybrid "
                                   "(uncertainty-weighted k-means++). Writes rank,case_id,strategy,score,reason.")
    s.add_argument("--workdir", required=True, help="trained work dir the embeddings come from")
    s.add_argument("--embeddings", required=True, help="embeddings of the candidate cases (mmvae embed)")
    s.add_argument("--budget", type=int, required=True, help="cases to suggest")
    from mmvae.retrieval.suggest import STRATEGIES      # numpy only: `mmvae --help` stays free of JAX
    s.add_argument("--strategy", default="hybrid", choices=list(STRATEGIES))
    s.add_argument("--labelled", help="CSV with case_id (and the label column) of the cases already labelled")
    s.add_argument("--seed", type=int, default=0, help="seed of random and hybrid")
    s.add_argument("--out", help="CSV to write (default: print)")
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.atomic import atomic_write_text
    from mmvae.errors import InputError
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.query import model_identity
    from mmvae.retrieval.suggest import read_labelled, suggest, suggestions_csv
    from mmvae.runs.files import read_run_files
    config, spec, _ = read_run_files(Path(a.workdir))
    emb = Embeddings.load(a.embeddings)
    want = model_identity(spec)["model_fingerprint"]
    if emb.identity.get("model_fingerprint") != want:
        raise InputError(f"embeddings of another model (fingerprint {emb.identity.get('model_fingerprint')!r}, "
                         f"the workdir's is {want!r}): embed with this run first", path=a.embeddings)
    label = config.data.label
    classes = list(spec.label_classes) or sorted({lab.get(label) for lab in emb.labels if lab.get(label)}) or None
    labelled = read_labelled(a.labelled, emb, classes, label) if a.labelled else {}
    rows = suggest(emb, a.budget, a.strategy, list(labelled), seed=a.seed)
    text = suggestions_csv(rows)
    if a.out:
        atomic_write_text(Path(a.out), text)
        print(f"{len(rows)} case(s) to annotate next ({a.strategy}; pool {len(emb.case_ids) - len(labelled)}) "
              f"-> {a.out}")
    else:
        print(text, end="")
