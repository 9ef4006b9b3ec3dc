"""Manifests, the preprocessing cache, cohort preparation, batches and bad input."""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmvae.config import base_config
from mmvae.data.cache import PreprocessCache
from mmvae.data.dataset import prepare_cohort, split_indices
from mmvae.data.manifest import ManifestEntry, group_cases, read_manifest, write_manifest
from mmvae.data.pipeline import Position, batch_indices, eval_batches
from mmvae.errors import InputError


def data_cfg(**kw):
    c = base_config().data
    c.shape = (8, 8, 8)
    c.spacing = (4.0, 4.0, 4.0)
    c.workers = 1
    c.report = True
    for k, v in kw.items():
        c[k] = v
    return c


def blob(seed, shape=(12, 12, 12)):
    rng = np.random.default_rng(seed)
    x = np.zeros(shape, np.float32)
    x[3:9, 3:9, 3:9] = 100 + rng.normal(0, 5, size=(6, 6, 6))
    return x + rng.uniform(0, 1, size=shape)


def save_nii(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


@pytest.fixture
def cohort_dir(tmp_path):
    entries = []
    for i in range(4):
        cid = f"c{i}"
        for j, m in enumerate(["t1", "t2", "dwi"]):
            if i == 3 and m == "dwi":
                continue       # a missing modality
            p = save_nii(tmp_path / cid / f"{cid}_{m}.nii.gz", blob(10 * i + j))
            entries.append(ManifestEntry(cid, m, str(p), labels={"class": "a" if i % 2 else "b"} if j == 0 else {}))
        if i != 2:
            entries.append(ManifestEntry(cid, "report", text=f"lesion number {i} seen", metadata={"age": 40.0 + i}))
    write_manifest(entries, tmp_path / "manifest.jsonl")
    return tmp_path


def test_manifest_round_trip_csv_and_jsonl(cohort_dir, tmp_path):
    entries = read_manifest(cohort_dir / "manifest.jsonl")
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"copy{suffix}"
        write_manifest(entries, out)
        again = read_manifest(out)
        assert [(e.case_id, e.modality, e.path, e.text, e.labels, e.metadata) for e in again] == \
               [(e.case_id, e.modality, e.path, e.text, e.labels, e.metadata) for e in entries]
    cases = group_cases(entries, ["t1", "t2", "dwi", "report"])
    assert [c.case_id for c in cases] == ["c0", "c1", "c2", "c3"]
    assert cases[3].modalities() == ["t1", "t2", "report"]
    assert cases[2].report_text is None and cases[1].labels == {"class": "a"}


def test_manifest_errors_name_case_and_modality(tmp_path):
    with pytest.raises(InputError, match=r"case 'x'.*modality 'pet'.*unknown modality"):
        group_cases([ManifestEntry("x", "pet", "/a.nii")], ["t1", "report"])
    with pytest.raises(InputError, match=r"case 'a'.*duplicate case id"):
        group_cases([ManifestEntry("a", "t1", "/1"), ManifestEntry("b", "t1", "/2"), ManifestEntry("a", "t2", "/3")])
    with pytest.raises(InputError, match="conflicting"):
        group_cases([ManifestEntry("a", "t1", "/1", labels={"class": "x"}),
                     ManifestEntry("a", "t2", "/2", labels={"class": "y"})])
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"case_id": "a", "modality": "t1", "path": "x.nii"}\n{not json\n')
    with pytest.raises(InputError, match="line 2"):
        read_manifest(bad)


def test_prepare_cohort_shapes_masks_and_batches(cohort_dir, tmp_path):
    from mmvae.data.text import build_word_tokenizer, load_tokenizer
    tok = load_tokenizer(build_word_tokenizer(["lesion number 0 1 2 3 seen"], tmp_path / "tok"))
    cache = PreprocessCache(tmp_path / "cache")
    cfg = data_cfg()
    cfg.clinical.numeric = ["age"]
    cohort = prepare_cohort(cohort_dir / "manifest.jsonl", cfg, cache, tok, show_progress=False)
    assert len(cohort) == 4 and cache.builds == 11
    b = cohort.batch([0, 3, 2])
    assert b["image/t1"].shape == (3, 1, 8, 8, 8)
    np.testing.assert_array_equal(b["series_mask/dwi"][:, 0], [1, 0, 1])
    assert b["image/dwi"][1].max() == 0.0
    assert b["report/mask"][2].sum() == 0 and b["report/mask"][0].sum() > 0
    np.testing.assert_array_equal(b["clinical/num_mask"][:, 0], [1, 1, 0])
    # z-scored inside the foreground
    x = np.asarray(cohort.images["t1"][0][0])
    fg = x != 0
    assert abs(x[fg].mean()) < 1e-3 and abs(x[fg].std() - 1) < 1e-2
    assert cohort.present_modalities(3) == ["t1", "t2", "report", "clinical"]
    # padded evaluation batches cover every case once
    seen = []
    for batch, valid in eval_batches(cohort, 3, prefetch=1):
        seen += list(np.nonzero(valid)[0])
        assert batch["image/t1"].shape[0] == 3
    assert len(seen) == 4


def test_cache_second_read_does_not_preprocess_and_corrupt_entry_is_rebuilt(cohort_dir, tmp_path):
    cfg = data_cfg(report=False)
    cache = PreprocessCache(tmp_path / "cache")
    c1 = prepare_cohort(cohort_dir / "manifest.jsonl", cfg, cache, show_progress=False)
    assert cache.builds == 11
    cache2 = PreprocessCache(tmp_path / "cache")      # a new process
    c2 = prepare_cohort(cohort_dir / "manifest.jsonl", cfg, cache2, show_progress=False)
    assert cache2.builds == 0
    assert isinstance(c2.images["t1"][0], np.memmap)
    np.testing.assert_array_equal(c1.images["t2"][1], c2.images["t2"][1])
    before = {m: [np.array(a) for a in c1.images[m]] for m in ("t1", "t2")}   # copies, not memmaps
    # corrupt one entry (flip bytes in the middle) and truncate another
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:100])
    cache3 = PreprocessCache(tmp_path / "cache")
    c3 = prepare_cohort(cohort_dir / "manifest.jsonl", cfg, cache3, show_progress=False)
    assert cache3.builds == 2 and cache3.rebuilt_corrupt == 2
    for m in ("t1", "t2"):
        for a, b in zip(before[m], c3.images[m]):
            np.testing.assert_array_equal(a, b)
    # a changed preprocessing config is a different key
    cache4 = PreprocessCache(tmp_path / "cache")
    prepare_cohort(cohort_dir / "manifest.jsonl", data_cfg(report=False, normalize="minmax"), cache4,
                   show_progress=False)
    assert cache4.builds == 11
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))


def _manifest_with(tmp_path, bad_path, modality="t2"):
    good = save_nii(tmp_path / "ok" / "ok_t1.nii.gz", blob(1))
    entries = [ManifestEntry("ok", "t1", str(good)), ManifestEntry("bad", "t1", str(good)),
               ManifestEntry("bad", modality, str(bad_path))]
    return write_manifest(entries, tmp_path / "manifest.jsonl")


def _bad_inputs(tmp_path):
    out = {}
    nan = blob(2); nan[5, 5, 5] = np.nan
    out["NaN"] = save_nii(tmp_path / "bad" / "nan.nii.gz", nan)
    out["constant"] = save_nii(tmp_path / "bad" / "const.nii.gz", np.ones((8, 8, 8), np.float32))
    out["4D"] = save_nii(tmp_path / "bad" / "four.nii.gz", np.stack([blob(3), blob(4)], -1))
    trunc = tmp_path / "bad" / "trunc.nii.gz"
    raw = save_nii(tmp_path / "bad" / "full.nii.gz", blob(5)).read_bytes()
    trunc.write_bytes(raw[: len(raw) // 2])
    out["trunc"] = trunc
    junk = tmp_path / "bad" / "junk.nii"
    junk.write_bytes(b"not a nifti file at all" * 20)
    out["unread"] = junk
    out["missing"] = tmp_path / "bad" / "does_not_exist.nii.gz"
    return out


def test_every_bad_image_names_case_modality_and_file(tmp_path):
    for what, path in _bad_inputs(tmp_path).items():
        m = _manifest_with(tmp_path, path)
        cache = PreprocessCache(tmp_path / f"cache_{what}")
        with pytest.raises(InputError) as e:
            prepare_cohort(m, data_cfg(report=False), cache, show_progress=False)
        msg = str(e.value)
        assert "case 'bad'" in msg and "modality 't2'" in msg and Path(path).name in msg, (what, msg)
        assert e.value.__cause__ is None or isinstance(e.value.__cause__, InputError)
        # nothing half-written: no temp files, and no entry for the bad file
        assert not list((tmp_path / f"cache_{what}").rglob("*.tmp-*"))


def test_on_error_skip_skips_and_counts(tmp_path):
    bad = _bad_inputs(tmp_path)
    m = _manifest_with(tmp_path, bad["NaN"])
    cohort = prepare_cohort(m, data_cfg(report=False, on_error="skip"), PreprocessCache(tmp_path / "c"),
                            show_progress=False)
    # the bad modality is dropped (noted), the case kept with what is usable
    assert cohort.case_ids == ["ok", "bad"] and cohort.present_modalities(1) == ["t1"] and not cohort.skipped
    [n] = [n for n in cohort.notes if n["kind"] == "dropped"]
    assert (n["case_id"], n["modality"]) == ("bad", "t2") and "NaN" in n["message"] and "nan.nii.gz" in n["path"]
    # a case left with nothing usable is skipped whole, with the reasons
    only_bad = write_manifest([ManifestEntry("ok", "t1", str(tmp_path / "ok" / "ok_t1.nii.gz")),
                               ManifestEntry("bad", "t2", str(bad["NaN"]))], tmp_path / "m2.jsonl")
    cohort = prepare_cohort(only_bad, data_cfg(report=False, on_error="skip"), PreprocessCache(tmp_path / "c"),
                            show_progress=False)
    assert cohort.case_ids == ["ok"]
    assert len(cohort.skipped) == 1 and cohort.skipped[0][0] == "bad" and "NaN" in cohort.skipped[0][1]


def test_a_blank_report_file_does_not_stop_the_tokenizer_of_a_training_cohort(tmp_path):
    """The run's word tokenizer reads every report first (runs.trained.load_cohort): a blank one
    is left out there too (data.empty_report=drop), so one empty report.txt no longer stops
    `mmvae train` before the cohort could drop it; with 'error' it still does."""
    from mmvae.config import load_config
    from mmvae.runs.trained import load_cohort
    img = [save_nii(tmp_path / f"{c}_t1.nii.gz", blob(i)) for i, c in enumerate("ab")]
    empty, full = tmp_path / "a.txt", tmp_path / "b.txt"
    empty.write_text("\n")
    full.write_text("A ring-enhancing lesion in the left parietal lobe.")
    m = write_manifest([ManifestEntry("a", "t1", str(img[0])), ManifestEntry("a", "report", str(empty)),
                        ManifestEntry("b", "t1", str(img[1])), ManifestEntry("b", "report", str(full))],
                       tmp_path / "m.jsonl")
    root = Path(__file__).resolve().parents[1]
    c = load_config(str(root / "configs" / "tiny.py"),         # its own small BERT, the word tokenizer
                    ["--config.data.image_modalities=['t1']", "--config.data.clinical.numeric=[]",
                     "--config.data.clinical.categorical={}", f"--config.data.cache_dir={tmp_path / 'cache'}"])
    cohort, tok, _ = load_cohort(c, tmp_path / "run", str(m), show_progress=False)
    assert cohort.case_ids == ["a", "b"] and cohort.reports[0] is None and "parietal" in cohort.reports[1]
    assert [n["case_id"] for n in cohort.notes if n["kind"] == "dropped"] == ["a"]
    with c.unlocked():
        c.data.empty_report = "error"
    with pytest.raises(InputError, match=r"case 'a'.*modality 'report'.*a.txt.*empty report"):
        load_cohort(c, tmp_path / "run2", str(m), show_progress=False)


def test_missing_and_empty_report(tmp_path):
    img = save_nii(tmp_path / "a_t1.nii.gz", blob(1))
    empty = tmp_path / "r.txt"
    empty.write_text("  \n")
    m = write_manifest([ManifestEntry("a", "t1", str(img)), ManifestEntry("a", "report", str(empty))],
                       tmp_path / "m.jsonl")
    # data.empty_report=error: the blank report stops the cohort, naming case, modality, file
    with pytest.raises(InputError, match=r"case 'a'.*modality 'report'.*r.txt.*empty report"):
        prepare_cohort(m, data_cfg(empty_report="error"), PreprocessCache(tmp_path / "c"), show_progress=False)
    # default (drop), even with on_error=raise: the case is kept without its report, noted and warned
    cohort = prepare_cohort(m, data_cfg(), PreprocessCache(tmp_path / "c"), show_progress=False)
    assert cohort.case_ids == ["a"] and cohort.reports == [None] and cohort.present_modalities(0) == ["t1"]
    [n] = [n for n in cohort.notes if n["kind"] == "dropped"]
    assert n["modality"] == "report" and "empty report" in n["message"] and n["path"].endswith("r.txt")
    # text that is not text is still an error (only blank reports are dropped by default)
    empty.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match=r"case 'a'.*modality 'report'"):
        prepare_cohort(m, data_cfg(), PreprocessCache(tmp_path / "c2"), show_progress=False)
    m2 = write_manifest([ManifestEntry("a", "t1", str(img)), ManifestEntry("a", "report", str(tmp_path / "no.txt"))],
                        tmp_path / "m2.jsonl")
    with pytest.raises(InputError, match=r"case 'a'.*modality 'report'.*no.txt"):
        prepare_cohort(m2, data_cfg(), PreprocessCache(tmp_path / "c"), show_progress=False)


def test_batch_order_is_deterministic_and_resumable():
    a, pos = [], Position()
    for _ in range(7):
        idx, pos = batch_indices(20, 6, seed=3, pos=pos)
        a.append(idx)
    assert pos == Position(2, 1)   # 3 batches per epoch
    b, pos2 = [], Position(1, 1)
    for _ in range(3):
        idx, pos2 = batch_indices(20, 6, seed=3, pos=pos2)
        b.append(idx)
    for x, y in zip(a[4:7], b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[3])          # a new permutation each epoch
    assert len(set(np.concatenate(a[:3]).tolist())) == 18
    tr, va = split_indices(50, 0.2, 0)
    assert len(va) == 10 and not set(tr) & set(va)
    np.testing.assert_array_equal(split_indices(50, 0.2, 0)[1], va)


def test_reports_given_as_files_build_the_tokenizer(tmp_path, caplog):
    """A report row may give its text inline or as a file (MedPix key-image folders do). The
    tokenizer used to be built from inline texts only: reports from files became all [UNK]."""
    from mmvae.data.text import tokenize
    from mmvae.runs.trained import get_tokenizer, report_texts
    (tmp_path / "r1.txt").write_text("Ring-enhancing lesion in the left cerebellum.\n", encoding="utf-8")
    entries = [ManifestEntry("a", "report", str(tmp_path / "r1.txt")),
               ManifestEntry("b", "report", text="Haematoma of the right frontal lobe."),
               ManifestEntry("c", "report", str(tmp_path / "missing.txt"))]     # reported when the cohort is read
    manifest = write_manifest(entries, tmp_path / "m.jsonl")
    with pytest.raises(InputError, match=r"case 'c', modality 'report', file '.*missing.txt'"):
        report_texts(manifest)                                   # data.on_error='raise': before any tokenizer
    texts = report_texts(manifest, "skip")
    assert texts == ["Ring-enhancing lesion in the left cerebellum.", "Haematoma of the right frontal lobe."]
    c = base_config()
    tok = get_tokenizer(c, tmp_path / "run", texts)
    ids, mask = tokenize(tok, texts[:1], 32)
    words = ids[0][mask[0] > 0]
    assert tok.unk_token_id not in set(words.tolist()) and len(words) >= 6
    assert "cerebellum" in tok.get_vocab()
    with caplog.at_level("WARNING", logger="mmvae.runs.trained"):
        empty = get_tokenizer(c, tmp_path / "run2", [])          # an image-only cohort: harmless, but said
    assert "no readable report" in caplog.text and len(empty.get_vocab()) < 10


def test_load_cohort_tokenizes_report_files_and_warns_on_a_stale_tokenizer(cohort_dir, tmp_path, caplog):
    """Through the call site the runs use: a report given as a file is tokenised with known words;
    a run folder whose tokenizer was built without any report (the old bug) is reported."""
    from mmvae.runs.trained import load_cohort
    entries = [e for e in read_manifest(cohort_dir / "manifest.jsonl") if e.modality != "report"]
    (tmp_path / "r.txt").write_text("Restricted diffusion in a ring-enhancing cerebellar lesion.", encoding="utf-8")
    last = max(i for i, e in enumerate(entries) if e.case_id == "c1")     # a case's rows stay together
    entries.insert(last + 1, ManifestEntry("c1", "report", str(tmp_path / "r.txt")))
    manifest = write_manifest(entries, tmp_path / "files.jsonl")
    c = base_config()
    c.data.shape, c.data.spacing, c.data.workers = (8, 8, 8), (4.0, 4.0, 4.0), 1
    cohort, tok, _ = load_cohort(c, tmp_path / "run", str(manifest), show_progress=False)
    i = cohort.case_ids.index("c1")
    ids = cohort.arrays["report/ids"][i][cohort.arrays["report/mask"][i] > 0]
    assert len(ids) >= 7 and tok.unk_token_id not in set(ids.tolist()) and "cerebellar" in tok.get_vocab()
    # a run folder whose vocabulary holds special tokens only, while the cohort has reports
    from mmvae.data.text import build_word_tokenizer
    build_word_tokenizer([], tmp_path / "stale" / "tokenizer", max_vocab=100)
    with caplog.at_level("WARNING", logger="mmvae.runs.trained"):
        load_cohort(c, tmp_path / "stale", str(manifest), show_progress=False)
    assert "holds special tokens only while the cohort has 1 report(s)" in caplog.text


def test_data_max_voxels_refuses_a_larger_nifti_naming_the_limit(tmp_path):
    """``data.max_voxels`` reaches the loaders: a NIfTI above it is refused from its header,
    the message naming the case, the file and the limit; at the default it is read."""
    big = save_nii(tmp_path / "big" / "big_t1.nii.gz", blob(7))           # 12³ = 1728 voxels
    m = write_manifest([ManifestEntry("big", "t1", str(big))], tmp_path / "m.jsonl")
    with pytest.raises(InputError) as e:
        prepare_cohort(m, data_cfg(report=False, image_modalities=["t1"], max_voxels=1000),
                       PreprocessCache(tmp_path / "c1"), show_progress=False)
    msg = str(e.value)
    assert "max_voxels=1000" in msg and "1728 voxels" in msg and "case 'big'" in msg and "big_t1.nii.gz" in msg
    assert base_config().data.max_voxels == 2 ** 28
    cohort = prepare_cohort(m, data_cfg(report=False, image_modalities=["t1"]), PreprocessCache(tmp_path / "c2"),
                            show_progress=False)
    assert cohort.case_ids == ["big"]


def test_preprocessing_failure_with_an_empty_message_still_has_a_reason(tmp_path, monkeypatch):
    import mmvae.data.dataset as ds

    def boom(*a, **k):
        raise ValueError()

    monkeypatch.setattr(ds, "_load_and_preprocess", boom)
    img = save_nii(tmp_path / "a_t1.nii.gz", blob(1))
    m = write_manifest([ManifestEntry("a", "t1", str(img))], tmp_path / "m.jsonl")
    with pytest.raises(InputError, match=r"preprocessing failed: ValueError") as e:
        prepare_cohort(m, data_cfg(report=False, image_modalities=["t1"]), PreprocessCache(tmp_path / "c"),
                       show_progress=False)
    assert "case 'a'" in str(e.value)
