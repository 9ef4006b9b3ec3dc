"""A synthetic cohort written as DICOM studies (one study per case, one MR series per sequence),
e.g. to fill a test PACS. Geometry is exact: the NIfTI affine (RAS) becomes DICOM's LPS
ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so a loaded series matches the
NIfTI volume voxel for voxel (values through RescaleSlope, int16 stored).

Patient attributes are synthetic (``Synthetic^<case>``, ID ``SYN-<case>``, a birth date from
the case's age) so that de-identification can be tested.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from mmvae.data.manifest import group_cases, read_manifest

__all__ = ["write_series_from_nifti", "write_dicom_studies", "SERIES_DESCRIPTIONS"]

# What a scanner would call each synthetic sequence (the PACS modality rules map them back).
SERIES_DESCRIPTIONS = {"t1": "t1_se_tra", "t2": "t2_tse_tra", "dwi": "ep2d_diff_tra_TRACEW", "flair": "t2_tirm_tra_dark-fluid"}


def write_series_from_nifti(nifti: str | os.PathLike, folder: str | os.PathLike, *, study_uid: str | None = None,
                            series_number: int = 1, description: str = "", patient: dict | None = None,
                            study: dict | None = None, image_type=("ORIGINAL", "PRIMARY"),
                            b_value: float | None = None) -> Path:
    """Write a 3-D NIfTI volume as an MR series (one file per slice ``k``) into ``folder``.

    ``patient``/``study``: DICOM keyword → value added to every instance (PatientName,
    AccessionNumber, StudyDate, ...). Values are stored as int16 with ``RescaleSlope`` =
    max|v| / 30000 (1 for integer volumes within int16)."""
    import nibabel as nib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"{nifti}: expected a 3-D volume, got shape {data.shape}")
    top = float(np.max(np.abs(data))) or 1.0
    integral = np.allclose(data, np.round(data)) and top <= 32767
    slope = 1.0 if integral else top / 30000.0
    arr = np.round(data / slope).astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = np.concatenate([lps[:3, 0] / sx, lps[:3, 1] / sy])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(arr.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", int(series_number), k + 1
        ds.SeriesDescription = ds.ProtocolName = description
        ds.ImageType = list(image_type)
        if b_value is not None:
            ds.DiffusionBValue = float(b_value)
        for kw, v in {**(patient or {}), **(study or {})}.items():
            setattr(ds, kw, v)
        ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [round(float(sy), 6), round(float(sx), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return folder


def write_dicom_studies(manifest: str | os.PathLike, out_dir: str | os.PathLike, *,
                        cases: list[str] | None = None) -> dict[str, dict]:
    """Write each case of a synthetic cohort's manifest (or the listed ``cases``) as a DICOM
    study under ``out_dir/<case>/<modality>/``. Returns case id → ``{"study_uid",
    "accession", "patient_name", "patient_id", "birth_date", "folders": {modality: folder}}``."""
    from pydicom.uid import generate_uid

    out = {}
    for i, ce in enumerate(group_cases(read_manifest(manifest))):
        if cases is not None and ce.case_id not in cases:
            continue
        age = float(ce.metadata.get("age", 50) or 50)
        birth = datetime.date(2026 - int(age), 1 + i % 12, 1 + i % 28)
        patient = {"PatientName": f"Synthetic^{ce.case_id}", "PatientID": f"SYN-{ce.case_id}",
                   "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": str(ce.metadata.get("sex", "O"))[:1]}
        study = {"AccessionNumber": f"ACC{i:06d}", "StudyDate": f"2026{1 + i % 12:02d}{1 + i % 28:02d}",
                 "StudyDescription": "MRI brain", "StudyID": str(i + 1)}
        uid = generate_uid()
        folders = {}
        for n, (m, paths) in enumerate(sorted(ce.images.items())):
            dwi = m == "dwi"
            folders[m] = write_series_from_nifti(
                paths[0], Path(out_dir) / ce.case_id / m, study_uid=uid, series_number=n + 1,
                description=SERIES_DESCRIPTIONS.get(m, m), patient=patient, study=study,
                image_type=("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW") if dwi else ("ORIGINAL", "PRIMARY"),
                b_value=1000.0 if dwi else None)
        out[ce.case_id] = {"study_uid": uid, "accession": study["AccessionNumber"],
                           "patient_name": patient["PatientName"], "patient_id": patient["PatientID"],
                           "birth_date": patient["PatientBirthDate"], "folders": folders}
    return out
