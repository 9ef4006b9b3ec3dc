"""The case data model: what one clinical case holds before preprocessing.

A *case* has an id, zero or more *series* per imaging modality, an optional
report text, optional labels (ground truth for retrieval metrics) and optional
clinical metadata. Any part may be missing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Series:
    """One image series.

    Attributes:
      array: voxel values, float32, shape ``(X, Y, Z)`` for volumes or ``(X, Y)``
        for 2D key images, indexed in voxel order ``(i, j, k)``.
      affine: ``(4, 4)`` float64 map from voxel index ``(i, j, k, 1)`` to world
        coordinates in millimetres, RAS+ convention (x: left→Right, y:
        posterior→Anterior, z: inferior→Superior), as in nibabel. For 2D images the
        third column describes a notional 1 mm slice.
      path: the file or folder it came from (for error messages and cache keys).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (lengths of the affine's columns)."""
        sp = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in sp[: self.array.ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclasses.dataclass
class Case:
    """One clinical case.

    Attributes:
      case_id: unique id within a cohort.
      series: modality name → list of series (a modality may have several).
      report: free-text report, or None when missing.
      labels: label name → value (strings), e.g. ``{"class": "abscess"}``.
      metadata: clinical fields, e.g. ``{"age": 63.0, "sex": "F"}``; missing fields absent.
    """

    case_id: str
    series: dict[str, list[Series]] = dataclasses.field(default_factory=dict)
    report: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def modalities(self) -> list[str]:
        """Names of the modalities this case has (image modalities, then 'report')."""
        out = [m for m, s in self.series.items() if s]
        if self.report:
            out.append("report")
        return out
