"""Building blocks whose gradients are fast on XLA (CPU, GPU, TPU).

Strided and transposed convolutions have very slow gradients on XLA CPU (measured on
2 cores, jax 0.10: a 3×3×3 stride-2 conv gradient takes 2.45 s where the same
down-sampling written as space-to-depth + matmul takes 0.05 s). So every resampling
here is a pure reshape (space-to-depth / depth-to-space) followed or preceded by a
dense layer over channels, and every convolution is stride 1.

Arrays are channels-last: ``(B, *spatial, C)`` with 2 or 3 spatial axes.

3×3×3 stride-1 convolutions can run as three 2-D convolutions over depth slices
(:func:`conv3d_depth2d`, ``model.image.conv``): same numbers within float rounding, and on
XLA CPU faster than its 3-D convolution because its 2-D kernels are better optimised
(docs/benchmarks.md has the measurements).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

CONV_IMPLS = ("auto", "xla", "depth2d")
# "auto" takes depth2d for 3-D convolutions of at least this many forward FLOPs (on CPU).
# Measured (bench_conv.py, 2 cores): depth2d is 1.2-2.5x faster at run time from 16³ × 8
# channels × batch 16 (0.23 GFLOP) up to the bench shapes; below ~0.05 GFLOP the conv takes
# under a millisecond either way and XLA's single op compiles faster (tiny test models).
AUTO_MIN_FLOPS = 50_000_000
_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def _depth_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (B, D, H, W, Ci)``, ``w (3, 3, 3, Ci, Co)`` → ``(B, D, H, W, Co)``, zero padding 1:
    ``y[:, d] = Σ_a conv2d(x[:, d + a - 1], w[a])``, each 2-D convolution over the ``B·D`` slices."""
    b, d, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    # below f32 (bf16 compute) each slice's product is kept in f32 and summed there, rounded once
    acc = None if x.dtype == jnp.float32 else jnp.float32
    out = None
    for a in range(3):
        y = lax.conv_general_dilated(xp[:, a:a + d].reshape(b * d, h, wd, c), w[a], (1, 1), "SAME",
                                     dimension_numbers=_DN2, preferred_element_type=acc)
        out = y if out is None else out + y
    return out.reshape(b, d, h, wd, -1).astype(x.dtype)


@jax.custom_vjp
def conv3d_depth2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """3×3×3 stride-1 'SAME' convolution, channels-last: ``x (B, D, H, W, Ci)``,
    ``w (3, 3, 3, Ci, Co)`` (DHWIO) → ``(B, D, H, W, Co)``; equal to
    ``lax.conv_general_dilated(x, w, (1, 1, 1), "SAME")`` up to float summation order.

    Forward and input gradient (a convolution of the output gradient with the flipped,
    transposed kernel) are each three 2-D convolutions over depth slices; the kernel
    gradient is XLA's own 3-D one (its 2-D kernel gradients are slower on CPU).
    """
    return _depth_sum(x, w)


def _conv3d_fwd(x, w):
    return _depth_sum(x, w), (x, w)


def _conv3d_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _depth_sum(g, jnp.swapaxes(w[::-1, ::-1, ::-1], 3, 4))
    _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=_DN3), w)
    return dx, vjp(g)[0].astype(w.dtype)


conv3d_depth2d.defvjp(_conv3d_fwd, _conv3d_bwd)


def _depth2d_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, precision, preferred_element_type) -> bool:
    if lhs.ndim != 5 or tuple(rhs.shape[:3]) != (3, 3, 3) or feature_group_count != 1:
        return False
    if precision is not None or preferred_element_type is not None:
        return False
    def unit(v):
        return v is None or tuple(np.broadcast_to(np.asarray(v), (3,)).tolist()) == (1, 1, 1)

    if not (unit(window_strides) and unit(lhs_dilation) and unit(rhs_dilation)):
        return False
    if not (padding == "SAME" or [tuple(p) for p in padding] == [(1, 1)] * 3):
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN3)
    got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return want == got


def conv_general_dilated(impl: str, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (what ``nnx.Conv`` calls) choosing the
    implementation: ``impl`` ``"xla"`` always XLA's convolution; ``"depth2d"``
    :func:`conv3d_depth2d` where it applies (3-D, 3³ kernel, stride 1, SAME, NDHWC/DHWIO,
    no groups/dilation), XLA's otherwise; ``"auto"``: ``depth2d`` on the CPU backend (faster
    there, measured) for convolutions of at least :data:`AUTO_MIN_FLOPS` forward FLOPs, ``xla``
    for smaller ones and on GPU/TPU (cuDNN / TPU convolutions stay untouched)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv implementation {impl!r}; choose one of {CONV_IMPLS}")
    if impl == "auto":
        # depth2d on CPU, for convolutions big enough that run time, not its extra compile
        # time (~10 % more per model), matters: ≥ AUTO_MIN_FLOPS per forward call
        flops = 2 * math.prod(lhs.shape[:-1]) * math.prod(rhs.shape)     # 2·B·DHW · 27·Ci·Co
        impl = "depth2d" if jax.default_backend() == "cpu" and flops >= AUTO_MIN_FLOPS else "xla"
    plain = all(v is None or (k == "batch_group_count" and v == 1) for k, v in kwargs.items())
    if impl == "depth2d" and plain and _depth2d_applies(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision, preferred_element_type):
        return conv3d_depth2d(lhs, rhs)
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
    """``(B, *S, C)`` → ``(B, *(S/f), f^d C)``: each f×…×f block becomes channels."""
    b, *spatial, c = x.shape
    d = len(spatial)
    shape = [b]
    for s in spatial:
        if s % factor:
            raise ValueError(f"spatial size {s} is not divisible by {factor}")
        shape += [s // factor, factor]
    x = x.reshape(shape + [c])
    # axes: 0, (1,2), (3,4), ... → 0, 1, 3, ..., 2, 4, ..., c
    outer = [1 + 2 * i for i in range(d)]
    inner = [2 + 2 * i for i in range(d)]
    x = x.transpose([0] + outer + inner + [1 + 2 * d])
    return x.reshape([b] + [s // factor for s in spatial] + [factor ** d * c])


def depth_to_space(x: jax.Array, factor: int) -> jax.Array:
    """Inverse of :func:`space_to_depth`: ``(B, *S, f^d C)`` → ``(B, *(f S), C)``."""
    b, *spatial, cf = x.shape
    d = len(spatial)
    c = cf // factor ** d
    x = x.reshape([b] + spatial + [factor] * d + [c])
    order = [0]
    for i in range(d):
        order += [1 + i, 1 + d + i]
    x = x.transpose(order + [1 + 2 * d])
    return x.reshape([b] + [s * factor for s in spatial] + [c])


def dense(x: jax.Array, layer: nnx.Linear) -> jax.Array:
    """``layer(x)``, ``x (..., Cin)`` → ``(..., Cout)``, same values and gradients, with the
    kernel gradient computed as ``(gᵀ x)ᵀ`` (see :func:`_dense_bwd`): 3.2× faster backward of
    the bench config's decoder on XLA CPU (5.5 → 2.3 s for its 45 decodes per case)."""
    if (layer.precision is not None or layer.preferred_element_type is not None
            or layer.dot_general is not lax.dot_general or layer.bias is None):
        return layer(x)
    x, w, b = layer.promote_dtype((x, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
    return _dense_vjp(x, w, b)


@jax.custom_vjp
def _dense_vjp(x, w, b):
    return x @ w + b


def _dense_fwd(x, w, b):
    return x @ w + b, (x, w)


def _dense_bwd(res, g):
    """The kernel gradient as ``(gᵀ x)ᵀ``: the output gradient is the dot's transposed
    operand, so XLA CPU transposes the (cheap, already materialised) input instead of
    fusing the output gradient's producer into a transposed copy with scattered reads
    (measured: ~100 ms per 16 MB tensor, most of the bench decoder's backward)."""
    x, w = res
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    dw = jnp.einsum("nm,nk->mk", g2, x2).T
    return (g @ w.T).astype(x.dtype), dw.astype(w.dtype), jnp.sum(g2, 0).astype(w.dtype)


_dense_vjp.defvjp(_dense_fwd, _dense_bwd)



# one callable per implementation, shared by every nnx.Conv (part of the graph definition:
# models built from the same spec compare equal and share jit caches)
_CONV_FNS = {impl: functools.partial(conv_general_dilated, impl) for impl in CONV_IMPLS}


class ConvResBlock(nnx.Module):
    """Pre-activation residual block: (GroupNorm → SiLU → 3^d conv, stride 1) × 2 + skip."""

    def __init__(self, channels: int, spatial_dims: int, *, groups: int = 8, dtype=jnp.float32,
                 conv: str = "auto", rngs: nnx.Rngs):
        g = max(1, min(groups, channels))
        while channels % g:
            g -= 1
        k = (3,) * spatial_dims
        if conv not in CONV_IMPLS:
            raise ValueError(f"unknown conv implementation {conv!r}; choose one of {CONV_IMPLS}")
        fn = _CONV_FNS[conv]
        self.norm1 = nnx.GroupNorm(channels, num_groups=g, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, k, padding="SAME", dtype=dtype, rngs=rngs, conv_general_dilated=fn)
        self.norm2 = nnx.GroupNorm(channels, num_groups=g, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, k, padding="SAME", dtype=dtype, rngs=rngs,
                              kernel_init=nnx.initializers.zeros, conv_general_dilated=fn)

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return x + h.astype(x.dtype)


class Downsample(nnx.Module):
    """Space-to-depth by f then a dense channel projection: ``(B,*S,Ci)`` → ``(B,*S/f,Co)``.

    With ``factor`` > 2 this is a patch stem (each f^d patch → one ``Co`` vector).
    """

    def __init__(self, cin: int, cout: int, spatial_dims: int, *, factor: int = 2, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.factor = factor
        self.proj = nnx.Linear(cin * factor ** spatial_dims, cout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(space_to_depth(x, self.factor))


class Upsample(nnx.Module):
    """Dense channel projection then depth-to-space by f: ``(B,*S,Ci)`` → ``(B,*fS,Co)``."""

    def __init__(self, cin: int, cout: int, spatial_dims: int, *, factor: int = 2, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.spatial_dims = spatial_dims
        self.factor = factor
        self.proj = nnx.Linear(cin, cout * factor ** spatial_dims, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return depth_to_space(self.proj(x), self.factor)


class MLP(nnx.Module):
    """Dense → SiLU → … → Dense."""

    def __init__(self, sizes: list[int], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.silu(x)
        return x
