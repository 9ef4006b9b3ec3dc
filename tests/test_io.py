"""Tests of mmvae.data.io: NIfTI / DICOM / PNG / report loaders and input validation."""
from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from mmvae.data.case import Series
from mmvae.data.io import (load_dicom_series, load_dicom_volumes, load_image, load_nifti, load_png,
                           load_report, load_series, validate_series)
from mmvae.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STUDY = DATA / "prostatex-dicom" / "ProstateX-0000" / "07-07-2011"
T2_TRA = STUDY / "4.000000-t2tsetra-00702"
DWI = STUDY / "6.000000-ep2ddifftraDYNDIST-69284"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"sample data not available: {path}")
    return path


def save_nifti(path: Path, arr, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def raises_input_error(path, name: str, *fragments: str, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        load_series(path, **kw)
    msg = str(ei.value)
    assert name in msg, msg
    for f in fragments:
        assert f in msg, msg
    # no chained library traceback
    assert ei.value.__cause__ is None
    assert ei.value.__context__ is None or ei.value.__suppress_context__
    return ei.value


def dcm_headers(folder: Path):
    files = sorted(folder.iterdir())
    return files, [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]


# --------------------------------------------------------------------------- NIfTI


def test_nifti_roundtrip_float32_affine_and_squeeze(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-100, 1000, size=(6, 7, 5, 1)).astype(np.int16)
    aff = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -4], [0, 0, 3, 7], [0, 0, 0, 1]])
    s = load_nifti(save_nifti(tmp_path / "a.nii.gz", arr, aff))
    assert s.array.dtype == np.float32 and s.shape == (6, 7, 5)
    np.testing.assert_array_equal(s.array, arr[..., 0].astype(np.float32))
    np.testing.assert_allclose(s.affine, aff)
    assert s.spacing == pytest.approx((2.0, 1.5, 3.0))
    assert s.path.endswith("a.nii.gz")


def test_truncated_gz_is_input_error(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz",
                      np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32))
    raw = good.read_bytes()
    bad = tmp_path / "half_file.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    err = raises_input_error(bad, "half_file.nii.gz", "truncated")
    assert err.path == str(bad)


def test_truncated_uncompressed_nifti(tmp_path):
    good = save_nifti(tmp_path / "g.nii", np.arange(4096, dtype=np.float32).reshape(16, 16, 16))
    bad = tmp_path / "cut.nii"
    bad.write_bytes(good.read_bytes()[:2000])
    raises_input_error(bad, "cut.nii", "cannot read NIfTI")


@pytest.mark.parametrize("name,content", [
    ("notnifti.nii.gz", gzip.compress(b"hello, this is not an image" * 20)),
    ("notgzip.nii.gz", b"plain bytes, not gzip" * 30),
    ("text.nii", b"just some text\n" * 40),
])
def test_non_nifti_is_input_error(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    raises_input_error(p, name, "cannot read NIfTI")


def test_nan_and_inf_voxels_are_counted(tmp_path):
    arr = np.random.default_rng(2).normal(size=(8, 8, 8)).astype(np.float32)
    a = arr.copy()
    a[0, 0, :3] = np.nan
    raises_input_error(save_nifti(tmp_path / "nan_img.nii.gz", a), "nan_img.nii.gz",
                       "NaN voxels (3 of 512)")
    b = arr.copy()
    b[1, 2, 3], b[4, 4, 4] = np.inf, -np.inf
    raises_input_error(save_nifti(tmp_path / "inf_img.nii.gz", b), "inf_img.nii.gz",
                       "infinite voxels (2 of 512)")


def test_empty_and_constant_images(tmp_path):
    raises_input_error(save_nifti(tmp_path / "empty_img.nii", np.zeros((0, 4, 4), np.float32)),
                       "empty_img.nii", "empty image", "(0, 4, 4)")
    raises_input_error(save_nifti(tmp_path / "const_img.nii.gz", np.full((5, 5, 5), 7, np.int16)),
                       "const_img.nii.gz", "constant image", "7")


def test_4d_where_3d_expected(tmp_path):
    p = save_nifti(tmp_path / "four_d.nii.gz",
                   np.random.default_rng(3).normal(size=(6, 6, 6, 3)).astype(np.float32))
    raises_input_error(p, "four_d.nii.gz", "4D image with 3 volumes where a 3D volume is expected")
    # a single-volume 4D file is just a volume
    one = save_nifti(tmp_path / "one.nii.gz",
                     np.random.default_rng(3).normal(size=(6, 6, 6, 1)).astype(np.float32))
    assert load_series(one)[0].shape == (6, 6, 6)


def test_validate_dimensionality_2d():
    rng = np.random.default_rng(4)
    aff = np.diag([0.5, 0.7, 4.0, 1.0])
    with pytest.raises(InputError, match="3D image where a 2D image is expected"):
        validate_series(Series(rng.normal(size=(4, 5, 6)), aff, "vol.nii"), 2)
    with pytest.raises(InputError, match="2D image where a 3D volume is expected"):
        validate_series(Series(rng.normal(size=(4, 5)), aff, "img.png"), 3)
    s = validate_series(Series(rng.normal(size=(4, 1, 6)), aff, "slab.nii"), 2)
    assert s.shape == (4, 6) and s.array.dtype == np.float32
    # the dropped axis' column moves to third place: spacing (0.5, 4.0)
    assert s.spacing == pytest.approx((0.5, 4.0))
    np.testing.assert_allclose(s.affine[:3, 2], [0, 0.7, 0])


def test_unsupported_and_missing_files(tmp_path):
    p = tmp_path / "scan.mha"
    p.write_bytes(b"xx")
    raises_input_error(p, "scan.mha", "unsupported file type")
    raises_input_error(tmp_path / "nope.nii.gz", "nope.nii.gz", "not found")


# --------------------------------------------------------------------------- PNG / report


def test_png_grayscale_transposed(tmp_path):
    rgb = np.zeros((3, 5, 3), np.uint8)  # 3 rows, 5 columns
    rgb[0, 4] = (255, 255, 255)
    rgb[2, 1] = (100, 100, 100)
    Image.fromarray(rgb).save(tmp_path / "key.png")
    s = load_series(tmp_path / "key.png", spatial_dims=2)[0]
    assert s.shape == (5, 3) and s.array.dtype == np.float32
    assert s.array[4, 0] == 255 and s.array[1, 2] == 100 and s.array.sum() == 355
    np.testing.assert_array_equal(s.affine, np.eye(4))
    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    s16 = load_png(tmp_path / "g16.png")
    np.testing.assert_array_equal(s16.array, g16.T.astype(np.float32))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    raises_input_error(bad, "broken.png", "cannot read PNG", spatial_dims=2)


def test_reports(tmp_path):
    p = tmp_path / "report.txt"
    p.write_text("\ufeff  Ring-enhancing lesion, left frontal.  \n", encoding="utf-8")
    assert load_report(p) == "Ring-enhancing lesion, left frontal."
    e = tmp_path / "empty_report.txt"
    e.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(InputError, match="empty report") as ei:
        load_report(e)
    assert "empty_report.txt" in str(ei.value)
    b = tmp_path / "latin1.txt"
    b.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_report(b)


# --------------------------------------------------------------------------- DICOM


def test_prostatex_t2_axial_geometry():
    folder = need(T2_TRA)
    files, hdrs = dcm_headers(folder)
    series = load_dicom_series(folder)
    assert len(series) == 1
    s = series[0]
    h0 = hdrs[0]
    # shape from the tags: (Columns, Rows, number of files) = (384, 384, 19)
    assert s.shape == (int(h0.Columns), int(h0.Rows), len(files)) == (384, 384, 19)
    iop = np.array(h0.ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    proj = np.array([np.dot(normal, np.array(h.ImagePositionPatient, float)) for h in hdrs])
    order = np.argsort(proj)
    slice_spacing = float(np.median(np.diff(proj[order])))
    assert slice_spacing == pytest.approx(3.0, abs=1e-3)
    ps = [float(x) for x in h0.PixelSpacing]
    assert s.spacing == pytest.approx((ps[1], ps[0], slice_spacing), abs=1e-4)
    # orientation computed by hand from one file's IOP: RAS = LPS with x, y negated
    codes = []
    for v, letters in ((row, "LR"), (col, "PA"), (normal, "IS")):
        ras = v * np.array([-1, -1, 1])
        axis = int(np.argmax(np.abs(ras)))
        codes.append(("LR", "PA", "IS")[axis][int(ras[axis] > 0)])
    assert nib.aff2axcodes(s.affine) == tuple(codes) == ("L", "P", "S")
    # voxel (0,0,0) is the first slice along the normal; world = its IPP with x, y negated
    first = hdrs[order[0]]
    ipp = np.array(first.ImagePositionPatient, float)
    np.testing.assert_allclose(s.affine @ [0, 0, 0, 1], [-ipp[0], -ipp[1], ipp[2], 1], atol=1e-6)
    last = np.array(hdrs[order[-1]].ImagePositionPatient, float)
    np.testing.assert_allclose(s.affine @ [0, 0, 18, 1], [-last[0], -last[1], last[2], 1], atol=1e-4)
    # i runs along a row (column index): arr[i, j, k] == pixel_array[j, i]
    px = pydicom.dcmread(str(files[order[0]])).pixel_array
    np.testing.assert_array_equal(s.array[:, :, 0], px.T.astype(np.float32))
    assert s.array[10, 200, 0] == px[200, 10]
    # same geometry as nibabel's DICOM wrapper (LPS, axes (row, column)) after the swap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers
        w = dicomwrappers.wrapper_from_file(str(files[order[0]]))
        waff = np.asarray(w.affine)
    ours = LPS_TO_RAS @ waff
    np.testing.assert_allclose(s.affine[:, 0], ours[:, 1], atol=1e-6)
    np.testing.assert_allclose(s.affine[:, 1], ours[:, 0], atol=1e-6)
    np.testing.assert_allclose(s.affine[:, 3], ours[:, 3], atol=1e-6)


def test_dwi_multi_bvalue_split():
    folder = need(DWI)
    vols = load_dicom_volumes(folder)
    assert [v.split_by for v in vols] == ["bvalue"] * 3
    assert [v.split_value for v in vols] == [50.0, 400.0, 800.0]
    assert all(v.series.shape == (84, 128, 19) for v in vols)
    for v in vols[1:]:
        np.testing.assert_allclose(v.series.affine, vols[0].series.affine)
    means = [float(v.series.array.mean()) for v in vols]
    assert means[0] > means[1] > means[2] > 0  # signal decays with b
    # b=50 volume, k=0: the b=50 image lowest along the normal (InstanceNumber 19)
    first = pydicom.dcmread(vols[0].files[0])
    assert int(first.InstanceNumber) == 19
    np.testing.assert_array_equal(vols[0].series.array[:, :, 0], first.pixel_array.T)
    # the loader chooses by a stated rule: the highest b-value by default (issue: it used b=50)
    got = load_image(folder)
    assert len(got.series) == 1 and np.array_equal(got.series[0].array, vols[2].series.array)
    assert got.notes == ["b-values 50/400/800 s/mm²: using b=800 (data.dwi_b_value='highest'); dropped the others"]
    assert np.array_equal(load_image(folder, b_value=420).series[0].array, vols[1].series.array)   # nearest
    assert np.array_equal(load_image(folder, b_value="lowest").series[0].array, vols[0].series.array)
    assert len(load_series(folder, b_value="all")) == 3


def copy_series(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


def test_dwi_split_falls_back_to_instance_number(tmp_path):
    folder = copy_series(need(DWI), tmp_path / "dwi no bvalue")
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(f))
        del ds[(0x0019, 0x100C)]
        ds.save_as(str(f))
    vols = load_dicom_volumes(folder)
    ref = load_dicom_volumes(DWI)
    assert [v.split_by for v in vols] == ["instance"] * 3 and [v.split_value for v in vols] == [0, 1, 2]
    for a, b in zip(vols, ref):
        np.testing.assert_array_equal(a.series.array, b.series.array)


def test_dicom_missing_slice(tmp_path):
    folder = copy_series(need(T2_TRA), tmp_path / "t2 missing", skip={"1-10.dcm"})
    raises_input_error(folder, "t2 missing", "missing slice", "1-09.dcm", "1-11.dcm")


def test_dicom_uneven_spacing(tmp_path):
    folder = copy_series(need(T2_TRA), tmp_path / "t2_uneven")
    f = folder / "1-07.dcm"
    ds = pydicom.dcmread(str(f))
    iop = np.array(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ds.ImagePositionPatient = [f"{x:.6f}" for x in np.array(ds.ImagePositionPatient, float) + 0.5 * normal]
    ds.save_as(str(f))
    raises_input_error(folder, "t2_uneven", "uneven slice spacing", "1-07.dcm")


def test_dicom_inconsistent_orientation_and_size(tmp_path):
    folder = copy_series(need(T2_TRA), tmp_path / "t2_orient")
    ds = pydicom.dcmread(str(folder / "1-05.dcm"))
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(str(folder / "1-05.dcm"))
    raises_input_error(folder, "t2_orient", "inconsistent ImageOrientationPatient", "1-05.dcm")
    folder2 = copy_series(T2_TRA, tmp_path / "t2_size")
    ds = pydicom.dcmread(str(folder2 / "1-03.dcm"))
    ds.Rows = 192
    ds.save_as(str(folder2 / "1-03.dcm"))
    raises_input_error(folder2, "t2_size", "inconsistent image size", "1-03.dcm")


def test_dicom_folder_without_images_and_skipped_files(tmp_path):
    empty = tmp_path / "no dicom here"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    raises_input_error(empty, "no dicom here", "no DICOM image files")
    # DICOMDIR and non-DICOM files beside the slices are ignored
    folder = copy_series(need(T2_TRA), tmp_path / "with extras")
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (folder / "README").write_text("not an image")
    s = load_series(folder)
    assert len(s) == 1 and s[0].shape == (384, 384, 19)
