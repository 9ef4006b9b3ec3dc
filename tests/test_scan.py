"""Tests of mmvae.data.scan: BraTS, BIDS and DICOM folder layouts."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmvae.data.io import load_series
from mmvae.data.scan import detect_layout, scan_folder, scan_folder_detailed
from mmvae.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"sample data not available: {path}")
    return path


def tiny_nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4)), str(path))
    return path


def test_brats_sample():
    root = need(DATA / "brats18-sample")
    res = scan_folder_detailed(root)
    assert res.layout == "brats" == detect_layout(root)
    rows = res.entries
    with open(root / "grades.csv", newline="") as f:
        grades = {r["case_id"]: r["grade"] for r in csv.DictReader(f)}
    assert len(rows) == 24
    cases = sorted({e.case_id for e in rows})
    assert cases == sorted(grades) and len(cases) == 6
    for c in cases:
        mine = [e for e in rows if e.case_id == c]
        assert sorted(e.modality for e in mine) == ["flair", "t1", "t1ce", "t2"]
        assert all(e.labels == {"grade": grades[c]} for e in mine)
        assert all(Path(e.path).is_file() and Path(e.path).name == f"{c}_{e.modality}.nii.gz"
                   for e in mine)
    assert Counter(grades.values()) == {"HGG": 4, "LGG": 2}
    assert not any("_seg" in e.path for e in rows)
    assert sum("segmentation" in why for _, why in res.skipped) == 6
    assert rows == scan_folder(root, layout="brats")  # deterministic
    assert [(e.case_id, e.modality) for e in rows] == sorted((e.case_id, e.modality) for e in rows)
    only = scan_folder(root, modalities=["t2"])
    assert len(only) == 6 and {e.modality for e in only} == {"t2"}


def test_isles_bids():
    root = need(DATA / "isles22-stroke")
    rows = scan_folder(root)
    assert detect_layout(root) == "bids"
    assert {e.case_id for e in rows} == {"sub-strokecase0009_ses-0001"}
    assert sorted(e.modality for e in rows) == ["adc", "dwi", "flair"]
    assert all("derivatives" not in e.path and Path(e.path).is_file() for e in rows)


def test_prostatex_dicom():
    root = need(DATA / "prostatex-dicom")
    res = scan_folder_detailed(root)
    assert res.layout == "dicom"
    by_mod = {e.modality: e for e in res.entries}
    assert sorted(by_mod) == ["adc", "dwi", "t2"] and len(res.entries) == 3
    assert {e.case_id for e in res.entries} == {"ProstateX-0000"}
    assert Path(by_mod["t2"].path).name == "4.000000-t2tsetra-00702"
    assert Path(by_mod["adc"].path).name == "7.000000-ep2ddifftraDYNDISTADC-48780"
    assert Path(by_mod["dwi"].path).name == "8.000000-ep2ddifftraDYNDISTCALCBVAL-83202"
    skipped = {Path(p).name for p, _ in res.skipped}
    assert {"3.000000-t2tsesag-87368", "5.000000-t2tsecor-03471",
            "6.000000-ep2ddifftraDYNDIST-69284", "9.000000-tfl3d PD reftra1.5x1.5t3-67276"} <= skipped


def test_dicom_folder_with_spaces_and_custom_rules():
    root = need(DATA / "prostatex-dicom")
    rows = scan_folder(root, layout="dicom", dicom_rules=[(r"pdref", "pd"), (r"t2tse(sag|cor)", "t2_other")])
    pd = [e for e in rows if e.modality == "pd"]
    assert len(pd) == 1 and " " in Path(pd[0].path).name
    s = load_series(pd[0].path)
    assert len(s) == 1 and s[0].shape == (128, 128, 16)
    assert Counter(e.modality for e in rows) == {"pd": 1, "t2_other": 2}


def test_synthetic_layouts_with_spaces(tmp_path):
    brats = tmp_path / "my brats"
    for case in ("case 01", "case 02"):
        for seq in ("t1", "T2", "flair", "seg"):
            tiny_nifti(brats / case / f"{case}_{seq}.nii.gz")
    (brats / "case 01" / "notes.txt").write_text("x")
    (brats / "grades.csv").write_text("case_id,grade,site\ncase 01,LGG,A\n")
    rows = scan_folder(brats)
    assert [(e.case_id, e.modality) for e in rows] == [
        ("case 01", "flair"), ("case 01", "t1"), ("case 01", "t2"),
        ("case 02", "flair"), ("case 02", "t1"), ("case 02", "t2")]
    assert rows[0].labels == {"grade": "LGG", "site": "A"} and rows[3].labels == {}
    assert load_series(rows[0].path)[0].shape == (3, 3, 3)

    bids = tmp_path / "bids set"
    tiny_nifti(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    tiny_nifti(bids / "sub-02" / "ses-a" / "dwi" / "sub-02_ses-a_dwi.nii.gz")
    tiny_nifti(bids / "sub-02" / "ses-b" / "anat" / "sub-02_ses-b_run-1_FLAIR.nii")
    tiny_nifti(bids / "derivatives" / "sub-01" / "sub-01_mask.nii.gz")
    (bids / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t63\tF\nsub-02\tn/a\tM\n")
    rows = scan_folder(bids)
    assert [(e.case_id, e.modality) for e in rows] == [
        ("sub-01", "t1w"), ("sub-02_ses-a", "dwi"), ("sub-02_ses-b", "flair")]
    assert rows[0].metadata == {"age": 63.0, "sex": "F"} and rows[1].metadata == {"sex": "M"}


def test_scan_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot detect"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(InputError, match="unknown layout"):
        scan_folder(tmp_path / "empty", layout="nifti")
    tiny_nifti(tmp_path / "b" / "c1" / "c1_t1.nii.gz")
    with pytest.raises(InputError, match="no images found"):
        scan_folder(tmp_path / "b", modalities=["flair"])


def test_check_names_case_modality_and_file_of_a_zigzag_series(tmp_path, capsys):
    """`mmvae check` on a scanned DICOM folder whose T2 has slices shifted in-plane: one line
    naming the case, the modality, the folder and the slice file."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    import pydicom
    from _dicom import write_series
    from mmvae.cli import main

    root = tmp_path / "study"
    t2 = write_series(root / "c1" / "t2_tse_tra", 8, description="t2_tse_tra")
    for k, f in enumerate(sorted(t2.glob("*.dcm"))[1:-1], start=1):
        ds = pydicom.dcmread(str(f))
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + (6.0 if k % 2 else -6.0)] + \
            [float(x) for x in ds.ImagePositionPatient[1:]]
        ds.save_as(str(f), enforce_file_format=True)
    manifest = tmp_path / "m.jsonl"
    assert main(["scan", str(root), "--layout", "dicom", "--out", str(manifest)]) in (0, None)
    capsys.readouterr()
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    rc = main(["check", "--manifest", str(manifest), "--config", tiny, "--quiet",
               "--config.data.image_modalities=['t2']", "--config.data.clinical.numeric=[]",
               "--config.data.clinical.categorical={}"])
    out = capsys.readouterr().out
    assert rc == 2
    line = next(x for x in out.splitlines() if "in-plane" in x)
    assert "case 'c1'" in line and "modality 't2'" in line and f"file '{t2}'" in line and "0002.dcm" in line
