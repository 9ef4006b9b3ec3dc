"""The DICOM loader: slice files of a folder → validated volumes (:class:`mmvae.data.case.Series`).

Reads a series folder (:func:`load_dicom_volumes`, :func:`load_dicom_series`), chooses one
series per folder (:func:`choose_series`) and one b-value of a DWI series
(:func:`choose_volumes`), and refuses what it cannot stack into a volume (inconsistent
headers, missing or uneven slices, mosaics, multi-frame files) with an
:class:`mmvae.errors.InputError` naming the folder. :func:`mmvae.data.io.load_image`
dispatches DICOM folders here; the names below are importable from :mod:`mmvae.data.io`
as well.

DICOM conventions (see :func:`load_dicom_series`):

* array axes ``(i, j, k) = (column, row, slice)``: ``pixel_array`` is transposed so
  that ``i`` runs along the row direction cosine (first three values of
  ImageOrientationPatient), as nibabel's DICOM wrappers and dcm2niix do;
* slices are sorted by their position projected on the slice normal
  ``n = row_cosine × column_cosine``, ascending, so ``k`` runs along ``+n``;
* the affine's columns are ``row_cosine * PixelSpacing[1]`` (column spacing),
  ``column_cosine * PixelSpacing[0]`` (row spacing), ``(IPP_last - IPP_first)/(N-1)``
  and ``IPP_first``, built in DICOM patient space (LPS) and converted to RAS+ by
  negating x and y.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmvae.data.case import Series
from mmvae.data.checks import _describe, _limit, _out_of_memory, _too_big, check_geometry
from mmvae.errors import InputError

#: Relative tolerance on slice spacing: every gap between consecutive slice positions
#: must lie within ``SPACING_RTOL`` of the median gap ("uneven slice spacing").
SPACING_RTOL = 0.01
#: A gap larger than ``MISSING_SLICE_FACTOR`` × the median gap is a missing slice.
MISSING_SLICE_FACTOR = 1.5
#: Slice positions (mm along the normal) closer than this are "the same position".
SAME_POSITION_MM = 0.01
#: Tolerance on ImageOrientationPatient cosines / PixelSpacing within one series.
ORIENTATION_ATOL = 1e-4
#: Every slice position must lie on the line from the first to the last position: the in-plane
#: distance (perpendicular to the slice normal) from its place on that line may not exceed
#: ``max(INPLANE_TOL_MM, INPLANE_TOL_PIXELS × the smaller pixel spacing)`` (a zig-zag series is refused).
INPLANE_TOL_MM = 0.1
INPLANE_TOL_PIXELS = 0.1
#: DiffusionBValue (0018,9087) and the Siemens private b-value (0019,100C) of one image disagree
#: when they differ by more than ``max(1 s/mm², B_VALUE_RTOL × the larger)``.
B_VALUE_RTOL = 0.01

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class DicomVolume:
    """One volume of a DICOM series, with how it was told apart from its siblings.

    Attributes:
      series: the loaded volume.
      series_uid: SeriesInstanceUID ("" when absent).
      description: SeriesDescription ("" when absent).
      split_by: "" when the series is one volume, else the key used to split it:
        "bvalue", "echo", "acquisition" or "instance".
      split_value: the value of that key for this volume (b-value in s/mm², echo or
        acquisition number, or the 0-based rank in InstanceNumber order).
      files: the slice files, in k order.
    """

    series: Series
    series_uid: str
    description: str
    split_by: str
    split_value: Any
    files: list[str]
    series_number: int | None = None


@dataclass
class _Slice:
    path: Path
    ds: Any
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)
    spacing: np.ndarray  # (2,) PixelSpacing: (row spacing, column spacing)
    rows: int
    cols: int
    position: float = 0.0  # projected on the slice normal (mm)
    slope: float = 1.0      # RescaleSlope
    intercept: float = 0.0  # RescaleIntercept


#: Groups a DICOM dataset without the Part-10 preamble (legacy ACR-NEMA style) starts with.
_LEGACY_FIRST_GROUPS = (0x0002, 0x0008)


def _starts_like_dataset(head: bytes) -> bool:
    """Whether bytes 0-3 are the tag of a first data element (group 0002 or 0008, either byte order)."""
    if len(head) < 8:
        return False
    return (int.from_bytes(head[:2], "little") in _LEGACY_FIRST_GROUPS
            or int.from_bytes(head[:2], "big") in _LEGACY_FIRST_GROUPS)


def _read_dicom_file(p: Path):
    """Return the pydicom dataset of an image file, or the reason (a string) it is skipped,
    or None when it is skipped without a word (hidden files, files named DICOMDIR).

    Rule, decided from the first 132 bytes before any parsing: a file with the Part-10 'DICM'
    marker at byte 128 is parsed (a file that then fails to parse is an error); a file without
    it is parsed only when its name ends with .dcm/.dicom/.ima *and* it starts with a data
    element of group 0002 or 0008 (a legacy file without preamble); anything else (a zero-filled
    file, a text file, a log) is skipped at once as not DICOM. Parsed files without PixelData
    (DICOMDIR, structured reports, presentation states) are skipped.
    """
    import pydicom

    if p.name.startswith(".") or p.name.upper() == "DICOMDIR":
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise InputError(f"cannot read file {p.name!r} ({_describe(e)})", path=str(p.parent)) from None
    force = False
    if head[128:132] != b"DICM":
        if not p.name.lower().endswith(_DICOM_SUFFIXES) or not _starts_like_dataset(head):
            if head and not head.strip(b"\0"):
                return "not a DICOM file (zero-filled: no 'DICM' marker at byte 128)"
            return "not a DICOM file (no 'DICM' marker at byte 128, no data element at its start)"
        force = True
    try:
        # Values over 64 KB (the pixel data) are read when used, after the series' declared size
        # (Rows x Columns x images, data.max_voxels) has been checked from the headers.
        ds = pydicom.dcmread(str(p), force=force, defer_size="64 KB")
    except MemoryError:
        raise InputError(_out_of_memory(f"reading DICOM file {p.name!r}"), path=str(p.parent)) from None
    except Exception as e:
        raise InputError(f"cannot read DICOM file {p.name!r} ({_describe(e)})",
                         path=str(p.parent)) from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        return "a DICOMDIR (index of a media set), not an image"
    if "PixelData" not in ds:
        return "DICOM file without pixel data (e.g. a report or presentation state)"
    return ds


def _float_list(ds, keyword: str, n: int, p: Path, folder: Path) -> np.ndarray:
    v = ds.get(keyword)
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f"DICOM file {p.name!r} lacks a valid {keyword}", path=str(folder))
    return arr


def _make_slice(p: Path, ds, folder: Path) -> _Slice:
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        raise InputError(f"DICOM file {p.name!r} is multi-frame ({int(frames)} frames); "
                         "enhanced/multi-frame DICOM is not supported", path=str(folder))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"DICOM file {p.name!r} is not a grayscale image", path=str(folder))
    image_type = [str(x).upper() for x in (ds.get("ImageType") or [])]
    in_mosaic = _siemens_int(ds, 0x100A)    # NumberOfImagesInMosaic (0019,100A)
    if "MOSAIC" in image_type or (in_mosaic or 0) > 1:
        said = ("ImageType MOSAIC" if "MOSAIC" in image_type else
                f"NumberOfImagesInMosaic (0019,100A) = {in_mosaic}, though its ImageType lacks MOSAIC")
        raise InputError(f"DICOM file {p.name!r} is a Siemens mosaic by its {said} (several slices packed in one "
                         "image), which mmvae does not unpack; convert the series with dcm2niix",
                         path=str(folder))
    slope, intercept = _rescale(p, ds, folder)
    try:
        dicom_b_value(ds)                    # both b-value tags read; refused when they disagree
    except InputError as e:
        raise InputError(f"DICOM file {p.name!r}: {e.reason}", path=str(folder)) from None
    iop = _float_list(ds, "ImageOrientationPatient", 6, p, folder)
    ipp = _float_list(ds, "ImagePositionPatient", 3, p, folder)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(float(r @ c)) > 1e-3:
        raise InputError(f"DICOM file {p.name!r} has an ImageOrientationPatient whose row and column "
                         f"cosines are not orthonormal ({list(np.round(iop, 4))})", path=str(folder))
    ps = _float_list(ds, "PixelSpacing", 2, p, folder)
    if np.any(ps <= 0):
        raise InputError(f"DICOM file {p.name!r} has a non-positive PixelSpacing", path=str(folder))
    return _Slice(p, ds, iop, ipp, ps, int(ds.Rows), int(ds.Columns), slope=slope, intercept=intercept)


def _rescale(p: Path, ds, folder: Path) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)``: absent or empty → ``(1, 0)``; a value that is not a
    finite number, a slope of 0 (every voxel would be the intercept), or a Modality LUT Sequence
    (a rescaling mmvae does not apply) is refused."""
    out = []
    for kw, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        v = ds.get(kw)
        if v is None or (isinstance(v, str) and not v.strip()):
            out.append(default)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not np.isfinite(f):
            raise InputError(f"DICOM file {p.name!r} has a {kw} that is not a finite number ({v!r})",
                             path=str(folder))
        out.append(f)
    if out[0] == 0.0:
        raise InputError(f"DICOM file {p.name!r} has RescaleSlope 0 (every voxel would equal the intercept); "
                         "refused rather than read as 1", path=str(folder))
    if "ModalityLUTSequence" in ds:
        raise InputError(f"DICOM file {p.name!r} has a Modality LUT Sequence, a rescaling mmvae does not apply",
                         path=str(folder))
    return out[0], out[1]


def _check_pixel_data_length(p: Path, ds, folder: Path) -> None:
    """Native (uncompressed) pixel data must hold one image of Rows × Columns × BitsAllocated
    (one pad byte allowed): several images' worth is several slices packed in one (refused, as
    is a shorter one). Encapsulated (compressed) data are checked when decoded."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or getattr(ts, "is_compressed", True):
        return
    try:
        data = ds.PixelData
        bits = int(ds.get("BitsAllocated") or 0)
        need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits + 7) // 8
    except (TypeError, ValueError, AttributeError):
        return
    if not isinstance(data, (bytes, bytearray)) or need <= 0:
        return
    have = len(data)
    if have < need:
        raise InputError(f"DICOM file {p.name!r}: PixelData holds {have} bytes, one {int(ds.Rows)}x{int(ds.Columns)} "
                         f"{bits}-bit image needs {need} (truncated)", path=str(folder))
    if have > need + 1:
        k = have / need
        what = f"{int(k)} images" if have % need in (0, 1) else f"{k:.2f} images"
        raise InputError(f"DICOM file {p.name!r}: PixelData holds {have} bytes = {what} of {int(ds.Rows)}x"
                         f"{int(ds.Columns)} {bits}-bit while NumberOfFrames says 1 (several slices packed in "
                         "one image?); refused", path=str(folder))


def _siemens_int(ds, element: int) -> int | None:
    """An integer of the Siemens private group (0019,10xx) (private creator 'SIEMENS ...' or absent)."""
    v = _siemens_value(ds, element)
    try:
        return None if v is None else int(float(v))
    except (TypeError, ValueError):
        return None


def _siemens_value(ds, element: int):
    creator = ds.get((0x0019, 0x0010))
    if creator is not None and "SIEMENS" not in str(creator.value).upper():
        return None                      # group 0019 of another vendor: another meaning
    el = ds.get((0x0019, element))
    if el is None:
        return None
    v = el.value
    if isinstance(v, (bytes, bytearray)):
        b = bytes(v)
        if element == 0x100A and len(b) == 2:           # US, raw (VR UN)
            return int.from_bytes(b, "little")
        v = b.decode("ascii", "ignore").strip("\x00 ")
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return None if v in (None, "") else v


def dicom_b_value(ds) -> float | None:
    """DiffusionBValue (0018,9087), else the Siemens private b-value (0019,100C) (read only
    when the group's private creator is Siemens or absent).

    Raises InputError (without a path: callers add it) when both are present and differ by
    more than ``max(1 s/mm², B_VALUE_RTOL × the larger)``."""
    std = None
    el = ds.get((0x0018, 0x9087))
    if el is not None and el.value not in (None, "", b""):
        try:
            std = float(el.value)
        except (TypeError, ValueError):
            std = None
    v = _siemens_value(ds, 0x100C)
    try:
        priv = None if v is None else float(v)
    except (TypeError, ValueError):
        priv = None
    if std is not None and priv is not None and abs(std - priv) > max(1.0, B_VALUE_RTOL * max(abs(std), abs(priv))):
        raise InputError(f"b-values disagree: DiffusionBValue (0018,9087) {std:g} vs Siemens private (0019,100C) "
                         f"{priv:g} s/mm²")
    return std if std is not None else priv


def _int_tag(ds, keyword: str) -> int | None:
    v = ds.get(keyword)
    try:
        return None if v in (None, "") else int(v)
    except (TypeError, ValueError):
        return None


def _split_keys(ds) -> dict[str, Any]:
    return {"echo": _int_tag(ds, "EchoNumbers"),
            "acquisition": _int_tag(ds, "AcquisitionNumber")}


def _position_ids(slices: list[_Slice]) -> list[int]:
    """Cluster projected positions: slices closer than SAME_POSITION_MM share an id."""
    order = sorted(range(len(slices)), key=lambda i: slices[i].position)
    ids = [0] * len(slices)
    cur, prev = -1, None
    for i in order:
        if prev is None or slices[i].position - prev > SAME_POSITION_MM:
            cur += 1
        ids[i] = cur
        prev = slices[i].position
    return ids


def _split_volumes(slices: list[_Slice], folder: Path) -> list[tuple[str, Any, list[_Slice]]]:
    """Split a series whose images repeat slice positions into volumes.

    Rule: images with at least two b-values (standard tag, else Siemens private; an
    untagged image beside tagged ones is b = 0) are grouped by b-value, increasing; a
    group repeating positions (diffusion directions) is split by rank into volumes
    ``(b, rank)``. Otherwise try the echo number, then the acquisition number: the first
    key that every image has, that takes at least two values and that leaves no position
    repeated within a value is used, volumes ordered by increasing value. Otherwise the
    images at each position are ordered by (InstanceNumber, file name) and the n-th image
    at each position goes to volume n (every position must then hold the same count).
    """
    pos = _position_ids(slices)
    if len(set(pos)) == len(slices):
        return [("", None, slices)]
    bvals = [dicom_b_value(s.ds) for s in slices]
    if any(b is not None for b in bvals) and len({b for b in bvals if b is not None} | ({0.0} if None in bvals else set())) > 1:
        # DWI: group by b-value (an image without the tag is b=0 beside tagged ones); several images
        # per position within a b-value (diffusion directions) become sub-volumes (b, rank)
        out = []
        groups: dict[float, list[_Slice]] = {}
        for s, b in zip(slices, bvals):
            groups.setdefault(0.0 if b is None else float(b), []).append(s)
        for b in sorted(groups):
            g = groups[b]
            gpos = _position_ids(g)
            if len(set(gpos)) == len(g):
                out.append(("bvalue", b, g))
                continue
            for r, sub in enumerate(_by_rank(g, gpos, folder)):
                out.append(("bvalue", (b, r), sub))
        return out
    for key in ("echo", "acquisition"):             # b-values are handled above
        values = [_split_keys(s.ds)[key] for s in slices]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[Any, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
        if all(len({pos[i] for i in g}) == len(g) for g in groups.values()):
            return [(key, v, [slices[i] for i in groups[v]]) for v in sorted(groups)]
    return [("instance", r, vol) for r, vol in enumerate(_by_rank(slices, pos, folder))]


def _by_rank(slices: list[_Slice], pos: list[int], folder: Path) -> list[list[_Slice]]:
    """The n-th image at each position (InstanceNumber, then file name order) → volume n."""
    by_pos: dict[int, list[_Slice]] = {}
    for s, pid in zip(slices, pos):
        by_pos.setdefault(pid, []).append(s)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1:
        raise InputError(f"images share slice positions but positions hold different numbers "
                         f"of images ({sorted(counts)}); cannot split into volumes",
                         path=str(folder))
    for v in by_pos.values():
        v.sort(key=lambda s: (_int_tag(s.ds, "InstanceNumber") or 0, s.path.name))
    n = counts.pop()
    return [[by_pos[pid][r] for pid in sorted(by_pos)] for r in range(n)]


def _check_consistent(slices: list[_Slice], folder: Path) -> None:
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise InputError(f"inconsistent image size within a series: {ref.path.name!r} is "
                             f"{ref.rows}x{ref.cols}, {s.path.name!r} is {s.rows}x{s.cols}",
                             path=str(folder))
        if not np.allclose(s.iop, ref.iop, atol=ORIENTATION_ATOL, rtol=0):
            raise InputError(f"inconsistent ImageOrientationPatient within a series "
                             f"({ref.path.name!r} vs {s.path.name!r})", path=str(folder))
        if not np.allclose(s.spacing, ref.spacing, atol=ORIENTATION_ATOL, rtol=0):
            raise InputError(f"inconsistent PixelSpacing within a series "
                             f"({ref.path.name!r} vs {s.path.name!r})", path=str(folder))


def _check_line(slices: list[_Slice], folder: Path) -> None:
    """``slices`` sorted by position: every ImagePositionPatient must lie on the line from the
    first to the last one (the line the affine's third column follows), in-plane within
    ``max(INPLANE_TOL_MM, INPLANE_TOL_PIXELS × pixel spacing)``. The positions along it are
    checked by :func:`_check_spacing`, the line's tilt by :func:`check_geometry`."""
    if len(slices) < 3:
        return
    ref = slices[0]
    normal = np.cross(ref.iop[:3], ref.iop[3:])
    normal /= np.linalg.norm(normal)
    step = (slices[-1].ipp - ref.ipp) / (len(slices) - 1)
    d = np.stack([s.ipp for s in slices]) - (ref.ipp + np.arange(len(slices))[:, None] * step)
    inplane = np.linalg.norm(d - (d @ normal)[:, None] * normal, axis=1)
    tol = max(INPLANE_TOL_MM, INPLANE_TOL_PIXELS * float(np.min(ref.spacing)))
    worst = int(np.argmax(inplane))
    if inplane[worst] > tol:
        raise InputError(f"slice positions are not on one line: {slices[worst].path.name!r} lies "
                         f"{inplane[worst]:.3f} mm in-plane off the line from {ref.path.name!r} to "
                         f"{slices[-1].path.name!r} (tolerance {tol:.3f} mm); slices shifted in-plane cannot "
                         "be stacked into one volume", path=str(folder))


def _check_spacing(slices: list[_Slice], folder: Path) -> None:
    """``slices`` sorted by position; raise on a missing slice or uneven spacing."""
    if len(slices) < 3:
        return
    pos = np.array([s.position for s in slices])
    gaps = np.diff(pos)
    med = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > MISSING_SLICE_FACTOR * med:
        a, b = slices[worst], slices[worst + 1]
        raise InputError(f"missing slice between {a.path.name!r} and {b.path.name!r} "
                         f"(gap {gaps[worst]:.3f} mm, median slice spacing {med:.3f} mm)",
                         path=str(folder))
    dev = np.abs(gaps - med) / med
    worst = int(np.argmax(dev))
    if dev[worst] > SPACING_RTOL:
        a, b = slices[worst], slices[worst + 1]
        raise InputError(f"uneven slice spacing: {gaps[worst]:.3f} mm between {a.path.name!r} "
                         f"and {b.path.name!r}, median {med:.3f} mm (tolerance "
                         f"{SPACING_RTOL:.0%})", path=str(folder))


_DECODER_HINTS = {
    "jpeg2000": "JPEG 2000 needs a decoder: pip install 'mmvae[dicom]' (pylibjpeg + pylibjpeg-openjpeg) or python-gdcm",
    "jpegls": "JPEG-LS needs a decoder: pip install 'mmvae[dicom]' (pyjpegls) or python-gdcm",
    "jpeg": "JPEG needs a decoder: pip install 'mmvae[dicom]' (pylibjpeg + pylibjpeg-libjpeg) or python-gdcm",
    "rle": "RLE is decoded by pydicom itself; the data are damaged",
}


def _codec_family(name: str) -> str:
    n = name.lower().replace(" ", "")
    if "2000" in n:
        return "jpeg2000"
    if "jpeg-ls" in n or "jpegls" in n:
        return "jpegls"
    if "jpeg" in n:
        return "jpeg"
    if "rle" in n:
        return "rle"
    return ""


def _pixels(s: _Slice, folder: Path) -> np.ndarray:
    try:
        arr = np.asarray(s.ds.pixel_array, dtype=np.float64)
    except MemoryError:
        raise InputError(_out_of_memory(f"decoding the pixel data of {s.path.name!r}"), path=str(folder)) from None
    except Exception as e:
        ts = getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts)) if ts is not None else "unknown"
        hint = _DECODER_HINTS.get(_codec_family(name), "")
        raise InputError(f"cannot decode pixel data of {s.path.name!r} (transfer syntax {name}"
                         f"{' ' + str(ts) if ts is not None and str(ts) != name else ''}): {_describe(e, full=True)}"
                         f"{'; ' + hint if hint else ''}", path=str(folder)) from None
    if arr.shape != (s.rows, s.cols):
        raise InputError(f"pixel data of {s.path.name!r} has shape {arr.shape}, expected "
                         f"{(s.rows, s.cols)}", path=str(folder))
    return (arr * s.slope + s.intercept).T  # (columns, rows) = (i, j)


def _volume(slices: list[_Slice], folder: Path) -> Series:
    """Stack position-sorted slices into a Series with its RAS+ affine."""
    ref = slices[0]
    row_cos, col_cos = ref.iop[:3], ref.iop[3:]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ref.spacing[1]  # i: along a row, step = column spacing
    lps[:3, 1] = col_cos * ref.spacing[0]  # j: down a column, step = row spacing
    if len(slices) > 1:
        lps[:3, 2] = (slices[-1].ipp - slices[0].ipp) / (len(slices) - 1)
    else:
        normal = np.cross(row_cos, col_cos)
        thick = ref.ds.get("SpacingBetweenSlices") or ref.ds.get("SliceThickness") or 1.0
        lps[:3, 2] = normal * float(thick)
    lps[:3, 3] = ref.ipp
    check_geometry((ref.cols, ref.rows, len(slices)), lps, str(folder))     # e.g. gantry tilt, before decoding
    try:
        data = np.stack([_pixels(s, folder) for s in slices], axis=-1).astype(np.float32)
    except MemoryError:
        raise InputError(_out_of_memory(f"stacking {len(slices)} slices of {ref.cols}x{ref.rows}"),
                         path=str(folder)) from None
    return Series(array=data, affine=_LPS_TO_RAS @ lps, path=str(folder))


def _headers(folder: Path, skipped: list[tuple[str, str]] | None = None) -> dict[str, list[tuple[Path, Any]]]:
    """SeriesInstanceUID → ``(file, dataset)`` of the folder's image files (an image stored twice,
    same SOPInstanceUID, counted once). Nothing is validated or decoded here. ``skipped``, when
    given, receives ``(file name, why)`` of each file skipped (:func:`_read_dicom_file`)."""
    if not folder.is_dir():
        raise InputError("DICOM folder not found", path=str(folder))
    files = sorted((e for e in os.scandir(folder) if e.is_file()), key=lambda e: e.name)
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    seen_sop: set[str] = set()
    for entry in files:
        p = Path(entry.path)
        ds = _read_dicom_file(p)
        if ds is None:
            continue
        if isinstance(ds, str):
            if skipped is not None:
                skipped.append((p.name, ds))
            continue
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen_sop:  # the same image stored twice
            continue
        seen_sop.add(sop)
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((p, ds))
    if not by_uid:
        raise InputError("no DICOM image files in folder", path=str(folder))
    return by_uid


def _series_number(items: list[tuple[Path, Any]]) -> int | None:
    return _int_tag(items[0][1], "SeriesNumber")


def _series_volumes(uid: str, items: list[tuple[Path, Any]], folder: Path,
                    max_voxels: int | None = None) -> list[DicomVolume]:
    """Validate and decode one series into its volumes (see :func:`_split_volumes`)."""
    slices = [_make_slice(p, ds, folder) for p, ds in items]
    _check_consistent(slices, folder)
    n, limit = slices[0].cols * slices[0].rows * len(slices), _limit(max_voxels)
    if n > limit:          # from the headers: no pixel data has been read yet (deferred)
        raise InputError(_too_big(f"series of {slices[0].cols}x{slices[0].rows}x{len(slices)} (columns x rows x "
                                  "images)", n, limit), path=str(folder))
    for s in slices:
        _check_pixel_data_length(s.path, s.ds, folder)
    normal = np.cross(slices[0].iop[:3], slices[0].iop[3:])
    if np.linalg.norm(normal) < 0.5:
        raise InputError(f"degenerate ImageOrientationPatient in {slices[0].path.name!r}", path=str(folder))
    normal /= np.linalg.norm(normal)
    for s in slices:
        s.position = float(np.dot(normal, s.ipp))
    desc = str(slices[0].ds.get("SeriesDescription", "") or "")
    out = []
    for key, value, vol in _split_volumes(slices, folder):
        vol = sorted(vol, key=lambda s: (s.position, s.path.name))
        _check_line(vol, folder)
        _check_spacing(vol, folder)
        out.append(DicomVolume(_volume(vol, folder), uid, desc, key, value, [str(s.path) for s in vol],
                               _series_number(items)))
    return out


def load_dicom_volumes(folder: str | os.PathLike, *, max_voxels: int | None = None) -> list[DicomVolume]:
    """Every volume of every series of a DICOM folder, with its series/split information.

    Volumes are ordered by (SeriesNumber, SeriesInstanceUID), then split value. Any
    problem in any series raises; :func:`load_image` instead chooses one series first
    (:func:`choose_series`) and reads only that one.
    """
    folder = Path(folder)
    by_uid = _headers(folder)

    def series_order(uid):
        num = _series_number(by_uid[uid])
        return (num if num is not None else 1 << 62, uid)

    return [v for uid in sorted(by_uid, key=series_order)
            for v in _series_volumes(uid, by_uid[uid], folder, max_voxels)]


def series_preference(images: int, number: int | None, uid: str) -> tuple:
    """Sort key (ascending: preferred first) of the one rule choosing among series: the most
    images, then the higher SeriesNumber (acquired later; a missing number ranks lowest), then
    the lower UID. Used by :func:`choose_series` (a DICOM folder) and by the PACS ingest
    (:func:`mmvae.pacs.rules.map_series`, among series one modality rule matches)."""
    return (-int(images), -(number if number is not None else -1), str(uid))


def preference_reason(counts: list[int]) -> str:
    """Why the first of series ranked by :func:`series_preference` (their image ``counts``) won."""
    tie = len(counts) > 1 and counts[0] == counts[1]
    return "the most images, then the higher series number" if tie else "the most images"


def _skip_note(skipped: list[tuple[str, str]]) -> list[str]:
    if not skipped:
        return []
    shown = "; ".join(f"{name!r}: {why}" for name, why in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    return [f"skipped {len(skipped)} file(s) that are not DICOM images: {shown}{more}"]


def choose_series(folder: str | os.PathLike) -> tuple[str, list[tuple[Path, Any]], list[str]]:
    """The series of a DICOM folder to use: ``(uid, its files, notes)``.

    Rule (:func:`series_preference`): the series with the most images; ties go to the higher
    SeriesNumber (acquired later; a missing number ranks lowest), then the lower UID. Decided
    from the headers alone, so a series that is not used (a localizer, a dose report, a
    screenshot) never stops the folder, whatever is wrong with it. Files skipped as not DICOM
    images (:func:`_read_dicom_file`) are named in a note, with the reason."""
    folder = Path(folder)
    skipped: list[tuple[str, str]] = []
    by_uid = _headers(folder, skipped)
    if len(by_uid) == 1:
        uid = next(iter(by_uid))
        return uid, by_uid[uid], _skip_note(skipped)

    ranked = sorted(by_uid, key=lambda u: series_preference(len(by_uid[u]), _series_number(by_uid[u]), u))

    def name(uid):
        n = _series_number(by_uid[uid])
        desc = str(by_uid[uid][0][1].get("SeriesDescription", "") or "")
        return f"series {n if n is not None else '?'} {desc!r} ({len(by_uid[uid])} images)"

    why = preference_reason([len(by_uid[u]) for u in ranked])
    note = (f"folder holds {len(by_uid)} series: using {name(ranked[0])} ({why}); dropped "
            + ", ".join(name(u) for u in ranked[1:]))
    return ranked[0], by_uid[ranked[0]], [note] + _skip_note(skipped)


#: How a DWI series with several b-values is reduced (``data.dwi_b_value``).
B_VALUE_RULES = ("highest", "lowest", "all")


def choose_volumes(vols: list[DicomVolume], b_value: str | float = "highest") -> tuple[list[DicomVolume], list[str]]:
    """The volumes of one series the model gets, and the choice made, in words.

    * a series split by b-value (DWI): ``b_value`` ``"highest"`` (default: the most
      diffusion-weighted), ``"lowest"``, ``"all"`` (every b-value as a series of the
      modality) or a number (the nearest b-value, s/mm²). Several volumes at the chosen
      b-value (diffusion directions) are combined into the trace image, their voxel-wise
      geometric mean (the isotropic diffusion-weighted image; Stejskal–Tanner signal
      ``S_b = S_0 exp(-b D)`` averaged in the log domain);
    * a series split by echo, acquisition or instance: every volume is kept, in order.
    """
    notes: list[str] = []
    if vols and vols[0].split_by == "bvalue":
        groups: dict[float, list[DicomVolume]] = {}
        for v in vols:
            groups.setdefault(_b_of(v), []).append(v)
        values = sorted(groups)
        listed = "/".join(f"{b:g}" for b in values)
        if b_value == "all":
            notes.append(f"b-values {listed} s/mm²: every b-value kept as a series (data.dwi_b_value='all')")
            return [_trace(groups[b], notes) for b in values], notes
        if b_value == "highest":
            pick = values[-1]
        elif b_value == "lowest":
            pick = values[0]
        else:
            try:
                want = float(b_value)
            except (TypeError, ValueError):
                raise InputError(f"data.dwi_b_value must be one of {B_VALUE_RULES} or a number, got {b_value!r}")
            pick = min(values, key=lambda b: abs(b - want))
        if len(values) > 1:
            notes.append(f"b-values {listed} s/mm²: using b={pick:g} (data.dwi_b_value={b_value!r}); "
                         f"dropped the others")
        return [_trace(groups[pick], notes)], notes
    if vols and vols[0].split_by and len(vols) > 1:
        notes.append(f"series split into {len(vols)} volumes by {vols[0].split_by}: all kept as series, in order")
    return vols, notes


def _b_of(v: DicomVolume) -> float:
    """The b-value of a volume split by b-value (``split_value`` is ``b`` or ``(b, direction rank)``)."""
    return float(v.split_value[0] if isinstance(v.split_value, tuple) else v.split_value)


def _trace(vols: list[DicomVolume], notes: list[str]) -> DicomVolume:
    """One volume of a b-value: itself, or the geometric mean of its diffusion directions."""
    if len(vols) == 1:
        return vols[0]
    b = _b_of(vols[0])
    arrs = np.stack([v.series.array for v in vols]).astype(np.float64)
    trace = np.exp(np.log(np.maximum(arrs, 1e-6)).mean(0)).astype(np.float32)
    notes.append(f"{len(vols)} images per position at b={float(b):g}: combined into the trace image "
                 "(geometric mean over diffusion directions)")
    first = vols[0]
    return DicomVolume(Series(array=trace, affine=first.series.affine, path=first.series.path), first.series_uid,
                       first.description, "bvalue", b, sum((v.files for v in vols), []), first.series_number)


def load_dicom_series(folder: str | os.PathLike) -> list[Series]:
    """Load every series (and every volume of a multi-volume series) in a DICOM folder.

    Args:
      folder: a directory holding the slice files (not searched recursively).

    Returns:
      one Series per volume, array shape ``(columns, rows, slices)`` float32 with
      RescaleSlope/RescaleIntercept applied, affine in RAS+ mm (see module doc).

    Files are grouped by SeriesInstanceUID (identical SOPInstanceUIDs are read
    once). Images repeating a slice position are split into volumes (see
    :func:`_split_volumes`: b-value, echo number, acquisition number, else
    InstanceNumber rank). Raises InputError naming the folder (and the slice files
    concerned) when there are no DICOM images, when orientation, pixel spacing or
    image size differ within a series, when a gap between consecutive slices
    exceeds ``MISSING_SLICE_FACTOR`` (1.5) × the median gap (missing slice), or when
    any gap deviates from the median by more than ``SPACING_RTOL`` (1 %).
    """
    return [v.series for v in load_dicom_volumes(folder)]
