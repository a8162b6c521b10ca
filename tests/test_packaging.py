"""The package as a user installs it: a plain (not editable) install of ``lib/`` into a folder of
its own must find its presets without the checkout, from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

LIB = Path(__file__).resolve().parents[1] / "lib"


def test_an_installed_package_finds_its_presets(tmp_path: Path):
    target, workdir, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "lib"
    workdir.mkdir()
    # a clean copy: setuptools would reuse the checkout's build/ folder, with whatever it holds
    shutil.copytree(LIB, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*install, "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import sdfsmis; print(sdfsmis.__file__)"], env=env, cwd=workdir, text=True,
        capture_output=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(target), "the test must run the installed copy"
    made = subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", "make-tiny", "tiny"], env=env, cwd=workdir, text=True,
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    written = yaml.safe_load((workdir / "tiny" / "sdfsmis.yaml").read_text())
    assert written["model"]["resolution"] == 64  # the tiny preset (configs/tiny.yaml), not the paper's 256
    assert (workdir / "tiny" / "unet" / "config.json").is_file()
