"""Loaders: NIfTI files, PNG key images and report texts, and the dispatch of an image
source (:func:`load_image`, :func:`load_series`: a DICOM folder, a NIfTI or a PNG file).

Every loader returns :class:`mmvae.data.case.Series` objects (float32 voxels, a 4x4
voxel→world affine in RAS+ millimetres) or raises :class:`mmvae.errors.InputError`
naming the file or folder; library exceptions (nibabel, zlib, pydicom, PIL) never
escape. Callers add the case and modality with ``err.with_context(...)``.

DICOM folders are read by :mod:`mmvae.data.dicom` (its conventions are documented there);
its names (``load_dicom_series``, ``choose_series``, ``series_preference``, ...) and the
shared checks of :mod:`mmvae.data.checks` (``MAX_VOXELS``, ``check_geometry``,
``_describe``) stay importable from here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmvae.data.case import Series
from mmvae.data.checks import (MAX_FOV_MM, MAX_VOXELS, VOXEL_MM, _describe, _limit, _out_of_memory,  # noqa: F401
                               _too_big, check_geometry)
from mmvae.data.dicom import (B_VALUE_RTOL, B_VALUE_RULES, INPLANE_TOL_MM, INPLANE_TOL_PIXELS,  # noqa: F401
                              MISSING_SLICE_FACTOR, ORIENTATION_ATOL, SAME_POSITION_MM, SPACING_RTOL,
                              DicomVolume, _series_volumes, choose_series, choose_volumes, dicom_b_value,
                              load_dicom_series, load_dicom_volumes, preference_reason, series_preference)
from mmvae.errors import InputError

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


# --------------------------------------------------------------------------- NIfTI


def load_nifti(path: str | os.PathLike, *, max_voxels: int | None = None) -> Series:
    """Load a ``.nii``/``.nii.gz`` file.

    Returns a Series with a float32 array of the stored shape (trailing singleton
    dimensions beyond the third removed, e.g. ``(X, Y, Z, 1)`` → ``(X, Y, Z)``) and
    nibabel's ``affine`` (sform when ``sform_code > 0``, else qform), RAS+, converted to
    millimetres from the header's spatial unit (``xyzt_units``: metres × 1000, microns
    × 0.001; "unknown" is taken as mm, the NIfTI-1 convention).

    Raises InputError for a missing, truncated, corrupt or non-NIfTI file, and for a
    header with ``sform_code = qform_code = 0``: its only affine is nibabel's fallback
    (voxel sizes, no orientation), which would silently mirror left and right against
    RAS. The data are read completely here (nibabel is lazy and a truncated gzip
    stream only fails when the voxels are read). Before any voxel is read: the declared
    voxel count (all volumes) must not exceed ``max_voxels`` (default :data:`MAX_VOXELS`), the
    file must hold the ``vox_offset + voxels × itemsize`` bytes its header declares
    (:func:`_check_nifti_length`: a truncated or header-only file is refused without
    allocating), and the field of view is checked (:func:`check_geometry`).
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path=str(p))
    try:
        img = nib.load(str(p), mmap=False)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"not a NIfTI file (nibabel reads it as {type(img).__name__})",
                             path=str(p))
        hdr = img.header
        shape = tuple(int(x) for x in hdr.get_data_shape())
        n = 1
        for x in shape:
            n *= x
        limit = _limit(max_voxels)
        if n > limit:
            raise InputError(_too_big(f"header declares {'x'.join(map(str, shape))}", n, limit), path=str(p))
        offset = getattr(img.dataobj, "offset", None)       # the header copy's vox_offset may read 0
        _check_nifti_length(p, int(offset if offset is not None else hdr["vox_offset"]),
                            n * int(hdr.get_data_dtype().itemsize))
        if int(hdr["sform_code"]) <= 0 and int(hdr["qform_code"]) <= 0:
            raise InputError("NIfTI header has no orientation (sform_code = qform_code = 0): left and right "
                             "cannot be told apart; set the sform/qform (e.g. convert again with dcm2niix)",
                             path=str(p))
        affine = np.array(img.affine, dtype=np.float64)
        unit = hdr.get_xyzt_units()[0]
        scale = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)
        affine[:3, :] *= scale
        check_geometry(tuple(int(x) for x in img.shape[:3]), affine, str(p))
        data = np.array(img.get_fdata(dtype=np.float32), dtype=np.float32, copy=True)
        if data.size == 0:  # nibabel returns shape (0,) for zero-size images
            data = data.reshape(img.shape)
    except InputError:
        raise
    except MemoryError:
        raise InputError(_out_of_memory("reading the voxels"), path=str(p)) from None
    except Exception as e:  # nibabel / gzip / zlib / OS errors of every kind
        raise InputError(f"cannot read NIfTI file ({_describe(e)})", path=str(p)) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return Series(array=data, affine=affine, path=str(p))


def _check_nifti_length(p: Path, offset: int, nbytes: int) -> None:
    """Refuse a NIfTI file holding fewer than ``offset + nbytes`` (data) bytes, without allocating.

    ``.nii``: the file size. ``.nii.gz``: when the gzip trailer's ISIZE (uncompressed length
    mod 2**32 of the last member) equals the declared length the file is taken as complete (a
    truncated stream ends in compressed bytes, which match by chance once in 2**32; nibabel's
    read still fails on it); otherwise the stream is decompressed in 1 MiB chunks, counted and
    dropped, up to the declared length (never more)."""
    need = offset + nbytes
    if not p.name.lower().endswith(".gz"):
        have = p.stat().st_size
    else:
        import gzip
        import zlib
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() >= 18:
                f.seek(-4, os.SEEK_END)
                if int.from_bytes(f.read(4), "little") == need % 2 ** 32:
                    return
        have = 0
        try:
            with gzip.open(p, "rb") as f:
                while have < need:
                    chunk = f.read(min(1 << 20, need - have))
                    if not chunk:
                        break
                    have += len(chunk)
        except EOFError:
            pass  # the stream ended early: counted so far
        except (OSError, zlib.error) as e:
            raise InputError(f"cannot read NIfTI file ({_describe(e)})", path=str(p)) from None
    if have < need:
        raise InputError(f"cannot read NIfTI file (truncated file: the header declares {nbytes} bytes of voxel "
                         f"data from byte {offset}, the file holds {max(0, have - offset)})", path=str(p))


# --------------------------------------------------------------------------- PNG


def load_png(path: str | os.PathLike, affine: np.ndarray | None = None, *,
             max_voxels: int | None = None) -> Series:
    """Load a 2D key image as grayscale float32 of shape ``(X, Y) = (columns, rows)``.

    Colour images are converted with PIL's ``convert("L")`` (ITU-R 601-2 luma,
    alpha ignored); 16-bit and float images keep their values. The affine is
    ``affine`` if given, else the identity. An image of more than ``max_voxels`` pixels
    (default :data:`MAX_VOXELS`) is refused from its header, before decoding; Pillow's own
    decompression-bomb guard (above ``2 × PIL.Image.MAX_IMAGE_PIXELS``) also applies.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise InputError("file not found", path=str(p))
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > _limit(max_voxels):
                raise InputError(_too_big(f"image of {w}x{h}", w * h, _limit(max_voxels), "pixels"), path=str(p))
            im.load()
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.float32)
            else:
                arr = np.asarray(im.convert("L")).astype(np.float32)
    except InputError:
        raise
    except MemoryError:
        raise InputError(_out_of_memory("decoding the image"), path=str(p)) from None
    except Exception as e:
        raise InputError(f"cannot read PNG image ({_describe(e)})", path=str(p)) from None
    if arr.ndim != 2:
        raise InputError(f"PNG image has shape {arr.shape}, expected 2D", path=str(p))
    aff = np.eye(4) if affine is None else np.array(affine, dtype=np.float64)
    return Series(array=np.ascontiguousarray(arr.T), affine=aff, path=str(p))


# --------------------------------------------------------------------------- dispatch


@dataclass
class Loaded:
    """What an image source gave: its series (validated) and every choice made, in words."""
    series: list[Series]
    notes: list[str]


def load_series(path: str | os.PathLike, *, spatial_dims: int = 3, b_value: str | float = "highest",
                max_voxels: int | None = None) -> list[Series]:
    """Load an image source and validate it (see :func:`load_image`)."""
    return load_image(path, spatial_dims=spatial_dims, b_value=b_value, max_voxels=max_voxels).series


def load_image(path: str | os.PathLike, *, spatial_dims: int = 3, b_value: str | float = "highest",
               max_voxels: int | None = None) -> Loaded:
    """Load an image source, choose among its volumes by stated rules, and validate.

    ``path`` is a DICOM folder, a ``.nii``/``.nii.gz`` file or a ``.png`` file
    (suffixes case-insensitive). A DICOM folder's volumes are reduced by
    :func:`choose_volumes` (one series per folder; one b-value by ``b_value``);
    every returned Series passed :func:`validate_series` with ``spatial_dims``. An image
    of more than ``max_voxels`` voxels (default :data:`MAX_VOXELS`) is refused from its
    headers before any voxel is read.
    """
    p = Path(path)
    notes: list[str] = []
    if p.is_dir():
        uid, items, notes = choose_series(p)
        vols, more = choose_volumes(_series_volumes(uid, items, p, max_voxels), b_value)
        notes += more
        series = [v.series for v in vols]
    elif not p.exists():
        raise InputError("file not found", path=str(p))
    elif _is_nifti(p):
        series = [load_nifti(p, max_voxels=max_voxels)]
    elif p.name.lower().endswith(".png"):
        series = [load_png(p, max_voxels=max_voxels)]
    else:
        raise InputError("unsupported file type (expected .nii, .nii.gz, .png or a DICOM "
                         "folder)", path=str(p))
    return Loaded([validate_series(s, spatial_dims) for s in series], notes)


def _drop_axis(series: Series, axis: int) -> Series:
    """Remove singleton array ``axis``; its affine column moves to third position."""
    arr = np.take(series.array, 0, axis=axis)
    cols = [c for c in range(3) if c != axis] + [axis]
    aff = np.array(series.affine, dtype=np.float64)
    aff[:, :3] = aff[:, cols]
    return Series(array=arr, affine=aff, path=series.path)


def validate_series(series: Series, spatial_dims: int) -> Series:
    """Check a loaded series; return it with a float32 array of ``spatial_dims`` dims.

    Errors (InputError with the series path): an empty array (a zero-size
    dimension); wrong dimensionality — more than one volume in a 4D image, a 2D
    image where a volume is expected, a volume where a 2D image is expected unless
    one of its axes is a singleton (that axis is then dropped and its affine column
    becomes the third); NaN or infinite voxels (with counts); a constant image; an
    affine that is not a finite, invertible 4x4 matrix.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    path = series.path or None
    arr = np.asarray(series.array)
    if arr.size == 0:
        raise InputError(f"empty image (shape {arr.shape})", path=path)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim > 3:
        vols = int(np.prod(arr.shape[3:]))
        what = "a 3D volume" if spatial_dims == 3 else "a 2D image"
        raise InputError(f"{arr.ndim}D image with {vols} volumes where {what} is expected "
                         f"(shape {arr.shape})", path=path)
    aff = np.asarray(series.affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError("invalid affine (not a finite invertible 4x4 matrix)", path=path)
    series = Series(array=arr, affine=aff, path=series.path)
    if spatial_dims == 3 and arr.ndim == 2:
        raise InputError(f"2D image where a 3D volume is expected (shape {arr.shape})", path=path)
    if spatial_dims == 3 and 1 in arr.shape:
        raise InputError(f"single-slice image (shape {arr.shape}) where a 3D volume is expected; key images "
                         "need a 2D config (data.spatial_dims=2)", path=path)
    if spatial_dims == 2 and arr.ndim == 3:
        singles = [a for a in (2, 1, 0) if arr.shape[a] == 1]
        if not singles:
            raise InputError(f"3D image where a 2D image is expected (shape {arr.shape})",
                             path=path)
        series = _drop_axis(series, singles[0])
        arr = series.array
    if arr.ndim < 2:
        raise InputError(f"{arr.ndim}D array is not an image (shape {arr.shape})", path=path)
    arr = np.asarray(arr, dtype=np.float32)
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        parts = []
        if n_nan:
            parts.append(f"NaN voxels ({n_nan} of {arr.size})")
        if n_inf:
            parts.append(f"infinite voxels ({n_inf} of {arr.size})")
        raise InputError(" and ".join(parts), path=path)
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(f"constant image (every voxel is {lo:g})", path=path)
    return Series(array=arr, affine=series.affine, path=series.path)


# --------------------------------------------------------------------------- reports


def load_report(path: str | os.PathLike) -> str:
    """Read a report file; return it stripped of outer whitespace.

    UTF-8 (a byte-order mark is dropped; a UTF-16/UTF-32 byte-order mark is honoured):
    :func:`mmvae.data.text.decode_text`. The text must pass
    :func:`mmvae.data.text.check_report_text` (not blank, not mostly control characters).
    Raises InputError naming the file for a missing or unreadable file, another encoding
    (named), or text that is not text.
    """
    from mmvae.data.text import check_report_text, decode_text
    p = Path(path)
    if not p.is_file():
        raise InputError("report file not found", path=str(p))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read report ({_describe(e)})", path=str(p)) from None
    try:
        return check_report_text(decode_text(raw)).strip()
    except InputError as e:
        reason = e.reason if e.reason.startswith(("report", "empty report")) else f"report {e.reason}"
        raise InputError(reason, path=str(p)) from None
