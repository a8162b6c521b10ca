"""A Hugging Face Hub endpoint on loopback, answering the requests `huggingface_hub` makes for
``snapshot_download(repo, local_dir=..., allow_patterns=...)`` (read from its own code, v2.4):

- ``GET /api/models/{repo}/revision/{rev}``: JSON with the commit ``sha`` and the ``siblings``;
- ``GET /api/models/{repo}/tree/{sha}?recursive=True&expand=False``: every file (``type``, ``path``,
  ``size``, git ``oid``; for LFS files ``lfs: {oid: sha256, size, pointerSize}``) and folder;
- ``HEAD /{repo}/resolve/{sha}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1), and for LFS
  files ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, the headers ``get_hf_file_metadata`` reads;
- ``GET`` of the same, whole or from ``Range: bytes=N-`` (``206`` + ``Content-Range``), as
  ``http_get`` resumes after a dropped connection.

Faults, per ``repo/path``, reproduce what a real network or mirror does to a file: ``drop_once``
(the first GET sends all but the last 64 KiB, then closes the connection), ``truncate`` (the metadata
announces the whole file, the body is shorter, as a mirror holding a partial copy serves it) and
``corrupt`` (same size, one byte changed). Every request is recorded for the tests to assert on."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")  # what the real repos' .gitattributes put in LFS


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, the ``oid`` the hub lists for every file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file stored in git in place of a large file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    """Repositories ``{repo_id: {path: bytes}}`` served at ``url`` while :func:`serve` runs."""

    repos: dict[str, dict[str, bytes]]
    faults: dict[str, str] = field(default_factory=dict)  # "repo/path" -> drop_once | truncate | corrupt
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def fetched(self, repo_id: str) -> set[str]:
        """Paths of ``repo_id`` whose bytes were requested (GET on ``resolve``)."""
        prefix = f"/{repo_id}/resolve/{self.commit(repo_id)}/"
        return {r.path[len(prefix) :] for r in self.requests if r.method == "GET" and r.path.startswith(prefix)}

    def tree(self, repo_id: str) -> list[dict]:
        files = self.repos[repo_id]
        folders = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
        entries = [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode())} for f in folders]
        for path, data in sorted(files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path.endswith(LFS_SUFFIXES):
                pointer = lfs_pointer(data)
                entry.update(
                    oid=git_blob_sha1(pointer),
                    size=len(data),
                    lfs={"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)},
                )
            entries.append(entry)
        return entries


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    dropped: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _json(self, body: object, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self, code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with lock:
                hub.requests.append(Request(method, path, self.headers.get("Range")))
            api = re.fullmatch(r"/api/models/(.+?)/(revision|tree)/([^/]+)", path)
            if api and method == "GET":
                repo_id, kind, _ = api.groups()
                if repo_id not in hub.repos:
                    return self._not_found("RepoNotFound")
                if kind == "tree":
                    return self._json(hub.tree(repo_id))
                siblings = [{"rfilename": name} for name in sorted(hub.repos[repo_id])]
                return self._json({"id": repo_id, "sha": hub.commit(repo_id), "siblings": siblings})
            for repo_id, files in hub.repos.items():
                resolve = re.fullmatch(rf"/{re.escape(repo_id)}/resolve/([^/]+)/(.+)", path)
                if resolve:
                    if resolve.group(2) not in files:
                        return self._not_found("EntryNotFound")
                    return self._file(method, repo_id, resolve.group(2), files[resolve.group(2)])
            self._not_found("RepoNotFound")

        def _file(self, method: str, repo_id: str, name: str, data: bytes) -> None:
            key = f"{repo_id}/{name}"
            fault = hub.faults.get(key)
            lfs = name.endswith(LFS_SUFFIXES)
            start = 0
            if method == "GET" and (wanted := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
                start = int(wanted.group(1))
            body = data
            if method == "GET" and fault == "corrupt":
                middle = len(data) // 2
                body = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.commit(repo_id))
            self.send_header("ETag", f'"{git_blob_sha1(lfs_pointer(data) if lfs else data)}"')
            if lfs:
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            sent = body[start:]
            if method == "GET" and fault == "truncate":
                sent = sent[: len(sent) // 2]
            self.send_header("Content-Length", str(len(sent)))
            self.end_headers()
            if method == "HEAD":
                return
            with lock:
                drop = fault == "drop_once" and key not in dropped
                dropped.add(key)
            if drop:  # all but the last 64 KiB of the announced bytes, then the connection goes away
                self.wfile.write(sent[: max(len(sent) - 2**16, 0)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(sent)

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve ``hub`` on 127.0.0.1 (a free port) from a thread of this process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
