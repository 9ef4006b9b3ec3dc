"""A real Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) started by the tests on
127.0.0.1 with a temporary storage folder and a generated configuration (free ports)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from mmvae.serve import free_port

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def require_orthanc() -> None:
    """Skip without Orthanc and its DICOMweb plugin, except under CI (MMVAE_REQUIRE_SERVICES=1): fail."""
    if ORTHANC and os.path.exists(DICOMWEB_PLUGIN):
        return
    msg = "Debian orthanc + orthanc-dicomweb are not installed (.ci/run installs them)"
    if os.environ.get("MMVAE_REQUIRE_SERVICES") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


class Orthanc:
    """Orthanc on free loopback ports; ``users``: HTTP basic authentication accounts."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None):
        require_orthanc()
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {"Name": "mmvae-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.port, "HttpBindAddress": "127.0.0.1", "RemoteAccessAllowed": False,
                  "DicomServerEnabled": False, "DicomPort": free_port(),
                  "AuthenticationEnabled": bool(users), "RegisteredUsers": dict(users or {}),
                  "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "StableAge": 1, "HttpTimeout": 60}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.rest = f"http://127.0.0.1:{self.port}"
        self.url = self.rest + "/dicom-web"
        self.auth = next(iter(users.items())) if users else None
        t0 = time.time()
        while True:
            try:
                if requests.get(self.rest + "/system", auth=self.auth, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.time() - t0 > 60:
                self.stop()
                pytest.fail(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def delete_study(self, study_uid: str) -> None:
        """Delete through Orthanc's own REST API (its DICOMweb plugin has no DELETE)."""
        found = requests.post(self.rest + "/tools/lookup", data=study_uid, auth=self.auth, timeout=30).json()
        for item in found:
            if item["Type"] == "Study":
                requests.delete(self.rest + item["Path"], auth=self.auth, timeout=30).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
