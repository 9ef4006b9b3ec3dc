"""Preprocessing of image series into fixed-shape float32 arrays (numpy/scipy only).

Pipeline of :func:`preprocess_series` (each step is a public function):

1. :func:`reorient_to_ras` — permute/flip axes so the array is closest to RAS+
   (nibabel ``as_closest_canonical`` semantics);
2. with a ``reference``: :func:`resample_to_grid` onto the (reoriented) reference grid;
3. :func:`resample_to_spacing` to ``cfg.spacing`` mm;
4. :func:`foreground_mask` — Otsu threshold, largest component, holes filled;
5. :func:`crop_or_pad` to ``cfg.shape`` around the foreground bounding-box centre
   (or the array centre);
6. :func:`normalize_intensity` — percentile clip inside the foreground, then
   z-score (or min-max) inside the foreground; voxels outside the foreground are 0.

All steps are deterministic. Affines are 4x4 voxel→world maps in RAS+ mm, with the
voxel-centre convention (voxel index ``i`` is the centre of voxel ``i``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from mmvae.data.case import Series
from mmvae.errors import ConfigError, InputError

log = logging.getLogger(__name__)
_CROPS = ("foreground", "center", "fit")
_NORMS = ("zscore", "minmax", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a series becomes a model input.

    Attributes:
      spacing: target voxel size in mm per axis (after reorientation, i.e. R, A, S),
        or None to keep the native spacing.
      shape: output array shape in voxels (2 or 3 ints, one per spatial axis);
        required (the default ``()`` is rejected).
      crop: "foreground" centres the crop/pad window on the foreground bounding-box
        centre, "center" on the array centre (both log a warning when the window cuts
        off foreground); "fit" scales the foreground bounding box (linear interpolation,
        aspect ratio kept) so that it just fits ``shape``, then pads: the whole object
        reaches the model, at a per-image scale (for 2D key images, which carry no
        pixel size).
      clip_percentiles: (low, high) percentiles of the foreground intensities to clip
        to before normalising, or None for no clipping.
      normalize: "zscore" (mean 0, std 1 inside the foreground), "minmax" ([0, 1]
        between the clip bounds) or "none".
      foreground_threshold: "otsu", or an intensity above which voxels are foreground.
      reorient: reorient to RAS+ first.
      order: spline interpolation order for resampling (0 = nearest, 1 = linear).
    """

    spacing: tuple[float, ...] | None = None
    shape: tuple[int, ...] = ()
    crop: str = "foreground"
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)
    normalize: str = "zscore"
    foreground_threshold: str | float = "otsu"
    reorient: bool = True
    order: int = 1

    def __post_init__(self):
        def setf(name, value):
            object.__setattr__(self, name, value)

        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise ConfigError(f"preprocess.shape must be a list of ints, got {self.shape!r}") from None
        if not shape:
            raise ConfigError("preprocess.shape is required")
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise ConfigError(f"preprocess.shape must be 2 or 3 positive ints, got {self.shape!r}")
        setf("shape", shape)
        if self.spacing is not None:
            try:
                spacing = tuple(float(s) for s in self.spacing)
            except (TypeError, ValueError):
                raise ConfigError(f"preprocess.spacing must be numbers, got {self.spacing!r}") from None
            if len(spacing) != len(shape) or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise ConfigError(f"preprocess.spacing must be {len(shape)} positive numbers "
                                  f"(one per axis of shape), got {self.spacing!r}")
            setf("spacing", spacing)
        if self.crop not in _CROPS:
            raise ConfigError(f"preprocess.crop must be one of {_CROPS}, got {self.crop!r}")
        if self.normalize not in _NORMS:
            raise ConfigError(f"preprocess.normalize must be one of {_NORMS}, got {self.normalize!r}")
        if self.clip_percentiles is not None:
            try:
                lo, hi = (float(x) for x in self.clip_percentiles)
            except (TypeError, ValueError):
                raise ConfigError("preprocess.clip_percentiles must be two numbers, got "
                                  f"{self.clip_percentiles!r}") from None
            if not 0.0 <= lo < hi <= 100.0:
                raise ConfigError("preprocess.clip_percentiles must satisfy 0 <= low < high "
                                  f"<= 100, got {self.clip_percentiles!r}")
            setf("clip_percentiles", (lo, hi))
        thr = self.foreground_threshold
        if isinstance(thr, str):
            if thr != "otsu":
                try:
                    thr = float(thr)
                except ValueError:
                    raise ConfigError("preprocess.foreground_threshold must be 'otsu' or a "
                                      f"number, got {thr!r}") from None
        elif isinstance(thr, bool) or not isinstance(thr, (int, float)):
            raise ConfigError(f"preprocess.foreground_threshold must be 'otsu' or a number, got {thr!r}")
        setf("foreground_threshold", thr if thr == "otsu" else float(thr))
        if not isinstance(self.reorient, bool):
            raise ConfigError(f"preprocess.reorient must be true or false, got {self.reorient!r}")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order <= 5:
            raise ConfigError(f"preprocess.order must be an int in 0..5, got {self.order!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("shape", "spacing", "clip_percentiles"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def key(self) -> str:
        """A stable string of all fields (sorted JSON), for cache keys."""
        return "preprocess:" + json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        """Build from a mapping (lists accepted for tuples); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"preprocess config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown preprocess field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(d))


# --------------------------------------------------------------------------- geometry


def _canonical_transform(affine: np.ndarray, shape: tuple[int, ...]):
    """(ornt, 4x4 voxel transform) bringing an array of ``shape`` closest to RAS+.

    For 2D arrays only the two in-plane axes are flipped/swapped (ordered by the
    world axis they are closest to); the notional third affine column is kept.
    """
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if len(shape) == 3:
        ornt = io_orientation(affine)
        return ornt, inv_ornt_aff(ornt, shape)
    sub = affine[:, [0, 1, 3]]  # (4, 3): two in-plane axes + translation
    ornt = io_orientation(sub)
    ornt[:, 0] = np.argsort(np.argsort(ornt[:, 0]))  # world axes -> ranks 0, 1
    t3 = inv_ornt_aff(ornt, shape)  # (3, 3)
    t4 = np.eye(4)
    idx = [0, 1, 3]
    t4[np.ix_(idx, idx)] = t3
    return ornt, t4


def reorient_to_ras(series: Series) -> Series:
    """Flip/permute array axes so they point closest to R, A, S (2D or 3D arrays).

    Same result as ``nibabel.as_closest_canonical``: the world position of every
    voxel is unchanged (``new_affine = affine @ inv_ornt_aff(ornt, shape)``).
    """
    from nibabel.orientations import apply_orientation

    arr = np.asarray(series.array)
    ornt, t = _canonical_transform(series.affine, arr.shape)
    if np.array_equal(ornt, np.array([[i, 1] for i in range(arr.ndim)], dtype=float)):
        return Series(array=arr, affine=np.asarray(series.affine, dtype=np.float64), path=series.path)
    data = np.ascontiguousarray(apply_orientation(arr, ornt))
    return Series(array=data, affine=np.asarray(series.affine, dtype=np.float64) @ t,
                  path=series.path)


def _reoriented_grid(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine :func:`reorient_to_ras` would give, without moving any data."""
    ornt, t = _canonical_transform(affine, shape)
    new_shape = [0] * len(shape)
    for ax, (dst, _) in enumerate(ornt):
        new_shape[int(dst)] = shape[ax]
    return tuple(new_shape), np.asarray(affine, dtype=np.float64) @ t


def _as3d(arr: np.ndarray) -> np.ndarray:
    return arr[..., None] if arr.ndim == 2 else arr


def resample_to_spacing(series: Series, spacing, order: int = 1) -> Series:
    """Resample to voxel size ``spacing`` (mm per array axis), keeping the grid centred.

    New shape ``n' = max(1, round(n * s / s'))``. The centre of the new grid
    coincides with the centre of the old one (voxel-centre convention): new voxel
    ``i'`` samples old position ``c + (i' - c') * s'/s`` with ``c = (n-1)/2``,
    ``c' = (n'-1)/2``, and the affine is updated so every voxel keeps its world
    position. Samples beyond the edge take the nearest edge value. A series already
    at ``spacing`` (within 1e-6 mm) is returned unchanged.
    """
    arr = np.asarray(series.array, dtype=np.float32)
    old = np.array(series.spacing, dtype=np.float64)
    new = np.array([float(s) for s in spacing], dtype=np.float64)
    if new.shape != old.shape:
        raise InputError(f"spacing {tuple(new)} has {new.size} values for a "
                         f"{arr.ndim}D image", path=series.path or None)
    if np.allclose(old, new, rtol=0, atol=1e-6):
        return Series(array=arr, affine=np.asarray(series.affine, dtype=np.float64), path=series.path)
    n_old = np.array(arr.shape, dtype=np.float64)
    n_new = np.maximum(1, np.round(n_old * old / new)).astype(int)
    from mmvae.data.io import MAX_VOXELS
    total = int(np.prod([int(x) for x in n_new], dtype=object))
    if total > MAX_VOXELS:
        raise InputError(f"resampling {tuple(int(x) for x in n_old)} voxels of {tuple(np.round(old, 4))} mm to "
                         f"{tuple(new)} mm gives {'x'.join(str(int(x)) for x in n_new)} = {total} voxels, more "
                         f"than the loaders handle (mmvae.data.io.MAX_VOXELS={MAX_VOXELS}); use a coarser "
                         "data.spacing", path=series.path or None)
    f = new / old  # old voxels per new voxel
    offset = (n_old - 1) / 2 - (n_new - 1) / 2 * f
    out = ndimage.affine_transform(arr, f, offset=offset, output_shape=tuple(n_new),
                                   order=order, mode="nearest")
    t = np.eye(4)
    k = arr.ndim
    t[:k, :k] = np.diag(f)
    t[:k, 3] = offset
    return Series(array=out.astype(np.float32, copy=False),
                  affine=np.asarray(series.affine, dtype=np.float64) @ t, path=series.path)


def resample_to_grid(series: Series, ref_shape, ref_affine, order: int = 1) -> Series:
    """Resample ``series`` onto the grid ``(ref_shape, ref_affine)`` through world space.

    Reference voxel ``v`` takes the value at source voxel
    ``inv(src_affine) @ ref_affine @ v`` (spline of ``order``); positions outside
    the source are 0. Returns a Series with ``ref_shape`` and ``ref_affine``.
    """
    arr = np.asarray(series.array, dtype=np.float32)
    ref_shape = tuple(int(s) for s in ref_shape)
    if len(ref_shape) != arr.ndim:
        raise InputError(f"cannot resample a {arr.ndim}D image onto a {len(ref_shape)}D grid",
                         path=series.path or None)
    ref_affine = np.asarray(ref_affine, dtype=np.float64)
    m = np.linalg.inv(np.asarray(series.affine, dtype=np.float64)) @ ref_affine
    out = ndimage.affine_transform(_as3d(arr), m[:3, :3], offset=m[:3, 3],
                                   output_shape=ref_shape + (1,) * (3 - len(ref_shape)),
                                   order=order, mode="constant", cval=0.0)
    out = out.reshape(ref_shape).astype(np.float32, copy=False)
    return Series(array=out, affine=ref_affine.copy(), path=series.path)


# --------------------------------------------------------------------------- foreground


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` on a ``bins``-bin histogram over [min, max].

    Returns the upper edge of the last bin of the lower class (``values > t`` is the
    upper class).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1e-12)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    between[w1 == 0] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(array: np.ndarray, threshold: str | float = "otsu") -> np.ndarray:
    """Boolean foreground (body) mask of the same shape as ``array``.

    ``array > t`` with ``t`` the Otsu threshold (``"otsu"``) or the given intensity;
    then the largest connected component (face connectivity) with its holes filled.
    If nothing is above ``t``, falls back to ``array > array.min()``; a constant
    array gives an all-True mask.
    """
    a = np.asarray(array)
    t = otsu_threshold(a) if threshold == "otsu" else float(threshold)
    mask = a > t
    if not mask.any():
        mask = a > a.min()
        if not mask.any():
            return np.ones(a.shape, dtype=bool)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _bbox_centre(mask: np.ndarray) -> tuple[float, ...] | None:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    return tuple((float(i.min()) + float(i.max())) / 2 for i in idx)


# --------------------------------------------------------------------------- crop/pad


def fit_to_shape(data: np.ndarray, mask: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``data``/``mask`` to the mask's bounding box and zoom it by one factor
    ``min_i(shape_i / box_i)`` (``scipy.ndimage.zoom``, linear for the data, nearest for
    the mask) so it fits ``shape``; an empty mask zooms the whole array."""
    idx = np.nonzero(mask)
    if idx[0].size:
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        data, mask = data[box], mask[box]
    factor = min(float(t) / float(n) for t, n in zip(shape, data.shape))
    zoomed = ndimage.zoom(data, factor, order=1, grid_mode=True, mode="nearest")
    zmask = ndimage.zoom(mask.astype(np.uint8), factor, order=0, grid_mode=True, mode="nearest") > 0
    # rounding may give one voxel too many along an axis
    sl = tuple(slice(0, min(a, int(t))) for a, t in zip(zoomed.shape, shape))
    return zoomed[sl].astype(np.float32), zmask[sl]


def crop_or_pad(array: np.ndarray, shape, center=None, pad_value: float = 0.0):
    """Crop and/or pad ``array`` to exactly ``shape`` around ``center``.

    Args:
      array: n-D array.
      shape: output shape (same number of dims).
      center: window centre in voxel coordinates (floats), default the array centre
        ``(n-1)/2``.
      pad_value: value of voxels outside the input.

    Returns:
      ``(out, offset)``: ``out[idx] == array[idx + offset]`` where that is inside the
      array, else ``pad_value``. The window starts at ``floor(center + 0.5 - s/2)``
      and is shifted to lie inside the array (when cropping) or to contain the whole
      array (when padding) along each axis.
    """
    a = np.asarray(array)
    shape = tuple(int(s) for s in shape)
    if len(shape) != a.ndim:
        raise ValueError(f"shape {shape} does not match a {a.ndim}D array")
    if center is None:
        center = [(n - 1) / 2 for n in a.shape]
    offset = []
    for n, s, c in zip(a.shape, shape, center):
        start = int(np.floor(float(c) + 0.5 - s / 2))
        start = min(max(start, 0), n - s) if s <= n else min(max(start, n - s), 0)
        offset.append(start)
    out = np.full(shape, pad_value, dtype=a.dtype)
    src, dst = [], []
    for n, s, o in zip(a.shape, shape, offset):
        lo, hi = max(o, 0), min(o + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = a[tuple(src)]
    return out, tuple(offset)


# --------------------------------------------------------------------------- intensity


def normalize_intensity(array: np.ndarray, mask: np.ndarray | None,
                        clip_percentiles=(0.5, 99.5), method: str = "zscore") -> np.ndarray:
    """Clip and normalise intensities; returns float32 of ``array.shape``.

    1. Clip the whole array to the ``clip_percentiles`` of the values inside
       ``mask`` (skipped when None).
    2. ``"zscore"``: subtract the mean and divide by the std of the clipped values
       inside the mask (std 0 → divide by 1); ``"minmax"``: map the clip bounds (or
       the in-mask min/max) to [0, 1]; ``"none"``: no scaling.
    3. For ``"zscore"``/``"minmax"`` voxels outside the mask are set to 0 — the
       foreground mean in z-score units, the low bound in min-max units — so
       background and padding carry no signal. ``"none"`` leaves them unchanged.

    An empty or missing mask means "all voxels".
    """
    if method not in _NORMS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {_NORMS}")
    a = np.asarray(array, dtype=np.float64)
    m = np.ones(a.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not m.any():
        m = np.ones(a.shape, dtype=bool)
    vals = a[m]
    if clip_percentiles is not None:
        lo, hi = np.percentile(vals, [float(clip_percentiles[0]), float(clip_percentiles[1])])
        a = np.clip(a, lo, hi)
        vals = a[m]
    else:
        lo, hi = float(vals.min()), float(vals.max())
    if method == "none":
        return a.astype(np.float32)
    if method == "zscore":
        mean, std = float(vals.mean()), float(vals.std())
        out = (a - mean) / (std if std > 0 else 1.0)
    else:
        out = (a - lo) / (hi - lo) if hi > lo else a - lo
    out[~m] = 0.0
    return out.astype(np.float32)


# --------------------------------------------------------------------------- pipeline


def preprocess_series_with_mask(series: Series, cfg: PreprocessConfig, *,
                                reference: Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`preprocess_series`, also returning the foreground mask (bool, ``cfg.shape``).

    Running out of memory, or a numeric failure whose message is empty, is an InputError naming
    the series with a non-empty reason (e.g. ``out of memory (MemoryError) preprocessing a
    (512, 512, 300) image``), never a bare exception with an empty text."""
    try:
        return _preprocess_series_with_mask(series, cfg, reference=reference)
    except MemoryError:
        raise InputError(f"out of memory (MemoryError) preprocessing a {tuple(np.shape(series.array))} image",
                         path=series.path or None) from None
    except (ValueError, RuntimeError) as e:
        if str(e).strip():
            raise
        raise InputError(f"preprocessing failed ({type(e).__name__}, no message) on a "
                         f"{tuple(np.shape(series.array))} image", path=series.path or None) from None


def _preprocess_series_with_mask(series: Series, cfg: PreprocessConfig, *,
                                 reference: Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(series.array)
    if arr.ndim != len(cfg.shape):
        raise InputError(f"{arr.ndim}D image but preprocess.shape {cfg.shape} has "
                         f"{len(cfg.shape)} dims", path=series.path or None)
    s = reorient_to_ras(series) if cfg.reorient else series
    if reference is not None:
        ref_shape, ref_affine = tuple(np.shape(reference.array)), np.asarray(reference.affine)
        if cfg.reorient:
            ref_shape, ref_affine = _reoriented_grid(ref_shape, ref_affine)
        s = resample_to_grid(s, ref_shape, ref_affine, order=cfg.order)
    if cfg.spacing is not None:
        s = resample_to_spacing(s, cfg.spacing, order=cfg.order)
    data = np.asarray(s.array, dtype=np.float32)
    mask = foreground_mask(data, cfg.foreground_threshold)
    if cfg.crop == "fit":
        data, mask = fit_to_shape(data, mask, cfg.shape)
    centre = _bbox_centre(mask) if cfg.crop in ("foreground", "fit") else None
    kept = int(mask.sum())
    data, _ = crop_or_pad(data, cfg.shape, centre)
    mask, _ = crop_or_pad(mask, cfg.shape, centre, pad_value=False)
    if kept and int(mask.sum()) < kept:
        log.warning("%s: the %s crop to %s removes %.1f %% of the foreground (data.crop='fit' resizes instead)",
                    series.path or "image", cfg.crop, tuple(cfg.shape), 100.0 * (1 - int(mask.sum()) / kept))
    out = normalize_intensity(data, mask, cfg.clip_percentiles, cfg.normalize)
    return out, mask


def preprocess_with_maps(series: Series, cfg: PreprocessConfig,
                         maps: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`preprocess_series` of ``series``, carrying voxel maps on the same grid along.

    Each map (an array of the series' shape, e.g. a soft lesion mask) goes through the
    same reorientation, resampling (linear) and crop/pad window as the image, without
    intensity normalisation, so ``out[m > 0.5]`` selects the same tissue in the model
    input as ``series.array[m > 0.5]`` in the file. Returns ``(image, {name: map})``.
    """
    out, _ = preprocess_series_with_mask(series, cfg)
    s = reorient_to_ras(series) if cfg.reorient else series
    if cfg.spacing is not None:
        s = resample_to_spacing(s, cfg.spacing, order=cfg.order)
    mask = foreground_mask(np.asarray(s.array, dtype=np.float32), cfg.foreground_threshold)
    if cfg.crop == "fit":
        raise InputError("preprocess_with_maps does not support crop='fit'", path=series.path or None)
    centre = _bbox_centre(mask) if cfg.crop == "foreground" else None
    res = {}
    for name, arr in maps.items():
        m = Series(array=np.asarray(arr, np.float32), affine=series.affine, path=series.path)
        m = reorient_to_ras(m) if cfg.reorient else m
        if cfg.spacing is not None:
            m = resample_to_spacing(m, cfg.spacing, order=1)
        res[name] = crop_or_pad(np.asarray(m.array, np.float32), cfg.shape, centre)[0]
    return out, res


def preprocess_series(series: Series, cfg: PreprocessConfig, *,
                      reference: Series | None = None) -> np.ndarray:
    """Turn a series into a float32 array of exactly ``cfg.shape``.

    Steps: reorient to RAS+ (``cfg.reorient``) → with ``reference``, resample onto the
    reference grid (the reference reoriented the same way) → resample to
    ``cfg.spacing`` mm → foreground mask → crop/pad to ``cfg.shape`` around the
    foreground (or array) centre → clip + normalise inside the foreground, 0 outside
    (see :func:`normalize_intensity`). Deterministic.
    """
    return preprocess_series_with_mask(series, cfg, reference=reference)[0]


def preprocess_case_series(series: Mapping[str, Series], cfg: PreprocessConfig, *,
                           reference: str | None = None) -> dict[str, np.ndarray]:
    """Preprocess one series per modality of a case, optionally on a common grid.

    Args:
      series: modality → series.
      cfg: the preprocessing config.
      reference: a modality whose grid the others are resampled onto first (e.g.
        "dwi" for ISLES, whose FLAIR lies on another grid); None = each on its own.

    Returns modality → float32 array of ``cfg.shape``. InputErrors carry the modality.
    """
    if reference is not None and reference not in series:
        raise InputError(f"reference modality {reference!r} missing; have {sorted(series)}")
    ref = series[reference] if reference is not None else None
    out = {}
    for mod, s in series.items():
        try:
            out[mod] = preprocess_series(s, cfg, reference=None if mod == reference else ref)
        except InputError as e:
            raise e.with_context(modality=mod, path=s.path or None) from None
    return out
