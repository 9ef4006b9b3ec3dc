"""``mmvae embed``: encode every case of a manifest with a trained model."""
from __future__ import annotations

from mmvae.cli import _config


def add(sub) -> None:
    s = sub.add_parser("embed", help="encode every case of a manifest with a trained model")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True, help="embeddings file (.npz)")
    s.add_argument("--on-error", choices=["raise", "skip"], help=_config.ON_ERROR_HELP)
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.retrieval.pipeline import embed_run
    done = embed_run(a.workdir, a.manifest, on_error=a.on_error, out=a.out)
    skipped = done.cohort.skipped
    print(f"embedded {len(done.embeddings.case_ids)} cases -> {a.out}"
          + (f" ({len(skipped)} skipped)" if skipped else ""))
