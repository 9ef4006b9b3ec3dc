"""The review web application (FastAPI): a page for query by example with relevance
feedback, and the JSON API behind it.

Routes (the OpenAPI page is ``/docs``, the schema ``/openapi.json``):

- ``GET /`` — the page (plain HTML + JavaScript, no build step; ``static/``).
- ``GET /api/info`` — the model's modalities, index size, defaults and limits.
- ``GET /api/cases?q=TEXT`` — indexed case ids containing TEXT.
- ``GET /api/case/{case_id}`` — a case's modalities, labels, report excerpt, uncertainty.
- ``GET /api/case/{case_id}/thumbnail/{modality}`` — PNG (middle axial slice, cached).
- ``POST /api/query`` — JSON ``{case_id, modalities?, k?, rerank?}``: query with an indexed case.
- ``POST /api/query/pacs`` — JSON ``{study_uid, modalities?, k?, rerank?}`` (``--pacs`` only).
- ``POST /api/query/upload`` — multipart: ``file_<modality>`` files (NIfTI, PNG, a .zip of
  one DICOM series), ``report``, ``modalities`` (comma list), ``k``, ``rerank``.
- ``POST /api/feedback`` — JSON ``{session, relevant: [ids], nonrelevant: [ids]}``: Rocchio
  round (:mod:`mmvae.serve.service`), returns the new ranking.
- ``GET /api/session/{id}`` and ``…/thumbnail/{modality}``, ``…/export.csv|json``.

A bad input answers ``{"error": "<the loaders' one-line message>"}`` with status 400 (404 for
an unknown case or session, 413 for an upload over ``serve.max_upload_mb``); the server
keeps running.

Queries (``/api/query``, ``…/upload``, ``…/pacs``) run in a worker thread of their own
(:mod:`mmvae.serve.jobs`) awaited up to ``serve.request_timeout_s``: past it the client gets
504 (503 when at the deadline it was still waiting for an upload slot, the model or the archive), the
worker is cancelled and the request's files are removed; other requests are served meanwhile.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from mmvae.errors import InputError, MmvaeError
from mmvae.retrieval.index import RERANKS
from mmvae.serve.jobs import Cancelled, RequestTimeout, ServerBusy
from mmvae.serve.service import ReviewService, UnknownCase, UploadTooLarge

__all__ = ["create_app"]

STATIC = Path(__file__).resolve().parent / "static"


class QueryRequest(BaseModel):
    case_id: str = Field(description="an indexed case id; it is excluded from its own results")
    modalities: Optional[list[str]] = Field(None, description="query with these of the case's modalities "
                                                               "(default: all it has)")
    k: Optional[int] = Field(None, description="results (default serve.k)")
    rerank: Optional[str] = Field(None, description=f"one of {[r for r in RERANKS if r]} or null")


class PacsQueryRequest(BaseModel):
    study_uid: str = Field(description="StudyInstanceUID of a study in the archive (--pacs)")
    modalities: Optional[list[str]] = None
    k: Optional[int] = None
    rerank: Optional[str] = None


class FeedbackRequest(BaseModel):
    session: str
    relevant: list[str] = Field(default_factory=list, description="case ids judged relevant")
    nonrelevant: list[str] = Field(default_factory=list, description="case ids judged not relevant")


def _error(e: MmvaeError) -> JSONResponse:
    status = 413 if isinstance(e, UploadTooLarge) else 404 if isinstance(e, UnknownCase) else 400
    if isinstance(e, RequestTimeout):
        status = 504
    elif isinstance(e, (ServerBusy, Cancelled)):
        status = 503
    if isinstance(e, InputError) and "unknown or expired query session" in e.reason:
        status = 404
    return JSONResponse({"error": str(e)}, status_code=status)


def _csv_list(value) -> list[str] | None:
    if value is None or str(value).strip() == "":
        return None
    return [x.strip() for x in str(value).split(",") if x.strip()]


def _int(value, name: str) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        raise InputError(f"{name} must be an integer (got {value!r})") from None


def create_app(service: ReviewService, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI application serving ``service`` (which the caller closes).

    ``allowed_hosts``: Host header values answered (others get 400), against DNS rebinding;
    default the loopback names (``127.0.0.1``, ``localhost``, ``[::1]``) — pass the served host
    name(s) when serving beyond the loopback interface (``mmvae serve --allow-remote`` does)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    app = FastAPI(title="mmvae review", version="1",
                  description="Query by example over a case index, with relevance feedback (Rocchio).")
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "[::1]", "::1"])
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    limit_bytes = int(float(service.settings["max_upload_mb"]) * 2 ** 20)
    timeout_s = float(service.settings["request_timeout_s"])

    async def run_job(name: str, fn, *args, **kwargs):
        """``fn`` in a worker of its own, awaited up to serve.request_timeout_s; past it the
        worker is cancelled (its folders removed now) and the client gets 504 / 503."""
        job, fut = service.workers.start(name, fn, *args, **kwargs)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except asyncio.TimeoutError:
            job.cancel()
            if job.waiting:
                raise ServerBusy(f"the server is busy with other queries: this one was still waiting for "
                                 f"{job.waiting} after {timeout_s:g} s (serve.request_timeout_s); try again "
                                 "shortly") from None
            raise RequestTimeout(f"the {name} took longer than serve.request_timeout_s = {timeout_s:g} s and "
                                 "was stopped; its files were removed") from None
        except asyncio.CancelledError:       # the server is stopping
            job.cancel()
            raise

    @app.exception_handler(MmvaeError)
    async def _mmvae_error(request: Request, exc: MmvaeError):
        return _error(exc)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info", summary="model, index and limits")
    def info():
        r = service.retriever
        rocchio = dict(r.config.retrieval.rocchio)
        return {"modalities": service.modalities, "image_modalities": list(r.image_modalities),
                "index_size": r.index.size, "k": int(service.settings["k"]),
                "rerank": [x for x in RERANKS if x], "rocchio": rocchio,
                "max_upload_mb": float(service.settings["max_upload_mb"]), "request_timeout_s": timeout_s,
                "pacs": service.archive.url if service.archive is not None else None}

    @app.get("/api/cases", summary="indexed case ids containing q")
    def cases(q: str = "", limit: int = 50):
        return {"cases": service.find_cases(q, limit)}

    @app.get("/api/case/{case_id}", summary="one indexed case")
    def case(case_id: str):
        return service.case_info(case_id)

    @app.get("/api/case/{case_id}/thumbnail/{modality}", summary="PNG thumbnail of a case's series",
             response_class=Response)
    def case_thumbnail(case_id: str, modality: str):
        return Response(service.case_thumbnail(case_id, modality), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/query", summary="query with an indexed case")
    async def query(req: QueryRequest):
        s = await run_job("case query", service.query_case, req.case_id, req.modalities, req.k, req.rerank or None)
        return service.session_json(s)

    @app.post("/api/query/pacs", summary="query with a study in the archive (server started with --pacs)")
    async def query_pacs(req: PacsQueryRequest):
        s = await run_job("archive query", service.query_pacs, req.study_uid, req.modalities, req.k,
                          req.rerank or None)
        return service.session_json(s)

    @app.post("/api/query/upload", summary="query with uploaded files",
              description="multipart/form-data: `file_<modality>` (one or more files per image modality: "
                          ".nii, .nii.gz, .png, or a .zip of one DICOM series), `report` (text), "
                          "`modalities` (comma list), `k`, `rerank`.")
    async def query_upload(request: Request):
        size = request.headers.get("content-length")
        if size is None or not size.isdigit():      # chunked: its size would only be known once spooled
            return JSONResponse({"error": "uploads need a Content-Length header (chunked uploads are refused)"},
                                status_code=411)
        if int(size) > limit_bytes + 2 ** 20:
            raise UploadTooLarge(f"upload of {int(size) / 2 ** 20:.1f} MB is larger than the limit of "
                                 f"{service.settings['max_upload_mb']} MB (serve.max_upload_mb)")
        form = await request.form(max_files=64, max_fields=64)
        try:
            uploads: dict[str, list] = {}
            for key, value in form.multi_items():
                if key.startswith("file_") and hasattr(value, "read"):
                    if not value.filename:           # an empty file field
                        continue
                    uploads.setdefault(key[len("file_"):], []).append((value.filename, value.file))
                elif key not in ("report", "modalities", "k", "rerank"):
                    raise InputError(f"unknown form field {key!r}")
            report = form.get("report")
            report = report if isinstance(report, str) else None
            k = _int(form.get("k"), "k")
            rerank = form.get("rerank") or None
            s = await run_job("upload query", service.query_files, uploads, report,
                              modalities=_csv_list(form.get("modalities")), k=k, rerank=rerank)
            return service.session_json(s)
        finally:
            await form.close()          # a timed-out worker still reading gets a closed file: it stops

    @app.post("/api/feedback", summary="mark results and search again (Rocchio)")
    def feedback(req: FeedbackRequest):
        return service.session_json(service.feedback(req.session, req.relevant, req.nonrelevant))

    @app.get("/api/session/{session_id}", summary="a query session: latest ranking and history")
    def session(session_id: str):
        return service.session_json(service.session(session_id))

    @app.get("/api/session/{session_id}/thumbnail/{modality}", response_class=Response,
             summary="PNG thumbnail of an uploaded query image")
    def session_thumbnail(session_id: str, modality: str):
        s = service.session(session_id)
        if modality not in s.thumbnails:
            raise InputError("no uploaded image of this modality in the query", modality=modality)
        return Response(s.thumbnails[modality], media_type="image/png")

    @app.get("/api/session/{session_id}/export.{fmt}", summary="every round's ranking as CSV or JSON")
    def export(session_id: str, fmt: str):
        text = service.export(session_id, fmt)
        media = "text/csv" if fmt == "csv" else "application/json"
        return Response(text, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="mmvae-query-{session_id[:8]}.{fmt}"'})

    return app
