"""A new modality kind is one module plus one registry line.

A toy kind, a fixed-length numeric vector (e.g. a lab panel), is defined here as a new
module would define it, registered with one line, and then trained (the real
``train_and_evaluate`` from a config and a manifest), embedded, indexed and queried
through the public entry points — none of which knows the kind.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmvae.config import load_config
from mmvae.errors import ConfigError, InputError
from mmvae.models import fusion
from mmvae.models.layers import MLP
from mmvae.models.modalities import KINDS, kinds_of, register
from mmvae.models.modalities.kind import Kind
from mmvae.retrieval.embed import embed_cohort
from mmvae.retrieval.evaluate import chance_map, evaluate
from mmvae.retrieval.index import build_index
from mmvae.cli.query import query_main
from mmvae.retrieval.query import Retriever
from mmvae.runs.files import fingerprint
from mmvae.runs.trained import load_cohort, load_trained
from mmvae.train.loop import train_and_evaluate

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


# ----------------------------------------------------------------- the new kind, as its own module would be
class VectorEncoder(nnx.Module):
    def __init__(self, size: int, latent: int, *, rngs: nnx.Rngs):
        self.mlp = MLP([2 * size, 32, 2 * latent], rngs=rngs)

    def __call__(self, x, mask):
        mu, lv = jnp.split(self.mlp(jnp.concatenate([x * mask[:, None], jnp.broadcast_to(mask[:, None], x.shape)],
                                                    -1)), 2, -1)
        return fusion.Gaussian(mu, lv)


def _case_arrays(m, options, metadata):
    size = int(options["size"])
    v = metadata.get(m)
    if v is None:
        return {f"{m}/x": np.zeros(size, np.float32), f"{m}/mask": np.float32(0)}
    v = np.asarray(v, np.float32)
    if v.shape != (size,) or not np.all(np.isfinite(v)):
        raise InputError(f"expected {size} finite numbers, got {metadata.get(m)!r}")
    return {f"{m}/x": v, f"{m}/mask": np.float32(1)}


def _log_likelihood(model, m, out, batch, reps):
    x, mask = batch[f"{m}/x"], batch[f"{m}/mask"]
    pred = out.reshape((reps,) + x.shape)
    return -0.5 * jnp.sum((pred - x[None]) ** 2, -1) * mask[None]          # unit-variance Gaussian, (R, B)


VECTOR = Kind(
    name="vector",
    encoder=lambda spec, m, latent, dtype, rngs: VectorEncoder(spec.options(m)["size"], latent, rngs=rngs),
    decoder=lambda spec, m, latent, dtype, rngs: MLP([latent, 32, spec.options(m)["size"]], rngs=rngs),
    encode=lambda enc, batch, m: (enc(batch[f"{m}/x"], batch[f"{m}/mask"]), batch[f"{m}/mask"].astype(jnp.float32),
                                  jnp.zeros((), jnp.int32)),
    log_likelihood=_log_likelihood,
    batch_keys=lambda spec, m: {f"{m}/x": ((spec.options(m)["size"],), "float32"), f"{m}/mask": ((), "float32")},
    size=lambda spec, m: spec.options(m)["size"],
    case_arrays=_case_arrays)


@pytest.fixture(scope="module")
def vector_kind():
    register(VECTOR)                                      # the one registry line
    yield VECTOR
    KINDS.pop("vector", None)


# ----------------------------------------------------------------- a cohort with the new modality
def _manifest(folder: Path, n: int = 48, size: int = 6, seed: int = 0) -> tuple[Path, dict]:
    """JSONL manifest: a 'class' label, an uninformative 'age' and a 'labs' vector (class one-hot × 2 + noise;
    1 in 8 cases lacks it)."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    rows, vecs = [], {}
    for i in range(n):
        c = i % 3
        v = np.zeros(size, np.float32)
        v[c] = 2.0
        v += rng.normal(0, 0.3, size).astype(np.float32)
        meta = {"age": float(rng.integers(20, 80))}
        if i % 8 != 7:
            meta["labs"] = [float(x) for x in v]
        if "labs" in meta:
            vecs[f"case{i:03d}"] = meta["labs"]
        rows.append({"case_id": f"case{i:03d}", "labels": {"class": classes[c]}, "meta": meta})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, vecs


def _config(manifest: Path, steps: int = 80):
    return load_config(TINY, ["--config.data.image_modalities=[]", "--config.data.report=false",
                              "--config.data.clinical.numeric=['age']", "--config.data.clinical.categorical={}",
                              f"--config.data.manifest={manifest}", f"--config.train.steps={steps}",
                              "--config.data.other_modalities={'labs': {'kind': 'vector', 'size': 6}}",
                              "--config.optim.lr=3e-3", "--config.train.log_every=20"])


def test_toy_kind_trains_embeds_and_queries(vector_kind, tmp_path):
    manifest, vecs = _manifest(tmp_path / "data")
    summary = train_and_evaluate(_config(manifest), tmp_path / "run", show_progress=False)
    assert summary["step"] == 80 and np.isfinite(summary["metrics"]["loss"])

    config, spec, model, _ = load_trained(tmp_path / "run")           # rebuilt from the run files
    assert spec.modalities == ("clinical", "labs") and spec.extra == (("labs", "vector", (("size", 6),)),)
    assert {"labs/x", "labs/mask"} <= set(spec.batch_keys())
    cohort, _, _ = load_cohort(config, tmp_path / "run", str(manifest), show_progress=False)
    assert cohort.arrays["labs/x"].shape == (48, 6)
    assert cohort.present_modalities(7) == ["clinical"] and cohort.present_modalities(0) == ["clinical", "labs"]

    emb = embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec)}, show_progress=False)
    assert emb.modalities == ["clinical", "labs"] and emb.present[:, 1].sum() == 42
    labels = [lab["class"] for lab in emb.labels]
    has = np.nonzero(emb.present[:, 1] > 0)[0]
    row = evaluate(emb, "class", 5, subsets=[np.array([0, 1], np.float32)], n_boot=0)[0]
    assert row["query"] == "labs"
    chance = chance_map(labels, has, 5)
    assert row["num_queries"] == 42 and row["map@5"] > chance + 0.3, (row["map@5"], chance)

    meta = [{"modalities": [m for m, p in zip(emb.modalities, r) if p > 0], "labels": lab}
            for r, lab in zip(emb.present, emb.labels)]
    index_dir = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind="flat", metric="cosine",
                            identity=dict(emb.identity)).save(tmp_path / "index")
    r = Retriever.load(tmp_path / "run", index_dir)
    hits = 0
    for cid in ("case000", "case001", "case002", "case004", "case005"):
        res = r.search(k=3, other={"labs": vecs[cid]}, exclude=[cid])
        hits += sum(x.labels.get("class") == cohort.labels[int(cid[4:])]["class"] for x in res)
    assert hits >= 9, hits                  # of 15 results; chance 5 (standardised embeddings: 10 measured)
    mu, _, used = r.encode(other={"labs": vecs["case000"]})
    assert used == ["labs"] and mu.shape == (spec.embedding_dim,)
    with pytest.raises(InputError, match="expected 6 finite numbers"):
        r.encode(other={"labs": [1.0, 2.0]})
    # the command line: --other NAME=JSON
    out = io.StringIO()
    query_main(["--workdir", str(tmp_path / "run"), "--index", str(index_dir), "--k", "3", "--json",
                "--other", f"labs={json.dumps(vecs['case001'])}"], out=out)
    got = json.loads(out.getvalue())
    assert got["query"]["modalities"] == ["labs"] and got["query"]["other"] == {"labs": vecs["case001"]}
    assert sum(x["labels"]["class"] == "b" for x in got["results"]) >= 2          # case001 is class b
    with pytest.raises(InputError, match="unknown modality 'glucose'"):
        r.encode(other={"glucose": 5.0})


def test_registry_refuses_unknown_kind_and_name_clash(vector_kind):
    from mmvae.models.mvae import ModelSpec
    spec = ModelSpec(image_modalities=(), shape=(), latent_dim=4, report=False, extra=(("x", "nope", ()),))
    with pytest.raises(ConfigError, match="unknown modality kind"):
        kinds_of(spec)
    clash = ModelSpec(image_modalities=("labs",), shape=(8, 8), latent_dim=4, report=False,
                      extra=(("labs", "vector", (("size", 3),)),))
    with pytest.raises(ConfigError, match="duplicate modality names"):
        clash.validate()
    with pytest.raises(ConfigError, match="already registered"):
        register(Kind(name="image", encoder=None, decoder=None, encode=None, log_likelihood=None,
                      batch_keys=None, size=None))


def test_built_in_kinds_in_expert_order():
    from mmvae.models.mvae import ModelSpec
    spec = ModelSpec(image_modalities=("t1", "t2"), shape=(8, 8), latent_dim=4, report=False,
                     clinical_numeric=("age",), label_classes=("a", "b"))
    kinds = kinds_of(spec)
    assert list(kinds) == ["t1", "t2", "clinical", "label"]
    assert [k.name for k in kinds.values()] == ["image", "image", "clinical", "label"]
    assert spec.query_modalities == ("t1", "t2", "clinical")
    assert spec.dims() == {"t1": 64, "t2": 64, "clinical": 1, "label": 1}
    assert jax.tree.leaves(spec.batch_keys()) is not None and "label/id" in spec.batch_keys()
