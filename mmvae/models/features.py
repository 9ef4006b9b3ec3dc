"""Frozen pretrained image features of every image kind, cached beside the preprocessed arrays.

A case's image series becomes a few 2-D pictures for an ImageNet network
(:mod:`mmvae.models.vision`, EfficientNet-Lite0; Tan & Le 2019), each a feature vector of
``D = 1280`` numbers (the global average of the last feature map):

* a **2-D key image** (PNG): the whole image, aspect kept, resized to fit ``size × size``
  (224 px) and padded with black;
* a **3-D volume**: 2.5-D — reoriented to RAS, ``K`` slices (``data.features.slices``, 12)
  evenly spaced through the foreground's extent along each plane of ``data.features.planes``
  (``axial``: along S; ``triplanar``: axial, coronal and sagittal; foreground: the largest
  connected region above a tenth of the volume's bright range), each shown at its physical
  aspect (mm), resized and padded the same way. Retrieval by 2-D slice embeddings of frozen
  pretrained networks, aggregated per volume: Khun Jush et al. 2024 (arXiv 2311.13547,
  2405.09334).

Intensities: the picture's values clipped to their 0.5 / 99.5 percentiles (of the foreground
for volumes) and mapped to [0, 1]; grey copied to the network's 3 channels, then its ImageNet
normalisation. The per-slice vectors ``(V, n, D)`` of a source (V volumes, e.g. several
b-values; n pictures per volume) are cached in the preprocessing cache under a key made of the
source's SHA-256, the extractor's identity (network, weights checksum, picture recipe) and the
loader options, so train, embed, query, PACS ingest and the review page compute them once.
:func:`pool` turns them into one vector per volume: ``mean`` (``D``) or ``meanmax``
(mean ‖ max over the pictures, ``2D``; the default for volumes, ``auto``).

The data layer never imports this module: :func:`cohort_features` adds the batch entries
``features/<m>`` ``(N, S, F)`` to a prepared :class:`~mmvae.data.dataset.Cohort` (zeros where a
series is absent; ``series_mask/<m>`` says which are present) and :func:`case_features` gives
one query's ``(V, F)``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from mmvae.data.cache import PreprocessCache, source_hash
from mmvae.data.case import Series
from mmvae.data.dataset import Cohort
from mmvae.data.manifest import CaseEntries
from mmvae.errors import ConfigError, InputError
from mmvae.progress import progress_bar

log = logging.getLogger(__name__)

#: Version of the picture recipe below: part of every cache key (bump when it changes).
RECIPE_VERSION = "1"
NETWORKS = ("efficientnet_lite0",)
PLANES = ("axial", "triplanar")
POOLINGS = ("auto", "mean", "meanmax")
INPUTS = ("pixels", "features", "both")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """``data.features``: which network, how volumes become pictures, how they are pooled."""

    network: str = "efficientnet_lite0"
    slices: int = 12                 # K pictures per plane of a volume
    planes: str = "axial"            # axial | triplanar
    pooling: str = "auto"            # auto (2-D: mean, 3-D: meanmax) | mean | meanmax
    batch_size: int = 32             # pictures per network call
    size: int = 224                  # picture side (px)

    def __post_init__(self):
        if self.network not in NETWORKS:
            raise ConfigError(f"data.features.network must be one of {list(NETWORKS)}, got {self.network!r}")
        if self.planes not in PLANES:
            raise ConfigError(f"data.features.planes must be one of {list(PLANES)}, got {self.planes!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"data.features.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        for name in ("slices", "batch_size", "size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"data.features.{name} must be a positive int, got {v!r}")

    @classmethod
    def from_config(cls, config) -> "FeatureConfig":
        f = config.data.features
        return cls(network=str(f.network), slices=int(f.slices), planes=str(f.planes), pooling=str(f.pooling),
                   batch_size=int(f.batch_size))

    def pooling_for(self, spatial_dims: int) -> str:
        return self.pooling if self.pooling != "auto" else ("mean" if int(spatial_dims) == 2 else "meanmax")

    def dim(self, spatial_dims: int) -> int:
        """``F``: length of one pooled feature vector."""
        from mmvae.models.vision import FEATURE_DIM
        return FEATURE_DIM * (2 if self.pooling_for(spatial_dims) == "meanmax" else 1)

    def picture_key(self, spatial_dims: int) -> str:
        """What decides a source's pictures (not the pooling, applied on read)."""
        if int(spatial_dims) == 2:
            return f"v{RECIPE_VERSION};2d;size={self.size}"
        return f"v{RECIPE_VERSION};3d;size={self.size};slices={self.slices};planes={self.planes}"


def needs_features(config) -> bool:
    """Whether a run reads frozen image features: an image expert on them
    (``model.image.input`` features | both) or retrieval vectors that hold them."""
    if not config.data.image_modalities:
        return False
    inp = str(config.model.image.input)
    emb = str(config.retrieval.embedding)
    return inp in ("features", "both") or "features" in emb


# ----------------------------------------------------------------------------- pictures
def _unit_range(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Clip to the 0.5 / 99.5 percentiles (of ``mask``'s values when given) → [0, 1] float32."""
    vals = img[mask] if mask is not None and mask.any() else img.reshape(-1)
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max())
    if not hi > lo:
        return np.zeros(img.shape, np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def fit_picture(img: np.ndarray, size: int, aspect: float = 1.0) -> np.ndarray:
    """``(rows, cols)`` in [0, 1] → ``(size, size)``: resized (bilinear, PIL) so its longer
    physical side is ``size`` px (``aspect`` = row spacing / column spacing), centred on black."""
    from PIL import Image
    rows, cols = img.shape
    h_mm, w_mm = rows * float(aspect), cols * 1.0
    scale = size / max(h_mm, w_mm)
    h, w = max(1, min(size, int(round(h_mm * scale)))), max(1, min(size, int(round(w_mm * scale))))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(img, np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((size, size), np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = np.clip(resized, 0.0, 1.0)
    return out


def slice_positions(lo: int, hi: int, k: int) -> np.ndarray:
    """``k`` indices evenly spaced through ``[lo, hi]`` (centres of k equal parts; repeats
    when the extent has fewer than k slices)."""
    return np.clip(np.round(lo + (hi - lo + 1) * (np.arange(k) + 0.5) / k - 0.5), lo, hi).astype(int)


def pictures(series: Series, spatial_dims: int, cfg: FeatureConfig) -> np.ndarray:
    """The network's pictures of one volume or key image: ``(n, size, size)`` float32 in [0, 1]
    (n = 1 for a key image; ``slices`` × planes for a volume). Rows run top to bottom as a
    radiologist views them (anterior / superior up)."""
    from mmvae.data.preprocess import foreground_mask, reorient_to_ras
    arr = np.asarray(series.array, np.float32)
    if int(spatial_dims) == 2:
        img = arr.T                                          # (X, Y) = (columns, rows) → (rows, columns)
        sp = series.spacing
        return fit_picture(_unit_range(img), cfg.size, aspect=sp[1] / sp[0] if sp[0] > 0 else 1.0)[None]
    ras = reorient_to_ras(series)
    vol, sp = np.asarray(ras.array, np.float32), ras.spacing     # axes point R, A, S
    # body vs air: above a tenth of the bright range (Otsu would split a bright lesion from the body)
    lo, hi = float(vol.min()), float(np.percentile(vol, 99.5))
    fg = foreground_mask(vol, threshold=lo + 0.1 * (hi - lo)) if hi > lo else np.ones(vol.shape, bool)
    scaled = _unit_range(vol, fg)
    out = []
    # plane: (slice axis, row axis, column axis); rows are flipped so A / S point up
    planes = [(2, 1, 0)] if cfg.planes == "axial" else [(2, 1, 0), (1, 2, 0), (0, 2, 1)]
    for ax, r, c in planes:
        other = tuple(a for a in range(3) if a != ax)
        nz = np.nonzero(fg.any(axis=other))[0]
        lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, vol.shape[ax] - 1)
        for k in slice_positions(lo, hi, cfg.slices):
            sl = np.take(scaled, k, axis=ax)                 # the two remaining axes, in order
            rem = [a for a in range(3) if a != ax]
            img = sl if rem == [r, c] else sl.T              # (rows, columns) = (axis r, axis c)
            out.append(fit_picture(img[::-1], cfg.size, aspect=sp[r] / sp[c] if sp[c] > 0 else 1.0))
    return np.stack(out)


def pool(vectors: np.ndarray, pooling: str) -> np.ndarray:
    """Per-picture vectors ``(..., n, D)`` → ``(..., D)`` (``mean``) or ``(..., 2D)`` (``meanmax``)."""
    v = np.asarray(vectors, np.float32)
    if pooling == "mean":
        return v.mean(-2)
    if pooling == "meanmax":
        return np.concatenate([v.mean(-2), v.max(-2)], -1)
    raise ConfigError(f"unknown feature pooling {pooling!r}; choose one of {POOLINGS[1:]}")


# ----------------------------------------------------------------------------- network
class FeatureExtractor:
    """The frozen network behind the features (loaded once per process, jitted, batched).

    ``vectors(pictures (n, H, W) in [0, 1]) → (n, D)`` float32; every call runs batches of
    exactly ``cfg.batch_size`` pictures (the last one padded), so one compilation serves all.
    """

    _shared: dict = {}
    _shared_lock = threading.Lock()

    def __init__(self, cfg: FeatureConfig):
        from mmvae.models import vision
        self.cfg = cfg
        self.identity = f"{cfg.network};sha256={vision.EFFICIENTNET_LITE0_SHA256}"
        self._vision = vision
        self._fn = None
        self._lock = threading.Lock()

    @classmethod
    def get(cls, cfg: FeatureConfig) -> "FeatureExtractor":
        """The process-wide extractor of ``cfg`` (the weights are read once)."""
        with cls._shared_lock:
            if cfg not in cls._shared:
                cls._shared[cfg] = cls(cfg)
            return cls._shared[cfg]

    def _forward(self):
        if self._fn is None:
            net = self._vision.load_efficientnet_lite0()
            mean = np.asarray(self._vision.IMAGENET_MEAN, np.float32)
            std = np.asarray(self._vision.IMAGENET_STD, np.float32)
            # x (B, H, W) in [0, 1]: grey → 3 channels, ImageNet normalisation; BatchNorm folded
            # into the convs (the fastest measured path, docs/benchmarks.md)
            self._fn = self._vision.compiled_features(net, prepare=lambda x: (x[..., None] - mean) / std)
        return self._fn

    def vectors(self, pics: np.ndarray) -> np.ndarray:
        pics = np.asarray(pics, np.float32)
        n, b = len(pics), self.cfg.batch_size
        if n == 0:
            return np.zeros((0, self._vision.FEATURE_DIM), np.float32)
        with self._lock:
            fn = self._forward()
            out = []
            for s in range(0, n, b):
                chunk = pics[s:s + b]
                if len(chunk) < b:
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.float32)])
                out.append(np.asarray(fn(chunk))[: min(b, n - s)])
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- cache
def _key(cache: PreprocessCache, extractor: FeatureExtractor, path: str, spatial_dims: int,
         b_value) -> str:
    return cache.key("features", source_hash(path), extractor.identity, extractor.cfg.picture_key(spatial_dims),
                     f"dims={int(spatial_dims)}", f"b={b_value}")


def _source_pictures(path: str, spatial_dims: int, b_value, cfg: FeatureConfig):
    """``(pictures (V, n, size, size), notes)`` of one image source (every volume the loader keeps)."""
    from mmvae.data import io as mio
    loaded = mio.load_image(path, spatial_dims=spatial_dims, b_value=b_value)
    return np.stack([pictures(s, spatial_dims, cfg) for s in loaded.series]), loaded.notes


def source_vectors(paths: Sequence[str], cache: PreprocessCache, extractor: FeatureExtractor, *,
                   spatial_dims: int, b_value="highest", where: Mapping[str, tuple[str, str]] | None = None,
                   show_progress: bool = True, workers: int = 2,
                   failed: dict | None = None) -> dict[str, np.ndarray]:
    """Per-picture vectors ``(V, n, D)`` of each image source in ``paths`` (cached; missing
    entries computed in batches of about ``8 × batch_size`` pictures and written atomically;
    at most 16 sources' pictures are held in memory at a time).

    ``where``: path → (case id, modality), for errors (:class:`InputError` naming case,
    modality and file). ``failed``: when given (``data.on_error='skip'``), a source that cannot
    be read is recorded there (path → the error) and left out instead of raising."""
    where = where or {}
    out: dict[str, np.ndarray] = {}
    todo: list[tuple[str, str]] = []
    for p in dict.fromkeys(paths):
        try:
            key = _key(cache, extractor, p, spatial_dims, b_value)
        except OSError as e:
            cid, m = where.get(p, (None, None))
            raise InputError(f"cannot read the image source ({e.strerror})", case_id=cid, modality=m,
                             path=p) from None
        got = cache.get(key)
        if got is not None:
            out[p] = np.asarray(got[0])
        else:
            todo.append((p, key))
    if not todo:
        return out

    def load(item):
        p, key = item
        cid, m = where.get(p, (None, None))
        try:
            try:
                return p, key, _source_pictures(p, spatial_dims, b_value, extractor.cfg)
            except InputError as e:
                raise e.with_context(case_id=cid, modality=m, path=p) from None
            except (ValueError, RuntimeError, MemoryError) as e:
                raise InputError(f"feature pictures failed: {type(e).__name__}: {e}", case_id=cid, modality=m,
                                 path=p) from None
        except InputError as e:
            if failed is None:
                raise
            return p, key, e

    budget = 8 * extractor.cfg.batch_size
    bar = progress_bar(range(len(todo)), total=len(todo), desc=f"features ({extractor.cfg.network})",
                       enable=show_progress, unit="series")
    done = iter(bar)
    window = 16                                          # sources whose pictures may wait in memory
    with ThreadPoolExecutor(max(1, int(workers))) as pool_:
        pending: list = []
        for start in range(0, len(todo), window):
            for p, key, got in pool_.map(load, todo[start:start + window]):
                if isinstance(got, InputError):
                    failed[p] = got
                    log.warning("skipping the features of %s", got)
                    next(done, None)
                    continue
                pics, notes = got
                pending.append((p, key, pics, notes))
                if sum(x[2].shape[0] * x[2].shape[1] for x in pending) >= budget:
                    _flush(pending, cache, extractor, out, done)
                    pending = []
        if pending:
            _flush(pending, cache, extractor, out, done)
    return out


def _flush(pending, cache, extractor, out, done) -> None:
    flat = np.concatenate([pics.reshape((-1,) + pics.shape[2:]) for _, _, pics, _ in pending])
    vecs = extractor.vectors(flat)
    s = 0
    for p, key, pics, notes in pending:
        v, n = pics.shape[:2]
        arr = vecs[s:s + v * n].reshape(v, n, -1)
        s += v * n
        cache.put(key, arr, notes)
        out[p] = arr
        next(done, None)


def case_features(paths: Sequence[str], cache: PreprocessCache, extractor: FeatureExtractor, *,
                  spatial_dims: int, b_value="highest", case_id: str | None = None,
                  modality: str | None = None, show_progress: bool = False) -> np.ndarray:
    """One modality of one case: the pooled features ``(V, F)`` of every volume of ``paths``,
    in order (as :func:`mmvae.data.dataset.load_case_images` stacks the pixel arrays)."""
    got = source_vectors(paths, cache, extractor, spatial_dims=spatial_dims, b_value=b_value,
                         where={p: (case_id, modality) for p in paths}, show_progress=show_progress)
    pooling = extractor.cfg.pooling_for(spatial_dims)
    return np.concatenate([pool(got[p], pooling) for p in paths], 0)


def cohort_features(cohort: Cohort, cases: Mapping[str, CaseEntries], cache: PreprocessCache,
                    extractor: FeatureExtractor, *, spatial_dims: int, b_value="highest",
                    show_progress: bool = True, workers: int = 2,
                    failed: dict | None = None) -> dict[str, np.ndarray]:
    """The batch entries ``features/<m>`` ``(N, S, F)`` float32 of a prepared cohort.

    ``cases``: case id → its manifest entries (the image paths). Only the modalities the
    cohort kept for a case are read (a dropped series has zeros here as in ``image/<m>``);
    a case's volumes are stacked in manifest order and the first ``S = max_series`` kept,
    so row ``[i, s]`` describes the same series as ``image/<m>[i, s]``. ``failed``: see
    :func:`source_vectors`; a case-modality with a failed source gets zeros here (the caller
    drops the modality from the case: :func:`mmvae.runs.trained.with_features`)."""
    spatial_dims = int(spatial_dims)
    pooling = extractor.cfg.pooling_for(spatial_dims)
    wanted: dict[str, tuple[str, str]] = {}
    for m in cohort.image_modalities:
        for i, cid in enumerate(cohort.case_ids):
            if cohort.images[m][i] is not None:
                for p in cases[cid].images.get(m, []):
                    wanted.setdefault(p, (cid, m))
    vecs = source_vectors(list(wanted), cache, extractor, spatial_dims=spatial_dims, b_value=b_value,
                          where=wanted, show_progress=show_progress, workers=workers, failed=failed)
    dim = next((pool(v, pooling).shape[-1] for v in vecs.values()), None) or extractor.cfg.dim(spatial_dims)
    out = {}
    for m in cohort.image_modalities:
        arr = np.zeros((len(cohort), cohort.max_series, dim), np.float32)
        for i, cid in enumerate(cohort.case_ids):
            if cohort.images[m][i] is None or any(p not in vecs for p in cases[cid].images.get(m, [])):
                continue
            pooled = np.concatenate([pool(vecs[p], pooling) for p in cases[cid].images.get(m, [])], 0)
            n = min(cohort.max_series, pooled.shape[0], cohort.images[m][i].shape[0])
            arr[i, :n] = pooled[:n]
        out[f"features/{m}"] = arr
    return out
