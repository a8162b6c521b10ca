"""The quick start's demo model step (``apps/demo_model.sh``, sourced by ``apps/quickstart.sh`` and
``apps/ohif_stack.sh``) as a new user runs it: afterwards the app serves BOTH methods trained, so
that DPL, the method a site without a GPU runs, works out of the box."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from monailabel.client import MONAILabelClient

from app_server import monailabel_server

ROOT = Path(__file__).resolve().parents[1]


def test_after_the_demo_model_step_both_methods_are_served_trained(tiny_backbone, tmp_path):
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        "BACKBONE": str(tiny_backbone),  # the suite's tiny backbone: the step's own build is not the point here
        "ITERATIONS": "3",
        "DPL_ITERATIONS": "3",
    }
    step = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f". {ROOT / 'apps' / 'demo_model.sh'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert step.returncode == 0, step.stderr[-3000:]
    published = {path.name for path in (tmp_path / "models" / "app").glob("*.safetensors")}
    assert published == {"sdfsmis.safetensors", "dpl.safetensors"}
    conf = [("backbone", tiny_backbone), ("model_dir", tmp_path / "models" / "app"), ("device", "cpu")]
    with monailabel_server(tmp_path / "studies", tmp_path / "server.log", *conf) as url:
        models = MONAILabelClient(url, tmpdir=str(tmp_path)).info()["models"]
    for method in ("sdfsmis", "dpl"):
        status = models[method][method]
        assert status["available"] is True and status["trained"] is True, (method, status["reason"])
