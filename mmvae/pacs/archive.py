"""A DICOMweb archive (PS3.18: QIDO-RS search, WADO-RS retrieve, STOW-RS store) through
``dicomweb-client``, with one-line errors naming the study and series.

Only what retrieval needs leaves this module: study and series identifiers, the series'
descriptive attributes (for the modality rules) and pixel data written without the
attributes that identify a person (:func:`deidentify`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pydicom
import requests

from mmvae.data.io import dicom_b_value
from mmvae.errors import MmvaeError
from mmvae.pacs.rules import SeriesInfo

__all__ = ["Archive", "PacsError", "StudyNotFound", "ArchiveUnreachable", "StudyInfo", "deidentify", "IDENTIFYING", "RULE_ATTRIBUTES"]

log = logging.getLogger(__name__)

# Attributes that identify a person or can link to one (a subset of PS3.15 Annex E, Table
# E.1-1, "Basic Application Level Confidentiality Profile"), removed from every dataset this
# package writes; private tags and the whole Patient group (0010,xxxx) go too.
IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "AccessionNumber", "StudyID", "RequestAttributesSequence", "ReferencedPatientSequence",
    "IssuerOfPatientID", "PatientInsurancePlanCodeSequence", "CountryOfResidence", "RegionOfResidence",
    "AdditionalPatientHistory", "PatientComments", "ImageComments", "StudyComments", "ContentCreatorName",
)
# Series attributes the modality rules may use (first instance of each series).
RULE_ATTRIBUTES = ("SeriesDescription", "ProtocolName", "ScanningSequence", "SequenceVariant", "SequenceName",
                   "ImageType", "DiffusionBValue", "MRAcquisitionType", "Modality", "ContrastBolusAgent",
                   "EchoTime", "RepetitionTime", "InversionTime")


class PacsError(MmvaeError):
    """The archive or one of its studies/series cannot be used; names study and series."""

    def __init__(self, reason: str, *, study: str | None = None, series: str | None = None):
        self.reason, self.study, self.series = reason, study, series
        where = ", ".join(x for x in ((f"study {study}" if study else ""), (f"series {series}" if series else "")) if x)
        super().__init__((where + ": " if where else "") + reason)


class ArchiveUnreachable(PacsError):
    """The archive does not answer (connection refused, DNS, timeout)."""


class StudyNotFound(PacsError):
    """A study searched for by its StudyInstanceUID is not in the archive."""

    def __init__(self, study: str):
        super().__init__("no such study in the archive", study=study)


@dataclass
class StudyInfo:
    study_uid: str
    accession: str = ""
    study_date: str = ""
    instances: int | None = None        # NumberOfStudyRelatedInstances, when the archive gives it


_IDENTIFYING_TAGS = frozenset(int(t) for t in map(pydicom.datadict.tag_for_keyword, IDENTIFYING) if t is not None)


def deidentify(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Remove, in place and at every nesting level (inside sequences too), the
    :data:`IDENTIFYING` attributes, the Patient (0010,xxxx) and Visit (0038,xxxx) groups and
    every private tag; the file meta's source AE title goes too. A Siemens private b-value
    is first copied to the standard DiffusionBValue (0018,9087), so the loaders' b-value rule
    still works. Returns ``ds``."""
    if "DiffusionBValue" not in ds:
        b = dicom_b_value(ds)          # the loaders' reader: the Siemens private (0019,100C) here
        if b is not None:
            ds.DiffusionBValue = b

    def strip(dataset: pydicom.Dataset) -> None:
        for tag in list(dataset.keys()):
            el = dataset[tag]
            if tag.is_private or tag.group in (0x0010, 0x0038) or int(tag) in _IDENTIFYING_TAGS:
                del dataset[tag]
            elif el.VR == "SQ":
                for item in el.value:
                    strip(item)

    strip(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SourceApplicationEntityTitle" in meta:
        del meta.SourceApplicationEntityTitle
    return ds


def _first(d: dict, keyword: str) -> Any:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    el = d.get(f"{tag:08X}") if tag is not None else None
    if not el or "Value" not in el or not el["Value"]:
        return None
    v = el["Value"]
    if el.get("vr") == "PN":
        return str(v[0].get("Alphabetic", "")) if isinstance(v[0], dict) else str(v[0])
    return v[0] if len(v) == 1 else list(v)


class Archive:
    """One DICOMweb service, e.g. Orthanc's plugin at ``http://127.0.0.1:8042/dicom-web``.

    Args:
      url: the DICOMweb root (QIDO, WADO and STOW under it).
      username, password: HTTP basic authentication (None: none).
      timeout: seconds per HTTP request.
      attempts: tries per request (dicomweb-client's retry with exponential back-off) before a
        refused connection or a 429/408/503/504 answer counts: ArchiveUnreachable / PacsError.
    """

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 timeout: float = 60.0, attempts: int = 5):
        from urllib.parse import urlsplit, urlunsplit

        from dicomweb_client import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"not a DICOMweb URL: {url!r} (expected http(s)://host[:port]/path)")
        if parts.username or parts.password:
            raise PacsError("give credentials with --username and $MMVAE_PACS_PASSWORD, not inside the URL "
                            "(it is stored in the index)")
        if username and password is None:
            raise PacsError(f"--username {username} without a password: set $MMVAE_PACS_PASSWORD")
        self.url = urlunsplit(parts).rstrip("/")
        self._settings = dict(username=username, password=password, timeout=timeout, attempts=attempts)
        session = create_session_from_user_pass(username, password) if username else None
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        self.attempts = int(attempts)
        if self.attempts < 1:
            raise PacsError(f"attempts must be >= 1, got {attempts}")
        # dicomweb-client's retry: exponential back-off from 2 s (2 + 4 + 8 + 16 s for 5 attempts)
        self.client.set_http_retry_params(retry=self.attempts > 1, max_attempts=self.attempts)

    def copy(self) -> "Archive":
        """A new client of the same archive with the same settings (its own HTTP session: one per
        thread of a parallel ingestion)."""
        return type(self)(self.url, **self._settings)

    def close(self) -> None:
        """Close this client's HTTP session."""
        session = getattr(self.client, "_session", None)
        if session is not None:
            session.close()

    def _call(self, what: str, fn: Callable, *args, study: str | None = None, series: str | None = None, **kw):
        from retrying import RetryError      # dicomweb-client's retry: raised when every attempt got a retriable answer
        try:
            return fn(*args, **kw)
        except RetryError as e:
            last = e.last_attempt.value[1] if getattr(e.last_attempt, "has_exception", False) else e.last_attempt.value
            r = getattr(last, "response", last)
            code = f"HTTP {r.status_code} {r.reason}" if hasattr(r, "status_code") else str(last)
            raise PacsError(f"{what} failed after {self.attempts} attempts: {code}", study=study,
                            series=series) from None
        except requests.HTTPError as e:
            r = e.response
            code = f"HTTP {r.status_code} {r.reason}" if r is not None else str(e)
            hint = " (check --username/--password)" if r is not None and r.status_code in (401, 403) else ""
            raise PacsError(f"{what} failed: {code}{hint}", study=study, series=series) from None
        except (requests.ConnectionError, requests.Timeout) as e:
            raise ArchiveUnreachable(f"archive unreachable at {self.url} ({type(e).__name__})", study=study,
                                     series=series) from None
        except requests.RequestException as e:       # bad URL, broken chunked answer, ...
            raise PacsError(f"{what} failed ({type(e).__name__}: {e})", study=study, series=series) from None
        except (ValueError, KeyError, TypeError, pydicom.errors.InvalidDicomError) as e:
            raise PacsError(f"{what}: unexpected answer from the archive ({type(e).__name__}: {e})",
                            study=study, series=series) from None

    # ------------------------------------------------------------------ QIDO-RS
    def studies(self, study_uids: Sequence[str] | None = None, since: str | None = None) -> list[StudyInfo]:
        """Studies of the archive (all, the given UIDs, or StudyDate ≥ ``since`` = YYYYMMDD), by UID."""
        filters: dict[str, Any] = {}
        if since:
            filters["StudyDate"] = f"{since}-"
        fields = ["AccessionNumber", "StudyDate", "NumberOfStudyRelatedInstances"]
        if study_uids:
            found = []
            for uid in study_uids:
                res = self._call("study search", self.client.search_for_studies, study=uid, fields=fields,
                                 search_filters={**filters, "StudyInstanceUID": uid})
                res = [d for d in res if str(_first(d, "StudyInstanceUID") or "") == uid]   # no wildcard/list matches
                if not res:
                    raise StudyNotFound(uid)
                found += res
        else:
            found = self._call("study search", self.client.search_for_studies, fields=fields,
                               search_filters=filters, get_remaining=True)
        out = {}
        for d in found:
            uid = str(_first(d, "StudyInstanceUID") or "")
            if uid:
                n = _first(d, "NumberOfStudyRelatedInstances")
                out[uid] = StudyInfo(uid, str(_first(d, "AccessionNumber") or ""), str(_first(d, "StudyDate") or ""),
                                     None if n is None else int(n))
        return [out[k] for k in sorted(out)]

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """The study's series with their first instance's :data:`RULE_ATTRIBUTES` (WADO-RS
        metadata), by SeriesNumber."""
        res = self._call("series search", self.client.search_for_series, study_uid, study=study_uid,
                         fields=["SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances", "Modality"])
        out = []
        for d in res:
            uid = str(_first(d, "SeriesInstanceUID") or "")
            meta = self._call("series metadata", self.client.retrieve_series_metadata, study_uid, uid,
                              study=study_uid, series=uid)
            first = meta[0] if meta else {}
            attrs = {kw: _first(first, kw) for kw in RULE_ATTRIBUTES}
            attrs = {k: v for k, v in attrs.items() if v is not None}
            num = _first(d, "SeriesNumber")
            n = _first(d, "NumberOfSeriesRelatedInstances")
            out.append(SeriesInfo(study_uid, uid, str(_first(d, "SeriesDescription") or attrs.get("SeriesDescription") or ""),
                                  None if num is None else int(num), int(n) if n is not None else len(meta), attrs))
        return sorted(out, key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid))

    # ------------------------------------------------------------------ WADO-RS / STOW-RS
    def retrieve(self, study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
        """Every instance of a series (pydicom datasets, as stored)."""
        return self._call("series retrieve", self.client.retrieve_series, study_uid, series_uid,
                          study=study_uid, series=series_uid)

    def write_series(self, study_uid: str, series_uid: str, folder: Path, expect: int | None = None) -> Path:
        """Retrieve a series and write its instances, de-identified (:func:`deidentify`), into
        ``folder`` (created). ``expect``: the instance count the listing gave; a different count
        means the study changed during ingestion (PacsError)."""
        datasets = self.retrieve(study_uid, series_uid)
        if expect is not None and len(datasets) != expect:
            raise PacsError(f"the series changed during ingestion ({expect} instances listed, {len(datasets)} "
                            "retrieved); run the ingestion again", study=study_uid, series=series_uid)
        if not datasets:
            raise PacsError("the series has no instances", study=study_uid, series=series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(datasets):
            deidentify(ds)
            try:
                ds.save_as(folder / f"{i:06d}.dcm", enforce_file_format=True)
            except (ValueError, AttributeError, TypeError) as e:
                raise PacsError(f"cannot write instance {i} ({e})", study=study_uid, series=series_uid) from None
        return folder

    def store(self, datasets: Sequence[pydicom.Dataset]) -> None:
        """STOW-RS: store instances (one request per study)."""
        by_study: dict[str, list] = {}
        for ds in datasets:
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        for uid, group in by_study.items():
            self._call("store", self.client.store_instances, group, study=uid)

    def has_study(self, study_uid: str) -> bool:
        """Whether the archive lists ``study_uid`` (a search by its UID)."""
        try:
            self.studies([study_uid])
            return True
        except StudyNotFound:
            return False
