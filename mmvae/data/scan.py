"""Scan a folder of images into manifest rows (:class:`ManifestEntry`).

Layouts:

``brats``
  ``<root>/<case>/<case>_<seq>.nii.gz`` (or ``.nii``; ``-`` accepted for ``_``).
  ``seq`` ∈ t1, t1ce, t2, flair (BraTS 2023 names t1n, t1c, t2w, t2f map onto
  them). ``_seg`` files and other suffixes are skipped (reported). If
  ``<root>/grades.csv`` exists (``case_id,<label>,...``), each further column is
  a label of the case (e.g. ``grade`` → HGG/LGG), set on every row of the case.

``bids``
  ``[<root>/rawdata]/sub-X[/ses-Y]/[<datatype>/]*_<suffix>.nii[.gz]``; case_id is
  ``sub-X`` or ``sub-X_ses-Y``; modality is the BIDS suffix lowercased (dwi, adc,
  flair, t1w, t2w...). ``derivatives`` are not scanned. Columns of
  ``participants.tsv`` (if present) become case metadata (numbers as floats,
  ``n/a`` dropped).

``dicom``
  one folder per case under ``root``; every folder below it that directly holds
  DICOM files (Part-10 'DICM' marker) is a series and becomes one row, with a
  modality found by matching regexes against the SeriesDescription, then the
  folder name, both lowercased with everything but letters and digits removed
  (``t2_tse_tra`` → ``t2tsetra``). First matching rule wins; defaults
  (:data:`DEFAULT_DICOM_RULES`):

  ====================  ========  ====================================================
  regex                 modality  matches
  ====================  ========  ====================================================
  ``adc``               adc       Siemens ``ep2d_diff_..._ADC``
  ``diff.*calcbval``    dwi       computed high b-value ``ep2d_diff_..._CALC_BVAL``
  ``t2.*(tra|ax)``      t2        axial T2 (``t2_tse_tra``); sag/cor T2 not matched
  ====================  ========  ====================================================

  The acquired multi-b-value DWI series (``ep2d_diff_tra``) is *not* matched by
  default (it loads as several volumes); pass ``dicom_rules`` to change this.
  Series matching no rule are skipped (reported).

``auto`` picks ``bids`` if ``root`` has ``dataset_description.json``, a
``rawdata`` folder or ``sub-*`` folders; else ``brats`` if a case folder holds
``<case>_<seq>.nii.gz`` files; else ``dicom`` if DICOM files are found.

Skipped files/folders are logged (logger ``mmvae.data.scan``) and returned by
:func:`scan_folder_detailed`. Rows are sorted by (case_id, modality, path).
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from mmvae.data.manifest import ManifestEntry
from mmvae.errors import InputError

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "brats", "bids", "dicom", "keyimages")
_KEYIMAGE_RE = re.compile(r"^(?P<seq>[a-z0-9]+?)(_(?P<n>\d+))?\.png$", re.IGNORECASE)
BRATS_SEQUENCES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
                   "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
DEFAULT_DICOM_RULES: tuple[tuple[str, str], ...] = (
    (r"adc", "adc"),
    (r"diff.*calcbval", "dwi"),
    (r"t2.*(tra|ax)", "t2"),
)
_NIFTI_RE = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class ScanResult:
    """Rows found and what was skipped, as ``(path, reason)`` pairs."""

    entries: list[ManifestEntry]
    layout: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _dirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted((Path(e.path) for e in it if e.is_dir() and not e.name.startswith(".")),
                      key=lambda p: p.name)


def _files(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted((Path(e.path) for e in it if e.is_file() and not e.name.startswith(".")),
                      key=lambda p: p.name)


def _nifti_stem(p: Path) -> str | None:
    m = _NIFTI_RE.match(p.name)
    return m.group("stem") if m else None


def _coerce(v: str):
    try:
        return float(v)
    except ValueError:
        return v


# --------------------------------------------------------------------------- brats


def _brats_seq(case: str, p: Path) -> str | None:
    stem = _nifti_stem(p)
    if stem is None or len(stem) <= len(case) + 1 or not stem.startswith(case):
        return None
    if stem[len(case)] not in "_-":
        return None
    return stem[len(case) + 1:].lower()


def read_label_csv(path: Path) -> dict[str, dict[str, str]]:
    """``case_id -> {label: value}`` from a CSV with a ``case_id`` column (else the first column)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read labels: {e}", path=str(path)) from None
    if not rows:
        return {}
    key = "case_id" if "case_id" in rows[0] else next(iter(rows[0]))
    out = {}
    for r in rows:
        cid = (r.get(key) or "").strip()
        if cid:
            out[cid] = {k.strip(): v.strip() for k, v in r.items()
                        if k and k != key and v not in (None, "")}
    return out


def _scan_brats(root: Path, res: ScanResult) -> None:
    grades = root / "grades.csv"
    labels = read_label_csv(grades) if grades.is_file() else {}
    for case_dir in _dirs(root):
        case = case_dir.name
        for p in _files(case_dir):
            seq = _brats_seq(case, p)
            if seq is None:
                res.skipped.append((str(p), "not a <case>_<seq>.nii.gz file"))
            elif seq == "seg":
                res.skipped.append((str(p), "segmentation, not an image modality"))
            elif seq not in BRATS_SEQUENCES:
                res.skipped.append((str(p), f"unknown BraTS sequence {seq!r}"))
            else:
                res.entries.append(ManifestEntry(case_id=case, modality=BRATS_SEQUENCES[seq],
                                                 path=str(p), labels=dict(labels.get(case, {}))))


# --------------------------------------------------------------------------- bids


def _bids_root(root: Path) -> Path:
    raw = root / "rawdata"
    return raw if raw.is_dir() and any(d.name.startswith("sub-") for d in _dirs(raw)) else root


def _participants(root: Path) -> dict[str, dict]:
    for base in (root, root / "rawdata"):
        p = base / "participants.tsv"
        if p.is_file():
            try:
                with open(p, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f, delimiter="\t"))
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise InputError(f"cannot read participants table: {e}", path=str(p)) from None
            return {r["participant_id"]: {k: _coerce(v) for k, v in r.items()
                                          if k != "participant_id" and v not in (None, "", "n/a")}
                    for r in rows if r.get("participant_id")}
    return {}


def _scan_bids(root: Path, res: ScanResult) -> None:
    base = _bids_root(root)
    meta = _participants(root)
    for sub in _dirs(base):
        if not sub.name.startswith("sub-"):
            continue
        sessions = [d for d in _dirs(sub) if d.name.startswith("ses-")]
        groups = [(f"{sub.name}_{s.name}", s) for s in sessions] or [(sub.name, sub)]
        for case_id, folder in groups:
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    stem = _nifti_stem(p)
                    if stem is None:
                        continue
                    suffix = stem.rsplit("_", 1)[-1].lower()
                    if not suffix or "-" in suffix:
                        res.skipped.append((str(p), "no BIDS suffix"))
                        continue
                    res.entries.append(ManifestEntry(case_id=case_id, modality=suffix, path=str(p),
                                                     metadata=dict(meta.get(sub.name, {}))))


# --------------------------------------------------------------------------- dicom


def _has_dicom_magic(p: Path) -> bool:
    if p.name.upper() == "DICOMDIR":
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first_dicom(folder: Path) -> Path | None:
    for p in _files(folder):
        if _has_dicom_magic(p):
            return p
    return None


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _series_description(p: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["SeriesDescription"])
        return str(ds.get("SeriesDescription", "") or "")
    except Exception:  # unreadable header: fall back to the folder name
        return ""


def _match(rules, *texts: str) -> str | None:
    for text in texts:
        t = _normalise(text)
        if not t:
            continue
        for rx, mod in rules:
            if rx.search(t):
                return mod
    return None


def _scan_dicom(root: Path, res: ScanResult, rules: Sequence[tuple[str, str]]) -> None:
    compiled = [(re.compile(rx), mod) for rx, mod in rules]
    for case_dir in _dirs(root):
        for dirpath, dirnames, _ in os.walk(case_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folder = Path(dirpath)
            first = _first_dicom(folder)
            if first is None:
                continue
            desc = _series_description(first)
            mod = _match(compiled, desc, folder.name)
            if mod is None:
                res.skipped.append((str(folder), f"series {desc or folder.name!r} matches no "
                                                 "modality rule"))
                continue
            res.entries.append(ManifestEntry(case_id=case_dir.name, modality=mod, path=str(folder)))


# --------------------------------------------------------------------------- key images


def _scan_keyimages(root: Path, res: ScanResult) -> None:
    """One folder per case: ``<sequence>.png`` and further ``<sequence>_<n>.png`` key images
    (each one series of that sequence, in order of n), ``report.txt`` (the report), and an
    optional ``labels.csv`` beside the folders (``case_id`` + label columns; ``age`` and
    ``sex`` columns become clinical metadata, every other column a label)."""
    labels: dict[str, dict[str, str]] = {}
    lab_path = root / "labels.csv"
    if lab_path.is_file():
        import csv
        with open(lab_path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                cid = (row.pop("case_id", "") or "").strip()
                if cid:
                    labels[cid] = {k: (v or "").strip() for k, v in row.items() if k}
    for case_dir in _dirs(root):
        cid = case_dir.name
        fields = labels.get(cid, {})
        meta = {k: _coerce(v) for k, v in fields.items() if k in ("age", "sex") and v}
        labs = {k: v for k, v in fields.items() if k not in ("age", "sex") and v}
        images = []
        for p in _files(case_dir):
            m = _KEYIMAGE_RE.match(p.name)
            if m:
                images.append((m.group("seq").lower(), int(m.group("n") or 0), p))
            elif p.name != "report.txt":
                res.skipped.append((str(p), "not a key image (<sequence>[_n].png) or report.txt"))
        for seq, _, p in sorted(images):
            res.entries.append(ManifestEntry(case_id=cid, modality=seq, path=str(p), labels=labs, metadata=meta))
        rep = case_dir / "report.txt"
        if rep.is_file():
            res.entries.append(ManifestEntry(case_id=cid, modality="report", path=str(rep), labels=labs,
                                             metadata=meta))


# --------------------------------------------------------------------------- detection


def detect_layout(root: str | os.PathLike) -> str:
    """Return "bids", "brats" or "dicom" for ``root`` (see module doc); InputError if none."""
    root = Path(root)
    dirs = _dirs(root)
    raw = root / "rawdata"
    raw_dirs = _dirs(raw) if raw.is_dir() else []
    if (root / "dataset_description.json").is_file() \
            or any(d.name.startswith("sub-") for d in dirs + raw_dirs):
        return "bids"
    for d in dirs:
        for p in _files(d):
            seq = _brats_seq(d.name, p)
            if seq in BRATS_SEQUENCES:
                return "brats"
    for d in dirs:
        for dirpath, dirnames, _ in os.walk(d):
            dirnames.sort()
            if _first_dicom(Path(dirpath)) is not None:
                return "dicom"
    if dirs and any(_KEYIMAGE_RE.match(p.name) for d in dirs[:20] for p in _files(d)):
        return "keyimages"
    raise InputError("cannot detect the folder layout (expected BIDS, BraTS, DICOM or key-image folders)",
                     path=str(root))


def scan_folder_detailed(root: str | os.PathLike, layout: str = "auto",
                         modalities: Iterable[str] | None = None, *,
                         dicom_rules: Sequence[tuple[str, str]] | None = None) -> ScanResult:
    """Scan ``root``; return the rows, the layout used and what was skipped.

    Args:
      root: the dataset folder.
      layout: "auto", "brats", "bids", "dicom" or "keyimages".
      modalities: keep only rows of these modalities (others reported as skipped).
      dicom_rules: ``(regex, modality)`` pairs for the dicom layout, tried in order
        on normalised SeriesDescription then folder name; default
        :data:`DEFAULT_DICOM_RULES`.

    Raises InputError when ``root`` is not a folder, the layout is unknown or
    undetectable, or no rows are found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder not found", path=str(root))
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; expected one of {LAYOUTS}", path=str(root))
    if layout == "auto":
        layout = detect_layout(root)
    res = ScanResult(entries=[], layout=layout)
    if layout == "brats":
        _scan_brats(root, res)
    elif layout == "bids":
        _scan_bids(root, res)
    elif layout == "keyimages":
        _scan_keyimages(root, res)
    else:
        _scan_dicom(root, res, DEFAULT_DICOM_RULES if dicom_rules is None else dicom_rules)
    if modalities is not None:
        keep = set(modalities)
        res.skipped.extend((e.path or "", f"modality {e.modality!r} not requested")
                           for e in res.entries if e.modality not in keep)
        res.entries = [e for e in res.entries if e.modality in keep]
    res.entries.sort(key=lambda e: (e.case_id, e.modality, e.path or ""))
    res.skipped.sort()
    for path, reason in res.skipped:
        logger.info("scan: skipped %s: %s", path, reason)
    if not res.entries:
        raise InputError(f"no images found ({layout} layout)", path=str(root))
    return res


def scan_folder(root: str | os.PathLike, layout: str = "auto",
                modalities: Iterable[str] | None = None, *,
                dicom_rules: Sequence[tuple[str, str]] | None = None) -> list[ManifestEntry]:
    """Scan ``root`` into manifest rows (see the module doc for the layouts)."""
    return scan_folder_detailed(root, layout, modalities, dicom_rules=dicom_rules).entries
