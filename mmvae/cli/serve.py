"""``mmvae serve``: the review web page (:mod:`mmvae.serve`)."""
from __future__ import annotations

import os


def add(sub) -> None:
    s = sub.add_parser("serve", help="review web page: query by example with relevance feedback",
                       description="Serve the review page for a trained run and its index on the loopback "
                                   "interface (http://127.0.0.1:8765/ by default; API docs at /docs).")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--index", required=True, help="index folder built from this run's embeddings")
    s.add_argument("--manifest", help="manifest of the indexed cases, for thumbnails and reports "
                                      "(default: the run's data.manifest)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a --host beyond the loopback interface (the page shows patient images)")
    s.add_argument("--k", type=int, help="results per query (default serve.k of the config, 10)")
    s.add_argument("--max-upload-mb", type=float, help="largest upload (default serve.max_upload_mb, 1024)")
    s.add_argument("--request-timeout-s", type=float,
                   help="deadline of one query's work: past it the client gets 504 and the request's files "
                        "are removed (default serve.request_timeout_s, 60)")
    s.add_argument("--workers", type=int,
                   help="uploads read and preprocessed at once (default serve.workers, 2)")
    s.add_argument("--pacs", help="DICOMweb root of an archive: query with a StudyInstanceUID in it")
    s.add_argument("--pacs-username", help="HTTP basic authentication (password from $MMVAE_PACS_PASSWORD)")
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.errors import InputError
    from mmvae.serve import serve
    for flag, v in (("--request-timeout-s", a.request_timeout_s), ("--workers", a.workers),
                    ("--max-upload-mb", a.max_upload_mb), ("--k", a.k)):
        if v is not None and not v > 0:
            raise InputError(f"{flag} must be > 0 (got {v})")
    settings = {"k": a.k, "max_upload_mb": a.max_upload_mb, "request_timeout_s": a.request_timeout_s,
                "workers": a.workers}
    serve(a.workdir, a.index, manifest=a.manifest, host=a.host, port=a.port, allow_remote=a.allow_remote,
          settings=settings, pacs=a.pacs, pacs_username=a.pacs_username,
          pacs_password=os.environ.get("MMVAE_PACS_PASSWORD"))
