"""Inputs that can be trusted: each awkward input of the trusted-inputs issue gives the right
value or a one-line error naming case, modality and file (exit 2 from the CLI)."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _dicom import write_series  # noqa: E402

from mmvae.cli import main  # noqa: E402
from mmvae.config import load_config  # noqa: E402
from mmvae.data import cache as cache_mod  # noqa: E402
from mmvae.data.cache import PreprocessCache  # noqa: E402
from mmvae.data.dataset import preprocess_config, prepare_cohort  # noqa: E402
from mmvae.data.io import load_image, load_nifti, load_series  # noqa: E402
from mmvae.data.manifest import ManifestEntry, write_manifest  # noqa: E402
from mmvae.data.preprocess import preprocess_series  # noqa: E402
from mmvae.errors import InputError  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def _nifti(path: Path, arr, affine=None, *, sform=1, qform=1, units="mm") -> Path:
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    if sform == 0 and qform == 0:             # nibabel writes codes 0 only for an image without affine
        img = nib.Nifti1Image(np.asarray(arr, np.float32), None)
        img.header.set_zooms(np.abs(np.diag(affine))[:3])
    else:
        img = nib.Nifti1Image(np.asarray(arr, np.float32), affine)
        img.header.set_sform(affine, code=sform)
        img.header.set_qform(affine, code=qform)
    img.header.set_xyzt_units(xyz=units)
    nib.save(img, str(path))
    h = nib.load(str(path)).header
    assert (int(h["sform_code"]), int(h["qform_code"])) == (sform, qform)
    return path


def _blob(shape=(24, 24, 16)) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (100.0 * np.exp(-4 * (g ** 2).sum(0)) + np.linspace(0, 5, shape[0])[:, None, None]).astype(np.float32)


def _check(capsys, manifest: Path, *overrides: str) -> tuple[int, str]:
    rc = main(["check", "--manifest", str(manifest), "--config", TINY, "--quiet",
               "--config.data.image_modalities=['t2','dwi']", *overrides])
    return rc, capsys.readouterr().out


# ----------------------------------------------------------------- 1. several series in one DICOM folder
def test_several_series_in_one_folder_uses_the_real_one(tmp_path, capsys):
    folder = write_series(tmp_path / "t2", 24, series_number=4, description="T2 TRA")
    write_series(folder, 3, series_number=1, description="localizer", iop=(0, 1, 0, 0, 0, -1),
                 origin=(0.0, -32.0, 32.0), start_instance=100)
    got = load_image(folder)
    assert [s.shape for s in got.series] == [(32, 32, 24)]
    assert "using series 4 'T2 TRA' (24 images)" in got.notes[0] and "dropped series 1 'localizer'" in got.notes[0]
    write_manifest([ManifestEntry("c1", "t2", str(folder), labels={"class": "a"})], tmp_path / "m.jsonl")
    rc, out = _check(capsys, tmp_path / "m.jsonl")
    assert rc == 0 and "chose  case c1, t2: folder holds 2 series: using series 4" in out


# ----------------------------------------------------------------- 2. NIfTI without orientation
def test_nifti_without_orientation_is_refused(tmp_path, capsys):
    p = _nifti(tmp_path / "noorient.nii.gz", _blob(), sform=0, qform=0)
    with pytest.raises(InputError, match=r"no orientation \(sform_code = qform_code = 0\)"):
        load_nifti(p)
    ok = _nifti(tmp_path / "ok.nii.gz", _blob(), sform=0, qform=1)      # a qform is enough
    assert load_nifti(ok).shape == (24, 24, 16)
    write_manifest([ManifestEntry("c1", "t2", str(p)), ManifestEntry("c1", "dwi", str(ok))], tmp_path / "m.jsonl")
    rc, out = _check(capsys, tmp_path / "m.jsonl")
    assert rc == 2
    line = next(x for x in out.splitlines() if x.startswith("drop"))
    assert "case 'c1'" in line and "modality 't2'" in line and "noorient.nii.gz" in line and "no orientation" in line


# ----------------------------------------------------------------- 3. one slice where a volume is expected
def test_single_slice_where_a_volume_is_expected(tmp_path):
    p = _nifti(tmp_path / "one.nii.gz", _blob((40, 40, 1)))
    with pytest.raises(InputError, match=r"single-slice image \(shape \(40, 40, 1\)\) where a 3D volume"):
        load_series(p, spatial_dims=3)
    assert load_series(p, spatial_dims=2)[0].shape == (40, 40)       # fine as a 2D key image


# ----------------------------------------------------------------- 4. spatial units
def test_units_are_honoured_and_implausible_grids_refused(tmp_path):
    metres = _nifti(tmp_path / "m.nii.gz", _blob(), affine=np.diag([0.002, 0.002, 0.004, 1.0]), units="meter")
    s = load_nifti(metres)
    np.testing.assert_allclose(s.spacing, (2.0, 2.0, 4.0))
    cfg = preprocess_config(load_config(TINY).data)
    out = preprocess_series(s, cfg)
    assert out.shape == (16, 16, 16) and np.count_nonzero(out) > 100          # not one voxel, not all zeros
    microns = _nifti(tmp_path / "u.nii.gz", _blob(), affine=np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    with pytest.raises(InputError, match=r"implausible voxel size 1000 mm .*check the file's spatial units"):
        load_nifti(microns)
    assert load_nifti(_nifti(tmp_path / "um.nii.gz", _blob(), affine=np.diag([1000.0, 1000.0, 1000.0, 1.0]),
                             units="micron")).spacing == pytest.approx((1.0, 1.0, 1.0))
    sheared = np.diag([2.0, 2.0, 2.0, 1.0])
    sheared[0, 2] = 1.0                                                      # 27° shear of the slice axis
    with pytest.raises(InputError, match=r"voxel axes 0 and 2 are .* not 90°"):
        load_nifti(_nifti(tmp_path / "shear.nii.gz", _blob(), affine=sheared))


# ----------------------------------------------------------------- 5. b-values and series beyond max_series
def test_dwi_b_value_rule_and_max_series_drops_are_reported(tmp_path, capsys):
    dwi = write_series(tmp_path / "dwi", 8, b_values=(50, 400, 800), description="ep2d_diff")
    got = load_image(dwi)
    assert len(got.series) == 1 and "using b=800" in got.notes[0]
    assert len(load_image(dwi, b_value="all").series) == 3
    t2a = write_series(tmp_path / "t2a", 12, description="T2 a")
    t2b = write_series(tmp_path / "t2b", 12, description="T2 b", seed=1)
    write_manifest([ManifestEntry("c1", "dwi", str(dwi), labels={"class": "a"}), ManifestEntry("c1", "t2", str(t2a)),
                    ManifestEntry("c1", "t2", str(t2b))], tmp_path / "m.jsonl")
    rc, out = _check(capsys, tmp_path / "m.jsonl")
    assert rc == 0                                            # choices, no dropped modality: not a problem
    assert "chose  case c1, dwi: b-values 50/400/800 s/mm²: using b=800" in out
    assert "trunc  case c1, t2: 2 series, the model takes the first 1 (data.max_series): dropped 1" in out
    rc, out = _check(capsys, tmp_path / "m.jsonl", "--config.data.max_series=2", "--config.data.dwi_b_value=400")
    assert rc == 0 and "using b=400" in out


# ----------------------------------------------------------------- 6 + 7. reports
def test_bad_report_drops_the_report_not_the_case_and_truncation_is_counted(tmp_path):
    img = _nifti(tmp_path / "t2.nii.gz", _blob())
    (tmp_path / "empty.txt").write_text("   \n")
    long = " ".join(f"word{i}" for i in range(300))
    write_manifest([ManifestEntry("c1", "t2", str(img), labels={"class": "a"}),
                    ManifestEntry("c1", "report", str(tmp_path / "empty.txt")),
                    ManifestEntry("c2", "t2", str(img), labels={"class": "b"}),
                    ManifestEntry("c2", "report", text=long)], tmp_path / "m.jsonl")
    c = load_config(TINY, ["--config.data.image_modalities=['t2']", "--config.data.on_error=skip",
                           "--config.data.text.max_len=64"])
    from mmvae.runs.trained import load_cohort
    cohort, tok, _ = load_cohort(c, tmp_path / "wd", str(tmp_path / "m.jsonl"), show_progress=False)
    assert cohort.case_ids == ["c1", "c2"] and cohort.present_modalities(0) == ["t2"]
    kinds = {(n["case_id"], n["modality"], n["kind"]) for n in cohort.notes}
    assert ("c1", "report", "dropped") in kinds and ("c2", "report", "truncated") in kinds
    msg = next(n["message"] for n in cohort.notes if n["kind"] == "truncated")
    assert msg.startswith("report of 30") and msg.endswith("truncated to data.text.max_len=64")
    assert load_config(TINY.replace("tiny", "quickstart") + ":text=scratch").data.text.max_len == 64  # synthetic reports
    from mmvae.config import base_config
    assert base_config().data.text.max_len == 256                                     # fits real reports


# ----------------------------------------------------------------- 8. undecodable compressed pixel data
def _compressed_garbage(folder: Path, ts: str = "1.2.840.10008.1.2.4.90") -> Path:
    """Re-label the series' pixel data as compressed (``ts``) with undecodable fragments."""
    from pydicom.encaps import encapsulate
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51garbage" * 4])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    return folder


@pytest.mark.parametrize("ts, family", [("1.2.840.10008.1.2.4.90", "JPEG 2000"), ("1.2.840.10008.1.2.4.80", "JPEG-LS")])
def test_undecodable_pixel_data_names_transfer_syntax_and_package(tmp_path, ts, family):
    folder = _compressed_garbage(write_series(tmp_path / "c", 3), ts)
    with pytest.raises(InputError) as e:
        load_series(folder)
    msg = str(e.value)
    assert "transfer syntax" in msg and family.split()[0] in msg and "pip install 'mmvae[dicom]'" in msg
    assert "\n" not in msg and len(msg) > 120                              # the reason is kept, on one line


# ----------------------------------------------------------------- 10. the cache under its own thread pool
def test_cache_serialises_npy_header_parsing(tmp_path, monkeypatch):
    cache = PreprocessCache(tmp_path)
    keys = [cache.key(str(i)) for i in range(24)]
    for k in keys:
        cache.get_or_build(k, lambda: np.ones((2, 4, 4), np.float32))
    inside, most = [0], [0]
    real = np.load

    def slow_load(*a, **kw):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.002)
        try:
            return real(*a, **kw)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(cache_mod.np, "load", slow_load)
    fresh = PreprocessCache(tmp_path)
    threads = [threading.Thread(target=lambda k=k: fresh.get_or_build(k, lambda: None)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1                                    # never two np.load calls at once


# ----------------------------------------------------------------- 12. key images reach the model whole
def test_key_images_are_resized_whole_by_default(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    arr = rng.normal(110, 15, (384, 512)).clip(0, 255)      # a textured image filling the frame ...
    arr[:40, :40] = rng.normal(230, 10, (40, 40))            # ... with marks in two opposite corners
    arr[-40:, -40:] = rng.normal(230, 10, (40, 40))
    arr = arr.astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "key.png")
    c = load_config(TINY, ["--config.data.spatial_dims=2", "--config.data.shape=(64,64)", "--config.data.spacing=()"])
    cfg = preprocess_config(c.data)
    assert cfg.crop == "fit"                                # data.crop='auto' with native spacing
    out = preprocess_series(load_series(tmp_path / "key.png", spatial_dims=2)[0], cfg)
    hi = out != 0                                            # the foreground (the marks) after normalisation
    xs, ys = np.nonzero(hi)
    # both corners still there: bright pixels at both ends of the long (x) axis, 512 px → 64 (aspect kept)
    assert xs.min() <= 5 and xs.max() >= 58 and ys.max() - ys.min() >= 40


# ----------------------------------------------------------------- kinds: geometry, vendor packing, constant
def test_geometry_the_loader_cannot_vouch_for_is_refused(tmp_path):
    with pytest.raises(InputError, match="not 90°.*gantry"):
        load_series(write_series(tmp_path / "tilt", 10, tilt=(0.0, 1.5)))
    with pytest.raises(InputError, match="Siemens mosaic"):
        load_series(write_series(tmp_path / "mosaic", 3, image_type=("ORIGINAL", "PRIMARY", "M", "MOSAIC")))
    with pytest.raises(InputError, match="not orthonormal"):
        load_series(write_series(tmp_path / "iop", 3, iop=(1, 0, 0, 0.2, 1, 0)))


def test_an_image_constant_after_preprocessing_is_an_error_naming_the_file(tmp_path):
    arr = np.zeros((24, 24, 16), np.float32)
    arr[0, 0, 0] = 1.0                                        # all that differs is cut off by the crop
    p = _nifti(tmp_path / "speck.nii.gz", arr)
    write_manifest([ManifestEntry("c1", "t2", str(p))], tmp_path / "m.jsonl")
    c = load_config(TINY, ["--config.data.image_modalities=['t2']", "--config.data.report=false",
                           "--config.data.crop=center"])
    with pytest.raises(InputError, match=r"case 'c1'.*modality 't2'.*speck.nii.gz.*constant after preprocessing"):
        prepare_cohort(tmp_path / "m.jsonl", c.data, PreprocessCache(tmp_path / "cache"), show_progress=False)


# ----------------------------------------------------------------- the scan command
def test_scan_command_writes_manifest_and_says_what_it_did(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "keys"
    for case in ("MPX1", "MPX2"):
        (root / case).mkdir(parents=True)
        Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(root / case / "t2.png")
        (root / case / "report.txt").write_text(f"findings of {case}")
    (root / "MPX2" / "notes.docx").write_text("x")
    (tmp_path / "labels.csv").write_text("case_id,category\nMPX1,tumor\nMPX2,infection\nMPX9,none\n")
    rc = main(["scan", str(root), "--layout", "keyimages", "--out", str(tmp_path / "m.jsonl"),
               "--labels", str(tmp_path / "labels.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "layout keyimages: 2 cases" in out and "MPX1  t2" in out
    assert "1 row(s) name no scanned case (e.g. 'MPX9')" in out
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {r["case_id"] for r in rows} == {"MPX1", "MPX2"}
    assert any(r.get("labels", {}).get("category") == "tumor" for r in rows)
    order = [r["case_id"] for r in rows]
    assert order == sorted(order)                             # a case's rows stay together: check reads it
    rc = main(["check", "--manifest", str(tmp_path / "m.jsonl"), "--config", TINY, "--quiet",
               "--config.data.spatial_dims=2", "--config.data.shape=(16,16)", "--config.data.spacing=()",
               "--config.data.image_modalities=['t1']", "--config.data.clinical.numeric=[]",
               "--config.data.clinical.categorical={}", "--config.data.extra_modalities=ignore"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 cases usable" in out
    assert "chose  case MPX1, t2: modality 't2' is not in data.image_modalities ['t1']: ignored" in out
    rc = main(["scan", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "dataset folder not found" in err and not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------- 11. the progress bar counts finished steps
def test_progress_bar_advances_only_when_a_step_has_finished(tmp_path, monkeypatch):
    """The bar used to count dispatched steps (XLA runs asynchronously): rate and ETA were wrong.
    Each iteration now waits for its step's loss, so the bar's clock measures real steps."""
    import jax
    from mmvae.data.synth import make_cohort
    from mmvae.train import loop
    manifest = make_cohort(tmp_path / "data", 24, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0))
    waited, real = [], jax.block_until_ready
    monkeypatch.setattr(loop.jax, "block_until_ready", lambda x: waited.append(1) or real(x))
    c = load_config(TINY, [f"--config.data.manifest={manifest}", "--config.train.steps=4"])
    loop.train_and_evaluate(c, tmp_path / "run", show_progress=True)
    assert len(waited) >= 4                      # one wait per step (+ the compile measurement)
    waited.clear()
    loop.train_and_evaluate(load_config(TINY, [f"--config.data.manifest={manifest}", "--config.train.steps=8"]),
                            tmp_path / "run", show_progress=False)
    assert len(waited) <= 1                      # without a bar nothing waits but the compile measurement


# ----------------------------------------------------------------- every refusal: one line naming case, modality, file; exit 2
@pytest.mark.parametrize("kind, message", [
    ("noorient", "no orientation"), ("single", "single-slice image"), ("microns", "implausible voxel size"),
    ("sheared", "not 90°"), ("mosaic", "Siemens mosaic"), ("tilt", "gantry"), ("missing", "file not found"),
    ("jpeg2000", "pip install 'mmvae[dicom]'")])
def test_check_command_refusals_exit_2_naming_case_modality_file(tmp_path, capsys, kind, message):
    good = _nifti(tmp_path / "good.nii.gz", _blob())
    bad = {"noorient": lambda: _nifti(tmp_path / "bad.nii.gz", _blob(), sform=0, qform=0),
           "single": lambda: _nifti(tmp_path / "bad.nii.gz", _blob((40, 40, 1))),
           "microns": lambda: _nifti(tmp_path / "bad.nii.gz", _blob(), affine=np.diag([900.0, 900.0, 900.0, 1.0])),
           "sheared": lambda: _nifti(tmp_path / "bad.nii.gz", _blob(), affine=np.array(
               [[2.0, 0, 1.5, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])),
           "mosaic": lambda: write_series(tmp_path / "bad", 3, image_type=("ORIGINAL", "PRIMARY", "M", "MOSAIC")),
           "tilt": lambda: write_series(tmp_path / "bad", 8, tilt=(0.0, 1.5)),
           "missing": lambda: tmp_path / "nowhere.nii.gz",
           "jpeg2000": lambda: _compressed_garbage(write_series(tmp_path / "bad", 3))}[kind]()
    write_manifest([ManifestEntry("case7", "t2", str(bad), labels={"class": "a"}),
                    ManifestEntry("case7", "dwi", str(good))], tmp_path / "m.jsonl")
    rc, out = _check(capsys, tmp_path / "m.jsonl")
    assert rc == 2
    [line] = [x for x in out.splitlines() if x.startswith("drop")]
    assert "case 'case7'" in line and "modality 't2'" in line and Path(bad).name in line and message in line
    assert "1 cases usable" in out                               # the case is kept with its dwi


def test_a_broken_series_that_is_not_used_does_not_stop_the_folder(tmp_path):
    folder = write_series(tmp_path / "t2", 12, series_number=5)
    write_series(folder, 1, series_number=999, description="dose report", start_instance=500)
    ds = pydicom.dcmread(folder / "0500.dcm")
    del ds.ImageOrientationPatient                           # a screenshot: no geometry
    ds.save_as(folder / "0500.dcm", enforce_file_format=True)
    got = load_image(folder)
    assert [s.shape for s in got.series] == [(32, 32, 12)]
    assert "dropped series 999 'dose report' (1 images)" in got.notes[0]


@pytest.mark.parametrize("b0_tag", [True, False])
def test_dwi_directions_at_the_chosen_b_value_become_the_trace_image(tmp_path, b0_tag):
    folder = write_series(tmp_path / "dwi", 6, b_values=(0 if b0_tag else None, 1000, 1000, 1000))
    got = load_image(folder)
    assert len(got.series) == 1 and got.series[0].shape == (32, 32, 6)
    assert "b-values 0/1000 s/mm²: using b=1000" in got.notes[0]
    assert "3 images per position at b=1000: combined into the trace image" in got.notes[1]
    b0 = load_image(folder, b_value="lowest").series[0].array
    assert float(got.series[0].array.mean()) < 0.5 * float(b0.mean())      # diffusion-weighted, not the b=0
