"""3×3×3 stride-1 'SAME' convolution, forward + backward, at the shapes of configs/bench.py's
image encoders (batch 16, channels-last: 16³ × 64, 8³ × 128, 4³ × 256 channels).

Implementations (all give the same numbers within float rounding, except ``im2col_bf16``):

* ``xla``: ``lax.conv_general_dilated`` (``model.image.conv=xla``);
* ``depth2d``: :func:`mmvae.models.layers.conv3d_depth2d`, three 2-D convolutions over
  depth slices (``model.image.conv=depth2d``, the CPU default);
* ``im2col``: the 27 shifted copies concatenated into ``(…, 27·C)`` patches and one matmul,
  gradients by autodiff;
* ``im2col_bf16``: the same with bf16 patches and kernel and f32 accumulation
  (``preferred_element_type``), which XLA CPU runs on AMX where the CPU has it; gradients
  by autodiff (bf16 rounding: ~5e-3 relative).

For each: median seconds (``--repeats``) of the forward alone, of the input gradient, of
the kernel gradient and of forward + both gradients, and the FLOP/s of the last
(3 × 2 · B · D³ · 27 · Ci · Co FLOPs). Also prints the f32 and bf16→f32 2048² matmul rates
of this process.

    python experiments/benchmarks/bench_conv.py --out experiments/benchmarks/results/conv.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from common import machine, median_seconds, peak_matmul_flops, write_json
from mmvae.models.layers import conv3d_depth2d

DN = ("NDHWC", "DHWIO", "NDHWC")


def xla(x, w):
    return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN)


def _im2col(x, w, dtype, **dot_kw):
    d = x.shape[1]
    xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    p = jnp.concatenate([xp[:, a:a + d, b:b + d, c:c + d] for a in range(3) for b in range(3) for c in range(3)], -1)
    return jnp.einsum("bxyzk,ko->bxyzo", p, w.astype(dtype).reshape(-1, w.shape[-1]), **dot_kw)


IMPLS = {
    "xla": xla,
    "depth2d": conv3d_depth2d,
    "im2col": lambda x, w: _im2col(x, w, jnp.float32),
    "im2col_bf16": lambda x, w: _im2col(x, w, jnp.bfloat16, preferred_element_type=jnp.float32),
}


def bf16_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / median_seconds(f, a, repeats=repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shapes", default="16x64,8x128,4x256", help="comma-separated SIDExCHANNELS")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args(argv)
    result = {"machine": machine(), "batch": a.batch, "matmul_f32_gflops": peak_matmul_flops() / 1e9,
              "matmul_bf16_f32acc_gflops": bf16_matmul_flops() / 1e9, "rows": []}
    print(f"matmul 2048²: f32 {result['matmul_f32_gflops']:.0f} GFLOP/s, bf16→f32 "
          f"{result['matmul_bf16_f32acc_gflops']:.0f} GFLOP/s")
    print(f"{'shape':>10s} {'impl':>12s} {'fwd ms':>8s} {'dx ms':>8s} {'dw ms':>8s} {'all ms':>8s} {'GFLOP/s':>8s} {'max rel err':>11s}")
    for spec in a.shapes.split(","):
        side, ch = (int(v) for v in spec.split("x"))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((a.batch, side, side, side, ch)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, ch, ch)) * 0.05, jnp.float32)
        g = jnp.asarray(rng.standard_normal((a.batch, side, side, side, ch)), jnp.float32)
        flops = 3 * 2 * a.batch * side ** 3 * 27 * ch * ch
        ref = None
        for name in a.impls.split(","):
            f = IMPLS[name]
            fwd = jax.jit(f)
            dx = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
            dw = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
            both = jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g) + (f(x, w),))
            out = both(x, w, g)
            if ref is None:
                ref = out
            err = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r))) for o, r in zip(out, ref))
            t = {k: median_seconds(fn, *args, repeats=a.repeats) for k, fn, args in
                 (("fwd", fwd, (x, w)), ("dx", dx, (x, w, g)), ("dw", dw, (x, w, g)), ("all", both, (x, w, g)))}
            row = {"shape": spec, "impl": name, **{f"{k}_s": v for k, v in t.items()},
                   "gflops_per_s": flops / t["all"] / 1e9, "max_rel_err_vs_first": err}
            result["rows"].append(row)
            print(f"{spec:>10s} {name:>12s} {1e3 * t['fwd']:8.1f} {1e3 * t['dx']:8.1f} {1e3 * t['dw']:8.1f} "
                  f"{1e3 * t['all']:8.1f} {row['gflops_per_s']:8.1f} {err:11.1e}", flush=True)
    write_json(a.out, result)


if __name__ == "__main__":
    main()
