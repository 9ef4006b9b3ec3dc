"""Query the archive by example: a DICOMweb PACS (e.g. Orthanc) as source and target of retrieval.

* :class:`~mmvae.pacs.archive.Archive` — QIDO-RS / WADO-RS / STOW-RS through ``dicomweb-client``.
* :mod:`~mmvae.pacs.rules` — which series is which modality (stated rules, logged decisions).
* :func:`~mmvae.pacs.ingest.ingest` — index an archive's studies, incrementally and crash-safely.
* :func:`~mmvae.pacs.query.query_study` — query with a study that lives in the archive.

The command line is ``mmvae pacs ingest`` and ``mmvae query --pacs URL --study UID``;
docs/pacs.md has the commands for a local Orthanc.
"""
