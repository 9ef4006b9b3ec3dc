"""Cohort manifests: which files and texts make up which case.

Format (CSV with a header, or JSON lines). One row per series or report:

=================  ===========================================================
field              meaning
=================  ===========================================================
``case_id``        case identifier (required)
``modality``       modality name, e.g. ``t1``, ``t2``, ``dwi``, ``report``
``path``           image file (.nii, .nii.gz, .png), DICOM series folder, or a
                   .txt report; relative paths are relative to the manifest
``text``           inline report text (``modality == 'report'`` only)
``label.<name>``   a label of the case (CSV); JSONL: ``"labels": {name: value}``
``meta.<name>``    a clinical field (CSV); JSONL: ``"meta": {name: value}``
=================  ===========================================================

Labels and metadata may appear on any row of a case; they are merged, and two
rows giving different values for the same field is an error. A row with an empty
``modality`` carries only labels/metadata.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from mmvae.errors import InputError
from mmvae.atomic import atomic_write_text
from mmvae.data.text import check_report_text, decode_text

REPORT = "report"


@dataclasses.dataclass
class ManifestEntry:
    case_id: str
    modality: str = ""
    path: str | None = None
    text: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CaseEntries:
    """All manifest rows of one case, merged."""

    case_id: str
    images: dict[str, list[str]]  # modality -> absolute paths, in manifest order
    report_text: str | None
    report_path: str | None
    labels: dict[str, str]
    metadata: dict[str, Any]

    def modalities(self) -> list[str]:
        out = list(self.images)
        if self.report_text is not None or self.report_path is not None:
            out.append(REPORT)
        return out

    def read_report(self) -> str | None:
        """The report: the inline text, else the file's (:func:`mmvae.data.io.load_report`),
        else None. Raises InputError naming the case, modality and file when the file
        cannot be read or the text is not text (:func:`mmvae.data.text.check_report_text`)."""
        if self.report_text is not None:
            try:
                return check_report_text(self.report_text)
            except InputError as e:
                raise e.with_context(case_id=self.case_id, modality=REPORT) from None
        if self.report_path is None:
            return None
        from mmvae.data.io import load_report      # imaging readers: only when a report file is read
        try:
            return load_report(self.report_path)
        except InputError as e:
            raise e.with_context(case_id=self.case_id, modality=REPORT) from None


def _coerce_meta(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Read a ``.csv`` or ``.jsonl`` manifest; relative paths become absolute."""
    path = Path(path)
    if not path.is_file():
        raise InputError("manifest not found", path=str(path))
    root = path.parent.resolve()
    entries: list[ManifestEntry] = []
    try:
        raw = decode_text(path.read_bytes())    # UTF-8, Excel's byte-order mark dropped; other encodings named
    except OSError as e:
        raise InputError(f"cannot read manifest: {e}", path=str(path)) from None
    except InputError as e:
        raise InputError(f"manifest {e.reason}", path=str(path)) from None
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {lineno}: invalid JSON ({e})", path=str(path)) from None
            entries.append(_entry_from_mapping(row, root, f"{path}:{lineno}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(raw))
        for lineno, row in enumerate(reader, 2):
            labels = {k[6:]: v for k, v in row.items() if k and k.startswith("label.") and v not in (None, "")}
            meta = {k[5:]: _coerce_meta(v) for k, v in row.items() if k and k.startswith("meta.") and v not in (None, "")}
            mapping = {k: v for k, v in row.items() if k in ("case_id", "modality", "path", "text") and v not in (None, "")}
            mapping["labels"], mapping["meta"] = labels, meta
            entries.append(_entry_from_mapping(mapping, root, f"{path}:{lineno}"))
    else:
        raise InputError("manifest must be .csv or .jsonl", path=str(path))
    return entries


def _entry_from_mapping(row: dict, root: Path, where: str) -> ManifestEntry:
    case_id = row.get("case_id")
    if not case_id:
        raise InputError(f"{where}: row without case_id")
    p = row.get("path")
    if p:
        p = str(p if os.path.isabs(p) else (root / p))
    return ManifestEntry(
        case_id=str(case_id),
        modality=str(row.get("modality") or ""),
        path=p or None,
        text=row.get("text"),
        labels={str(k): str(v) for k, v in (row.get("labels") or {}).items()},
        metadata=dict(row.get("meta") or {}),
    )


def write_manifest(entries: Iterable[ManifestEntry], path: str | os.PathLike) -> Path:
    """Write entries as CSV or JSONL (by suffix), atomically; paths relative to the file."""
    path = Path(path)
    root = path.parent.resolve()
    entries = list(entries)

    def rel(p):
        if p is None:
            return None
        try:
            return os.path.relpath(p, root)
        except ValueError:
            return p

    if path.suffix == ".jsonl":
        lines = []
        for e in entries:
            row = {"case_id": e.case_id, "modality": e.modality}
            if e.path:
                row["path"] = rel(e.path)
            if e.text is not None:
                row["text"] = e.text
            if e.labels:
                row["labels"] = e.labels
            if e.metadata:
                row["meta"] = e.metadata
            lines.append(json.dumps(row))
        atomic_write_text(path, "\n".join(lines) + "\n")
    elif path.suffix == ".csv":
        label_keys = sorted({k for e in entries for k in e.labels})
        meta_keys = sorted({k for e in entries for k in e.metadata})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["case_id", "modality", "path", "text"]
                   + [f"label.{k}" for k in label_keys] + [f"meta.{k}" for k in meta_keys])
        for e in entries:
            w.writerow([e.case_id, e.modality, rel(e.path) or "", e.text or ""]
                       + [e.labels.get(k, "") for k in label_keys]
                       + [e.metadata.get(k, "") for k in meta_keys])
        atomic_write_text(path, buf.getvalue())
    else:
        raise InputError("manifest must be .csv or .jsonl", path=str(path))
    return path


def group_cases(entries: Iterable[ManifestEntry], modalities: Iterable[str] | None = None,
                *, allow_duplicate_ids: bool = False) -> list[CaseEntries]:
    """Merge rows into cases, in order of first appearance.

    Args:
      entries: manifest rows.
      modalities: the known modality names (image modalities and 'report'); a row
        naming another modality raises :class:`InputError`. None accepts any.

    Rows of one case must be contiguous unless ``allow_duplicate_ids``: a case id that
    reappears after another case is reported as a duplicate case id.
    """
    known = None if modalities is None else set(modalities)
    cases: dict[str, CaseEntries] = {}
    last = None
    for e in entries:
        if e.case_id in cases and e.case_id != last and not allow_duplicate_ids:
            raise InputError("duplicate case id (its rows appear twice, separated by other cases)",
                             case_id=e.case_id, path=e.path)
        last = e.case_id
        c = cases.setdefault(e.case_id, CaseEntries(e.case_id, {}, None, None, {}, {}))
        for field, src in (("labels", e.labels), ("metadata", e.metadata)):
            dst = getattr(c, field)
            for k, v in src.items():
                if k in dst and dst[k] != v:
                    raise InputError(f"conflicting {field[:-1] if field == 'labels' else 'metadata'} "
                                     f"{k!r}: {dst[k]!r} vs {v!r}", case_id=e.case_id)
                dst[k] = v
        if not e.modality:
            continue
        if known is not None and e.modality not in known:
            raise InputError(f"unknown modality; known: {sorted(known)}", case_id=e.case_id,
                             modality=e.modality, path=e.path)
        if e.modality == REPORT:
            if c.report_text is not None or c.report_path is not None:
                raise InputError("more than one report", case_id=e.case_id, modality=REPORT)
            if e.text is not None:
                c.report_text = e.text
            elif e.path:
                c.report_path = e.path
            else:
                raise InputError("report row has neither text nor path", case_id=e.case_id, modality=REPORT)
        else:
            if not e.path:
                raise InputError("image row without a path", case_id=e.case_id, modality=e.modality)
            c.images.setdefault(e.modality, []).append(e.path)
    return list(cases.values())
