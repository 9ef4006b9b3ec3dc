"""Tests of mmvae.data.preprocess: reorientation, resampling, masks, crop/pad, normalisation."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest

from mmvae.data.case import Series
from mmvae.data.io import load_nifti
from mmvae.data.preprocess import (PreprocessConfig, crop_or_pad, foreground_mask,
                                   normalize_intensity, otsu_threshold, preprocess_case_series,
                                   preprocess_series, preprocess_series_with_mask,
                                   reorient_to_ras, resample_to_grid, resample_to_spacing)
from mmvae.errors import ConfigError, InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRATS_T1 = DATA / "brats18-sample" / "Brats18_2013_11_1" / "Brats18_2013_11_1_t1.nii.gz"
ISLES = DATA / "isles22-stroke" / "rawdata" / "sub-strokecase0009" / "ses-0001"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"sample data not available: {path}")
    return path


def world(affine, idx):
    idx = np.asarray(idx, float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def ramp(affine, shape):
    """Values = x + 2y + 3z of each voxel centre (linear in world coordinates)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    w = world(affine, idx)
    return (w @ [1.0, 2.0, 3.0]).reshape(shape).astype(np.float32)


def blob(shape=(40, 44, 36), seed=0):
    """A noisy bright ellipsoid (with a dark core) on a dark noisy background."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [n / 2 + 3 for n in shape]
    r2 = sum(((gi - ci) / (n / 3.5)) ** 2 for gi, ci, n in zip(g, c, shape))
    body = r2 < 1
    arr = rng.uniform(0, 5, size=shape)
    arr[body] = rng.normal(100, 10, size=int(body.sum()))
    arr[r2 < 0.05] = 2.0  # dark core: a hole in the threshold mask
    return arr.astype(np.float32), body


# --------------------------------------------------------------------------- config


def test_config_from_dict_key_and_validation():
    a = PreprocessConfig.from_dict({"shape": [64, 64, 32], "spacing": [2, 2, 4],
                                    "clip_percentiles": [1, 99]})
    b = PreprocessConfig(shape=(64, 64, 32), spacing=(2.0, 2.0, 4.0), clip_percentiles=(1.0, 99.0))
    assert a == b and a.key() == b.key() and a.shape == (64, 64, 32) and a.spacing == (2.0, 2.0, 4.0)
    assert a.key() != PreprocessConfig(shape=(64, 64, 32), spacing=(2, 2, 4), order=3).key()
    for field in ("shape", "spacing", "crop", "clip_percentiles", "normalize",
                  "foreground_threshold", "reorient", "order"):
        assert f'"{field}"' in a.key()
    assert PreprocessConfig(shape=(8, 8), foreground_threshold="12.5").foreground_threshold == 12.5
    assert PreprocessConfig((2, 2, 4), (64, 64, 32), clip_percentiles=(1, 99)) == a  # positional
    with pytest.raises(ConfigError, match="shape is required"):
        PreprocessConfig(spacing=(1.0, 1.0))
    with pytest.raises(AttributeError):
        a.order = 0  # frozen
    bad = [{"shape": [64, 64, 32], "crop": "middle"}, {"shape": [64, 0, 3]},
           {"shape": [8, 8, 8], "spacing": [1, 1]}, {"shape": [8, 8], "normalize": "l2"},
           {"shape": [8, 8], "clip_percentiles": [99, 1]}, {"shape": [8, 8], "order": 7},
           {"shape": [8, 8], "colour": "red"}, {"spacing": [1, 1]},
           {"shape": [8, 8], "foreground_threshold": "triangle"}]
    for d in bad:
        with pytest.raises(ConfigError):
            PreprocessConfig.from_dict(d)


# --------------------------------------------------------------------------- reorientation


def test_reorient_matches_nibabel_and_keeps_world_positions():
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    # axes: i -> -S (I), j -> L, k -> +P, with a little rotation and translation
    aff = np.array([[0.0, -2.0, 0.1, 30], [0.05, 0.0, -1.5, -20], [-3.0, 0.0, 0.0, 12], [0, 0, 0, 1]])
    s = reorient_to_ras(Series(arr, aff, "x"))
    assert nib.aff2axcodes(aff) == ("I", "L", "P") and nib.aff2axcodes(s.affine) == ("R", "A", "S")
    ref = nib.as_closest_canonical(nib.Nifti1Image(arr, aff))
    np.testing.assert_array_equal(s.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(s.affine, ref.affine)
    assert s.shape == (6, 7, 5)
    # every voxel keeps its value at its world position
    idx_old = np.array([[0, 0, 0], [4, 5, 6], [1, 2, 3]])
    w = world(aff, idx_old)
    idx_new = np.rint(world(np.linalg.inv(s.affine), w)).astype(int)
    for o, n in zip(idx_old, idx_new):
        assert arr[tuple(o)] == s.array[tuple(n)]
    # RAS input is returned as-is
    again = reorient_to_ras(s)
    np.testing.assert_array_equal(again.array, s.array)
    np.testing.assert_array_equal(again.affine, s.affine)


def test_reorient_2d_flips_in_plane_only():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    aff = np.diag([-0.5, 0.8, 1.0, 1.0])
    aff[:3, 3] = [10, -3, 5]
    s = reorient_to_ras(Series(arr, aff, "k.png"))
    np.testing.assert_array_equal(s.array, arr[::-1])
    np.testing.assert_allclose(world(s.affine, [0, 0, 0]), world(aff, [2, 0, 0]))
    np.testing.assert_allclose(s.affine[:3, :3], np.diag([0.5, 0.8, 1.0]))


def test_brats_lps_and_ras_copies_agree_after_reorient(tmp_path):
    src = need(BRATS_T1)
    img = nib.load(str(src))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data = np.asarray(img.dataobj)
    nx, ny = data.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    ras_img = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1, :]), img.affine @ flip)
    ras_path = tmp_path / "t1_ras.nii"
    nib.save(ras_img, str(ras_path))
    lps = load_nifti(src)
    ras = load_nifti(ras_path)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert not np.array_equal(lps.array, ras.array)
    a, b = reorient_to_ras(lps), reorient_to_ras(ras)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    np.testing.assert_array_equal(b.array, ras.array)  # already RAS: untouched


# --------------------------------------------------------------------------- resampling


def test_resample_to_spacing_shape_and_world_consistency():
    aff = np.array([[1.0, 0, 0, -10], [0, 1.0, 0, 4], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    shape = (20, 30, 10)
    s = Series(ramp(aff, shape), aff, "r")
    out = resample_to_spacing(s, (2.0, 2.0, 2.0), order=1)
    assert out.shape == (10, 15, 10) and out.spacing == pytest.approx((2.0, 2.0, 2.0))
    # grid centre preserved
    np.testing.assert_allclose(world(out.affine, (np.array(out.shape) - 1) / 2),
                               world(aff, (np.array(shape) - 1) / 2))
    # linear interpolation of a linear field is exact away from the edges
    expected = ramp(out.affine, out.shape)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(out.array[inner], expected[inner], atol=1e-3)
    same = resample_to_spacing(s, (1.0, 1.0, 2.0))
    np.testing.assert_array_equal(same.array, s.array)


def test_resample_to_grid_linear_field_and_outside_zero():
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    src = Series(ramp(aff, (30, 30, 12)), aff, "src")
    c, s_ = np.cos(0.3), np.sin(0.3)
    ref_aff = np.array([[2 * c, -2 * s_, 0, 8], [2 * s_, 2 * c, 0, -6], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    out = resample_to_grid(src, (20, 20, 16), ref_aff, order=1)
    assert out.shape == (20, 20, 16)
    np.testing.assert_array_equal(out.affine, ref_aff)
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    src_idx = world(np.linalg.inv(aff), world(ref_aff, vox))
    inside = np.all((src_idx >= 0) & (src_idx <= np.array(src.shape) - 1), axis=1)
    assert 0.1 < inside.mean() < 0.95
    flat = out.array.reshape(-1)
    np.testing.assert_allclose(flat[inside], ramp(ref_aff, out.shape).reshape(-1)[inside], atol=1e-3)
    far_outside = np.any((src_idx < -1) | (src_idx > np.array(src.shape)), axis=1)
    assert far_outside.any() and np.all(flat[far_outside] == 0)


def test_isles_flair_onto_dwi_grid():
    dwi = load_nifti(need(ISLES / "sub-strokecase0009_ses-0001_dwi.nii.gz"))
    flair_path = ISLES / "sub-strokecase0009_ses-0001_flair.nii.gz"
    flair = load_nifti(flair_path)
    assert flair.shape == (512, 512, 29) and dwi.shape == (112, 112, 73)
    out = resample_to_grid(flair, dwi.shape, dwi.affine)
    assert out.shape == dwi.shape == (112, 112, 73)
    np.testing.assert_array_equal(out.affine, dwi.affine)
    # agrees with nibabel's own resampler
    ref = nibabel.processing.resample_from_to(nib.load(str(flair_path)), (dwi.shape, dwi.affine),
                                              order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(out.array, np.asarray(ref.dataobj), atol=1e-3 * float(flair.array.max()))
    # the head lands where the DWI head is
    m_dwi, m_fl = foreground_mask(dwi.array), foreground_mask(out.array)
    dice = 2 * (m_dwi & m_fl).sum() / (m_dwi.sum() + m_fl.sum())
    assert dice > 0.9


# --------------------------------------------------------------------------- masks, crop, intensity


def test_otsu_and_foreground_mask():
    arr, body = blob()
    t = otsu_threshold(arr)
    assert 5 < t < 70
    far = arr.copy()
    far[0:3, 0:3, 0:3] = 120  # a small bright speck: not the largest component
    m = foreground_mask(far)
    assert m.dtype == bool and m.shape == arr.shape
    assert not m[1, 1, 1]
    assert m[tuple(int(n / 2 + 3) for n in arr.shape)]  # dark core filled
    assert (m ^ body).sum() <= 0.01 * body.sum()
    box = np.zeros((10, 10, 10), np.float32)
    box[2:6, 3:8, 1:9] = np.arange(1, 161, dtype=np.float32).reshape(4, 5, 8)
    np.testing.assert_array_equal(foreground_mask(box, threshold=1000.0), box > 0)  # fallback
    assert foreground_mask(box, threshold=80.0).sum() == 80
    assert foreground_mask(np.full((3, 3), 4.0)).all()


def test_crop_or_pad():
    a = np.arange(10 * 8).reshape(10, 8)
    out, off = crop_or_pad(a, (4, 12))
    assert out.shape == (4, 12) and off == (3, -2)
    np.testing.assert_array_equal(out[:, 2:10], a[3:7])
    assert (out[:, :2] == 0).all() and (out[:, 10:] == 0).all()
    out, off = crop_or_pad(a, (4, 4), center=(0, 7))  # window shifted inside
    assert off == (0, 4)
    np.testing.assert_array_equal(out, a[0:4, 4:8])
    out, off = crop_or_pad(a, (6, 3), center=(5.0, 2.0))
    assert off == (2, 1)
    np.testing.assert_array_equal(out, a[2:8, 1:4])
    m, _ = crop_or_pad(np.ones((2, 2), bool), (4, 4), pad_value=False)
    assert m.sum() == 4 and m.dtype == bool


def test_normalize_intensity():
    rng = np.random.default_rng(5)
    arr = rng.gamma(2.0, 50.0, size=(30, 30, 20))
    mask = np.zeros(arr.shape, bool)
    mask[5:25, 5:25, 3:17] = True
    z = normalize_intensity(arr, mask, (1, 99), "zscore")
    assert z.dtype == np.float32
    assert abs(float(z[mask].mean())) < 1e-5 and float(z[mask].std()) == pytest.approx(1.0, abs=1e-5)
    assert np.all(z[~mask] == 0)
    lo, hi = np.percentile(arr[mask], [1, 99])
    assert float(z[mask].max()) == pytest.approx((hi - np.clip(arr[mask], lo, hi).mean())
                                                / np.clip(arr[mask], lo, hi).std(), rel=1e-5)
    mm = normalize_intensity(arr, mask, (1, 99), "minmax")
    assert mm[mask].min() == 0.0 and mm[mask].max() == pytest.approx(1.0) and np.all(mm[~mask] == 0)
    none = normalize_intensity(arr, None, None, "none")
    np.testing.assert_allclose(none, arr.astype(np.float32))


# --------------------------------------------------------------------------- pipeline


def test_preprocess_synthetic_exact_shape_and_stats():
    arr, body = blob()
    aff = np.diag([-1.2, 1.0, 1.5, 1.0])
    cfg = PreprocessConfig(shape=(32, 40, 24), spacing=(2.0, 1.5, 2.0))
    out, mask = preprocess_series_with_mask(Series(arr, aff, "b"), cfg)
    assert out.shape == (32, 40, 24) and out.dtype == np.float32 and mask.shape == out.shape
    assert abs(float(out[mask].mean())) < 1e-4 and float(out[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[~mask] == 0)
    # foreground crop: the body is not cut by the window (mask fully inside, border is empty)
    assert not mask[0].any() and not mask[-1].any() and not mask[:, :, 0].any()
    with pytest.raises(InputError, match="2D image but preprocess.shape"):
        preprocess_series(Series(arr[:, :, 0], aff, "slice.png"), cfg)


def test_preprocess_2d_key_image():
    i, j = np.meshgrid(np.arange(60), np.arange(50), indexing="ij")
    disc = ((i - 28) / 18) ** 2 + ((j - 26) / 15) ** 2 < 1  # 30 x 15 mm ellipse
    img = np.where(disc, 100.0 + (i % 7), 1.0 + (j % 3)).astype(np.float32)
    aff = np.diag([0.5, -0.5, 1.0, 1.0])
    cfg = PreprocessConfig(spacing=(1.0, 1.0), shape=(32, 32), normalize="minmax")
    out, mask = preprocess_series_with_mask(Series(img, aff, "key.png"), cfg)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out[mask].min() == 0.0 and out[mask].max() == pytest.approx(1.0)
    assert np.all(out[~mask] == 0)
    assert abs(int(mask.sum()) - np.pi * 9 * 7.5) < 0.1 * np.pi * 9 * 7.5  # ellipse area in 1 mm px


def test_preprocess_brats_deterministic():
    s = load_nifti(need(BRATS_T1))
    cfg = PreprocessConfig(shape=(48, 56, 40), spacing=(4.0, 4.0, 4.0))
    out, mask = preprocess_series_with_mask(s, cfg)
    assert out.shape == (48, 56, 40) and out.dtype == np.float32
    assert abs(float(out[mask].mean())) < 1e-4 and float(out[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[~mask] == 0) and 0.2 < mask.mean() < 0.6
    again = preprocess_series(s, cfg)
    np.testing.assert_array_equal(out, again)
    centre = preprocess_series(s, PreprocessConfig(shape=(48, 56, 40), spacing=(4, 4, 4), crop="center"))
    assert centre.shape == out.shape


def test_preprocess_with_reference_grid_and_case():
    dwi = load_nifti(need(ISLES / "sub-strokecase0009_ses-0001_dwi.nii.gz"))
    flair = load_nifti(ISLES / "sub-strokecase0009_ses-0001_flair.nii.gz")
    cfg = PreprocessConfig(shape=(64, 64, 40), spacing=(3.0, 3.0, 3.0))
    out = preprocess_case_series({"dwi": dwi, "flair": flair}, cfg, reference="dwi")
    assert set(out) == {"dwi", "flair"} and all(v.shape == (64, 64, 40) for v in out.values())
    direct = preprocess_series(flair, cfg, reference=dwi)
    np.testing.assert_array_equal(direct, out["flair"])
    # on a common grid the two sequences overlap: their foregrounds (non-zero) mostly coincide
    a, b = out["dwi"] != 0, out["flair"] != 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    bad = Series(np.zeros((4, 4, 4), np.float32), np.eye(4), "x.nii")
    with pytest.raises(InputError) as ei:
        preprocess_case_series({"dwi": dwi, "t2": Series(dwi.array[:, :, 0], dwi.affine, "t2.nii")},
                               cfg)
    assert "modality 't2'" in str(ei.value)
    with pytest.raises(InputError, match="reference modality"):
        preprocess_case_series({"t2": bad}, cfg, reference="dwi")


def test_fit_crop_keeps_the_whole_key_image(caplog):
    """A 512 x 400 key image reaches a 64 x 64 model whole with crop='fit'; the
    foreground crop cuts most of it away and says so."""
    import logging
    from mmvae.data.case import Series
    from mmvae.data.preprocess import PreprocessConfig, preprocess_series_with_mask
    img = np.zeros((512, 400), np.float32)
    img[40:480, 30:370] = 100.0
    img[40:60, 30:50] = 300.0                     # a bright corner finding, far from the centre
    s = Series(array=img, affine=np.eye(4), path="key.png")
    out, mask = preprocess_series_with_mask(s, PreprocessConfig(shape=(64, 64), spacing=None, crop="fit",
                                                                clip_percentiles=None))
    assert out.shape == (64, 64)
    rows, cols = np.nonzero(mask)
    assert rows.min() == 0 and rows.max() == 63              # the long side spans the field of view
    assert 45 <= cols.max() - cols.min() + 1 <= 51           # aspect 340/440 kept: ~49 px
    assert out[mask].max() > out[mask].mean() + 1.5          # the corner finding survived
    with caplog.at_level(logging.WARNING, logger="mmvae.data.preprocess"):
        preprocess_series_with_mask(s, PreprocessConfig(shape=(64, 64), spacing=None, crop="foreground",
                                                        clip_percentiles=None))
    assert "removes" in caplog.text and "key.png" in caplog.text
