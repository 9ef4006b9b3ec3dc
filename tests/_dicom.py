"""Synthetic DICOM series for tests (pydicom 3): slices with real geometry tags."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(folder: Path, n_slices: int, *, series_number: int = 1, description: str = "T2 TRA",
                 rows: int = 32, cols: int = 32, spacing=(2.0, 2.0), slice_gap: float = 3.0,
                 iop=(1, 0, 0, 0, 1, 0), origin=(-32.0, -32.0, -12.0), tilt=(0.0, 0.0),
                 b_values=(None,), series_uid: str | None = None, image_type=("ORIGINAL", "PRIMARY"),
                 seed: int = 0, start_instance: int = 1) -> Path:
    """Write ``n_slices`` (× ``len(b_values)``) slices into ``folder``; returns the folder.

    ``tilt``: an in-plane offset (mm per slice, along row and column directions) of each
    slice's position, i.e. slices not stacked along the normal (gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uid = series_uid or generate_uid()
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    yy, xx = np.mgrid[:rows, :cols]
    base = 200.0 * np.exp(-(((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) / (2 * (rows / 4) ** 2)))
    inst = start_instance
    for bi, b in enumerate(b_values):
        for k in range(n_slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(folder / f"{inst:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.Modality = "MR"
            ds.SeriesInstanceUID = uid
            ds.StudyInstanceUID = "1.2.3.4"
            ds.SeriesNumber = series_number
            ds.SeriesDescription = description
            ds.InstanceNumber = inst
            ds.ImageType = list(image_type)
            ds.ImageOrientationPatient = [float(x) for x in iop]
            pos = (np.asarray(origin) + normal * slice_gap * k + iop[:3] * tilt[0] * k + iop[3:] * tilt[1] * k)
            ds.ImagePositionPatient = [float(x) for x in pos]
            ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
            ds.SliceThickness = float(slice_gap)
            ds.Rows, ds.Columns = rows, cols
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            if b is not None:
                ds.add_new((0x0018, 0x9087), "FD", float(b))
            img = base * (1.0 + 0.1 * k) * np.exp(-0.001 * (b or 0)) + rng.normal(0, 2, base.shape)
            ds.PixelData = np.clip(img, 0, 65535).astype(np.uint16).tobytes()
            ds.save_as(str(folder / f"{inst:04d}.dcm"), enforce_file_format=True)
            inst += 1
    return folder


def nifti_to_series(nifti: Path, folder: Path) -> Path:
    """Write a NIfTI volume as a DICOM series (one MR slice file per k)."""
    from mmvae.data.synth_dicom import write_series_from_nifti
    return write_series_from_nifti(nifti, folder, description="T2 TRA")
