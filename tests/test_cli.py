"""The command line: help texts, the quickstart path on a tiny config, errors → exit 2."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmvae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: mmvae " + name in capsys.readouterr().out


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("qs")
    rc = main(["quickstart", "--workdir", str(wd), "--config", TINY, "--cases", "32", "--steps", "4", "--quiet"])
    assert rc == 0
    return wd


def test_quickstart_writes_a_table_for_every_query_subset(quickstart_run, capsys):
    wd = quickstart_run
    rows = list(csv.DictReader(open(wd / "retrieval.csv")))
    # 5 modalities (t1, t2, dwi, report, clinical) → 31 non-empty query subsets
    assert len(rows) == 31
    assert rows[0]["query"] == "t1" and rows[-1]["query"] == "t1+t2+dwi+report+clinical"
    for r in rows:
        if int(r["num_queries"]) > 0:
            for m in ("map@10", "precision@10", "recall@10", "ndcg@10"):
                assert 0.0 <= float(r[m]) <= 1.0
            assert float(r["map@10_lo"]) <= float(r["map@10"]) <= float(r["map@10_hi"])
    md = (wd / "retrieval.md").read_text()
    assert "| t1+t2+dwi+report+clinical |" in md
    # the table says which model produced it, report expert included (the `auto` text recipe
    # depends on whether the text extra is installed)
    assert "Model: poe fusion, embedding dimension 8, 4 steps; report expert: " in md
    # the chance level is stated: random AP@10 with 7 balanced classes in 32 cases is ~0.1-0.2
    chance = float(md.split("Chance mAP@10 (random ranking, same protocol): ")[1].split()[0])
    assert 0.03 < chance < 0.3
    # every artefact of the path exists and is consistent
    emb = np.load(wd / "embeddings.npz", allow_pickle=False)
    # retrieval.embedding=experts (the default): the five experts' means concatenated
    assert emb["mu"].shape == (32, 40) and emb["experts_mu"].shape == (32, 5, 8)
    assert "Retrieval vectors: the 5 experts' standardised means concatenated (40 dims)." in md
    info = json.loads((wd / "index" / "index.json").read_text())
    assert info["kind"] == "flat" and info["latent_dim"] == 40
    metrics = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    run_info = json.loads((wd / "run_info.json").read_text())
    assert run_info["devices"] and run_info["mmvae_version"]


def test_evaluate_and_index_commands_on_quickstart_embeddings(quickstart_run, tmp_path, capsys):
    wd = quickstart_run
    assert main(["evaluate", "--embeddings", str(wd / "embeddings.npz"), "--subsets", "t1", "t1+t2",
                 "--out", str(tmp_path / "ev")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "ev.csv")))
    assert [r["query"] for r in rows] == ["t1", "t1+t2"]
    assert main(["index", "--embeddings", str(wd / "embeddings.npz"), "--out", str(tmp_path / "idx"),
                 "--kind", "hnsw"]) == 0
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["kind"] == "hnsw"
    capsys.readouterr()
    assert main(["evaluate", "--embeddings", str(wd / "embeddings.npz"), "--subsets", "t1+pet"]) == 2
    err = capsys.readouterr().err
    assert "pet" in err and "known" in err


def test_bad_volume_in_manifest_exits_2_naming_case_modality_file(tmp_path, capsys):
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    x = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    ok = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(x, aff), str(ok))
    x[3, 3, 3] = np.nan
    bad = tmp_path / "case b" / "bad t2.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(x, aff), str(bad))
    m = tmp_path / "manifest.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [
        {"case_id": "a", "modality": "t1", "path": str(ok)},
        {"case_id": "b", "modality": "t1", "path": str(ok)},
        {"case_id": "b", "modality": "t2", "path": str(bad)}]) + "\n")
    rc = main(["train", "--config", TINY, "--workdir", str(tmp_path / "wd"), "--manifest", str(m), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "case 'b'" in err and "modality 't2'" in err and "bad t2.nii.gz" in err and "NaN" in err
    assert "Traceback" not in err
    # --on-error skip: the bad case is skipped with a warning and a final count
    import logging
    logging.getLogger().handlers.clear()
    rc = main(["train", "--config", TINY, "--workdir", str(tmp_path / "wd2"), "--manifest", str(m), "--quiet",
               "--on-error", "skip", "--config.train.steps=0", "--config.data.val_fraction=0.0",
               "--config.train.batch_size=1", "--config.data.report=False"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # the bad modality is dropped, case b kept with its t1 (a warning counts and names the drop)
    assert "dropped modalities: 1 case-modalities" in err and "bad t2.nii.gz" in err
    summary = json.loads((tmp_path / "wd2" / "input_summary.json").read_text())
    assert summary["cases"] == 2 and summary["counts"] == {"dropped": 1}


def test_unknown_config_key_and_wrong_type_fail_before_running(tmp_path, capsys):
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.train.steps=abc"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
