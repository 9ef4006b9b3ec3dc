"""The three real sample cohorts in ../shared/data go through the whole data layer:
scan → manifest → load → preprocess (cached) → static-shape batches."""
from pathlib import Path

import numpy as np
import pytest

from mmvae.config import base_config
from mmvae.data.cache import PreprocessCache
from mmvae.data.dataset import prepare_cohort
from mmvae.data.manifest import write_manifest
from mmvae.data.scan import scan_folder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _need(sub):
    if not (DATA / sub).exists():
        pytest.skip(f"real sample data not found at {DATA / sub} (see the developers' README)")
    return DATA / sub


def _cfg(modalities, shape=(32, 32, 16), spacing=(6.0, 6.0, 6.0), **kw):
    c = base_config().data
    c.image_modalities = list(modalities)
    c.report = False
    c.shape, c.spacing, c.workers = shape, spacing, 2
    for k, v in kw.items():
        c[k] = v
    return c


def _check(cohort, modalities, shape):
    for m in modalities:
        for arr in cohort.images[m]:
            assert arr is not None and arr.shape[1:] == shape
            assert np.isfinite(arr).all()
            fg = arr[0] != 0
            assert fg.mean() > 0.02
            np.testing.assert_allclose(arr[0][fg].mean(), 0.0, atol=1e-3)
            np.testing.assert_allclose(arr[0][fg].std(), 1.0, atol=1e-2)


def test_brats_two_cases_preprocess_with_grade_labels(tmp_path):
    root = _need("brats18-sample")
    entries = [e for e in scan_folder(root, layout="brats")
               if e.case_id in ("Brats18_2013_11_1", "Brats18_TCIA10_628_1")]
    m = write_manifest(entries, tmp_path / "brats.jsonl")
    mods = ("t1", "t1ce", "t2", "flair")
    cohort = prepare_cohort(m, _cfg(mods, shape=(32, 32, 24)), PreprocessCache(tmp_path / "c"), show_progress=False)
    assert cohort.case_ids == ["Brats18_2013_11_1", "Brats18_TCIA10_628_1"]
    assert [lab["grade"] for lab in cohort.labels] == ["HGG", "LGG"]
    _check(cohort, mods, (32, 32, 24))
    b = cohort.batch([0, 1])
    assert b["image/flair"].shape == (2, 1, 32, 32, 24) and b["series_mask/t1ce"].sum() == 2


def test_isles_flair_on_dwi_grid_and_dwi_adc(tmp_path):
    root = _need("isles22-stroke")
    m = write_manifest(scan_folder(root, layout="bids"), tmp_path / "isles.jsonl")
    mods = ("dwi", "adc", "flair")
    cfg = _cfg(mods, shape=(48, 48, 32), spacing=(4.0, 4.0, 4.0), reference_modality="dwi")
    cohort = prepare_cohort(m, cfg, PreprocessCache(tmp_path / "c"), show_progress=False)
    assert len(cohort) == 1
    _check(cohort, mods, (48, 48, 32))
    # FLAIR was resampled onto the DWI grid first: its head mask overlaps DWI's.
    f, d = np.asarray(cohort.images["flair"][0][0]) != 0, np.asarray(cohort.images["dwi"][0][0]) != 0
    assert 2 * (f & d).sum() / (f.sum() + d.sum()) > 0.7


def test_prostatex_dicom_series_preprocess(tmp_path):
    root = _need("prostatex-dicom")
    m = write_manifest(scan_folder(root, layout="dicom"), tmp_path / "px.jsonl")
    mods = ("t2", "dwi", "adc")
    cfg = _cfg(mods, shape=(32, 32, 16), spacing=(3.0, 3.0, 3.0))
    cohort = prepare_cohort(m, cfg, PreprocessCache(tmp_path / "c"), show_progress=False)
    assert cohort.case_ids == ["ProstateX-0000"]
    _check(cohort, mods, (32, 32, 16))


def test_medpix_reports_are_in_the_tokenizer(tmp_path):
    """MedPix key-image folders give each report as report.txt: the tokenizer built for a run
    must know their words (it was once built from inline texts only: all [UNK])."""
    from mmvae.data.text import tokenize
    from mmvae.runs.trained import get_tokenizer, report_texts
    root = _need("medpix-dev")
    manifest = write_manifest(scan_folder(root, layout="keyimages"), tmp_path / "m.jsonl")
    texts = report_texts(manifest)
    assert len(texts) == len({p.parent for p in root.glob("*/report.txt")}) >= 100
    tok = get_tokenizer(base_config(), tmp_path / "run", texts)
    ids, mask = tokenize(tok, texts, 256)
    words = ids[mask > 0]
    assert len(tok.get_vocab()) > 1000
    assert np.mean(words == tok.unk_token_id) < 0.02
