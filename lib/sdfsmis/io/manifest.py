"""A manifest beside weights carried in by hand: every file of a backbone or checkpoint folder with
its size and sha256, and where the files came from. A hospital that copies weights onto an
air-gapped server checks the copy against it (``sdfsmis verify DIR``), and the app reports which
weights it serves by the manifest's own digest."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 2**20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[Path]:
    """The folder's files, except the manifest and hidden entries (a download's ``.cache``)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def write_manifest(directory: str | Path, source: str, revision: str | None = None) -> Path:
    """Record every file of ``directory`` (path, size, sha256) with its ``source`` (a hub id, or
    how the files were made) and ``revision``; written last, so it describes the finished folder."""
    directory = Path(directory)
    files = [
        {"path": path.relative_to(directory).as_posix(), "size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in _listed_files(directory)
    ]
    manifest = {
        "source": source,
        "revision": revision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_manifest(directory: str | Path) -> list[str]:
    """What differs between ``directory`` and its manifest: one line per missing, resized,
    changed or unlisted file; empty when the folder is exactly what was recorded."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return [f"{path}: no manifest (written by `sdfsmis download`, `sdfsmis make-tiny` and `sdfsmis train`)"]
    try:
        listed = {entry["path"]: entry for entry in json.loads(path.read_text())["files"]}
    except (ValueError, KeyError, TypeError) as error:
        return [f"{path}: not a readable manifest ({error})"]
    problems = []
    for name, entry in listed.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, the manifest says {entry['size']}")
        elif sha256_of(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (the file was changed or corrupted)")
    present = {file.relative_to(directory).as_posix() for file in _listed_files(directory)}
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(listed))]
    return problems


def manifest_identity(directory: str | Path) -> dict | None:
    """Which weights a folder holds, for logs and ``/info/``: source, revision, file count and the
    manifest's own sha256 (one value that changes with any file); None without a manifest."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        return {
            "source": manifest.get("source"),
            "revision": manifest.get("revision"),
            "files": len(manifest.get("files", [])),
            "manifest_sha256": sha256_of(path),
        }
    except (OSError, ValueError):
        return None
