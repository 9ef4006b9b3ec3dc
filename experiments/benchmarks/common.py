"""Shared helpers of the benchmark scripts: machine description, peak matmul, memory."""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


from mmvae.experiments.report import machine  # noqa: E402,F401  (one definition, re-exported)


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time of ``fn(*args)`` (results blocked on) over ``repeats`` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a large float32 matmul (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    return 2 * n ** 3 / median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: str | None, result: dict) -> None:
    print(json.dumps(result, indent=2))
    if path:
        from mmvae.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(result, indent=2))


# --------------------------------------------------------------------------- pipeline / query helpers
def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other jobs on a shared machine show up here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def stats(values, scale: float = 1.0) -> dict:
    """p50 / p90 / mean / min / max of ``values`` times ``scale`` (e.g. 1e3 for ms), and n."""
    v = np.asarray(values, dtype=np.float64) * scale
    if v.size == 0:
        return {"n": 0}
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "mean": float(v.mean()),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def evict_page_cache(paths) -> int:
    """Ask the kernel to drop the page-cache pages of ``paths`` (``posix_fadvise(DONTNEED)``,
    no root needed; clean pages only, so each file is fsynced first). Returns the bytes
    advised. Best effort: pages mapped by a live memory map may stay resident."""
    total = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += size
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)
    return total


def preprocess_stage_times(path: str, cfg, spatial_dims: int = 3) -> dict:
    """Seconds of each step one source file goes through on its way into the cache
    (:func:`mmvae.data.dataset.load_case_images` → ``_load_and_preprocess`` →
    :func:`mmvae.data.preprocess.preprocess_series`), timed one by one: ``hash`` (cache
    key), ``load`` (read + decode + float32), ``reorient``, ``resample``, ``mask``
    (Otsu + largest component + hole filling), ``crop_normalize`` and ``cache_write``
    (npy + CRC sidecar into a throw-away cache)."""
    import tempfile

    from mmvae.data import io as mio
    from mmvae.data.cache import PreprocessCache, source_hash
    from mmvae.data.preprocess import (_bbox_centre, crop_or_pad, foreground_mask, normalize_intensity,
                                       reorient_to_ras, resample_to_spacing)
    out = {}
    t = time.perf_counter()
    source_hash(path)
    out["hash"] = time.perf_counter() - t
    t = time.perf_counter()
    s = mio.load_series(path, spatial_dims=spatial_dims)[0]
    out["load"] = time.perf_counter() - t
    native = tuple(np.shape(s.array))
    t = time.perf_counter()
    if cfg.reorient:
        s = reorient_to_ras(s)
    out["reorient"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.spacing is not None:
        s = resample_to_spacing(s, cfg.spacing, order=cfg.order)
    out["resample"] = time.perf_counter() - t
    t = time.perf_counter()
    data = np.asarray(s.array, dtype=np.float32)
    mask = foreground_mask(data, cfg.foreground_threshold)
    out["mask"] = time.perf_counter() - t
    t = time.perf_counter()
    centre = _bbox_centre(mask) if cfg.crop == "foreground" else None
    data, _ = crop_or_pad(data, cfg.shape, centre)
    mask, _ = crop_or_pad(mask, cfg.shape, centre, pad_value=False)
    arr = normalize_intensity(data, mask, cfg.clip_percentiles, cfg.normalize)[None]
    out["crop_normalize"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-stage-cache-") as d:
        cache = PreprocessCache(d)
        t = time.perf_counter()
        cache.get_or_build(cache.key("stage-timing"), lambda: arr)
        out["cache_write"] = time.perf_counter() - t
    out["total"] = sum(out.values())
    out["native_shape"] = list(native)
    return out


BRATS_DIR = "/work/shared/data/brats18-sample"
# BraTS has T1, T1ce, T2 and FLAIR; a model modality without a BraTS sequence of its name takes
# FLAIR (e.g. the bench config's "dwi"), so every modality gets a real 240x240x155 volume.
BRATS_STAND_IN = "flair"


def brats_cases(root: str | None, modalities) -> list[tuple[str, dict[str, str]]]:
    """``[(case_id, {modality: path})]`` of the BraTS sample folders under ``root`` (sorted;
    ``[]`` when absent). Each model modality maps to the BraTS file of the same name, else
    to :data:`BRATS_STAND_IN`."""
    if not root or not Path(root).is_dir():
        return []
    out = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        files = {}
        for m in modalities:
            for name in (m, BRATS_STAND_IN):
                f = d / f"{d.name}_{name}.nii.gz"
                if f.is_file():
                    files[m] = str(f)
                    break
        if len(files) == len(list(modalities)):
            out.append((d.name, files))
    return out


# --------------------------------------------------------------------------- fresh processes
def _fresh_child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
    finally:
        conn.close()


def run_fresh(fn, *args):
    """``fn(*args)`` in a fresh spawned process (its memory and peak RSS not blurred by what ran before);
    ``fn`` is a module-level function. Returns its value; RuntimeError with the child's error otherwise."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_fresh_child, args=(child, fn, args))
    p.start()
    child.close()
    status, value = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value
