"""A local Orthanc PACS with its DICOMweb plugin, on loopback, for the OHIF flow and its tests,
and the upload of generated DICOM series to any DICOMweb server (STOW-RS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from pydicom.dataset import Dataset

PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
HOW_TO_INSTALL = "install Debian's packages: apt-get install orthanc orthanc-dicomweb"


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed or did not start."""


@dataclass(frozen=True)
class OrthancServer:
    http_port: int
    dicom_port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        """Storage under ``folder``, HTTP and DICOM bound to loopback only, no authentication
        (loopback only), no DICOM peer let in, the DICOMweb plugin at /dicom-web/."""
        plugins = [folder for folder in PLUGIN_FOLDERS if Path(folder).is_dir()]
        if shutil.which("Orthanc") is None or not any(Path(f, "libOrthancDicomWeb.so").exists() for f in plugins):
            raise OrthancUnavailable(f"Orthanc with its DICOMweb plugin is not installed: {HOW_TO_INSTALL}")
        config = {
            "Name": "sdfsmis-orthanc",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpBindAddress": "127.0.0.1",  # honoured by recent Orthanc; RemoteAccessAllowed guards older ones
            "DicomBindAddress": "127.0.0.1",
            # Orthanc 1.10 has no DicomBindAddress and its DICOM port listens on every interface,
            # letting any host store (echo) by default: no peer is let in, as none is declared
            # (uploads go through loopback DICOMweb)
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": "127.0.0.1"},
            "StableAge": 1,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, log: Path | None = None, timeout: float = 30.0) -> subprocess.Popen:
        config = self.write_config()
        out = open(log or self.folder / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        process = subprocess.Popen(["Orthanc", str(config)], stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready(process, timeout)
        return process

    def wait_ready(self, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                log = self.folder / "orthanc.log"
                raise OrthancUnavailable(f"Orthanc exited with code {process.returncode}: see {log}")
            try:
                if requests.get(f"{self.dicomweb}/studies", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise OrthancUnavailable(f"Orthanc did not answer on {self.dicomweb} within {timeout:.0f} s")


def store_instances(datasets: list[Dataset], dicomweb_url: str, batch: int = 32) -> None:
    """STOW-RS the datasets to a DICOMweb server, a few instances per request."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=dicomweb_url.rstrip("/"))
    for start in range(0, len(datasets), batch):
        client.store_instances(datasets[start : start + batch])
