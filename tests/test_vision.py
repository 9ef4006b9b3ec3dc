"""Tests of mmvae.models.vision: EfficientNet-Lite0 port, safe .pth reader, weights cache."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmvae.errors import CheckpointError, ConfigError, InputError
from mmvae.models import vision, vision_reference
from mmvae.models.vision import (
    EFFICIENTNET_LITE0_SHA256,
    EXTRA_HINT,
    FEATURE_DIM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    efficientnet_lite0_available,
    find_efficientnet_lite0_weights,
    load_efficientnet_lite0,
    read_torch_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "efficientnet_lite0_reference.json"
PTH = find_efficientnet_lite0_weights()
needs_weights = pytest.mark.skipif(
    PTH is None, reason=f"{vision.WEIGHTS_PACKAGE} is not installed ({EXTRA_HINT})")


@nnx.jit
def _forward(model, x):
    return model(x), model.features(x)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-cache")


@pytest.fixture(scope="module")
def model(cache_dir):
    if PTH is None:
        pytest.skip(f"{vision.WEIGHTS_PACKAGE} is not installed ({EXTRA_HINT})")
    return load_efficientnet_lite0(cache_dir=cache_dir)


# ---------------------------------------------------------------- (a) reference features
@needs_weights
def test_matches_pytorch_reference(model):
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert tuple(vision_reference.MEAN) == IMAGENET_MEAN and tuple(vision_reference.STD) == IMAGENET_STD
    assert [(r["seed"], r["height"], r["width"]) for r in ref["inputs"]] == list(vision_reference.INPUTS)
    assert ref["normalisation"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    worst = 0.0
    # Full f32 convolutions also where the platform default is lower (TF32 on GPUs).
    with jax.default_matmul_precision("float32"):
        for r in ref["inputs"]:
            x = vision_reference.reference_input(r["seed"], r["height"], r["width"])
            x64 = x.astype(np.float64)
            np.testing.assert_allclose(x64.sum(), r["input_sum"], rtol=1e-7, atol=1e-6)
            np.testing.assert_allclose(np.square(x64).sum(), r["input_sum_sq"], rtol=1e-7)
            fmap, feats = _forward(model, jnp.asarray(x[None]))
            fmap, feats = np.asarray(fmap)[0], np.asarray(feats)[0]
            # the inference path the feature extractor runs (BatchNorm folded into the convs)
            folded = np.asarray(vision.compiled_features(model)(jnp.asarray(x[None])))[0]
            np.testing.assert_allclose(folded, feats, atol=2e-5)
            assert list(fmap.shape) == r["feature_map_shape"]
            want = np.asarray(r["features"])
            err = float(np.max(np.abs(feats - want)))
            worst = max(worst, err / float(np.max(np.abs(want))))
            # Features lie in [0, 6] (ReLU6); achieved ~7e-6 (f32 rounding, 7-digit JSON).
            assert err <= 1e-4, (r["seed"], err)
            np.testing.assert_allclose(np.linalg.norm(feats), r["feature_norm"], rtol=1e-5)
            np.testing.assert_allclose(fmap[..., :ref["feature_map_channels"]],
                                       np.asarray(r["feature_map_channels"]), atol=1e-4)
    assert worst <= 1e-5


# ---------------------------------------------------------------- (b) safe unpickler
def _g(module: str, name: str) -> bytes:                 # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:                              # BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:                                 # BININT
    return b"J" + struct.pack("<i", n)


def _t(*items: bytes) -> bytes:                          # MARK ... TUPLE
    return b"(" + b"".join(items) + b"t"


def _tensor(stype: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    pid = _t(_s("storage"), _g("torch", stype), _s(key), _s("cpu"), _i(numel)) + b"Q"
    hooks = _g("collections", "OrderedDict") + b")R"
    args = _t(pid, _i(offset), _t(*map(_i, size)), _t(*map(_i, stride)), b"\x89", hooks)
    return _g("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_s(k) + v for k, v in entries.items())
    return b"\x80\x02" + _g("collections", "OrderedDict") + b")R(" + body + b"u."


def _write_zip_pth(path: Path, pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def test_zip_format_state_dict(tmp_path):
    """A hand-built torch zip checkpoint: strided view with offset, shared storage,
    float16, 0-d int64 (num_batches_tracked)."""
    f32 = np.arange(12, dtype="<f4")
    pkl = _state_pickle({
        "w": _tensor("FloatStorage", "0", 12, 2, (2, 3), (1, 2)),
        "w2": _tensor("FloatStorage", "0", 12, 0, (3,), (4,)),
        "h": _tensor("HalfStorage", "1", 3, 0, (3,), (1,)),
        "bn.num_batches_tracked": _tensor("LongStorage", "2", 1, 0, (), ()),
    })
    path = _write_zip_pth(tmp_path / "ok.pth", pkl, {
        "0": f32.tobytes(), "1": np.array([1.5, -2, 3], "<f2").tobytes(),
        "2": np.array([7], "<i8").tobytes()})
    sd = read_torch_state_dict(path)
    assert list(sd) == ["w", "w2", "h", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(sd["w"], [[2, 4, 6], [3, 5, 7]])
    assert sd["w"].flags["C_CONTIGUOUS"] and sd["w"].flags["WRITEABLE"]
    np.testing.assert_array_equal(sd["w2"], [0, 4, 8])
    assert sd["h"].dtype == np.float16 and sd["h"].tolist() == [1.5, -2, 3]
    assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 7
    # A view running past its storage is refused, not read out of bounds.
    bad = _state_pickle({"w": _tensor("FloatStorage", "0", 12, 10, (2, 3), (1, 2))})
    with pytest.raises(CheckpointError, match="malformed layout"):
        read_torch_state_dict(_write_zip_pth(tmp_path / "oob.pth", bad, {"0": f32.tobytes()}))


@pytest.mark.parametrize("payload", [
    # protocol 0 GLOBAL os.system + REDUCE
    lambda cmd: b"cos\nsystem\n(" + _s(cmd) + b"tR.",
    # protocol 4 STACK_GLOBAL builtins.eval
    lambda cmd: (b"\x80\x04" + _s("builtins") + _s("eval") + b"\x93("
                 + _s(f"__import__('os').system({cmd!r})") + b"tR."),
    # an allowed module with a name outside the allow-list
    lambda cmd: b"\x80\x02" + _g("torch._utils", "_import_dotted_name") + b"(" + _s(cmd) + b"tR.",
    # os.system hidden inside an otherwise valid state dict
    lambda cmd: _state_pickle({"x": b"cos\nsystem\n(" + _s(cmd) + b"tR"}),
], ids=["os.system", "builtins.eval", "torch-not-allowed", "nested"])
def test_safe_unpickler_refuses_globals(tmp_path, payload):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    zpath = _write_zip_pth(tmp_path / "evil.pth", payload(cmd), {})
    with pytest.raises(CheckpointError, match="refused.*global") as e:
        read_torch_state_dict(zpath)
    assert "system" in str(e.value) or "eval" in str(e.value) or "_import" in str(e.value)
    # The same payload in the legacy (non-zip) layout.
    legacy = tmp_path / "evil-legacy.pth"
    legacy.write_bytes(pickle.dumps(vision._MAGIC, 2) + pickle.dumps(1001, 2)
                       + pickle.dumps({"little_endian": True}, 2) + payload(cmd))
    with pytest.raises(CheckpointError, match="refused"):
        read_torch_state_dict(legacy)
    assert not marker.exists()


def test_reader_rejects_non_checkpoints(tmp_path):
    p = tmp_path / "x.pth"
    p.write_bytes(pickle.dumps([1, 2, 3], 2))
    with pytest.raises(CheckpointError, match="magic"):
        read_torch_state_dict(p)
    p.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        read_torch_state_dict(p)
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_torch_state_dict(_write_zip_pth(tmp_path / "d.pth",
                                             b"\x80\x02}" + _s("a") + _i(1) + b"s.", {}))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_torch_state_dict(tmp_path / "missing.pth")


# ---------------------------------------------------------------- (c) tampered weights
@needs_weights
def test_tampered_weights_refused_by_checksum(tmp_path, monkeypatch):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(PTH.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(vision, "read_torch_state_dict",
                        lambda p: pytest.fail("a refused file was unpickled"))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="refused: checksum mismatch") as e:
        load_efficientnet_lite0(cache_dir=cache, weights_path=bad)
    assert str(bad) in str(e.value)
    assert not cache.exists() or not any(cache.iterdir())


# ---------------------------------------------------------------- (d) safetensors cache
@needs_weights
def test_cache_written_once_and_reused(model, cache_dir, tmp_path, monkeypatch):
    st, side = vision._cache_paths(cache_dir)
    assert st.is_file() and side.is_file()
    assert EFFICIENTNET_LITE0_SHA256[:16] in st.name
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([st.name, side.name])
    mtime = st.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the .pth was read although the cache is valid")

    with monkeypatch.context() as mp:  # cached: neither the .pth nor the package is needed
        mp.setattr(vision, "read_torch_state_dict", boom)
        mp.setattr(vision, "find_efficientnet_lite0_weights", lambda: None)
        again = load_efficientnet_lite0(cache_dir=cache_dir)
        assert efficientnet_lite0_available(cache_dir)
    assert st.stat().st_mtime_ns == mtime
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A corrupt cache is rebuilt (with a warning) from the verified .pth.
    other = tmp_path / "cache2"
    shutil.copytree(cache_dir, other)
    st2, side2 = vision._cache_paths(other)
    data = bytearray(st2.read_bytes())
    data[-100] ^= 0xFF
    st2.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="rebuilt: checksum mismatch"):
        load_efficientnet_lite0(cache_dir=other)
    assert st2.read_bytes() == st.read_bytes() and side2.read_text() == side.read_text()


def test_missing_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "find_efficientnet_lite0_weights", lambda: None)
    assert not efficientnet_lite0_available(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_efficientnet_lite0(cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and EXTRA_HINT in msg and "mmvae[pretrained]" in msg
    monkeypatch.setenv("MMVAE_WEIGHTS_CACHE", str(tmp_path / "env"))
    assert vision._cache_paths(None)[0].parent == tmp_path / "env"


@needs_weights
def test_loader_checks_every_tensor():
    sd = read_torch_state_dict(PTH)
    assert len(sd) == 296 and sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    for change, pattern in [
        (lambda d: d.pop("_blocks.3._bn1.running_var"), "missing tensor '_blocks.3._bn1"),
        (lambda d: d.__setitem__("_conv_head.weight", np.zeros((1280, 320, 1, 2), "f4")),
         "'_conv_head.weight' has shape \\(1280, 320, 1, 2\\), expected \\(1280, 320, 1, 1\\)"),
        (lambda d: d.__setitem__("_blocks.16._bn0.weight", np.zeros(3, "f4")),
         "unexpected tensor.*_blocks.16"),
        (lambda d: d.__setitem__("_bn0.weight", np.zeros(32, "i8")), "dtype int64"),
    ]:
        d = dict(sd)
        change(d)
        with pytest.raises(CheckpointError, match=pattern):
            vision._load_into(d, "x.safetensors", dtype=jnp.float32, padding="static")


# ---------------------------------------------------------------- (e) shapes, (f) jit vs eager
@needs_weights
def test_shapes_non_square_and_padding_modes(model):
    out = jax.eval_shape(lambda x: (model(x), model.features(x)),
                         jax.ShapeDtypeStruct((2, 160, 192, 3), jnp.float32))
    assert out[0].shape == (2, 5, 6, FEATURE_DIM) and out[0].dtype == jnp.float32
    assert out[1].shape == (2, FEATURE_DIM) and out[1].dtype == jnp.float32
    # Not a multiple of 32: the PyTorch port's static paddings floor, TF "SAME" ceils.
    x = jax.ShapeDtypeStruct((1, 200, 168, 3), jnp.float32)
    assert jax.eval_shape(model, x).shape == (1, 6, 5, FEATURE_DIM)
    same = jax.eval_shape(lambda x: vision.EfficientNetLite(padding="same")(x), x)
    assert same.shape == (1, 7, 6, FEATURE_DIM)
    with pytest.raises(InputError, match="N, H, W, 3"):
        model(jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(InputError, match=">= 32"):
        model(jnp.zeros((1, 16, 64, 3)))
    with pytest.raises(ConfigError, match="padding"):
        vision.EfficientNetLite(padding="valid")


@needs_weights
def test_jit_and_eager_agree(model, cache_dir):
    rng = np.random.default_rng(0)
    x = jnp.asarray(vision.normalize_images(rng.random((2, 64, 96, 3))))
    # Eager with XLA grouped convs (one op per conv: the shifted-slice form is ~900 small
    # ops, slow to dispatch eagerly); jitted with the default (on CPU: shifted slices).
    as_conv = load_efficientnet_lite0(cache_dir=cache_dir, depthwise="conv")
    eager = np.asarray(as_conv.features(x))
    fmap, jitted = _forward(model, x)
    assert fmap.shape == (2, 2, 3, FEATURE_DIM)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
    np.testing.assert_allclose(np.asarray(f(state, x)), eager, atol=1e-5)
    if jax.default_backend() != "cpu":  # "auto" used grouped convs: check the other form
        shifted = load_efficientnet_lite0(cache_dir=cache_dir, depthwise="shifted")
        np.testing.assert_allclose(np.asarray(_forward(shifted, x)[1]), eager, atol=1e-5)
    assert np.all(eager >= 0) and np.all(eager <= 6)
    with pytest.raises(ConfigError, match="depthwise"):
        load_efficientnet_lite0(cache_dir=cache_dir, depthwise="fast")


@needs_weights
def test_folded_inference_path(model, cache_dir):
    """fold_batchnorm + folded_forward (the extractor's default) equal the module's features
    on batches of several sizes, with "same" paddings too; bf16 compute stays close; an
    unknown path is refused."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(vision.normalize_images(rng.random((3, 96, 64, 3))))
    ref = np.asarray(_forward(model, x)[1])
    got = np.asarray(vision.compiled_features(model)(x))
    np.testing.assert_allclose(got, ref, atol=2e-5)
    plan, params = vision.fold_batchnorm(model)
    assert len(plan) == len(params) == 2 + sum(3 if e != 1 else 2 for _, _, e, _, _, r in vision._LITE0_STAGES
                                               for _ in range(r))
    # the folded bias carries BatchNorm's shift: with zero input the stem's output is ReLU6(b)
    stem = vision.folded_forward(plan[:1], params[:1], jnp.zeros((1, 32, 32, 3)))
    np.testing.assert_allclose(np.asarray(stem)[0], np.clip(params[0]["b"], 0, 6), atol=1e-6)
    same = load_efficientnet_lite0(cache_dir=cache_dir, padding="same")
    odd = jnp.asarray(vision.normalize_images(rng.random((2, 70, 50, 3))))   # "same" ≠ "static" here
    np.testing.assert_allclose(np.asarray(vision.compiled_features(same)(odd)),
                               np.asarray(_forward(same, odd)[1]), atol=2e-5)
    bf16 = np.asarray(vision.compiled_features(model, dtype=jnp.bfloat16)(x))
    cos = np.sum(bf16 * ref, 1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(cos > 0.99), cos          # bf16 rounding: close in direction, not to 1e-5
    with pytest.raises(ConfigError, match="feature path"):
        vision.compiled_features(model, path="fast")


@pytest.mark.parametrize("padding", ["static", "same"])
def test_batchnorm_fold_with_random_statistics(padding):
    """The fold (W·s, β − μ·s, s = γ/√(σ² + ε)) with random BatchNorm statistics in every layer
    (depthwise kernels included), on an input whose size is not a multiple of 32: the folded
    path equals the module. Needs no weights file."""
    net = vision.EfficientNetLite(padding=padding, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(5)
    n = 0
    for _, bn in nnx.iter_graph(net):
        if isinstance(bn, nnx.BatchNorm):
            c = bn.scale.shape[0]
            bn.mean.set_value(jnp.asarray(rng.normal(0, 0.5, c), jnp.float32))
            bn.var.set_value(jnp.asarray(rng.uniform(0.2, 2.0, c), jnp.float32))
            bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32))
            bn.bias.set_value(jnp.asarray(rng.normal(0, 0.3, c), jnp.float32))
            n += 1
    assert n == len(vision.fold_batchnorm(net)[0])
    x = jnp.asarray(vision.normalize_images(rng.random((2, 70, 50, 3))))
    ref = np.asarray(_forward(net, x)[1])
    got = np.asarray(vision.compiled_features(net)(x))
    assert np.max(np.abs(ref)) > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.max(np.abs(ref)))))
