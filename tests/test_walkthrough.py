"""The README's "Your own data" walkthrough, run as written on the shared BraTS sample.

The commands are read from the README's code block (so the README cannot drift from what
works): the data folder becomes ``../shared/data/brats18-sample``, training runs a few
steps, the query uses one indexed case's files, and ``serve`` (a server; tests/test_serve.py)
is left out. Each command runs through ``mmvae.cli.main`` in this process.
"""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BRATS = ROOT.parent / "shared" / "data" / "brats18-sample"
CASE = "Brats18_TCIA10_628_1"


def walkthrough_commands() -> list[list[str]]:
    """The ``mmvae ...`` lines of the README's "Your own data" code block, as argv lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = section.split("\n\n", 2)[2].split("\n\n", 1)[0]       # the indented block after the intro
    lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("mmvae ")]
    return [shlex.split(ln)[1:] for ln in lines]


def test_readme_walkthrough_lists_the_steps_in_order():
    cmds = [c[0] for c in walkthrough_commands()]
    assert cmds == ["scan", "check", "train", "embed", "index", "evaluate", "query", "serve"]


def test_own_data_walkthrough_on_brats(tmp_path, monkeypatch, capsys):
    if not BRATS.is_dir():
        pytest.skip(f"BraTS sample absent at {BRATS}: the walkthrough was not run")
    from mmvae.cli import main
    monkeypatch.chdir(tmp_path)
    new = tmp_path / "new"
    new.mkdir()
    for seq in ("t2", "flair"):       # "a new case": copies of one sample case's files
        (new / f"{seq}.nii.gz").write_bytes((BRATS / CASE / f"{CASE}_{seq}.nii.gz").read_bytes())
    outputs = {}
    for argv in walkthrough_commands():
        if argv[0] == "serve":
            continue
        argv = [str(BRATS) if a == "data/brats" else str(BRATS / "grades.csv") if a == "data/brats/grades.csv"
                else a for a in argv]
        if argv[0] == "train":      # a few steps: the walkthrough, not the recipe's quality
            argv = [re.sub(r"steps=\d+", "steps=3", a) for a in argv] + ["--quiet"]
        if argv[0] == "check":
            argv += ["--quiet"]
        rc = main(argv)
        out, err = capsys.readouterr()
        outputs[argv[0]] = out
        assert rc in (0, None), (argv, out, err[-2000:])

    assert "6 cases" in outputs["scan"] and (tmp_path / "runs/brats/manifest.jsonl").is_file()
    assert "6 cases usable; 0 skipped" in outputs["check"]
    assert (tmp_path / "runs/brats/run/checkpoints").is_dir()
    emb = np.load(tmp_path / "runs/brats/emb.npz")
    assert len(emb["case_ids"]) == 6
    # evaluate: the run's label (grade) without --label, chance beside each row
    ev = outputs["evaluate"]
    assert "label 'grade'" in ev and "chance mAP@5" in ev
    row = next(ln for ln in ev.splitlines() if ln.startswith("| t1+t1ce+t2+flair |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "6" and 0.0 <= float(cells[2].split()[0]) <= 1.0
    assert abs(float(cells[-1]) - 0.663) < 0.05          # chance of 4 HGG + 2 LGG, mAP@5
    # query with the copies of an indexed case: that case comes back first
    first = next(ln for ln in outputs["query"].splitlines() if ln.strip().startswith("1"))
    assert CASE in first, outputs["query"]


def test_evaluate_label_errors(tmp_path, capsys):
    """A label no case has is an error (exit 2) naming the labels present."""
    from mmvae.cli import main
    from mmvae.retrieval.embed import Embeddings
    rng = np.random.default_rng(0)
    n = 8
    mu = rng.normal(size=(n, 4)).astype(np.float32)
    emb = Embeddings(case_ids=[f"c{i}" for i in range(n)], modalities=["t1"],
                     experts_mu=mu[:, None], experts_logvar=np.zeros((n, 1, 4), np.float32),
                     mu=mu, logvar=np.zeros((n, 4), np.float32),
                     present=np.ones((n, 1), np.float32), labels=[{"grade": "HGG" if i % 2 else "LGG"} for i in range(n)],
                     identity={})
    emb.save(tmp_path / "e.npz")
    assert main(["evaluate", "--embeddings", str(tmp_path / "e.npz"), "--label", "class"]) == 2
    assert "label 'class': no case of the embeddings has it (labels present: grade)" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", str(tmp_path / "e.npz"), "--bootstrap", "0"]) in (0, None)
    assert "label 'grade'" in capsys.readouterr().out
