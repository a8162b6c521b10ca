"""Start and stop the REAL MONAI Label server on loopback, as a user does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

APP = Path(__file__).resolve().parents[1] / "sdfsmis_app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def monailabel_server(studies: Path, log: Path, *conf: tuple[str, str], env: dict | None = None):
    """``monailabel start_server --app sdfsmis_app ...``; yields the URL once /info/ answers."""
    port = free_port()
    bindir = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [os.path.join(bindir, "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies)]
    for key, value in conf:
        command += ["--conf", key, str(value)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/info/", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # answering, e.g. 401 with authentication enabled
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        with suppress(ProcessLookupError):  # a server that failed to start has exited already
            os.killpg(process.pid, 15)
        process.wait(timeout=30)


def server_process(url: str) -> psutil.Process:
    """The process of a server started by :func:`monailabel_server` (a child of this one that
    listens on the port of ``url``), e.g. to watch its memory."""
    port = int(url.rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp")):
                return child
    raise LookupError(f"no child process of this one listens on {url}")
