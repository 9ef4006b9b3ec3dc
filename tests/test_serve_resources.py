"""The review server holds under slow inputs and stops clean (issue 30): a slow upload runs
in a worker with a deadline (``serve.request_timeout_s``) while other requests are answered,
and its files go when the deadline passes; leftovers of dead servers are swept at start; a
SIGTERM'd ``mmvae serve`` removes its temporary folder; a restart right after ``kill -9``
binds the same port.

Uses the session's tiny trained run + index (tests/_tiny_run.py), a real server on
127.0.0.1 and, for the signal tests, ``mmvae serve`` subprocesses with their own TMPDIR.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

from _dicom import write_series

from mmvae.serve import BackgroundServer, free_port
from mmvae.serve.app import create_app
from mmvae.serve.service import ReviewService

TIMEOUT_S = 1.5          # serve.request_timeout_s of the module's server


@pytest.fixture(scope="module")
def served(tiny_indexed):
    _, c, wd, _, index_dir = tiny_indexed
    service = ReviewService.load(wd, index_dir, settings={"k": 5, "request_timeout_s": TIMEOUT_S})
    live = BackgroundServer(create_app(service))
    yield {"service": service, "url": live.url, "workdir": wd, "index": index_dir}
    live.stop()
    service.close()


def many_member_zip(folder: Path, members: int) -> bytes:
    """A valid zipped DICOM series of 16 slices whose files are repeated under ``members``
    names: seconds to unzip and read, though every file is a good slice."""
    series = write_series(folder / "series", 16, rows=16, cols=16)
    blobs = [p.read_bytes() for p in sorted(series.iterdir())]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(members):
            z.writestr(f"series/{i:05d}.dcm", blobs[i % len(blobs)])
    return buf.getvalue()


def wait_until(cond, timeout: float, what: str, step: float = 0.02):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(step)


def test_slow_upload_times_out_while_other_requests_are_served(served, tmp_path):
    service, url = served["service"], served["url"]
    cid = service.retriever.index.case_ids[1]
    body = many_member_zip(tmp_path, 9000)
    got: dict = {}

    def upload():
        t0 = time.time()
        got["r"] = requests.post(url + "/api/query/upload", files={"file_t2": ("series.zip", body)}, timeout=120)
        got["s"] = time.time() - t0

    th = threading.Thread(target=upload)
    th.start()
    wait_until(lambda: any(service.tmp.glob("query-*")), 30, "the upload's folder")
    t0 = time.time()
    q = requests.post(url + "/api/query", json={"case_id": cid}, timeout=30)
    assert q.status_code == 200, q.text
    res = [x["case_id"] for x in q.json()["results"]]
    fb = requests.post(url + "/api/feedback", json={"session": q.json()["session"], "relevant": [res[1]]},
                       timeout=30)
    assert fb.status_code == 200 and fb.json()["round"] == 1
    others_s = time.time() - t0
    upload_running = th.is_alive()
    th.join(120)
    assert upload_running, "the upload ended before the other requests were answered"
    assert others_s < TIMEOUT_S, f"a case query + feedback round took {others_s:.2f}s while an upload ran"
    r = got["r"]
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert "serve.request_timeout_s" in err and "\n" not in err and str(service.tmp) not in err
    assert got["s"] < TIMEOUT_S + 3.0, "answered when the work ended, not at the deadline"
    # the request's files are removed (now, or when the worker reaches its next step)
    wait_until(lambda: not any(service.tmp.glob("query-*")), 15, "the timed-out upload's files to go", 0.1)
    assert requests.get(url + "/api/info", timeout=10).json()["request_timeout_s"] == TIMEOUT_S


def test_leftovers_of_dead_servers_are_swept_at_start(served, tmp_path):
    base = served["service"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"mmvae-serve-{gone.pid}-k2j4"
    (dead / "query-1").mkdir(parents=True)
    (dead / "query-1" / "t2-0000.dcm").write_bytes(b"\0" * 1000)        # a killed server's upload
    live = tmp_path / f"mmvae-serve-{os.getpid()}-x9x9"                 # a running server's folder
    (live / "query-2").mkdir(parents=True)
    other = tmp_path / "mmvae-serve-notes"                              # not a server folder: kept
    other.mkdir()
    s = ReviewService(base.retriever, base.cases, tmp_root=tmp_path)
    try:
        assert not dead.exists()
        assert live.exists() and (live / "query-2").exists() and other.exists()
        assert s.folder.parent == tmp_path and s.folder.name.startswith(f"mmvae-serve-{os.getpid()}-")
        assert s.tmp.parent == s.folder and list(s.tmp.iterdir()) == []
    finally:
        s.close(close_retriever=False)
    assert not s.folder.exists()


def start_cli(served, port: int, tmp_root: Path, *flags: str) -> subprocess.Popen:
    """``mmvae serve`` on ``port`` with TMPDIR=tmp_root, once it answers."""
    env = {**os.environ, "TMPDIR": str(tmp_root)}
    proc = subprocess.Popen([sys.executable, "-m", "mmvae.cli", "serve", "--workdir", str(served["workdir"]),
                             "--index", str(served["index"]), "--port", str(port), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(up, 120, "mmvae serve to answer", 0.2)
    return proc


def server_dirs(root: Path, pid: int) -> list[Path]:
    return sorted(root.glob(f"mmvae-serve-{pid}-*"))


def test_sigterm_removes_the_temporary_folder(served, tmp_path):
    root = tmp_path / "tmp"
    root.mkdir()
    port = free_port()
    proc = start_cli(served, port, root, "--request-timeout-s", "45", "--workers", "1")
    try:
        assert requests.get(f"http://127.0.0.1:{port}/api/info", timeout=10).json()["request_timeout_s"] == 45
        cid = "synth-00001"
        r = requests.post(f"http://127.0.0.1:{port}/api/query", json={"case_id": cid, "modalities": ["t2"]},
                          timeout=60)                     # re-encodes: the case's arrays are cached
        assert r.status_code == 200, r.text
        assert server_dirs(root, proc.pid)
        assert sum(1 for p in root.rglob("*") if p.is_file()) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert list(root.iterdir()) == []


def test_restart_right_after_kill9_binds_and_sweeps(served, tmp_path):
    root = tmp_path / "tmp"
    root.mkdir()
    port = free_port()
    first = start_cli(served, port, root)
    second = None
    with requests.Session() as http:         # a kept-alive connection: the port lingers after the kill
        try:
            assert http.get(f"http://127.0.0.1:{port}/api/info", timeout=10).status_code == 200
            assert server_dirs(root, first.pid)
        finally:
            first.kill()
            first.communicate(timeout=30)
        assert server_dirs(root, first.pid), "kill -9 cannot clean up"
        try:
            second = start_cli(served, port, root)
            assert not server_dirs(root, first.pid), "the dead server's folder was not swept"
            assert server_dirs(root, second.pid)
        finally:
            if second is not None:
                second.terminate()
                second.communicate(timeout=60)
    assert list(root.iterdir()) == []


def test_serve_flags_must_be_positive(capsys):
    from mmvae.cli import main
    for flag in ("--request-timeout-s", "--workers"):
        assert main(["serve", "--workdir", "nowhere", "--index", "nowhere", flag, "0"]) == 2
        assert f"{flag} must be > 0 (got 0" in capsys.readouterr().err
