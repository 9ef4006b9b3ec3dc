"""The BraTS cohort's manifest with the report's labels: ``grade`` and ``tumour_volume``.

``tumour_volume`` is the tertile (``small`` / ``medium`` / ``large``) of the tumour volume
measured on each case's ``*_seg`` mask; used by ``experiments/make_report.py`` and
``experiments/real_cohorts.py``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

BRATS_MODALITIES = ["t1", "t1ce", "t2", "flair"]


def tumour_volumes(root: Path, case_ids) -> dict[str, float]:
    """Tumour volume in mL per case: voxels with a non-zero ``*_seg`` label × voxel volume."""
    import nibabel as nib
    out = {}
    for case in case_ids:
        seg = next(iter(sorted((root / case).glob(f"{case}_seg.nii*"))), None)
        if seg is None:
            continue
        img = nib.load(str(seg))
        vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        out[case] = float(np.count_nonzero(np.asarray(img.dataobj))) * vox_ml
    return out


def tertiles(values: dict[str, float]) -> dict[str, str]:
    """``small`` / ``medium`` / ``large`` by rank (equal thirds; ties keep case order)."""
    order = sorted(values, key=lambda c: (values[c], c))
    n = len(order)
    names = ("small", "medium", "large")
    return {c: names[min(2, (3 * i) // n)] for i, c in enumerate(order)}


def brats_manifest(root: Path, path: Path) -> tuple[Path, dict]:
    """Scan a BraTS folder into the manifest ``path`` with the ``tumour_volume`` tertile label added;
    returns the path and, per case, its grade, tumour volume (mL) and tertile."""
    from mmvae.data.manifest import write_manifest
    from mmvae.data.scan import scan_folder
    entries = scan_folder(root, layout="brats", modalities=BRATS_MODALITIES)
    cases = sorted({e.case_id for e in entries})
    vols = tumour_volumes(root, cases)
    terc = tertiles(vols)
    entries = [dataclasses.replace(e, labels={**e.labels, **({"tumour_volume": terc[e.case_id]}
                                                           if e.case_id in terc else {})}) for e in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(entries, path)
    info = {c: {"grade": next((e.labels.get("grade", "") for e in entries if e.case_id == c), ""),
                "tumour_ml": round(vols.get(c, float("nan")), 1), "tumour_volume": terc.get(c, "")} for c in cases}
    return path, info
