"""The review page (``mmvae serve``): its JSON API over real HTTP, and the page driven in a
real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through Selenium).

One tiny model is trained for the module (tests/_tiny_run.py); the app is served by uvicorn
on a free loopback port in a background thread. Browser tests skip when Chromium or its
driver is missing, except under CI (``MMVAE_REQUIRE_SERVICES=1``, set by .ci/run), where they
fail.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from _dicom import nifti_to_series

from mmvae.data.manifest import group_cases, read_manifest
from mmvae.retrieval.feedback import rocchio
from mmvae.serve import BackgroundServer as LiveServer, free_port, is_loopback
from mmvae.serve.app import create_app
from mmvae.serve.service import ReviewService, uncertainty
from mmvae.serve.thumbnails import slice_for_display, window

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_indexed):
    tmp = tmp_path_factory.mktemp("serve")
    _, c, wd, emb, index_dir = tiny_indexed
    service = ReviewService.load(wd, index_dir, settings={"k": 5})
    service_tmp = service.tmp
    live = LiveServer(create_app(service))
    cases = {ce.case_id: ce for ce in group_cases(read_manifest(c.data.manifest))}
    yield {"service": service, "url": live.url, "cases": cases, "tmp": tmp, "workdir": wd, "index": index_dir,
           "manifest": Path(c.data.manifest)}
    live.stop()
    service.close()
    assert not service_tmp.exists(), "the service's temporary folder outlived it"


def complete_case(env):
    for cid, ce in env["cases"].items():
        if len(ce.images) == 3 and ce.report_text:
            return cid, ce
    raise AssertionError("no complete case")


def expected_ids(service, q, lv, exclude, k, modalities=None):
    return [r.case_id for r in service.retriever.search_embedding(q, lv, k=k, exclude=exclude, modalities=modalities)]


def request_files(service) -> list:
    """What requests left in the service's requests folder."""
    return sorted(service.tmp.iterdir())


def post(env, path, **kw):
    return requests.post(env["url"] + path, timeout=60, **kw)


def get(env, path, **kw):
    return requests.get(env["url"] + path, timeout=60, **kw)


# ----------------------------------------------------------------------------- units
def test_display_orientation_and_window():
    vol = np.zeros((4, 5, 3), np.float32)          # RAS: x → left, y → anterior, z → superior
    vol[0, 4, 1] = 10.0                              # right-most, anterior-most voxel of the middle slice
    img = slice_for_display(vol)
    assert img.shape == (5, 4)                       # rows = y, cols = x
    assert img[0, 0] == 10.0                         # anterior at the top, patient's right on the viewer's left
    key = np.arange(6, dtype=np.float32).reshape(3, 2)   # (X=3 cols, Y=2 rows) as load_png stores it
    assert slice_for_display(key).shape == (2, 3)
    u8 = window(np.linspace(0, 100, 101).reshape(1, -1))
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    assert not window(np.full((4, 4), 3.0)).any()   # constant image: black, no division by zero


def test_uncertainty_fields():
    u = uncertainty(np.log(np.array([1.0, 4.0])), np.log(np.array([[0.5, 0.5], [9.0, 9.0]])))
    assert u["mean_variance"] == pytest.approx(2.5) and u["log_det"] == pytest.approx(np.log(4.0))
    assert u["percentile"] == 50.0


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


# ----------------------------------------------------------------------------- JSON API
def test_info_cases_and_case_view(env):
    info = get(env, "/api/info").json()
    assert info["image_modalities"] == ["t1", "t2", "dwi"] and "report" in info["modalities"]
    assert info["index_size"] == 40 and info["k"] == 5
    ids = get(env, "/api/cases", params={"q": "0001"}).json()["cases"]
    assert ids and all("0001" in c for c in ids)
    cid, ce = complete_case(env)
    case = get(env, f"/api/case/{cid}").json()
    assert case["images"] == ["t1", "t2", "dwi"] and case["report_excerpt"].startswith(ce.report_text[:20])
    assert case["labels"] == ce.labels
    png = get(env, f"/api/case/{cid}/thumbnail/t2")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    from PIL import Image
    im = np.asarray(Image.open(io.BytesIO(png.content)))
    assert im.shape == (192, 192) and im.std() > 10           # a real image, not a blank square
    r = get(env, "/api/case/no-such-case")
    assert r.status_code == 404 and "no-such-case" in r.json()["error"]
    assert "/api/query" in get(env, "/openapi.json").json()["paths"]


def test_query_by_indexed_case_matches_the_retriever(env):
    s = env["service"]
    cid, _ = complete_case(env)
    doc = post(env, "/api/query", json={"case_id": cid}).json()
    mu, lv = s.retriever.index.embeddings([cid])
    assert [r["case_id"] for r in doc["results"]] == expected_ids(s, mu[0], lv[0], [cid], 5)
    assert cid not in [r["case_id"] for r in doc["results"]] and doc["round"] == 0
    # a subset of modalities re-encodes the case's files: what Retriever.search gives for them
    sub = post(env, "/api/query", json={"case_id": cid, "modalities": ["t2"]}).json()
    assert sub["modalities"] == ["t2"]
    want = s.retriever.search({"t2": env["cases"][cid].images["t2"]}, k=5, exclude=[cid])
    assert [r["case_id"] for r in sub["results"]] == [r.case_id for r in want]
    # fewer experts in a product of experts: a wider posterior (PoE precisions add)
    assert sub["uncertainty"]["mean_variance"] > doc["uncertainty"]["mean_variance"]


def test_upload_nifti_and_zipped_dicom(env, tmp_path):
    s = env["service"]
    cid, ce = complete_case(env)
    files = [("file_t1", (Path(ce.images["t1"][0]).name, open(ce.images["t1"][0], "rb"))),
             ("file_dwi", (Path(ce.images["dwi"][0]).name, open(ce.images["dwi"][0], "rb")))]
    dicom = nifti_to_series(Path(ce.images["t2"][0]), tmp_path / "t2")
    zpath = tmp_path / "t2.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(dicom.iterdir()):
            z.write(p, f"series/{p.name}")
    files.append(("file_t2", ("t2.zip", open(zpath, "rb"))))
    r = post(env, "/api/query/upload", files=files, data={"report": ce.report_text})
    for _, (_, f) in files:
        f.close()
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["modalities"] == ["t1", "t2", "dwi", "report"]
    assert doc["results"][0]["case_id"] == cid                      # its own files find it first
    want = s.retriever.search({"t1": ce.images["t1"], "t2": [str(dicom)], "dwi": ce.images["dwi"]},
                              ce.report_text, k=5)
    assert [x["case_id"] for x in doc["results"]] == [x.case_id for x in want]
    assert doc["source"]["files"]["t2"] == ["t2.zip"] and sorted(doc["query_thumbnails"]) == ["dwi", "t1", "t2"]
    png = get(env, f"/api/session/{doc['session']}/thumbnail/t2")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert request_files(s) == []                               # uploads removed once encoded


def test_feedback_rounds_follow_rocchio_and_export(env):
    s = env["service"]
    cid, _ = complete_case(env)
    doc = post(env, "/api/query", json={"case_id": cid}).json()
    ids = [r["case_id"] for r in doc["results"]]
    rel, non = ids[3], ids[0]
    doc1 = post(env, "/api/feedback", json={"session": doc["session"], "relevant": [rel], "nonrelevant": [non]}).json()
    mu, lv = s.retriever.index.embeddings([cid, rel, non])
    w = s.retriever.config.retrieval.rocchio
    q1 = rocchio(mu[0], mu[1:2], mu[2:3], w.alpha, w.beta, w.gamma)
    got = [r["case_id"] for r in doc1["results"]]
    assert got == expected_ids(s, q1, lv[0], [cid], 5) and doc1["round"] == 1
    assert got.index(rel) < 3                                              # moved up as marked
    doc2 = post(env, "/api/feedback", json={"session": doc["session"], "relevant": [got[1]]}).json()
    m2 = s.retriever.index.embeddings([got[1]])[0]
    q2 = rocchio(q1, m2, None, w.alpha, w.beta, w.gamma)                     # rounds compound
    assert [r["case_id"] for r in doc2["results"]] == expected_ids(s, q2, lv[0], [cid], 5)
    assert [h["relevant"] for h in doc2["history"]] == [[rel], [got[1]], []]
    rows = list(csv.DictReader(io.StringIO(get(env, f"/api/session/{doc['session']}/export.csv").text)))
    assert len(rows) == 15 and [r["round"] for r in rows[::5]] == ["0", "1", "2"]
    assert {(r["case_id"], r["mark"]) for r in rows if r["mark"]} == {(rel, "relevant"), (non, "nonrelevant"),
                                                                      (got[1], "relevant")}
    js = get(env, f"/api/session/{doc['session']}/export.json").json()
    assert len(js["rows"]) == 15 and js["source"] == {"kind": "case", "case_id": cid}


def test_bad_input_answers_one_line_and_the_server_keeps_running(env, tmp_path):
    s = env["service"]
    cid, ce = complete_case(env)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    r = post(env, "/api/query/upload", files={"file_t2": ("notes.txt", open(bad, "rb"))})
    assert r.status_code == 400 and r.json()["error"].startswith("modality 't2', file 'notes.txt': unsupported")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"\x00" * 100))
    r = post(env, "/api/query/upload", files={"file_t1": ("broken.nii.gz", open(broken, "rb"))})
    err = r.json()["error"]
    assert r.status_code == 400 and "broken.nii.gz" in err and "\n" not in err and "mmvae-serve" not in err
    r = post(env, "/api/query/upload", files={"file_t2": ("x.zip", io.BytesIO(b"PK not a zip"))})
    assert r.status_code == 400 and "x.zip" in r.json()["error"]
    r = post(env, "/api/query/upload", data={"report": "  "})
    assert r.status_code == 400 and "no query modality" in r.json()["error"]
    r = post(env, "/api/query", json={"case_id": cid, "modalities": ["ct"]})
    assert r.status_code == 400 and "'ct'" in r.json()["error"]
    r = post(env, "/api/feedback", json={"session": "nope", "relevant": [cid]})
    assert r.status_code == 404 and "session" in r.json()["error"]
    doc = post(env, "/api/query", json={"case_id": cid}).json()
    r = post(env, "/api/feedback", json={"session": doc["session"], "relevant": ["ghost"]})
    assert r.status_code == 404 and "'ghost'" in r.json()["error"]
    # an upload over the limit: refused from its size, before anything is written
    small = ReviewService(s.retriever, s.cases, settings={"max_upload_mb": 0.01}, tmp_root=tmp_path)
    live = LiveServer(create_app(small))
    try:
        with open(ce.images["t1"][0], "rb") as f:
            r = requests.post(live.url + "/api/query/upload", files={"file_t1": ("big.nii.gz", f.read() * 4)},
                              timeout=60)
        assert r.status_code == 413 and "limit of 0.01 MB" in r.json()["error"]
        assert request_files(small) == []
    finally:
        live.stop()
        small.close(close_retriever=False)
    assert get(env, "/api/info").status_code == 200
    assert request_files(s) == []


def test_upload_limits_zip_members_chunks_and_host(env, tmp_path):
    s = env["service"]

    def zipped(name, members):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for n, data in members:
                z.writestr(n, data)
        return (name, buf.getvalue())

    small = ReviewService(s.retriever, s.cases, settings={"max_upload_mb": 1.0}, tmp_root=tmp_path)
    live = LiveServer(create_app(small))
    try:
        url = live.url + "/api/query/upload"
        # five zips of 0.3 MB unzipped each: under the limit one by one, over it together
        files = [("file_t2", zipped(f"z{i}.zip", [(f"a{i}.dcm", b"\0" * 300_000)])) for i in range(5)]
        r = requests.post(url, files=files, timeout=60)
        assert r.status_code == 413 and "unzipped upload larger than the limit" in r.json()["error"]
        r = requests.post(url, files={"file_t2": zipped("evil.zip", [("../../etc/x.dcm", b"1")])}, timeout=60)
        assert r.status_code == 400 and "points outside the archive" in r.json()["error"]
        good = zipped("bad.zip", [("a.dcm", b"x" * 5000)])
        corrupt = good[1].replace(b"x" * 100, b"y" * 100, 1)          # stored bytes changed: CRC mismatch
        r = requests.post(url, files={"file_t2": ("bad.zip", corrupt)}, timeout=60)
        assert r.status_code == 400 and "not a readable zip file" in r.json()["error"]
        r = requests.post(url, data=(b"x" for _ in range(3)),
                          headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)   # chunked
        assert r.status_code == 411 and "Content-Length" in r.json()["error"]
        r = requests.get(live.url + "/api/info", headers={"Host": "evil.example"}, timeout=30)
        assert r.status_code == 400                                     # DNS rebinding: foreign Host refused
        assert request_files(small) == []
    finally:
        live.stop()
        small.close(close_retriever=False)


def test_cli_serve_refuses_remote_host_and_starts(env):
    from mmvae.cli import main
    assert main(["serve", "--workdir", str(env["workdir"]), "--index", str(env["index"]),
                 "--host", "0.0.0.0"]) == 2
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmvae.cli", "serve", "--workdir", str(env["workdir"]),
                             "--index", str(env["index"]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while True:
            try:
                info = requests.get(f"http://127.0.0.1:{port}/api/info", timeout=2).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() - t0 < 120, "mmvae serve did not answer"
                time.sleep(0.5)
        assert info["index_size"] == 40
        assert "<title>mmvae" in requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


# ----------------------------------------------------------------------------- the page in Chromium
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        msg = "Debian chromium + chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("MMVAE_REQUIRE_SERVICES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=60):
    t0 = time.time()
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        assert time.time() - t0 < timeout, f"timed out waiting for: {script}"
        time.sleep(0.1)


THUMB_STATS = """
return [...document.querySelectorAll('#results img.thumb')].map(img => {
  if (!img.complete || img.naturalWidth === 0) return null;
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0, n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
  return Math.sqrt(s2 / n - (s / n) ** 2);
});"""


def test_page_query_thumbnails_feedback_and_bad_file(env, browser, tmp_path):
    from selenium.webdriver.common.by import By
    s = env["service"]
    cid, _ = complete_case(env)
    browser.get(env["url"] + "/")
    wait_for(browser, "return document.body.dataset.ready")
    browser.find_element(By.ID, "case-search").send_keys(cid)
    browser.find_element(By.ID, "query-case").click()
    wait_for(browser, "return document.body.dataset.round === '0' && !document.body.dataset.busy")
    order0 = browser.execute_script("return [...document.querySelectorAll('#results .result')].map(x => x.dataset.caseId)")
    mu, lv = s.retriever.index.embeddings([cid])
    assert order0 == expected_ids(s, mu[0], lv[0], [cid], 5)
    assert "Posterior spread" in browser.find_element(By.ID, "uncertainty").text
    # every result shows one thumbnail per image sequence it has, and none is blank
    wait_for(browser, "const r = [...document.querySelectorAll('#results .result')]; "
                      "return r.length === 5 && r.every(x => x.dataset.loaded === '1')")
    n_thumbs = sum(len(env["cases"][c].images) for c in order0)
    stats = wait_for(browser, f"const s = (function(){{{THUMB_STATS}}})(); "
                              f"return s.length === {n_thumbs} && s.every(x => x !== null) ? s : null")
    assert min(stats) > 5.0, stats
    # mark two results, search again: the ranking the Rocchio-moved query gives
    rel, non = order0[3], order0[0]
    browser.find_element(By.CSS_SELECTOR, f".result[data-case-id='{rel}'] .mark-relevant").click()
    browser.find_element(By.CSS_SELECTOR, f".result[data-case-id='{non}'] .mark-nonrelevant").click()
    browser.find_element(By.ID, "search-again").click()
    wait_for(browser, "return document.body.dataset.round === '1' && !document.body.dataset.busy")
    order1 = browser.execute_script("return [...document.querySelectorAll('#results .result')].map(x => x.dataset.caseId)")
    means = s.retriever.index.embeddings([rel, non])[0]
    w = s.retriever.config.retrieval.rocchio
    q1 = rocchio(mu[0], means[:1], means[1:], w.alpha, w.beta, w.gamma)
    assert order1 == expected_ids(s, q1, lv[0], [cid], 5)
    assert order1 != order0 and order1.index(rel) < order0.index(rel)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == 2
    if os.environ.get("MMVAE_SCREENSHOT"):
        browser.save_screenshot(os.environ["MMVAE_SCREENSHOT"])
    # a bad file: the loaders' one-line error on the page, and the page still works
    bad = tmp_path / "scan.txt"
    bad.write_text("not an image")
    browser.find_element(By.ID, "file-t1").send_keys(str(bad))
    browser.find_element(By.ID, "query-upload").click()
    wait_for(browser, "return !document.getElementById('error').hidden")
    err = browser.find_element(By.ID, "error").text
    assert "scan.txt" in err and "unsupported file type" in err
    assert get(env, "/api/info").status_code == 200 and request_files(s) == []
