"""The archive as source and target of retrieval, against a live Orthanc (tests/_orthanc.py):
studies stored through STOW-RS, ingested (QIDO-RS + WADO-RS), queried by study UID,
ingested again incrementally, after deletion, after a kill; nothing identifying written."""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _kill import kill_when
from _orthanc import Orthanc

from mmvae.cli import main
from mmvae.errors import InputError
from mmvae.data.synth_dicom import write_dicom_studies, write_series_from_nifti
from mmvae.pacs.archive import Archive, PacsError
from mmvae.pacs.ingest import ingest
from mmvae.pacs.query import query_study
from mmvae.pacs.rules import SeriesInfo, load_rules, map_series
from mmvae.retrieval.index import load_index
from mmvae.retrieval.query import Retriever

PROSTATEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "prostatex-dicom" / "ProstateX-0000"


def read_folder(folder) -> list:
    return [pydicom.dcmread(p) for p in sorted(glob.glob(str(Path(folder) / "**" / "*"), recursive=True))
            if os.path.isfile(p)]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_indexed):
    tmp = tmp_path_factory.mktemp("pacs")
    _, c, wd, emb, index_dir = tiny_indexed
    emb_path = tmp / "cohort.npz"
    emb.save(emb_path)
    manifest = Path(c.data.manifest)
    complete = [cid for cid in emb.case_ids if all(emb.present[emb.case_ids.index(cid)][:3])][:5]
    studies = write_dicom_studies(manifest, tmp / "dicom", cases=complete)
    orthanc = Orthanc(tmp / "orthanc")
    archive = Archive(orthanc.url)
    first4 = complete[:4]
    for cid in first4:
        archive.store(read_folder(tmp / "dicom" / cid))
    prostatex = None
    if PROSTATEX.exists():
        ds = read_folder(PROSTATEX)
        archive.store(ds)
        prostatex = {"study_uid": str(ds[0].StudyInstanceUID), "patient": str(ds[0].PatientName)}
    yield {"tmp": tmp, "cohort": manifest.parent, "workdir": wd, "emb": emb_path, "orthanc": orthanc, "archive": archive, "studies": studies,
           "first4": first4, "fifth": complete[4], "prostatex": prostatex}
    orthanc.stop()


def written_files(*folders) -> list[Path]:
    return [Path(p) for f in folders for p in glob.glob(str(Path(f) / "**" / "*"), recursive=True)
            if os.path.isfile(p)]


# ----------------------------------------------------------------------------- rules
def test_rules_map_the_prostatex_series():
    if not PROSTATEX.exists():
        pytest.skip("../shared/data/prostatex-dicom is absent")
    infos = []
    for folder in sorted(PROSTATEX.glob("*/*")):
        ds = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
        infos.append(SeriesInfo("s", str(ds.SeriesInstanceUID), str(ds.SeriesDescription), int(ds.SeriesNumber),
                                len(list(folder.iterdir())),
                                {k: ds.get(k) for k in ("ImageType", "ProtocolName", "ScanningSequence")}))
    chosen, notes = map_series(infos, load_rules(), ["t2", "dwi", "adc"])
    assert {m: s.description for m, s in chosen.items()} == {
        "t2": "t2_tse_tra", "dwi": "ep2d_diff_tra_DYNDISTCALC_BVAL", "adc": "ep2d_diff_tra_DYNDIST_ADC"}
    assert any("t2_tse_sag" in n and "no rule matches" in n for n in notes)
    assert any("ep2d_diff_tra_DYNDIST'" in n and "not used" in n for n in notes)   # acquired multi-b DWI
    # a model without ADC never maps the ADC map to dwi
    chosen, _ = map_series(infos, load_rules(), ["t1", "t2", "dwi"])
    assert chosen["dwi"].description == "ep2d_diff_tra_DYNDISTCALC_BVAL" and "t1" not in chosen


def test_rules_file_errors(tmp_path):
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps({"rules": [{"modality": "t2", "description": "t2("}]}))
    with pytest.raises(Exception, match=r"rule 1: bad regex"):
        load_rules(bad)
    bad.write_text(json.dumps({"rules": [{"description": "t2"}]}))
    with pytest.raises(Exception, match="needs a 'modality'"):
        load_rules(bad)


def test_series_of_one_modality_chosen_by_the_folder_rule():
    """A 3-image localizer described like the T2 does not become the study's T2: among series the
    same rule matches, the folder loader's rule (most images, then the higher SeriesNumber) decides."""
    from mmvae.data.io import series_preference
    loc = SeriesInfo("s", "1.1", "t2_tse_tra", 2, 3)
    t2 = SeriesInfo("s", "1.2", "t2_tse_tra", 5, 24)
    t2_again = SeriesInfo("s", "1.3", "t2_tse_tra", 7, 24)
    chosen, notes = map_series([loc, t2], load_rules(), ["t2"])
    assert chosen["t2"] is t2
    said = " | ".join(notes)
    assert "series 5 't2_tse_tra' (24 images)" in said and "the most images" in said
    assert "series 2 't2_tse_tra' (3 images)" in said and "not used" in said
    chosen, notes = map_series([t2_again, loc, t2], load_rules(), ["t2"])       # a tie: the later series
    assert chosen["t2"] is t2_again and any("then the higher series number" in n for n in notes)
    # the same ranking as a DICOM folder's (mmvae.data.io.choose_series)
    ranked = sorted([loc, t2, t2_again], key=lambda s: series_preference(s.instances, s.number, s.series_uid))
    assert ranked[0] is t2_again and ranked[-1] is loc

# ----------------------------------------------------------------------------- ingest + query
def test_ingest_query_add_delete(env, capsys):
    archive, tmp = env["archive"], env["tmp"]
    idx = tmp / "index-a"
    rep = ingest(archive, env["workdir"], idx, standardize_from=env["emb"], show_progress=False)
    n = 4 + (env["prostatex"] is not None)
    assert len(rep.added) == n and not rep.failed
    index = load_index(idx)
    assert index.size == n
    with Retriever.load(env["workdir"], idx) as r:
        assert index.identity["weights_digest"] == r.weights_digest      # staleness checkable (no warning)
        for cid in env["first4"]:
            st = env["studies"][cid]
            doc = query_study(r, archive, st["study_uid"], k=3)
            assert doc["results"][0]["study_instance_uid"] == st["study_uid"]          # itself first
            assert doc["results"][0]["accession_number"] == st["accession"]
            assert doc["modalities"] == ["t1", "t2", "dwi"]
        if env["prostatex"]:
            doc = query_study(r, archive, env["prostatex"]["study_uid"], k=3)
            assert doc["modalities"] == ["t2", "dwi"] and doc["results"][0]["study_instance_uid"] == env["prostatex"]["study_uid"]
            assert any("t2_tse_tra" in d and "→ t2" in d for d in doc["decisions"])
        st = env["studies"][env["first4"][0]]
        sub = query_study(r, archive, st["study_uid"], modalities=["t2"], k=3)
        assert sub["modalities"] == ["t2"]
    # the CLI form, JSON out
    rc = main(["query", "--pacs", archive.url, "--study", st["study_uid"], "--workdir", str(env["workdir"]),
               "--index", str(idx), "--k", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["results"][0]["study_instance_uid"] == st["study_uid"]
    # idempotent: nothing new, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in written_files(idx)}
    rep = ingest(archive, env["workdir"], idx, show_progress=False)
    assert (rep.added, rep.removed, rep.updated, len(rep.unchanged)) == ([], [], [], n)
    assert {p: p.stat().st_mtime_ns for p in written_files(idx)} == before
    # one study added to the archive: exactly one added
    fifth = env["studies"][env["fifth"]]
    archive.store(read_folder(tmp / "dicom" / env["fifth"]))
    rep = ingest(archive, env["workdir"], idx, show_progress=False)
    assert rep.added == [fifth["study_uid"]] and not rep.removed and load_index(idx).size == n + 1
    # one study deleted from the archive: exactly one removed
    gone = env["studies"][env["first4"][1]]["study_uid"]
    env["orthanc"].delete_study(gone)
    rep = ingest(archive, env["workdir"], idx, show_progress=False)
    assert rep.removed == [gone] and not rep.added and load_index(idx).size == n
    assert gone not in load_index(idx).case_ids
    # privacy: no patient name, ID or birth date in any written file
    secrets = [s[k] for s in env["studies"].values() for k in ("patient_name", "patient_id", "birth_date")]
    secrets += [x.split("^")[1] for x in secrets if "^" in x]
    if env["prostatex"]:
        secrets.append(env["prostatex"]["patient"])
    for p in written_files(idx):
        blob = p.read_bytes()
        for s in secrets:
            assert s.encode() not in blob, f"{s!r} found in {p}"


def test_deidentify_nested_sequences_and_keeps_the_b_value():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from mmvae.pacs.archive import deidentify
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "P123", "19500101"
    ds.AdmissionID, ds.InstitutionName, ds.SeriesDescription = "ADM9", "General Hospital", "ep2d_diff"
    inner = Dataset()
    inner.PatientName, inner.PatientID, inner.PatientBirthDate = "Doe^Jane", "P123", "19500101"
    mod = Dataset()
    mod.ModifiedAttributesSequence = Sequence([inner])
    ds.OriginalAttributesSequence = Sequence([mod])
    ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100C), "IS", "800")
    ds.add_new((0x0029, 0x1010), "OB", b"Doe^Jane in a CSA header")
    deidentify(ds)
    blob = repr(ds)
    assert "Doe" not in blob and "P123" not in blob and "19500101" not in blob and "ADM9" not in blob
    assert "General Hospital" not in blob and not any(t.is_private for t in ds.keys())
    assert float(ds.DiffusionBValue) == 800.0 and ds.SeriesDescription == "ep2d_diff"


def test_archive_url_and_credentials_checks():
    for url, msg in [("ftp://x/dicom-web", "not a DICOMweb URL"), ("http://bob:pw@127.0.0.1:1/dicom-web",
                                                                    "not inside the URL")]:
        with pytest.raises(PacsError, match=msg):
            Archive(url)
    with pytest.raises(PacsError, match="MMVAE_PACS_PASSWORD"):
        Archive("http://127.0.0.1:1/dicom-web", username="bob")


def test_written_series_are_deidentified_and_changes_detected(env, tmp_path):
    archive = env["archive"]
    st = env["studies"][env["first4"][0]]
    series = archive.series(st["study_uid"])
    folder = archive.write_series(st["study_uid"], series[0].series_uid, tmp_path / "s", expect=series[0].instances)
    for ds in read_folder(folder):
        assert "PatientName" not in ds and "PatientID" not in ds and "PatientBirthDate" not in ds
        assert "AccessionNumber" not in ds and not any(t.group == 0x0010 for t in ds.keys())
    with pytest.raises(PacsError, match=r"changed during ingestion \(999 instances listed"):
        archive.write_series(st["study_uid"], series[0].series_uid, tmp_path / "t", expect=999)


def test_killed_ingestion_resumes_to_the_same_index(env):
    tmp, archive = env["tmp"], env["archive"]
    ref = tmp / "index-ref"
    ingest(archive, env["workdir"], ref, standardize_from=env["emb"], show_progress=False)
    killed = tmp / "index-killed"
    kill_when([sys.executable, "-m", "mmvae.cli", "pacs", "ingest", "--url", archive.url, "--workdir",
               str(env["workdir"]), "--index", str(killed), "--standardize-from", str(env["emb"]), "--quiet"],
              killed.exists, timeout=180)
    assert (tmp / ".index-killed.ingest-tmp").exists()          # the killed run's scratch: left behind
    part = load_index(killed)
    total = load_index(ref).size
    assert 1 <= part.size < total, "the kill came after the ingestion had finished"
    rep = ingest(archive, env["workdir"], killed, show_progress=False)
    assert len(rep.added) == total - part.size and not rep.removed
    a, b = load_index(ref), load_index(killed)
    assert sorted(a.case_ids) == sorted(b.case_ids) and not (tmp / ".index-killed.ingest-tmp").exists()
    ids = sorted(a.case_ids)
    np.testing.assert_allclose(a.embeddings(ids)[0], b.embeddings(ids)[0], atol=1e-5)
    # parallel retrieval (--workers): the same index, in the same order, as one worker
    par = tmp / "index-par"
    rep = ingest(archive, env["workdir"], par, standardize_from=env["emb"], show_progress=False, workers=3)
    c = load_index(par)
    assert len(rep.added) == total and c.case_ids == a.case_ids
    assert [c.metadata(x)["source"] for x in c.case_ids] == [a.metadata(x)["source"] for x in a.case_ids]
    np.testing.assert_allclose(c.embeddings(c.case_ids)[0], a.embeddings(a.case_ids)[0], atol=1e-6)
    assert not (tmp / ".index-par.ingest-tmp").exists()
    with pytest.raises(InputError, match="workers"):
        ingest(archive, env["workdir"], par, workers=0, show_progress=False)


# ----------------------------------------------------------------------------- errors
def test_authentication(tmp_path):
    orthanc = Orthanc(tmp_path / "auth", users={"alice": "s3cret"})
    try:
        with pytest.raises(PacsError, match=r"HTTP 401.*--username"):
            Archive(orthanc.url).studies()
        assert Archive(orthanc.url, username="alice", password="s3cret").studies() == []
    finally:
        orthanc.stop()


def test_bad_archive_and_studies(env, tmp_path, capsys):
    from mmvae.serve import free_port
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc = main(["pacs", "ingest", "--url", dead, "--workdir", str(env["workdir"]), "--index", str(tmp_path / "i"),
               "--quiet", "--attempts", "1"])    # the default 5 tries back off for 30 s before saying so
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "archive unreachable" in err and "\n" not in err and not (tmp_path / "i").exists()
    # a study whose series match no rule: named, skipped with --on-error skip, the rest goes on
    man = tmp_path / "scout"
    nifti = sorted(glob.glob(str(env["cohort"] / "cases" / "*" / "*t1*.nii*")))[0]
    write_series_from_nifti(nifti, man, description="localizer", patient={"PatientName": "Scout^Only",
                                                                           "PatientID": "SCOUT1"})
    ds = read_folder(man)
    env["archive"].store(ds)
    uid = str(ds[0].StudyInstanceUID)
    idx = tmp_path / "index"
    good = env["studies"][env["first4"][0]]["study_uid"]     # one good study beside it (ProstateX is ingested elsewhere)
    rep = ingest(env["archive"], env["workdir"], idx, studies=[uid, good], standardize_from=env["emb"],
                 on_error="skip", show_progress=False)
    assert [s for s, _ in rep.failed] == [uid] and "no series matches the modality rules" in rep.failed[0][1]
    assert uid in rep.failed[0][1] and "'localizer'" in rep.failed[0][1]
    assert rep.added == [good] and uid not in load_index(idx).case_ids
    with pytest.raises(PacsError, match=f"study {uid}: no series matches"):
        ingest(env["archive"], env["workdir"], tmp_path / "index2", studies=[uid], standardize_from=env["emb"],
               show_progress=False)
    rc = main(["query", "--pacs", env["archive"].url, "--study", "1.2.3.4", "--workdir", str(env["workdir"]),
               "--index", str(idx)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("study 1.2.3.4: no such study in the archive")
    env["orthanc"].delete_study(uid)
    # standardisation statistics embedded with other weights: stale, refused before any study is read
    from mmvae.retrieval.embed import Embeddings
    emb = Embeddings.load(env["emb"])
    emb.identity = {**emb.identity, "weights_digest": "0" * 64}
    emb.save(tmp_path / "stale.npz")
    with pytest.raises(InputError, match=r"other weights \(000000000000…\).*re-run `mmvae embed"):
        ingest(env["archive"], env["workdir"], tmp_path / "index3", standardize_from=tmp_path / "stale.npz",
               show_progress=False)
    assert not (tmp_path / "index3").exists()


def test_review_page_queries_a_study_in_the_archive(env, tmp_path):
    import requests
    from mmvae.serve import BackgroundServer
    from mmvae.serve.app import create_app
    from mmvae.serve.service import ReviewService
    idx = tmp_path / "index"
    ingest(env["archive"], env["workdir"], idx, standardize_from=env["emb"], show_progress=False)
    service = ReviewService.load(env["workdir"], idx, settings={"k": 3}, archive=env["archive"])
    live = BackgroundServer(create_app(service))
    try:
        assert requests.get(live.url + "/api/info", timeout=30).json()["pacs"] == env["archive"].url
        st = env["studies"][env["first4"][0]]
        doc = requests.post(live.url + "/api/query/pacs", json={"study_uid": st["study_uid"]}, timeout=120).json()
        assert doc["results"][0]["case_id"] == st["study_uid"] and doc["modalities"] == ["t1", "t2", "dwi"]
        assert doc["source"]["accession_number"] == st["accession"] and sorted(doc["query_thumbnails"]) == ["dwi", "t1", "t2"]
        assert any("→ t2" in n for n in doc["notes"])
        png = requests.get(f"{live.url}/api/session/{doc['session']}/thumbnail/t2", timeout=30)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        r = requests.post(live.url + "/api/query/pacs", json={"study_uid": "1.2.3"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == "study 1.2.3: no such study in the archive"
        assert list(service.tmp.iterdir()) == []
    finally:
        live.stop()
        service.close()


def test_local_queries_go_on_while_a_pacs_study_downloads(env, tmp_path):
    """The service lock is not held while the archive is read: with a PACS download held
    open, a query on an indexed case returns; the PACS query then finishes normally."""
    import threading
    from mmvae.serve.service import ReviewService
    idx = tmp_path / "index"
    ingest(env["archive"], env["workdir"], idx, standardize_from=env["emb"], show_progress=False)
    service = ReviewService.load(env["workdir"], idx, settings={"k": 3}, archive=env["archive"])
    arrived, release = threading.Event(), threading.Event()
    real_write = env["archive"].write_series

    def held_write(*a, **kw):            # the real Orthanc download, held until released
        out = real_write(*a, **kw)
        arrived.set()
        assert release.wait(60)
        return out

    service.archive = type("Held", (), {})()
    for name in ("studies", "series", "url"):
        setattr(service.archive, name, getattr(env["archive"], name))
    service.archive.write_series = held_write
    st = env["studies"][env["first4"][0]]
    done: dict = {}

    def pacs_query():
        try:
            done["s"] = service.query_pacs(st["study_uid"])
        except BaseException as e:      # shown by the test, not as a thread warning
            done["e"] = e

    t = threading.Thread(target=pacs_query, daemon=True)
    try:
        t.start()
        assert arrived.wait(120), f"the PACS query never reached the download: {done.get('e')!r}"
        local = service.query_case(service.retriever.index.case_ids[1])   # must not wait for the download
        assert len(local.rounds[0].results) == 3 and t.is_alive()
    finally:
        release.set()
        t.join(180)
    try:
        assert not t.is_alive()
        if "e" in done:
            raise done["e"]
        assert done["s"].rounds[0].results[0].case_id == st["study_uid"]
        assert list(service.tmp.iterdir()) == []          # the study's folders are gone
    finally:
        service.close()


def test_an_archive_busy_on_every_attempt_is_one_pacs_error():
    """dicomweb-client retries a 429/503 answer with back-off; when every attempt gets one it
    raises retrying's RetryError, which becomes one PacsError naming the answer (not a traceback,
    and --on-error skip applies)."""
    import requests
    from retrying import Retrying
    busy = requests.Response()
    busy.status_code, busy.reason = 503, "Service Unavailable"
    archive = Archive("http://127.0.0.1:9/dicom-web", attempts=2)

    def always_busy():
        return Retrying(retry_on_result=lambda r: r.status_code == 503, stop_max_attempt_number=2,
                        wait_fixed=1).call(lambda: busy)
    with pytest.raises(PacsError, match="study search failed after 2 attempts: HTTP 503 Service Unavailable"):
        archive._call("study search", always_busy)
    with pytest.raises(PacsError, match="attempts must be >= 1"):
        Archive("http://127.0.0.1:9/dicom-web", attempts=0)
