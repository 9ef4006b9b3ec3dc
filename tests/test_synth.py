"""Tests of mmvae.data.synth: determinism, files/manifest, the class design, missingness, 2D."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mmvae.data import synth
from mmvae.data.manifest import REPORT, group_cases, read_manifest
from mmvae.errors import ConfigError

SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)
N_DESIGN = 70  # 10 cases per class (classes are balanced per block of 7)
CUE = re.compile(r"known primary|carcinoma|cancer|melanoma", re.I)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def design(tmp_path_factory):
    """A complete cohort (nothing missing) and per-case lesion contrasts measured from the files."""
    root = tmp_path_factory.mktemp("design")
    manifest = synth.make_cohort(root, N_DESIGN, seed=0, shape=SHAPE, spacing=SPACING,
                                 modalities=("t1", "t2", "dwi"), missing_prob=0.0,
                                 report_missing_prob=0.0)
    cases = group_cases(read_manifest(manifest))
    truth = synth.read_truth(root)
    rows = []
    for c in cases:
        maps = synth.tissue_maps(truth[c.case_id], SHAPE, SPACING)
        core = (maps["lesion"] >= 0.99) & (maps["lesion_rho"] <= 0.6)
        ref = (maps["wm"] >= 0.99) & (maps["lesion_rho"] > 2.2) & (maps["oedema"] == 0)
        assert core.sum() >= 3 and ref.sum() >= 15, c.case_id
        row = {"case_id": c.case_id, "class": c.labels["class"], "report": c.report_text,
               "size": float((maps["lesion"]).sum()), "labels": c.labels, "metadata": c.metadata}
        for mod, (path,) in c.images.items():
            a = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
            row[mod] = a[core].mean() / a[ref].mean() - 1.0  # lesion vs white matter, scale-free
        rows.append(row)
    return {"root": root, "manifest": manifest, "cases": cases, "truth": truth, "rows": rows}


def _values(rows, cls, key):
    return np.array([r[key] for r in rows if r["class"] == cls])


def _welch_t(a, b):
    return abs(a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


def _loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier on features x."""
    x = x.reshape(len(x), -1)
    ok = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        classes = sorted(set(y[keep]))
        cent = np.stack([x[keep][y[keep] == c].mean(0) for c in classes])
        ok += classes[int(np.argmin(((cent - x[i]) ** 2).sum(1)))] == y[i]
    return ok / len(x)


# ----------------------------------------------------------------------------- determinism

def test_deterministic_bytes_and_order_independent(tmp_path):
    kw = dict(shape=(16, 16, 16), spacing=(3.0, 3.0, 3.0), missing_prob=0.3)
    a, b, c, d = (tmp_path / n for n in "abcd")
    synth.make_cohort(a, 8, seed=3, **kw)
    synth.make_cohort(b, 8, seed=3, **kw)
    synth.make_cohort(c, 8, seed=4, **kw)
    synth.make_cohort(d, 4, seed=3, **kw)
    fa, fb, fc, fd = (_files(p) for p in (a, b, c, d))
    assert fa == fb
    assert any(f.endswith(".nii.gz") for f in fa)
    # a different seed changes the images and the reports
    common = [k for k in fa if k.endswith(".nii.gz") and k in fc]
    assert common and all(fa[k] != fc[k] for k in common)
    assert fa["manifest.jsonl"] != fc["manifest.jsonl"]
    # a case does not depend on how many others are generated
    for k, v in fd.items():
        if k.startswith("cases/"):
            assert fa[k] == v
    la = (a / "manifest.jsonl").read_text().splitlines()
    ld = (d / "manifest.jsonl").read_text().splitlines()
    assert la[:len(ld)] == ld
    # in-memory generation gives the same case
    case = synth.generate_case(2, 3, **kw)
    row = [json.loads(x) for x in la if json.loads(x)["case_id"] == "synth-00002"]
    assert [r["modality"] for r in row] == list(case.images) + ([REPORT] if case.report else [])
    for m, arr in case.images.items():
        on_disk = nib.load(a / "cases/synth-00002" / f"synth-00002_{m}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(on_disk.dataobj), arr)


def test_modality_choice_does_not_change_phantom():
    full = synth.generate_case(5, 1, shape=(16, 16, 16), missing_prob=0.0)
    t2only = synth.generate_case(5, 1, shape=(16, 16, 16), modalities=("t2",), missing_prob=0.0)
    np.testing.assert_array_equal(full.images["t2"], t2only.images["t2"])
    assert full.labels == t2only.labels and full.metadata == t2only.metadata


# ----------------------------------------------------------------------------- files

def test_files_and_manifest_consistent(design):
    root, cases, truth = design["root"], design["cases"], design["truth"]
    assert len(cases) == N_DESIGN
    assert [c.case_id for c in cases] == [f"synth-{i:05d}" for i in range(N_DESIGN)]
    lines = [json.loads(x) for x in design["manifest"].read_text().splitlines()]
    first = {}
    for ln in lines:
        first.setdefault(ln["case_id"], ln)
    for c in cases:
        assert set(c.images) == {"t1", "t2", "dwi"} and c.report_text
        assert first[c.case_id]["labels"] == c.labels
        assert first[c.case_id].get("meta", {}) == c.metadata
        assert c.labels["class"] in synth.CLASSES
        assert c.labels["lesion_size"] in ("small", "medium", "large")
        assert truth[c.case_id]["class"] == c.labels["class"]
        for mod, (path,) in c.images.items():
            assert path == str(root / "cases" / c.case_id / f"{c.case_id}_{mod}.nii.gz")
            img = nib.load(path)
            assert img.shape == SHAPE and img.get_data_dtype() == np.int16
            assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), SPACING)
    # relative paths in the manifest, labels/metadata only on the first row of a case
    assert all(not Path(ln["path"]).is_absolute() for ln in lines if "path" in ln)
    assert all(ln is first[ln["case_id"]] for ln in lines if "labels" in ln)
    # classes are balanced per block of 7
    counts = {k: sum(r["class"] == k for r in design["rows"]) for k in synth.CLASSES}
    assert set(counts.values()) == {N_DESIGN // len(synth.CLASSES)}
    # no temp files left behind
    assert not list(root.rglob(".*tmp-*"))


def test_truth_lesion_centre_matches_maps(design):
    for cid in ("synth-00000", "synth-00011"):
        tr = design["truth"][cid]
        maps = synth.tissue_maps(tr, SHAPE, SPACING)
        w = maps["lesion"]
        com = np.array([(w * idx).sum() / w.sum() for idx in np.indices(SHAPE)])
        np.testing.assert_allclose(com, tr["lesion"]["centre_vox"], atol=0.6)
        # the lesion is inside the brain and cut by the middle axial slice
        assert maps["brain"][tuple(np.round(tr["lesion"]["centre_vox"]).astype(int))] > 0.99
        assert w[:, :, SHAPE[2] // 2].max() > 0.99


def test_metadata_fields(design):
    rows = design["rows"]
    ages = [r["metadata"]["age"] for r in rows if "age" in r["metadata"]]
    assert len(ages) >= 0.8 * len(rows)
    assert all(isinstance(a, float) and 18 <= a <= 95 for a in ages)
    assert {r["metadata"]["sex"] for r in rows if "sex" in r["metadata"]} <= {"M", "F"}
    assert {r["metadata"]["smoking"] for r in rows if "smoking" in r["metadata"]} <= {"yes", "no", "unknown"}
    assert any(len(r["metadata"]) < 3 for r in rows)  # some fields missing at random
    # the report states the true age
    for r in rows[:20]:
        age = design["truth"][r["case_id"]]["true_metadata"]["age"]
        assert str(int(age)) in r["report"]


# ----------------------------------------------------------------------------- design

def test_contrast_signs_follow_table(design):
    table = synth.class_contrast_table()
    assert set(table) == set(synth.CLASSES) and len(synth.CLASSES) >= 4
    rows = design["rows"]
    for cls in synth.CLASSES:
        for mod in ("t1", "t2", "dwi"):
            m = _values(rows, cls, mod).mean()
            code = table[cls][mod]
            if code > 0:
                assert m > 0.3, (cls, mod, m)
            elif code < 0:
                assert m < -0.3, (cls, mod, m)
            else:
                assert abs(m) < 0.1, (cls, mod, m)


def test_dwi_only_pair(design):
    rows = design["rows"]
    for mod in ("t1", "t2"):
        a, b = _values(rows, "abscess", mod), _values(rows, "necrotic_tumour", mod)
        assert abs(a.mean() - b.mean()) < 0.15 and _welch_t(a, b) < 3.0, mod
    a, b = _values(rows, "abscess", "dwi"), _values(rows, "necrotic_tumour", "dwi")
    assert a.min() > b.max() and a.mean() - b.mean() > 1.0
    assert synth.LESION_SIZE_RANGE["abscess"] == synth.LESION_SIZE_RANGE["necrotic_tumour"]
    assert synth.LESION_DEPTH_RANGE["abscess"] == synth.LESION_DEPTH_RANGE["necrotic_tumour"]


def test_report_only_pair(design):
    rows = design["rows"]
    for key in ("t1", "t2", "dwi", "size"):
        a, b = _values(rows, "glioma", key), _values(rows, "metastasis", key)
        assert _welch_t(a, b) < 3.0, key
    assert synth.LESION_SIZE_RANGE["glioma"] == synth.LESION_SIZE_RANGE["metastasis"]
    assert synth.LESION_DEPTH_RANGE["glioma"] == synth.LESION_DEPTH_RANGE["metastasis"]
    x = np.array([[r["t1"], r["t2"], r["dwi"]] for r in rows if r["class"] in ("glioma", "metastasis")])
    y = np.array([r["class"] for r in rows if r["class"] in ("glioma", "metastasis")])
    assert _loo_nearest_centroid(x, y) <= 0.75
    # ...but the reports differ in the clinical-history cue
    met = [bool(CUE.search(r["report"])) for r in rows if r["class"] == "metastasis"]
    gli = [bool(CUE.search(r["report"])) for r in rows if r["class"] == "glioma"]
    assert np.mean(met) >= 0.6 and not any(gli)


def test_t1_t2_combination_needed(design):
    quad = ("acute_haematoma", "early_haematoma", "late_haematoma", "glioma")
    rows = [r for r in design["rows"] if r["class"] in quad]
    y = np.array([r["class"] for r in rows])
    acc = {k: _loo_nearest_centroid(np.array([[r[m] for m in k] for r in rows]), y)
           for k in (("t1",), ("t2",), ("dwi",), ("t1", "t2"))}
    assert acc[("t1",)] <= 0.7 and acc[("t2",)] <= 0.7 and acc[("dwi",)] <= 0.5, acc
    assert acc[("t1", "t2")] >= 0.95, acc


def test_size_does_not_leak_class(design):
    rows = design["rows"]
    y = np.array([r["class"] for r in rows])
    x = np.array([r["size"] for r in rows])
    assert _loo_nearest_centroid(x, y) < 0.35  # chance is 1/7
    sizes = [r["labels"]["lesion_size"] for r in rows]
    assert all(sizes.count(s) >= 10 for s in ("small", "medium", "large"))


def test_report_cues(design):
    rows = design["rows"]
    restricted = re.compile(r"(?<!no )restricted diffusion|diffusion restriction", re.I)
    for r in rows:
        text = r["report"]
        assert re.search(r"\d+-year-old|\d+[MF]\.", text)
        if r["class"] == "necrotic_tumour":
            assert "There is restricted" not in text and "marked diffusion restriction" not in text
        if r["class"] == "abscess":
            assert "No restricted diffusion" not in text
        if r["class"] != "abscess":
            assert not re.search(r"There is restricted diffusion|marked diffusion restriction|in keeping with "
                                 r"restricted", text)
    abscess = [bool(restricted.search(r["report"])) for r in rows if r["class"] == "abscess"]
    assert 0.2 <= np.mean(abscess) <= 0.9  # partial cue
    haem = [bool(re.search(r"haem", r["report"], re.I)) for r in rows if "haematoma" in r["class"]]
    assert 0.5 <= np.mean(haem) < 1.0
    assert len({r["report"] for r in rows}) == len(rows)


# ----------------------------------------------------------------------------- missing

def test_missing_rates_and_no_empty_case(tmp_path):
    n = 280
    calls = []
    manifest = synth.make_cohort(tmp_path, n, seed=7, shape=(12, 12, 12), missing_prob=0.3,
                                 report_missing_prob=0.2, progress=calls.append)
    assert calls == list(range(1, n + 1))
    cases = group_cases(read_manifest(manifest))
    assert len(cases) == n and all(c.modalities() for c in cases)
    for mod in ("t1", "t2", "dwi"):
        rate = np.mean([mod not in c.images for c in cases])
        assert 0.22 <= rate <= 0.38, (mod, rate)
    rate = np.mean([c.report_text is None for c in cases])
    assert 0.13 <= rate <= 0.27
    # every case keeps its labels/metadata even when the first row is the report
    assert all("class" in c.labels for c in cases)
    # files on disk are exactly those listed
    listed = {p for c in cases for ps in c.images.values() for p in ps}
    on_disk = {str(p) for p in (tmp_path / "cases").rglob("*.nii.gz")}
    assert listed == on_disk


def test_never_empty_with_high_missing_prob():
    for i in range(40):
        c = synth.generate_case(i, 0, shape=(8, 8, 8), missing_prob=0.95, report_missing_prob=0.95)
        assert c.images or c.report
        assert c.to_case().modalities()


# ----------------------------------------------------------------------------- 2D

def test_2d_pngs_are_middle_slices(tmp_path, design):
    manifest = synth.make_cohort(tmp_path, 7, seed=0, shape=SHAPE, spacing=SPACING, spatial_dims=2,
                                 missing_prob=0.0, report_missing_prob=0.0)
    cases = group_cases(read_manifest(manifest))
    vols = {c.case_id: c for c in design["cases"]}
    for c in cases:
        assert vols[c.case_id].labels == c.labels and vols[c.case_id].report_text == c.report_text
        for mod, (path,) in c.images.items():
            assert path.endswith(f"{c.case_id}_{mod}.png")
            px = np.asarray(Image.open(path))
            assert px.shape == SHAPE[:2] and px.dtype == np.uint16
            vol = np.asanyarray(nib.load(vols[c.case_id].images[mod][0]).dataobj)
            mid = vol[:, :, SHAPE[2] // 2].astype(float)
            # same phantom and intensity scale, independent noise
            assert np.corrcoef(px.ravel(), mid.ravel())[0, 1] > 0.85
            assert 0.9 < px.mean() / mid.mean() < 1.1
    maps = synth.tissue_maps(synth.read_truth(tmp_path)["synth-00000"], SHAPE, SPACING, spatial_dims=2)
    assert maps["lesion"].shape == SHAPE[:2] and maps["lesion"].max() > 0.99


def test_2d_shape_and_default_spacing(tmp_path):
    manifest = synth.make_cohort(tmp_path, 3, seed=0, shape=(20, 24), spacing=(), spatial_dims=2,
                                 missing_prob=0.0)
    for c in group_cases(read_manifest(manifest)):
        for (path,) in c.images.values():
            assert np.asarray(Image.open(path)).shape == (20, 24)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        synth.make_cohort(tmp_path, 2, modalities=("t1", "pet"))
    with pytest.raises(ConfigError):
        synth.make_cohort(tmp_path, 2, spatial_dims=4)
    with pytest.raises(ConfigError):
        synth.make_cohort(tmp_path, 2, missing_prob=1.0)
    with pytest.raises(ConfigError):
        synth.make_cohort(tmp_path, 2, seed=-1)
    with pytest.raises(ConfigError):
        synth.make_cohort(tmp_path, 2, modalities=(), with_report=False)
