"""Thumbnails of image series for the review page: one greyscale PNG per series.

A volume is reoriented to RAS (:func:`mmvae.data.preprocess.reorient_to_ras`) and its
middle axial slice (``k = Z // 2``) is shown in radiological convention: anterior at the
top, the patient's right on the viewer's left. A 2-D key image is shown as stored. The
grey window is the 1st–99th percentile of the slice's non-zero pixels (all pixels when
fewer than 16 are non-zero), mapped linearly to 0–255.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

import numpy as np

from mmvae.data import io as mio
from mmvae.data.preprocess import reorient_to_ras
from mmvae.errors import InputError

__all__ = ["slice_for_display", "window", "png_bytes", "thumbnail_png", "ThumbnailCache"]

PERCENTILES = (1.0, 99.0)


def slice_for_display(array: np.ndarray) -> np.ndarray:
    """``(rows, cols)`` image to show of a RAS array: ``(X, Y)`` → its transpose (a
    key image as stored); ``(X, Y, Z)`` → the middle axial slice, rows from anterior to
    posterior, columns from the patient's right to left."""
    a = np.asarray(array, np.float32)
    if a.ndim == 2:
        return a.T
    if a.ndim == 3:
        return a[:, :, a.shape[2] // 2].T[::-1]
    raise InputError(f"cannot show an array of shape {a.shape} (expected 2-D or 3-D)")


def window(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """uint8 image: values between the ``percentiles`` of the non-zero pixels mapped to
    0–255 (clipped); a constant image gives zeros."""
    x = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    nz = x[x != 0]
    ref = nz if nz.size >= 16 else x.ravel()
    lo, hi = np.percentile(ref, percentiles) if ref.size else (0.0, 0.0)
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip(np.round((x - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def png_bytes(image_u8: np.ndarray, size: int) -> bytes:
    """PNG of a uint8 image, resized (bilinear) so that its longer side is ``size`` pixels."""
    from PIL import Image
    im = Image.fromarray(np.ascontiguousarray(image_u8), mode="L")
    h, w = image_u8.shape
    scale = size / max(h, w)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(path: str | os.PathLike, *, size: int = 192, spatial_dims: int = 3,
                  b_value: str | float = "highest", max_voxels: int | None = None) -> bytes:
    """PNG thumbnail of the first series of an image source (NIfTI file, DICOM series
    folder or PNG), loaded with the loaders' rules (:func:`mmvae.data.io.load_image`).

    Raises:
      InputError: the source does not load (the loader's message, naming the file).
    """
    series = mio.load_image(path, spatial_dims=spatial_dims, b_value=b_value, max_voxels=max_voxels).series[0]
    arr = series.array if series.array.ndim == 2 else reorient_to_ras(series).array
    return png_bytes(window(slice_for_display(arr)), size)


class ThumbnailCache:
    """PNG bytes by key, least recently used evicted beyond ``max_items``; thread-safe (a
    missing thumbnail is built outside the lock: two requests may both build it)."""

    def __init__(self, max_items: int = 512):
        self.max_items = int(max_items)
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, build) -> bytes:
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self.misses += 1
        data = build()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data
