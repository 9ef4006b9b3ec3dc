"""Synthetic multimodal MRI cohorts with a known ground truth.

:func:`make_cohort` writes a cohort of cases, each made of up to four MR sequences
(``t1``, ``t2``, ``dwi``, optionally ``flair``) of a head phantom with one lesion,
a free-text radiology report, labels and clinical metadata, plus the manifest
(``manifest.jsonl``, see :mod:`mmvae.data.manifest`) and a ground-truth sidecar
(``synth_truth.jsonl``: every phantom parameter, so that tissue and lesion masks
can be recomputed exactly with :func:`tissue_maps`). The lesion geometry is kept
out of the manifest on purpose: manifest metadata are clinical inputs, and a
metadata encoder given lesion size/location would see a class cue no clinician
records.

The pathology classes are designed so that **fusion matters**: each image
sequence and the report separates some classes and confuses others, and only a
combination of them resolves all seven.

Lesion contrast design
----------------------
bright = hyperintense (code +1), dark = hypointense (-1), iso = the lesion takes
the case's white-matter value (0); :func:`class_contrast_table` returns these
codes. FLAIR follows T2.

=====================  ======  ======  ======  ===================================================
class                  T1      T2      DWI     report cue (each present only part of the time)
=====================  ======  ======  ======  ===================================================
``glioma``             dark    bright  iso     "no known history of malignancy"; never a known
                                               primary
``metastasis``         dark    bright  iso     known primary ("Known primary lung carcinoma.",
                                               breast cancer, melanoma, ...) in 85 % of reports
``abscess``            dark    bright  bright  fever / infection history; "restricted diffusion"
``necrotic_tumour``    dark    bright  dark    "no restricted diffusion", "facilitated diffusion"
``acute_haematoma``    dark    dark    iso     haemorrhage/haematoma noun; "acute"
``early_haematoma``    bright  dark    iso     haemorrhage/haematoma noun; "early subacute"
``late_haematoma``     bright  bright  iso     haemorrhage/haematoma noun; "late subacute"
=====================  ======  ======  ======  ===================================================

What separates what:

* **images identical, report only**: ``glioma`` vs ``metastasis`` share contrast,
  size and location distributions; only the clinical history in the report (and,
  weakly, age and smoking) tells them apart.
* **DWI only**: ``abscess`` (restricted diffusion, DWI bright), ``necrotic_tumour``
  (DWI dark) and ``glioma``/``metastasis`` (DWI iso) are identical on T1/T2/FLAIR
  with identical size and location distributions.
* **T1 x T2 only**: the haematoma ageing quad ``acute`` (T1 dark, T2 dark),
  ``early`` (bright, dark), ``late`` (bright, bright) and ``glioma``/``metastasis``
  (dark, bright), all DWI iso: T1 alone confuses acute/glioma and early/late; T2
  alone confuses acute/early and late/glioma; both together resolve them.

Reports mention T1/T2 signal (each ~40 %), diffusion (abscess/necrotic ~50 %,
others "no restricted diffusion" ~20 %), enhancement (shared wording between
pairs), the lesion location and size (computed from the phantom), perilesional
oedema (class independent), 0-3 incidental distractor findings, a technique
sentence, age and sex. The impression names the class in ~30 %, gives a
differential shared by the confusable pair in ~30 %, and is generic otherwise.

Size and location
-----------------
The lesion is an ellipsoid (random axes ratio and orientation, soft edge, mild
texture, bright/dark level varying +-20 % per case and sequence) with equivalent radius drawn uniformly from a class range and its
centre at a class-dependent in-plane depth; the ranges overlap heavily and are
identical within every pair that must not be separable by images
(:data:`LESION_SIZE_RANGE`, :data:`LESION_DEPTH_RANGE`). Lesion centres lie close
to the middle axial slice (``k = nz // 2``), so 2D key images always cut the
lesion. The label ``lesion_size`` is ``small``/``medium``/``large`` by the fixed
tertiles :data:`SIZE_TERTILES` of the equivalent radius over the class mixture.

Images
------
The phantom lives in normalised coordinates (world mm / ``R``, ``R`` = half the
smallest field-of-view extent), so it scales with ``shape`` x ``spacing``: a
head ellipsoid (per-case size, axes, centre offset, small yaw/pitch/roll) with
scalp, skull, a CSF rim, cortex-like grey matter with a wavy grey/white
boundary, white matter and two ventricles (larger with age). Tissue contrasts:
T1 WM > GM > CSF; T2 CSF > GM > WM; DWI nearly flat in parenchyma, CSF dark;
FLAIR like T2 with CSF suppressed. Per case and sequence: tissue levels jitter
(+-5 %), a random global intensity scale (log-uniform 0.5-2), a smooth
multiplicative bias field (exp of a random 2nd-order polynomial) and Rician noise
(magnitude of complex Gaussian) with SNR uniform in 10-30 (DWI 6-15), relative
to white matter. Optional class-independent perilesional oedema (T2/FLAIR
bright, T1 slightly dark).

Stored values are ``round(INTENSITY_SCALE * intensity)`` with
:data:`INTENSITY_SCALE` = 1000: NIfTI volumes as int16 (no scaling in the
header; RAS affine ``diag(spacing)`` centred on the field of view), 2D key images
(``spatial_dims=2``) as 16-bit greyscale PNGs whose pixel array (as read by
``np.asarray(PIL.Image.open(p))``, shape ``(X, Y)``) is the middle axial slice
``[:, :, nz // 2]`` of the same noise-free phantom (the noise realisation
differs).

Determinism
-----------
Every random draw of case ``i`` comes from ``np.random.SeedSequence([seed, i,
stream, k])`` (classes: balanced, a seeded permutation per block of 7 cases), so
a case does not depend on the other cases, on generation order, on which
modalities are requested or on ``missing_prob`` (except which are dropped), and
the same arguments give byte-identical files.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmvae.atomic import atomic_path, atomic_write_text
from mmvae.data.case import Case, Series
from mmvae.data.manifest import REPORT, ManifestEntry, write_manifest
from mmvae.errors import ConfigError

__all__ = [
    "CLASSES", "SEQUENCES", "INTENSITY_SCALE", "SIZE_TERTILES", "LESION_SIZE_RANGE",
    "LESION_DEPTH_RANGE", "MANIFEST_NAME", "TRUTH_NAME", "SynthCase",
    "class_contrast_table", "make_cohort", "generate_case", "tissue_maps", "read_truth",
]

CLASSES: tuple[str, ...] = (
    "glioma", "metastasis", "abscess", "necrotic_tumour",
    "acute_haematoma", "early_haematoma", "late_haematoma",
)
#: Image sequences the phantom can render (``modalities`` must be a subset).
SEQUENCES: tuple[str, ...] = ("t1", "t2", "dwi", "flair")
#: Stored value = round(INTENSITY_SCALE * phantom intensity), for NIfTI and PNG.
INTENSITY_SCALE = 1000.0
MANIFEST_NAME = "manifest.jsonl"
TRUTH_NAME = "synth_truth.jsonl"

# class -> (T1, T2, DWI) lesion contrast code; FLAIR follows T2.
_CODES = {
    "glioma": (-1, +1, 0),
    "metastasis": (-1, +1, 0),
    "abscess": (-1, +1, +1),
    "necrotic_tumour": (-1, +1, -1),
    "acute_haematoma": (-1, -1, 0),
    "early_haematoma": (+1, -1, 0),
    "late_haematoma": (+1, +1, 0),
}

#: Lesion equivalent radius range per class, normalised units (1 = half the FOV).
LESION_SIZE_RANGE: dict[str, tuple[float, float]] = {
    "glioma": (0.14, 0.28), "metastasis": (0.14, 0.28),
    "abscess": (0.14, 0.28), "necrotic_tumour": (0.14, 0.28),
    "acute_haematoma": (0.13, 0.26), "early_haematoma": (0.13, 0.26),
    "late_haematoma": (0.13, 0.26),
}
#: In-plane depth of the lesion centre, as a fraction of the head's axes.
LESION_DEPTH_RANGE: dict[str, tuple[float, float]] = {
    "glioma": (0.10, 0.45), "metastasis": (0.10, 0.45),
    "abscess": (0.10, 0.45), "necrotic_tumour": (0.10, 0.45),
    "acute_haematoma": (0.05, 0.42), "early_haematoma": (0.05, 0.42),
    "late_haematoma": (0.05, 0.42),
}

# Tissue layers, bottom to top (a layer overwrites those below it).
_LAYERS = ("scalp", "skull", "csf", "gm", "wm", "ventricle", "lesion")
# sequence -> tissue level (scalp, skull, csf, gm, wm); ventricles use csf.
_TISSUE = {
    "t1": (0.90, 0.08, 0.18, 0.55, 0.80),
    "t2": (0.55, 0.05, 1.00, 0.68, 0.48),
    "dwi": (0.12, 0.03, 0.10, 0.50, 0.46),
    "flair": (0.70, 0.05, 0.08, 0.62, 0.48),
}
# sequence -> lesion level for code +1 / -1 (code 0 = white-matter level).
_LESION = {
    "t1": (1.15, 0.32), "t2": (0.98, 0.20), "dwi": (1.25, 0.18), "flair": (1.00, 0.20),
}
# sequence -> additive oedema change at full strength.
_OEDEMA = {"t1": -0.12, "t2": 0.30, "dwi": 0.04, "flair": 0.35}
_SNR = {"t1": (10.0, 30.0), "t2": (10.0, 30.0), "dwi": (6.0, 15.0), "flair": (10.0, 30.0)}

# Metadata model: age mean per class (sd 14), P(male), P(smoker).
_AGE_MEAN = {"glioma": 52.0, "metastasis": 63.0, "abscess": 47.0, "necrotic_tumour": 60.0,
             "acute_haematoma": 68.0, "early_haematoma": 68.0, "late_haematoma": 68.0}
_P_MALE = {"glioma": 0.58, "metastasis": 0.5, "abscess": 0.6, "necrotic_tumour": 0.58,
           "acute_haematoma": 0.55, "early_haematoma": 0.55, "late_haematoma": 0.55}
_P_SMOKER = {c: (0.45 if c == "metastasis" else 0.22) for c in CLASSES}
_META_MISSING = {"age": 0.05, "sex": 0.08, "smoking": 0.2}

# Random streams of a case.
_S_CLASS, _S_META, _S_ANAT, _S_SEQ, _S_NOISE, _S_REPORT, _S_MISSING = range(7)


def class_contrast_table() -> dict[str, dict[str, int]]:
    """Lesion contrast code per class and sequence: +1 bright, 0 iso (= WM), -1 dark."""
    out = {}
    for c in CLASSES:
        t1, t2, dwi = _CODES[c]
        out[c] = {"t1": t1, "t2": t2, "dwi": dwi, "flair": t2}
    return out


def _size_tertiles() -> tuple[float, float]:
    los = np.array([LESION_SIZE_RANGE[c][0] for c in CLASSES])
    his = np.array([LESION_SIZE_RANGE[c][1] for c in CLASSES])

    def cdf(r):
        return float(np.mean(np.clip((r - los) / (his - los), 0.0, 1.0)))

    out = []
    for q in (1 / 3, 2 / 3):
        a, b = float(los.min()), float(his.max())
        for _ in range(60):
            m = 0.5 * (a + b)
            a, b = (m, b) if cdf(m) < q else (a, m)
        out.append(round(0.5 * (a + b), 6))
    return tuple(out)


#: Equivalent-radius thresholds (normalised units) of the ``lesion_size`` label.
SIZE_TERTILES: tuple[float, float] = _size_tertiles()


def _rng(seed: int, index: int, stream: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream, k]))


def _case_id(index: int) -> str:
    return f"synth-{index:05d}"


# ----------------------------------------------------------------------------- grid

@dataclasses.dataclass(frozen=True)
class _Grid:
    shape: tuple[int, ...]        # array shape written (2D or 3D)
    spacing: tuple[float, float, float]
    R: float                      # mm per normalised unit
    vox: float                    # mean voxel size, normalised units
    z_mid: float                  # normalised z of the middle axial slice
    xyz: np.ndarray               # (3, N) normalised coordinates, float32
    basis: np.ndarray             # (9, N) bias-field polynomial basis, float32
    affine: np.ndarray


@functools.lru_cache(maxsize=8)
def _grid(shape: tuple[int, ...], spacing: tuple[float, ...], spatial_dims: int) -> _Grid:
    if len(shape) == 2:
        nx, ny = shape
        nz, sz = 1, (spacing[2] if len(spacing) > 2 else 1.0)
        z_index = None
    else:
        nx, ny, nz = shape
        sz = spacing[2]
        z_index = nz // 2
    sx, sy = spacing[0], spacing[1]
    ext = [nx * sx, ny * sy] + ([nz * sz] if len(shape) == 3 else [])
    R = min(ext) / 2.0
    xs = (np.arange(nx) - (nx - 1) / 2.0) * sx / R
    ys = (np.arange(ny) - (ny - 1) / 2.0) * sy / R
    if len(shape) == 3:
        zs_all = (np.arange(nz) - (nz - 1) / 2.0) * sz / R
        z_mid = float(zs_all[z_index])
        zs = zs_all if spatial_dims == 3 else zs_all[z_index:z_index + 1]
    else:
        z_mid = 0.0
        zs = np.zeros(1)
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")
    xyz = np.stack([X.ravel(), Y.ravel(), Z.ravel()]).astype(np.float32)
    x, y, z = xyz
    basis = np.stack([x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z])
    basis = basis.astype(np.float32)
    out_shape = (nx, ny, len(zs)) if spatial_dims == 3 else (nx, ny)
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = sx, sy, sz
    affine[:3, 3] = [-(nx - 1) / 2.0 * sx, -(ny - 1) / 2.0 * sy,
                     -(nz - 1) / 2.0 * sz if len(shape) == 3 else 0.0]
    if spatial_dims == 2:   # a notional 1 mm slice at the middle slice's position
        affine[2, 2] = 1.0
        affine[2, 3] = z_mid * R
    for a in (xyz, basis, affine):
        a.setflags(write=False)
    vox = float(np.mean([sx, sy] + ([sz] if spatial_dims == 3 else []))) / R
    return _Grid(out_shape, (float(sx), float(sy), float(sz)), float(R), vox, z_mid, xyz, basis, affine)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return Rz @ Rx @ Ry


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d <= -width/2, 1 for d >= width/2, linear between."""
    return np.clip(0.5 + d * (1.0 / width), 0.0, 1.0)


# ------------------------------------------------------------------------ parameters

def _class_of(seed: int, index: int) -> str:
    k = len(CLASSES)
    block, pos = divmod(index, k)
    perm = _rng(seed, block, _S_CLASS).permutation(k)
    return CLASSES[int(perm[pos])]


def _draw_metadata(seed: int, index: int, cls: str) -> tuple[dict, dict]:
    """(true values, recorded metadata with fields missing at random)."""
    g = _rng(seed, index, _S_META)
    age = float(np.clip(g.normal(_AGE_MEAN[cls], 14.0), 18.0, 95.0))
    age = round(age, 1)
    sex = "M" if g.random() < _P_MALE[cls] else "F"
    u = g.random()
    smoking = "unknown" if u < 0.15 else ("yes" if g.random() < _P_SMOKER[cls] else "no")
    true = {"age": age, "sex": sex, "smoking": smoking}
    miss = {k: g.random() < p for k, p in _META_MISSING.items()}
    recorded = {k: v for k, v in true.items() if not miss[k]}
    return true, recorded


def _draw_anatomy(seed: int, index: int, cls: str, age: float, z_mid: float) -> dict:
    g = _rng(seed, index, _S_ANAT)
    U = g.uniform
    s = U(0.88, 1.0)
    axes = [s * U(0.72, 0.80), s * U(0.86, 0.94), s * U(0.74, 0.84)]
    centre = [U(-0.04, 0.04), U(-0.04, 0.04), z_mid + U(-0.04, 0.04)]
    rot = _rotation(math.radians(U(-12, 12)), math.radians(U(-5, 5)), math.radians(U(-4, 4)))
    vs = float(np.clip(0.75 + 0.009 * (age - 40.0) + g.normal(0, 0.08), 0.6, 1.45))
    waves = []
    for _ in range(3):
        d = g.normal(size=3)
        d /= np.linalg.norm(d)
        waves.append([float(v) for v in d * U(8.0, 14.0)] + [U(0, 2 * math.pi), U(0.01, 0.035)])
    # lesion
    lo, hi = LESION_SIZE_RANGE[cls]
    r_eq = U(lo, hi)
    la = np.exp(U(-0.2, 0.2, size=3))
    la = la / np.prod(la) ** (1 / 3)
    l_axes = [float(r_eq * v) for v in la]
    dlo, dhi = LESION_DEPTH_RANGE[cls]
    depth = U(dlo, dhi)
    theta = U(0, 2 * math.pi)
    local = np.array([depth * math.cos(theta) * axes[0], depth * math.sin(theta) * axes[1], 0.0])
    l_centre = np.array(centre) + rot @ local
    l_centre[2] = z_mid + U(-0.3, 0.3) * l_axes[2]
    l_rot = _rotation(U(0, 2 * math.pi), math.radians(U(-20, 20)), math.radians(U(-20, 20)))
    tex = []
    for _ in range(2):
        d = g.normal(size=3)
        d /= np.linalg.norm(d)
        tex.append([float(v) for v in d * (math.pi / r_eq) * U(0.8, 1.6)] + [U(0, 2 * math.pi)])
    oedema = float(U(0.3, 1.0)) if g.random() < 0.6 else 0.0
    jitter = {q: float(U(0.8, 1.2)) for q in SEQUENCES}
    return {
        "head": {"centre": centre, "axes": axes, "rot": rot.tolist()},
        "ventricle_scale": vs,
        "wm_waves": waves,
        "lesion": {"centre": [float(v) for v in l_centre], "axes": l_axes, "rot": l_rot.tolist(),
                   "r_eq": float(r_eq), "depth": float(depth), "theta": float(theta),
                   "texture": tex, "level_jitter": jitter},
        "oedema": oedema,
    }


def _draw_sequence(seed: int, index: int, seq: str) -> dict:
    g = _rng(seed, index, _S_SEQ, SEQUENCES.index(seq))
    tissue = [float(v * g.uniform(0.95, 1.05)) for v in _TISSUE[seq]]
    scale = float(math.exp(g.uniform(math.log(0.5), math.log(2.0))))
    snr = float(g.uniform(*_SNR[seq]))
    coef = np.concatenate([np.clip(g.normal(0, 0.10, 3), -0.25, 0.25),
                           np.clip(g.normal(0, 0.08, 6), -0.2, 0.2)])
    return {"tissue": tissue, "scale": scale, "snr": snr, "bias": [float(c) for c in coef]}


# --------------------------------------------------------------------------- render

def _fields(anat: dict, grid: _Grid) -> dict[str, np.ndarray]:
    """Layer memberships (overwrite order applied), lesion texture, oedema, lesion rho."""
    xyz = grid.xyz
    h = anat["head"]
    rot = np.asarray(h["rot"], dtype=np.float32)
    local = rot.T @ (xyz - np.asarray(h["centre"], dtype=np.float32)[:, None])
    ax = np.asarray(h["axes"], dtype=np.float32)[:, None]
    pqr = local / ax                               # head-normalised coordinates
    rho = np.sqrt((pqr * pqr).sum(0))
    e = grid.vox / float(np.mean(h["axes"]))       # ~1 voxel in rho units
    wm_edge = np.full_like(rho, 0.68)
    for wx, wy, wz, ph, amp in anat["wm_waves"]:
        wm_edge += np.float32(amp) * np.cos(wx * pqr[0] + wy * pqr[1] + wz * pqr[2] + ph)
    vs = anat["ventricle_scale"]
    vent = np.zeros_like(rho)
    va = np.array([0.10 * vs, 0.34 * math.sqrt(vs), 0.17 * vs], dtype=np.float32)[:, None]
    for side in (-1.0, 1.0):
        c = np.array([side * (0.05 + 0.09 * vs), 0.0, 0.10], dtype=np.float32)[:, None]
        d = (pqr - c) / va
        rv = np.sqrt((d * d).sum(0))
        vent = np.maximum(vent, _ramp((1.0 - rv) * float(va.min()), e))
    le = anat["lesion"]
    lrot = np.asarray(le["rot"], dtype=np.float32)
    dl = xyz - np.asarray(le["centre"], dtype=np.float32)[:, None]
    lloc = lrot.T @ dl
    la = np.asarray(le["axes"], dtype=np.float32)[:, None]
    lq = lloc / la
    lrho = np.sqrt((lq * lq).sum(0))
    les = _ramp((1.0 - lrho) * le["r_eq"], 1.5 * grid.vox)
    masks = [
        _ramp(1.0 - rho, e), _ramp(0.95 - rho, e), _ramp(0.88 - rho, e), _ramp(0.84 - rho, e),
        _ramp(wm_edge - rho, e), vent, les,
    ]
    weights = [None] * len(masks)
    rem = np.ones_like(rho)
    for k in range(len(masks) - 1, -1, -1):
        weights[k] = masks[k] * rem
        rem = rem * (1.0 - masks[k])
    tex = np.ones_like(rho)
    for wx, wy, wz, ph in le["texture"]:
        tex += np.float32(0.03) * np.cos(wx * dl[0] + wy * dl[1] + wz * dl[2] + ph)
    parenchyma = weights[3] + weights[4]
    oed = np.float32(anat["oedema"]) * np.clip((1.8 - lrho) / 0.8, 0.0, 1.0) * parenchyma
    return {"weights": np.stack(weights), "texture": tex, "oedema": oed, "lesion_rho": lrho}


def _render(seq: str, cls: str, anat: dict, sp: dict, f: dict, grid: _Grid,
            noise_rng: np.random.Generator) -> np.ndarray:
    """Noisy intensity image (float32, flat) of one sequence."""
    scalp, skull, csf, gm, wm = sp["tissue"]
    code = class_contrast_table()[cls][seq]
    if code == 0:
        lesion = wm
    else:
        lesion = _LESION[seq][0 if code > 0 else 1] * anat["lesion"]["level_jitter"][seq]
    levels = np.array([scalp, skull, csf, gm, wm, csf, 0.0], dtype=np.float32)
    w = f["weights"]
    img = levels @ w
    img += np.float32(lesion) * w[6] * f["texture"]
    img += np.float32(_OEDEMA[seq]) * f["oedema"]
    bias = np.exp(np.asarray(sp["bias"], dtype=np.float32) @ grid.basis)
    img *= bias * np.float32(sp["scale"])
    sigma = np.float32(sp["scale"] * wm / sp["snr"])
    n = noise_rng.standard_normal((2, img.size), dtype=np.float32)
    n *= sigma
    img += n[0]
    return np.sqrt(img * img + n[1] * n[1])


def _quantise(img: np.ndarray, spatial_dims: int) -> np.ndarray:
    hi = 32767 if spatial_dims == 3 else 65535
    q = np.clip(np.rint(img * np.float32(INTENSITY_SCALE)), 0, hi)
    return q.astype(np.int16 if spatial_dims == 3 else np.uint16)


# --------------------------------------------------------------------------- report

def _pick(g: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(g.integers(len(options)))]


_GENERIC_COMPLAINT = ("headache", "new-onset seizure", "confusion", "dizziness", "visual disturbance",
                      "word-finding difficulty", "unsteadiness", "progressive weakness")
_PRIMARY = ("Known primary lung carcinoma.", "History of breast cancer.", "Known metastatic melanoma.",
            "Background of renal cell carcinoma.", "Known primary colorectal carcinoma, for staging.",
            "Previously treated lung cancer.")
_DISTRACTORS = (
    "Incidental mucosal thickening in the {side} maxillary sinus.",
    "The mastoid air cells are clear.",
    "The orbits are unremarkable.",
    "No extra-axial collection.",
    "Scattered punctate T2 hyperintense foci in the white matter, likely chronic small vessel disease.",
    "Normal flow voids in the major intracranial vessels.",
    "The pituitary gland is normal in size.",
    "Minor motion artefact on some sequences.",
    "The craniocervical junction is unremarkable.",
    "Small arachnoid cyst in the {side} middle cranial fossa, incidental.",
    "No acute infarct elsewhere.",
)
_HAEM_NOUNS = ("haematoma", "haemorrhagic lesion", "intraparenchymal haemorrhage", "focus of haemorrhage")
_NOUNS = ("lesion", "mass", "focal lesion", "intra-axial lesion", "abnormality")
_SIGNAL = {
    ("T1", +1): ("It is hyperintense on T1.", "High T1 signal.", "The lesion shows T1 hyperintensity.",
                 "T1-weighted images show high signal within the lesion."),
    ("T1", -1): ("It is hypointense on T1.", "Low T1 signal.", "The lesion shows T1 hypointensity.",
                 "T1-weighted images show low signal within the lesion."),
    ("T2", +1): ("It is hyperintense on T2.", "High T2 signal.", "The lesion is T2 bright.",
                 "T2-weighted images show high signal."),
    ("T2", -1): ("It is hypointense on T2.", "Low T2 signal.", "The lesion is T2 dark.",
                 "T2-weighted images show low signal."),
}
_WORD = {+1: ("high", "hyperintense"), -1: ("low", "hypointense")}
_IMPRESSION_DEF = {
    "glioma": ("Appearances favour a primary glial neoplasm.", "Likely glioma."),
    "metastasis": ("Findings are in keeping with a metastasis.", "Likely cerebral metastasis."),
    "abscess": ("Appearances are consistent with a cerebral abscess.", "Likely abscess."),
    "necrotic_tumour": ("Likely necrotic high-grade neoplasm.", "Appearances favour a necrotic tumour."),
    "acute_haematoma": ("Acute intraparenchymal haematoma.", "Findings consistent with acute haemorrhage."),
    "early_haematoma": ("Early subacute haematoma.", "Subacute haemorrhage, early stage."),
    "late_haematoma": ("Late subacute haematoma.", "Subacute haemorrhage, late stage."),
}
_IMPRESSION_HEDGE = {
    "tumour": ("Differential includes a primary glial neoplasm and a metastasis.",
               "Solitary intra-axial mass: glioma or metastasis."),
    "ring": ("Differential: abscess versus necrotic neoplasm.",
             "Ring-enhancing lesion: abscess or necrotic tumour."),
    "haem": ("Intraparenchymal haemorrhage of indeterminate age.",
             "Haematoma; follow-up imaging advised to exclude an underlying lesion."),
}
_HEDGE_GROUP = {"glioma": "tumour", "metastasis": "tumour", "abscess": "ring", "necrotic_tumour": "ring",
                "acute_haematoma": "haem", "early_haematoma": "haem", "late_haematoma": "haem"}
_IMPRESSION_GENERIC = ("Solitary intra-axial lesion as described.",
                       "Focal intracranial abnormality, see findings; suggest MDT discussion.",
                       "Single lesion as above; further characterisation recommended.")


def _location(anat: dict, g: np.random.Generator) -> str:
    le = anat["lesion"]
    th = le["theta"]
    p, q = math.cos(th), math.sin(th)       # head-local direction (x: right, y: anterior)
    side = "right" if p > 0 else "left"
    if le["depth"] < 0.2:
        return _pick(g, (f"{side} periventricular white matter", f"{side} deep white matter",
                         f"{side} basal ganglia region" if q >= 0 else f"{side} thalamic region"))
    if q > 0.5:
        lobe = "frontal"
    elif q < -0.5:
        lobe = "occipital"
    else:
        lobe = "parietal" if q >= 0 else "temporal"
    return _pick(g, (f"{side} {lobe} lobe", f"{side} {lobe} white matter", f"{side} {lobe} region"))


def _report(seed: int, index: int, cls: str, true_meta: dict, anat: dict, grid: _Grid,
            present: Sequence[str]) -> str:
    g = _rng(seed, index, _S_REPORT)
    r = g.random
    codes = class_contrast_table()[cls]
    group = _HEDGE_GROUP[cls]
    haem = group == "haem"

    # --- history
    age, sex = int(true_meta["age"]), true_meta["sex"]
    who = _pick(g, ("man", "male", "gentleman") if sex == "M" else ("woman", "female", "lady"))
    complaint = _pick(g, _GENERIC_COMPLAINT)
    cues = []
    if cls == "metastasis" and r() < 0.85:
        cues.append(_pick(g, _PRIMARY))
    elif cls in ("glioma", "necrotic_tumour") and r() < 0.4:
        cues.append(_pick(g, ("No known history of malignancy.", "No prior oncological history.")))
    elif cls == "abscess" and r() < 0.5:
        cues.append(_pick(g, ("Fever and raised inflammatory markers.", "Recent dental infection.",
                              "Pyrexia of unknown origin.", "Recent sinusitis, now febrile.")))
    elif haem and r() < 0.4:
        cues.append(_pick(g, ("Sudden-onset severe headache.", "On anticoagulation.",
                              "History of hypertension.")))
    if true_meta["smoking"] == "yes" and r() < 0.3:
        cues.append(_pick(g, ("Smoker.", "Current smoker.")))
    form = int(g.integers(3))
    if form == 0:
        hist = f"{age}-year-old {who} with {complaint}."
    elif form == 1:
        hist = f"{complaint[0].upper() + complaint[1:]}. {age}{sex}."
    else:
        hist = f"{age}-year-old {who} presenting with {complaint}."
    hist = " ".join([hist] + cues)
    hist_head = _pick(g, ("Clinical history: ", "History: ", "Indication: ", "CLINICAL DETAILS: ", ""))

    # --- technique
    names = {"t1": "T1", "t2": "T2", "dwi": "DWI", "flair": "FLAIR"}
    technique = None
    if r() < 0.8:
        technique = _pick(g, (
            "MRI brain without and with intravenous gadolinium.",
            "Multiplanar multisequence MR imaging of the brain.",
            "Sequences: " + ", ".join(names[m] for m in present) + "." if present else
            "Multiplanar multisequence MR imaging of the brain.",
            "Standard departmental brain protocol including diffusion-weighted imaging.",
        ))

    # --- lesion sentence
    le = anat["lesion"]
    if haem and r() < 0.6:
        noun = _pick(g, _HAEM_NOUNS)
        stage = r()
        if cls == "acute_haematoma" and stage < 0.35:
            noun = "acute " + noun
        elif cls == "early_haematoma" and stage < 0.25:
            noun = "early subacute " + noun
        elif cls == "late_haematoma" and stage < 0.25:
            noun = "late subacute " + noun
        elif cls != "acute_haematoma" and stage < 0.45:
            noun = "subacute " + noun
    else:
        noun = _pick(g, _NOUNS)
    loc = _location(anat, g)
    d = sorted((2.0 * a * grid.R for a in le["axes"]), reverse=True)
    u = r()
    if u < 0.35:
        size = f", measuring {d[0]:.0f} mm"
    elif u < 0.6:
        size = f" ({d[0]:.0f} x {d[1]:.0f} mm)"
    elif u < 0.75:
        size = f", measuring {d[0] / 10:.1f} cm"
    else:
        size = ""
    article = "An" if noun[0] in "aeiou" else "A"
    lesion_sentence = _pick(g, (
        f"There is a {noun} in the {loc}{size}.",
        f"{article} {noun} is seen in the {loc}{size}.",
        f"{article} {noun} is centred on the {loc}{size}.",
    ))
    findings = []
    # --- signal
    says_t1, says_t2 = r() < 0.4, r() < 0.4
    if says_t1 and says_t2 and r() < 0.5:
        w1, w2 = _WORD[codes["t1"]], _WORD[codes["t2"]]
        findings.append(_pick(g, (f"It returns {w1[0]} T1 and {w2[0]} T2 signal.",
                                  f"The lesion is T1 {w1[1]} and T2 {w2[1]}.")))
    else:
        if says_t1:
            findings.append(_pick(g, _SIGNAL[("T1", codes["t1"])]))
        if says_t2:
            findings.append(_pick(g, _SIGNAL[("T2", codes["t2"])]))
    # --- diffusion
    if cls == "abscess":
        if r() < 0.5:
            findings.append(_pick(g, ("There is restricted diffusion.",
                                      "The lesion shows marked diffusion restriction.",
                                      "High DWI signal with low ADC, in keeping with restricted diffusion.")))
    elif cls == "necrotic_tumour":
        if r() < 0.5:
            findings.append(_pick(g, ("No restricted diffusion.",
                                      "There is no diffusion restriction; the centre shows facilitated diffusion.",
                                      "Low central DWI signal without restriction.")))
    elif r() < 0.2:
        findings.append(_pick(g, ("No restricted diffusion.", "No diffusion restriction.")))
    # --- enhancement
    u = r()
    if group == "ring" and u < 0.5:
        findings.append(_pick(g, ("There is peripheral rim enhancement.",
                                  "Smooth ring enhancement following contrast.", "Rim-enhancing margin.")))
    elif cls == "glioma" and u < 0.35:
        findings.append(_pick(g, ("No enhancement.", "There is no appreciable enhancement.",
                                  "Patchy heterogeneous enhancement.")))
    elif cls == "metastasis" and u < 0.35:
        findings.append(_pick(g, ("Avid enhancement.", "Patchy heterogeneous enhancement.",
                                  "Nodular enhancement.")))
    elif haem and u < 0.4:
        findings.append(_pick(g, ("No underlying enhancing lesion.", "No enhancement.",
                                  "No abnormal enhancement.")))
    # --- oedema, mass effect
    if anat["oedema"] > 0.55 and r() < 0.7:
        findings.append(_pick(g, ("There is surrounding vasogenic oedema.", "Moderate perilesional oedema.")))
    elif anat["oedema"] == 0.0 and r() < 0.5:
        findings.append(_pick(g, ("No significant perilesional oedema.", "No surrounding oedema.")))
    if r() < 0.4:
        findings.append(_pick(g, ("Mild local mass effect without midline shift.", "No midline shift.",
                                  "There is effacement of the adjacent sulci.")))
    g.shuffle(findings)
    # --- distractors
    n_dis = int(g.integers(0, 4))
    idx = g.choice(len(_DISTRACTORS), size=n_dis, replace=False) if n_dis else []
    dis = [_DISTRACTORS[int(i)].format(side=_pick(g, ("left", "right"))) for i in idx]
    if true_meta["age"] > 70 and r() < 0.5:
        dis.append("Age-appropriate generalised volume loss.")
    elif r() < 0.3:
        dis.append("The ventricles are normal in size and configuration.")
    body = [lesion_sentence] + findings
    if r() < 0.5:
        body = body + dis
    else:
        body = body[:1] + dis + body[1:]
    # --- impression
    u = r()
    if u < 0.3:
        imp = _pick(g, _IMPRESSION_DEF[cls])
    elif u < 0.6:
        imp = _pick(g, _IMPRESSION_HEDGE[group])
    else:
        imp = _pick(g, _IMPRESSION_GENERIC)

    layout = int(g.integers(3))
    if layout == 0:
        parts = [hist_head + hist]
        if technique:
            parts.append("Technique: " + technique)
        parts.append("Findings: " + " ".join(body))
        parts.append(_pick(g, ("Impression: ", "IMPRESSION: ", "Conclusion: ")) + imp)
        return "\n".join(parts)
    if layout == 1:
        parts = [hist] + ([technique] if technique else []) + body + [imp]
        return " ".join(parts)
    parts = [(hist_head or "History: ") + hist, "FINDINGS: " + " ".join(([technique] if technique else []) + body),
             _pick(g, ("Summary: ", "Conclusion: ", "Opinion: ")) + imp]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass
class SynthCase:
    """One generated case, in memory.

    Attributes:
      case_id: ``synth-00042`` style id.
      index: case index in the cohort.
      images: present image modality -> stored values (int16 ``(X, Y, Z)`` volume,
        or uint16 ``(X, Y)`` key image); intensity = value / INTENSITY_SCALE.
      affine: voxel -> world (mm, RAS) map of the images.
      report: report text, or None when missing.
      labels: ``{"class": ..., "lesion_size": ...}``.
      metadata: recorded clinical fields (some missing at random).
      truth: ground truth: every phantom parameter (``params``), true metadata,
        lesion centre/axes in voxels and mm; :func:`tissue_maps` rebuilds masks.
    """

    case_id: str
    index: int
    images: dict[str, np.ndarray]
    affine: np.ndarray
    report: str | None
    labels: dict[str, str]
    metadata: dict[str, Any]
    truth: dict[str, Any]

    @property
    def label(self) -> str:
        return self.labels["class"]

    def to_case(self) -> Case:
        """As a :class:`mmvae.data.case.Case` with float32 intensities (value / scale)."""
        series = {m: [Series((a.astype(np.float32) / np.float32(INTENSITY_SCALE)), self.affine.copy(),
                             f"synth:{self.case_id}:{m}")] for m, a in self.images.items()}
        return Case(self.case_id, series, self.report, dict(self.labels), dict(self.metadata))


def _check(n_cases, seed, shape, spacing, modalities, missing_prob, report_missing_prob,
           spatial_dims, with_report):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if n_cases is not None and (isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer))
                                or n_cases < 0):
        raise ConfigError(f"n_cases must be a non-negative integer, got {n_cases!r}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 and not (spatial_dims == 2 and len(shape) == 2):
        raise ConfigError(f"shape must have 3 entries (or 2 with spatial_dims=2), got {shape}")
    if min(shape) < 8:
        raise ConfigError(f"shape entries must be >= 8, got {shape}")
    spacing = tuple(float(s) for s in (spacing or ()))
    if not spacing:  # () / None: the default 2 mm isotropic grid
        spacing = (2.0, 2.0, 2.0)
    if len(spacing) not in (2, 3) or len(spacing) < len(shape) or min(spacing) <= 0:
        raise ConfigError(f"spacing must be {len(shape)} positive numbers, got {spacing}")
    modalities = tuple(modalities)
    bad = [m for m in modalities if m not in SEQUENCES]
    if bad:
        raise ConfigError(f"unknown synthetic modalities {bad}; known: {list(SEQUENCES)}")
    if len(set(modalities)) != len(modalities):
        raise ConfigError(f"duplicate modalities in {modalities}")
    if not modalities and not with_report:
        raise ConfigError("no modalities and no report: cases would be empty")
    for name, p in (("missing_prob", missing_prob), ("report_missing_prob", report_missing_prob)):
        if not 0.0 <= float(p) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {p!r}")
    return int(seed), shape, spacing, modalities


def _generate(index: int, seed: int, grid: _Grid, modalities, missing_prob, with_report,
              report_missing_prob, spatial_dims) -> SynthCase:
    cid = _case_id(index)
    cls = _class_of(seed, index)
    true_meta, meta = _draw_metadata(seed, index, cls)
    anat = _draw_anatomy(seed, index, cls, true_meta["age"], grid.z_mid)
    # missingness: one draw per known sequence + report, whatever is requested
    gm = _rng(seed, index, _S_MISSING)
    u = gm.random(len(SEQUENCES) + 2)
    present = [m for m in modalities if u[SEQUENCES.index(m)] >= missing_prob]
    has_report = with_report and u[len(SEQUENCES)] >= report_missing_prob
    if not present and not has_report:
        options = list(modalities) + ([REPORT] if with_report else [])
        keep = options[min(int(u[-1] * len(options)), len(options) - 1)]
        if keep == REPORT:
            has_report = True
        else:
            present = [keep]
    images = {}
    if present:
        f = _fields(anat, grid)
        for m in present:
            sp = _draw_sequence(seed, index, m)
            img = _render(m, cls, anat, sp, f, grid, _rng(seed, index, _S_NOISE, SEQUENCES.index(m)))
            images[m] = _quantise(img, spatial_dims).reshape(grid.shape)
    report = _report(seed, index, cls, true_meta, anat, grid, present) if has_report else None
    r_eq = anat["lesion"]["r_eq"]
    size = "small" if r_eq < SIZE_TERTILES[0] else ("medium" if r_eq < SIZE_TERTILES[1] else "large")
    labels = {"class": cls, "lesion_size": size}
    le = anat["lesion"]
    c_mm = [v * grid.R for v in le["centre"]]
    inv = np.linalg.inv(grid.affine)
    c_vox = (inv @ np.array(c_mm + [1.0]))[:3]
    truth = {
        "case_id": cid, "index": index, "class": cls, "true_metadata": true_meta,
        "modalities": list(present) + ([REPORT] if has_report else []),
        "lesion": {"centre_mm": c_mm, "centre_vox": [float(v) for v in c_vox[:len(grid.shape)]],
                   "axes_mm": [a * grid.R for a in le["axes"]], "radius_mm": r_eq * grid.R},
        "sequences": {m: _draw_sequence(seed, index, m) for m in present},
        "params": anat,
    }
    return SynthCase(cid, index, images, np.array(grid.affine), report, labels, meta, truth)


def generate_case(index: int, seed: int = 0, *, shape: Sequence[int] = (32, 32, 32),
                  spacing: Sequence[float] = (2.0, 2.0, 2.0),
                  modalities: Sequence[str] = ("t1", "t2", "dwi"), missing_prob: float = 0.15,
                  with_report: bool = True, report_missing_prob: float = 0.1,
                  spatial_dims: int = 3) -> SynthCase:
    """Generate case ``index`` of the cohort :func:`make_cohort` would write, in memory."""
    seed, shape, spacing, modalities = _check(index, seed, shape, spacing, modalities, missing_prob,
                                              report_missing_prob, spatial_dims, with_report)
    grid = _grid(shape, spacing, spatial_dims)
    return _generate(int(index), seed, grid, modalities, float(missing_prob), with_report,
                     float(report_missing_prob), spatial_dims)


def tissue_maps(truth: dict, shape: Sequence[int] = (32, 32, 32),
                spacing: Sequence[float] = (2.0, 2.0, 2.0), spatial_dims: int = 3) -> dict[str, np.ndarray]:
    """Recompute the noise-free soft tissue memberships of a case on its image grid.

    ``truth`` is a row of ``synth_truth.jsonl`` (or ``SynthCase.truth``); shape,
    spacing and spatial_dims must be those the cohort was made with. Returns float32
    arrays shaped like the images: ``scalp``, ``skull``, ``csf`` (outer CSF and
    ventricles), ``gm``, ``wm``, ``lesion`` (after the overwrite order, so they sum
    to the head mask), ``brain`` (gm + wm + csf + lesion), ``oedema`` (strength-
    weighted) and ``lesion_rho`` (ellipsoidal radius: 1 on the lesion surface).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in (spacing or ())) or (2.0, 2.0, 2.0)
    grid = _grid(shape, spacing, spatial_dims)
    f = _fields(truth["params"], grid)
    w = f["weights"]
    out = {name: w[k].reshape(grid.shape) for k, name in enumerate(_LAYERS)}
    out["csf"] = out["csf"] + out.pop("ventricle")
    out["brain"] = out["gm"] + out["wm"] + out["csf"] + out["lesion"]
    out["oedema"] = f["oedema"].reshape(grid.shape)
    out["lesion_rho"] = f["lesion_rho"].reshape(grid.shape)
    return out


def read_truth(out_dir: str | os.PathLike) -> dict[str, dict]:
    """case_id -> ground-truth row of a cohort written by :func:`make_cohort`."""
    rows = {}
    for line in (Path(out_dir) / TRUTH_NAME).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["case_id"]] = row
    return rows


def _save(path: Path, array: np.ndarray, affine: np.ndarray, spatial_dims: int) -> None:
    if spatial_dims == 3:
        import nibabel as nib
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(img, str(tmp))
    else:
        from PIL import Image
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(np.ascontiguousarray(array)).save(str(tmp), format="PNG")


def make_cohort(out_dir: str | os.PathLike, n_cases: int, seed: int = 0, *,
                shape: Sequence[int] = (32, 32, 32), spacing: Sequence[float] = (2.0, 2.0, 2.0),
                modalities: Sequence[str] = ("t1", "t2", "dwi"), missing_prob: float = 0.15,
                with_report: bool = True, report_missing_prob: float = 0.1, spatial_dims: int = 3,
                progress: Callable[[int], Any] | None = None) -> Path:
    """Write a synthetic cohort; return the manifest path ``out_dir/manifest.jsonl``.

    Files: ``cases/<id>/<id>_<modality>.nii.gz`` (``.png`` when ``spatial_dims=2``),
    ``manifest.jsonl`` (image rows, then a report row with inline text; labels and
    metadata on the first row of each case) and ``synth_truth.jsonl`` (ground
    truth, see :func:`read_truth`, :func:`tissue_maps`). Each image modality is
    missing with probability ``missing_prob`` and the report with
    ``report_missing_prob``, but every case keeps at least one. Stale image files of
    a re-used ``out_dir`` that the new cohort does not list are removed.
    ``progress(n_done)`` is called after each case. ``shape`` may have 2 entries
    when ``spatial_dims=2`` (the phantom is then cut at its centre); an empty
    ``spacing`` means 2 mm isotropic.
    """
    seed, shape, spacing, modalities = _check(n_cases, seed, shape, spacing, modalities, missing_prob,
                                              report_missing_prob, spatial_dims, with_report)
    grid = _grid(shape, spacing, spatial_dims)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if spatial_dims == 3 else ".png"
    entries: list[ManifestEntry] = []
    truth_lines: list[str] = []
    for i in range(int(n_cases)):
        case = _generate(i, seed, grid, modalities, float(missing_prob), with_report,
                         float(report_missing_prob), spatial_dims)
        cdir = out_dir / "cases" / case.case_id
        rows = []
        for m in SEQUENCES:
            for e in (".nii.gz", ".png"):
                p = cdir / f"{case.case_id}_{m}{e}"
                if (m not in case.images or e != ext) and p.exists():
                    p.unlink()
        for m, arr in case.images.items():
            p = cdir / f"{case.case_id}_{m}{ext}"
            _save(p, arr, case.affine, spatial_dims)
            rows.append(ManifestEntry(case.case_id, m, path=str(p.resolve())))
        if case.report is not None:
            rows.append(ManifestEntry(case.case_id, REPORT, text=case.report))
        rows[0].labels = dict(case.labels)
        rows[0].metadata = dict(case.metadata)
        entries.extend(rows)
        truth_lines.append(json.dumps(case.truth))
        if progress is not None:
            progress(i + 1)
    atomic_write_text(out_dir / TRUTH_NAME, "".join(line + "\n" for line in truth_lines))
    return write_manifest(entries, out_dir / MANIFEST_NAME)
