"""Checks and wording shared by the image loaders (:mod:`mmvae.data.io`: NIfTI, PNG and the
dispatch; :mod:`mmvae.data.dicom`: DICOM folders).

Both refuse an image of more than :data:`MAX_VOXELS` voxels from its headers and a grid
:func:`check_geometry` cannot vouch for, before any voxel is read, and word a library
exception with :func:`_describe` (never an empty reason).
"""
from __future__ import annotations

import numpy as np

from mmvae.errors import InputError

#: Largest image the loaders read, in voxels (all volumes of a file or series together):
#: 2**28 = 268,435,456 voxels, 1 GiB as float32. Checked from the headers before any voxel is
#: read or decoded; a loader's ``max_voxels`` argument overrides it.
MAX_VOXELS = 2 ** 28


def _limit(max_voxels: int | None) -> int:
    return MAX_VOXELS if max_voxels is None else int(max_voxels)


def _too_big(what: str, n: int, limit: int, unit: str = "voxels") -> str:
    return (f"{what} = {n} {unit}, more than the loaders read (max_voxels={limit}); "
            "refused before reading (a wrong header, or an image to crop or downsample first)")


def _out_of_memory(what: str) -> str:
    return f"out of memory (MemoryError) {what}"


#: Plausible voxel size (mm) and field of view (mm per axis) of a medical image: outside,
#: the units are wrong (metres or microns labelled as mm) and resampling would produce one
#: voxel or tens of GiB.
VOXEL_MM = (0.001, 50.0)      # 1 µm (optical coherence tomography) to 5 cm
MAX_FOV_MM = 2500.0


def check_geometry(shape: tuple[int, ...], affine: np.ndarray, path: str | None) -> None:
    """Refuse a grid mmvae cannot vouch for (InputError naming ``path``), before any voxel is read:

    * voxel sizes outside :data:`VOXEL_MM` or a field of view above :data:`MAX_FOV_MM`
      (wrong units);
    * axes that are not orthogonal (more than 1° from 90°: a sheared or gantry-tilted grid,
      which reorientation to RAS would distort; resample it onto a straight grid first).
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.sqrt((a ** 2).sum(0))
    for ax, (n, v) in enumerate(zip(shape, sizes)):
        if n > 1 and not VOXEL_MM[0] <= v <= VOXEL_MM[1]:
            raise InputError(f"implausible voxel size {v:.4g} mm along axis {ax} (expected {VOXEL_MM[0]}-"
                             f"{VOXEL_MM[1]} mm): check the file's spatial units", path=path)
        if n * v > MAX_FOV_MM:
            raise InputError(f"implausible field of view {n * v:.4g} mm along axis {ax} ({n} voxels of "
                             f"{v:.4g} mm; at most {MAX_FOV_MM:g} mm): check the file's spatial units",
                             path=path)
    unit = a / np.maximum(sizes, 1e-12)
    for i in range(3):
        for j in range(i + 1, 3):
            if len(shape) > max(i, j) and shape[i] > 1 and shape[j] > 1:
                ang = np.degrees(np.arccos(np.clip(abs(float(unit[:, i] @ unit[:, j])), 0.0, 1.0)))
                if ang < 89.0:
                    raise InputError(f"voxel axes {i} and {j} are {ang:.1f}° apart, not 90° (a sheared or "
                                     "gantry-tilted grid); resample it onto a straight grid first "
                                     "(e.g. dcm2niix corrects gantry tilt)", path=path)


def _describe(e: BaseException, full: bool = False) -> str:
    text = str(e).strip()
    msg = (" ".join(line.strip() for line in text.splitlines() if line.strip()) if full
           else (text.splitlines()[0] if text else ""))
    name = type(e).__name__
    if isinstance(e, EOFError) or "end-of-stream" in msg or "truncat" in msg.lower():
        return f"truncated file: {name}: {msg}"
    return f"{name}: {msg}" if msg else name
