"""No stale state served (issue 30): an index (and its embeddings file) is tied to the exact
weights that built it, and a run whose weights have moved on refuses it.

The shared tiny run (tests/_tiny_run.py) is copied, embedded and indexed with ``mmvae embed`` /
``mmvae index`` (checkpoint step 6); "training on" is a step-12 checkpoint of perturbed
parameters written through the project's checkpoint API (no further training)."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae.cli import main
from mmvae.errors import InputError
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.index import load_index
from mmvae.retrieval.query import Retriever

from _tiny_run import faiss_one_thread, files_digest


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with faiss_one_thread():
        yield


@dataclasses.dataclass
class Stale:
    run: Path          # the run the index was built from (step 6)
    later: Path        # the same run "trained on" to step 12
    emb: Path
    index: Path
    manifest: str
    tmp: Path


def write_later_checkpoint(workdir: Path, step: int = 12, scale: float = 1.05) -> None:
    """A newer checkpoint whose parameters (and EMA) differ from the current ones."""
    from mmvae.runs import checkpoint as ckpt
    from mmvae.runs.files import read_run_files
    from mmvae.runs.trained import abstract_train_state
    config, spec, _ = read_run_files(workdir)
    _, abstract = abstract_train_state(spec, config)
    mgr = ckpt.manager(workdir, int(config.train.keep_checkpoints))
    _, state, meta = ckpt.restore_latest(mgr, abstract, quarantine=False)
    moved = lambda t: jax.tree.map(lambda x: x * scale if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    state = dict(state, params=moved(state["params"]), step=jnp.asarray(step, jnp.int32))
    if "ema" in state:
        state["ema"] = moved(state["ema"])
    ckpt.save(mgr, step, state, meta)
    mgr.wait_until_finished()
    mgr.close()


@pytest.fixture(scope="module")
def stale(tiny_indexed, tmp_path_factory) -> Stale:
    tmp = tmp_path_factory.mktemp("stale")
    _, c, wd, _, _ = tiny_indexed
    run = tmp / "run"
    shutil.copytree(wd, run)
    assert main(["embed", "--workdir", str(run), "--manifest", c.data.manifest, "--out", str(tmp / "emb.npz")]) == 0
    assert main(["index", "--embeddings", str(tmp / "emb.npz"), "--out", str(tmp / "index")]) == 0
    later = tmp / "later"
    shutil.copytree(run, later)
    write_later_checkpoint(later)
    return Stale(run, later, tmp / "emb.npz", tmp / "index", c.data.manifest, tmp)


def test_embeddings_and_index_record_the_weights_digest(stale, tiny_indexed):
    from mmvae.runs.trained import load_trained, weights_digest
    _, _, model, _ = load_trained(stale.run)
    want = weights_digest(model)
    assert len(want) == 64 and int(want, 16) >= 0                      # a SHA-256, in hex
    assert weights_digest(load_trained(stale.run)[2]) == want           # deterministic
    emb = Embeddings.load(stale.emb)
    assert emb.identity["weights_digest"] == want and emb.identity["checkpoint_step"] == 6
    ident = load_index(stale.index).identity                            # `mmvae index` carries it over
    assert ident["weights_digest"] == want and ident["checkpoint_step"] == 6
    # embed_cohort records it whoever calls it (the shared tiny index was built through the API)
    _, _, _, tiny_emb, tiny_index = tiny_indexed
    assert tiny_emb.identity["weights_digest"] == want == load_index(tiny_index).identity["weights_digest"]
    # other weights, other digest
    _, _, later_model, _ = load_trained(stale.later)
    assert weights_digest(later_model) != want


def test_unchanged_run_loads_and_finds_itself(stale, caplog):
    from mmvae.data.manifest import group_cases, read_manifest
    caplog.set_level(logging.WARNING)
    with Retriever.load(stale.run, stale.index) as r:
        ce = next(c for c in group_cases(read_manifest(stale.manifest)) if len(c.images) == 3)
        res = r.search(dict(ce.images), k=3)
    assert res[0].case_id == ce.case_id and res[0].score == pytest.approx(1.0, abs=1e-4)
    assert not [x for x in caplog.records if "weights" in x.getMessage()]


def test_run_trained_on_refuses_the_stale_index(stale, capsys):
    from mmvae.runs.trained import load_trained, weights_digest
    before = files_digest(stale.index)
    old = load_index(stale.index).identity["weights_digest"]
    new = weights_digest(load_trained(stale.later)[2])
    with pytest.raises(InputError) as e:
        Retriever.load(stale.later, stale.index)
    msg = str(e.value)
    assert f"index {stale.index}" in msg and f"run {stale.later}" in msg
    assert f"weights {old[:12]} (step 6)" in msg and f"has {new[:12]} (step 12)" in msg
    assert f"mmvae embed --workdir {stale.later}" in msg and f"mmvae index --embeddings" in msg
    assert f"--out {stale.index}" in msg and "\n" not in msg
    # the command line: exit 2, the same line
    from mmvae.data.manifest import group_cases, read_manifest
    t2 = next(c.images["t2"][0] for c in group_cases(read_manifest(stale.manifest)) if "t2" in c.images)
    rc = main(["query", "--workdir", str(stale.later), "--index", str(stale.index), "--t2", t2])
    err = capsys.readouterr().err
    assert rc == 2 and "(step 12)" in err and "mmvae embed" in err and err.count("\n") == 1
    assert files_digest(stale.index) == before


def test_index_without_a_weights_digest_warns_once(stale, caplog):
    from mmvae.retrieval.index import build_index
    emb = Embeddings.load(stale.emb)
    ident = {k: v for k, v in emb.identity.items() if k != "weights_digest"}    # as older versions wrote it
    meta = [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]
    old = build_index(emb.mu, emb.logvar, emb.case_ids, meta, identity=ident).save(stale.tmp / "old_index")
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        Retriever.load(stale.later, old).close()      # not refused: it cannot be checked
    said = [x.getMessage() for x in caplog.records if "weights" in x.getMessage()]
    assert len(said) == 1 and "cannot be checked" in said[0] and str(old) in said[0], said
