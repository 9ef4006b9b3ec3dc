"""Inputs that hold (issue 30, loader side): every slice's position checked against one line,
header signals that disagree refused, bounded voxel counts, non-DICOM files skipped fast and noted."""
from __future__ import annotations

import gzip
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _dicom import write_series  # noqa: E402

from mmvae.data import io as mio  # noqa: E402
from mmvae.data.io import load_image, load_nifti, load_png  # noqa: E402
from mmvae.errors import InputError  # noqa: E402


def _edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(str(path))
    fn(ds)
    ds.save_as(str(path), enforce_file_format=True)


def _refused(path, *fragments, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        load_image(path, **kw)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return ei.value


# ----------------------------------------------------------------- 1. every slice on one line
def test_zigzag_series_is_refused(tmp_path):
    folder = write_series(tmp_path / "zz", 10)
    files = sorted(folder.glob("*.dcm"))
    for k, f in enumerate(files[1:-1], start=1):        # middle slices ±6 mm along the rows; ends line up
        shift = 6.0 if k % 2 else -6.0
        _edit(f, lambda ds: setattr(ds, "ImagePositionPatient",
                                    [float(ds.ImagePositionPatient[0]) + shift] + [float(x) for x in ds.ImagePositionPatient[1:]]))
    e = _refused(folder, "in-plane", "0002.dcm", str(folder))
    assert "6.0" in e.reason


def test_small_inplane_jitter_and_straight_series_still_load(tmp_path):
    folder = write_series(tmp_path / "ok", 8)
    f = sorted(folder.glob("*.dcm"))[3]
    _edit(f, lambda ds: setattr(ds, "ImagePositionPatient",
                                [float(ds.ImagePositionPatient[0]) + 0.05] + [float(x) for x in ds.ImagePositionPatient[1:]]))
    assert load_image(folder).series[0].shape == (32, 32, 8)


# ----------------------------------------------------------------- 2. header signals that disagree
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_rescale_slope_zero_and_non_finite_are_refused(tmp_path):
    folder = write_series(tmp_path / "s0", 6)
    _edit(folder / "0003.dcm", lambda ds: setattr(ds, "RescaleSlope", 0))
    _refused(folder, "RescaleSlope", "0003.dcm")
    folder = write_series(tmp_path / "snan", 6)
    _edit(folder / "0002.dcm", lambda ds: setattr(ds, "RescaleIntercept", "NaN"))
    _refused(folder, "RescaleIntercept", "0002.dcm")


def test_b_values_that_disagree_are_refused(tmp_path):
    folder = write_series(tmp_path / "dwi", 5, b_values=(0, 1000))

    def siemens(b):
        def fn(ds):
            ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
            ds.add_new((0x0019, 0x100C), "IS", str(b))
        return fn

    _edit(folder / "0007.dcm", siemens(1000))          # agrees: fine
    assert len(load_image(folder).series) == 1
    _edit(folder / "0008.dcm", siemens(500))           # disagrees with DiffusionBValue 1000
    _refused(folder, "b-value", "0008.dcm", "1000", "500")


def test_pixel_data_holding_several_slices_is_refused(tmp_path):
    folder = write_series(tmp_path / "packed", 5)
    _edit(folder / "0003.dcm", lambda ds: setattr(ds, "PixelData", bytes(ds.PixelData) * 4))
    _refused(folder, "0003.dcm", "PixelData", "4 images")


def test_mosaic_signals_that_disagree_are_refused(tmp_path):
    folder = write_series(tmp_path / "mosaic", 5)

    def fn(ds):
        ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
        ds.add_new((0x0019, 0x100A), "US", 16)           # NumberOfImagesInMosaic, ImageType lacks MOSAIC

    _edit(folder / "0002.dcm", fn)
    _refused(folder, "0002.dcm", "mosaic", "16")


# ----------------------------------------------------------------- 4. bounded sizes
def _header_only(path: Path, shape, dtype=np.float32) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    block = hdr.binaryblock + b"\0" * 4
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(block)
    else:
        path.write_bytes(block)
    return path


def test_huge_declared_nifti_is_refused_before_reading(tmp_path):
    p = _header_only(tmp_path / "huge.nii.gz", (1800, 1800, 1200))
    t = time.perf_counter()
    with pytest.raises(InputError) as ei:
        load_nifti(p)
    assert time.perf_counter() - t < 2.0
    msg = str(ei.value)
    assert "3888000000 voxels" in msg and f"{mio.MAX_VOXELS}" in msg and str(p) in msg


@pytest.mark.parametrize("name", ["short.nii.gz", "short.nii"])
def test_header_only_nifti_is_refused_before_allocating(tmp_path, name):
    p = _header_only(tmp_path / name, (400, 400, 400))   # 256 MB of float32 declared, none stored
    tracemalloc.start()
    try:
        t = time.perf_counter()
        with pytest.raises(InputError, match="truncated") as ei:
            load_nifti(p)
        took = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2 ** 20 and took < 2.0
    assert "256000000 bytes" in str(ei.value) and str(p) in str(ei.value)


def test_complete_gzip_nifti_with_unexpected_isize_still_loads(tmp_path):
    arr = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    raw = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(raw))
    p = tmp_path / "two_members.nii.gz"        # two gzip members: the trailer's ISIZE is the last one's only
    data = raw.read_bytes()
    p.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(load_nifti(p).array, arr)


def test_dicom_and_png_voxel_bounds(tmp_path):
    folder = write_series(tmp_path / "d", 4)
    _refused(folder, "32x32x4", "4096 voxels", "max_voxels=1000", max_voxels=1000)
    assert load_image(folder, max_voxels=4096).series[0].shape == (32, 32, 4)
    png = tmp_path / "k.png"
    Image.fromarray((np.arange(100 * 60) % 251).astype(np.uint8).reshape(60, 100)).save(png)
    with pytest.raises(InputError, match=r"100x60 .*6000 pixels.*max_voxels=1000"):
        load_png(png, max_voxels=1000)
    assert load_png(png, max_voxels=6000).shape == (100, 60)


def test_memory_errors_have_a_reason(tmp_path, monkeypatch):
    arr = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    p = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", boom)
    with pytest.raises(InputError, match=r"out of memory \(MemoryError\)") as ei:
        load_nifti(p)
    assert str(p) in str(ei.value)
    monkeypatch.undo()

    from mmvae.data import preprocess as pp
    s = load_nifti(p)
    monkeypatch.setattr(pp, "foreground_mask", boom)
    with pytest.raises(InputError, match=r"out of memory \(MemoryError\)"):
        pp.preprocess_series(s, pp.PreprocessConfig(shape=(8, 8, 8), spacing=None))


# ----------------------------------------------------------------- 5. non-DICOM files skipped fast, noted
def test_zero_filled_dcm_is_skipped_fast_and_noted(tmp_path):
    folder = write_series(tmp_path / "s", 6)
    (folder / "zeros.dcm").write_bytes(b"\0" * (20 * 2 ** 20))
    (folder / "notes.txt").write_text("scanner export log\n")
    t = time.perf_counter()
    got = load_image(folder)
    assert time.perf_counter() - t < 1.0
    assert got.series[0].shape == (32, 32, 6)
    said = " | ".join(got.notes)
    assert "zeros.dcm" in said and "not a DICOM file" in said and "notes.txt" in said


def test_text_file_named_dcm_is_skipped_and_noted(tmp_path):
    folder = write_series(tmp_path / "s", 5)
    (folder / "readme.dcm").write_text("exported by the scanner console; see the study log\n" * 2000)
    got = load_image(folder)
    assert got.series[0].shape == (32, 32, 5)
    assert any("readme.dcm" in n and "not a DICOM file" in n for n in got.notes)


def test_dicom_pixel_data_is_not_read_before_the_size_check(tmp_path):
    """A series over max_voxels is refused from its headers: its pixel data (here 3 × 8 MB) is
    never read into memory (pydicom defers values over 64 KB)."""
    import tracemalloc
    folder = write_series(tmp_path / "big", 3, rows=2048, cols=2048)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="max_voxels=1000"):
            load_image(folder, max_voxels=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB allocated before the refusal"
