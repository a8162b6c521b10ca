"""Guards of the server that users depend on, each against the REAL server over real HTTP
(``monailabel start_server``; Slicer's client class where Slicer would call): a queued inference
that waits too long is told so (503) and the server carries on; a checkpoint published while two
inferences run never mixes two models in one result; a label within the voxel limit is taken
without a float64 decode; ids, tags, session ids and archive members cannot reach outside the
studies or session folders; a token signed with the realm's public key as an HMAC secret is
refused; an untrained head is served only when allowed, flagged, and otherwise refused with the fix.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import io
import json
import os
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import jwt
import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from monailabel.client.client import MONAILabelClient, MONAILabelClientException

from app_server import monailabel_server, server_process
from rest import infer, nifti, organ_label, put_label, random_head_checkpoint, stored
from sdfsmis.io.weights import WEIGHTS_NAME
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti

SHAPE = (48, 48, 16)
LONG_SHAPE = (96, 96, 320)  # drawn on 3 slices per organ: the tiny model segments ~270 slices, ~34 batches
LABEL_INFO = [{"name": "liver", "idx": 1}, {"name": "left kidney", "idx": 3}]
QUEUE_TIMEOUT_S = 1
#: 262 M voxels: within the default max_voxels (512 x 512 x 1024); 2 GiB as float64
BIG_SHAPE = (512, 512, 1000)
BIG_AFFINE = np.array([[0.7, 0, 0, -180.0], [0, 0.7, 0, -170.0], [0, 0, 1.0, -600.0], [0, 0, 0, 1]])
LPS = np.diag([-1.0, -1.0, 1.0])  # NRRD's space here, left-posterior-superior; the affines are RAS


def _studies(root: Path, seed: int) -> Path:
    """Two small cases, and a long one with ``root/long_label.nii.gz``: its liver and left kidney
    drawn on their first, middle and last slices (grounded, the organs' whole extent is then
    segmented, slice batch after batch)."""
    studies = root / "studies"
    make_studies(studies, 2, seed=seed, shape=SHAPE)
    image, truth, affine = make_volume(seed + 10, shape=LONG_SHAPE)
    write_nifti(studies / "case_long.nii.gz", np.rint(image).astype(np.int16), affine)
    drawn = np.zeros(LONG_SHAPE, np.uint8)
    for label_id in (1, 3):
        slices = np.flatnonzero((truth == label_id).any(axis=(0, 1)))
        for z in (slices[0], slices[len(slices) // 2], slices[-1]):
            drawn[..., z] = np.where(truth[..., z] == label_id, label_id, 0)
    write_nifti(root / "long_label.nii.gz", drawn, affine)
    return studies


def _submit_support(url: str, root: Path, seed: int) -> None:
    label, affine = organ_label(seed, SHAPE)  # case_000's anatomy
    response = put_label(
        url, "case_000", nifti(root / "support.nii.gz", label, affine), params={"label_info": LABEL_INFO}
    )
    assert response.status_code == 200, response.text


def _slices(shape: tuple[int, int, int], blob: tuple[slice, slice, slice] | None):
    """The z-slices of a uint8 volume, zero but for ``blob`` (label 1), as bytes in file order (x fastest)."""
    for z in range(shape[2]):
        part = np.zeros(shape[:2], np.uint8)
        if blob is not None and blob[2].start <= z < blob[2].stop:
            part[blob[0], blob[1]] = 1
        yield part.tobytes(order="F")


def _gzip_nifti(path: Path, shape: tuple[int, int, int], affine: np.ndarray) -> Path:
    """A uint8 NIfTI of zeros written slice by slice (never the whole volume in memory)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = 352  # single file: 348 header bytes and an empty extension flag
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock + b"\0" * 4)
        for data in _slices(shape, None):
            out.write(data)
    return path


def _gzip_nrrd(path: Path, shape: tuple[int, int, int], affine: np.ndarray, blob) -> tuple[str, bytes]:
    """A gzip NRRD uint8 label (as Slicer writes one) written slice by slice; ``(name, bytes)``."""
    vectors = " ".join("({:g},{:g},{:g})".format(*column) for column in (LPS @ affine[:3, :3]).T)
    header = (
        "NRRD0004\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {shape[0]} {shape[1]} {shape[2]}\nspace directions: {vectors}\nkinds: domain domain domain\n"
        "encoding: gzip\nspace origin: ({:g},{:g},{:g})\n\n".format(*(LPS @ affine[:3, 3]))
    )
    with open(path, "wb") as out:
        out.write(header.encode())
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as packed:
            for data in _slices(shape, blob):
                packed.write(data)
    return path.name, path.read_bytes()


class Call(threading.Thread):
    """A request sent from another thread (as a second client would); ``result`` once it ends."""

    def __init__(self, call: Callable[[], object]):
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.call()
        except Exception as error:  # handed to the test, which asserts on it
            self.error = error

    def outcome(self, timeout: float = 300) -> object:
        self.join(timeout)
        assert not self.is_alive(), "the request did not end in time"
        if self.error is not None:
            raise self.error
        return self.result


def _inferences(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json()["models"]["sdfsmis"]["sdfsmis"]["inferences"]


def _wait_until_running(url: str, count: int, *calls: Call) -> None:
    """Until ``count`` inferences hold a slot; failing if the calls end (or a minute passes) first."""
    deadline = time.time() + 60
    while _inferences(url)["running"] < count:
        assert all(call.is_alive() for call in calls) and time.time() < deadline, "never that many running at once"
        time.sleep(0.05)


def _segment(client: MONAILabelClient, image: str, model: str = "sdfsmis") -> tuple[np.ndarray, dict]:
    """``image`` segmented with case_000's submitted label as the support (Slicer's request)."""
    result, params = client.infer(model, image, {"support": "case_000"})
    return np.asarray(nib.load(result).dataobj), params


def _segment_long(client: MONAILabelClient, root: Path) -> tuple[np.ndarray, dict]:
    """case_long segmented from its own drawn slices, uploaded with the request (Slicer's scribbles path)."""
    result, params = client.infer("sdfsmis", "case_long", {}, label_in=str(root / "long_label.nii.gz"))
    return np.asarray(nib.load(result).dataobj), params


# ---------------------------------------------------------------------------------------------
# a site with a trained SD-FSMIS head and no DPL head, one inference at a time, a short queue wait


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("guards")
    studies = _studies(root, 70)
    _gzip_nifti(studies / "case_big.nii.gz", BIG_SHAPE, BIG_AFFINE)
    random_head_checkpoint(tiny_backbone, root / "model" / WEIGHTS_NAME)
    (root / "tmp").mkdir()  # the server's temp folder: an archive member climbing out of it lands in root
    victim = root / "victim"  # laid out as a session of a store beside this one (another server's, say)
    victim.mkdir()
    (victim / "meta.info").write_text(json.dumps({"name": "victim", "image": str(victim / "gone.nii.gz")}))
    (victim / "kept.txt").write_text("another store's file")
    conf = [
        ("backbone", tiny_backbone),
        ("model_dir", root / "model"),
        ("device", "cpu"),
        ("max_concurrent_infers", 1),
        ("infer_queue_timeout_s", QUEUE_TIMEOUT_S),
    ]
    env = {"TMPDIR": str(root / "tmp"), "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    with monailabel_server(studies, root / "server.log", *conf, env=env) as url:
        _submit_support(url, root, 70)
        yield url, root


def test_a_queued_inference_waiting_past_its_timeout_gets_503_and_the_server_carries_on(site, tmp_path):
    url, root = site
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    long = Call(lambda: _segment_long(client, root))
    _wait_until_running(url, 1, long)

    queued = infer(url, "case_001", {"support": "case_000"})  # waits for the one slot longer than allowed
    still_running = long.is_alive()
    assert queued.status_code == 503, queued.text
    assert f"no inference slot became free within {QUEUE_TIMEOUT_S} s" in queued.json()["detail"]
    assert int(queued.headers["Retry-After"]) > 0
    assert still_running  # it was refused while the slot was taken, not after

    labels, params = long.outcome()
    assert labels.shape == LONG_SHAPE and params["support"]["source"] == "uploaded_label"
    # the waiter that gave up holds neither a slot nor a place in the queue: the next one is served
    assert {k: v for k, v in _inferences(url).items() if k in ("running", "waiting")} == {"running": 0, "waiting": 0}
    labels, params = _segment(client, "case_001")
    assert labels.shape == SHAPE and params["trained"] is True


def test_an_untrained_head_is_refused_naming_the_fix_when_not_allowed(site, tmp_path):
    url, root = site
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    status = client.info()["models"]["dpl"]["dpl"]
    assert status["available"] is False and status["trained"] is False
    with pytest.raises(MONAILabelClientException) as refused:
        client.infer("dpl", "case_001", {"support": "case_000"})
    message = refused.value.msg
    assert message.startswith("Status: 503;"), message
    assert f"no fine-tuned DPL checkpoint at {root / 'model' / 'dpl.safetensors'}" in message
    for fix in ("POST /train/dpl", "--conf dpl_checkpoint PATH", "--conf allow_untrained true"):
        assert fix in message, fix
    assert client.info()["models"]["dpl"]["dpl"]["available"] is False  # nothing half-loaded, still refused


#: The server's extra resident memory while it takes the big label, at most, in bytes per voxel.
#: The label is held as stored (uint8, 1 byte a voxel) and as the int32 ids the app works with
#: (4 bytes), both at once while one becomes the other; the datastore's check and the submit
#: answer read it one after the other: 5 bytes a voxel. A float64 decode needs 8 bytes a voxel
#: for that array alone (plus 4 for the int32 ids made from it): the bound of 8 leaves 3 bytes a
#: voxel (750 MiB here) for the request, the answer and the allocator, and no float64 copy of the
#: whole label fits under it.
BYTES_PER_VOXEL = 8


def test_a_label_within_the_voxel_limit_is_taken_without_a_float64_decode(site, tmp_path):
    url, root = site
    # the server reads an NRRD label first: loading ITK's libraries is not this label's cost
    label, affine = organ_label(71, SHAPE)  # case_001's anatomy
    nrrd_header = {
        "space": "left-posterior-superior",
        "space directions": (LPS @ affine[:3, :3]).T,
        "space origin": LPS @ affine[:3, 3],
    }
    nrrd.write(str(tmp_path / "case_001.nrrd"), label, nrrd_header)
    response = put_label(url, "case_001", ("case_001.nrrd", (tmp_path / "case_001.nrrd").read_bytes()))
    assert response.status_code == 200, response.text

    blob = (slice(200, 300), slice(180, 260), slice(400, 460))
    upload = _gzip_nrrd(tmp_path / "case_big.nrrd", BIG_SHAPE, BIG_AFFINE, blob)
    voxels = int(np.prod(BIG_SHAPE))
    bound = BYTES_PER_VOXEL * voxels
    process = server_process(url)
    before = peak = process.memory_info().rss
    submit = Call(lambda: put_label(url, "case_big", upload, params={"label_info": LABEL_INFO[:1]}))
    deadline = time.time() + 600
    while submit.is_alive() and peak - before <= bound and time.time() < deadline:
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.01)
    grew = peak - before
    assert grew <= bound, f"the server grew past {BYTES_PER_VOXEL} bytes a voxel ({grew / voxels:.1f} when last seen)"
    response = submit.outcome(timeout=max(1.0, deadline - time.time()))
    assert response.status_code == 200, response.text
    answer = response.json()["sdfsmis"]
    assert answer["support_available"] is True and answer["labels"] == ["liver"]
    assert (root / "studies" / "labels" / "final" / "case_big.nrrd").read_bytes() == upload[1]
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    print(f"\nlabel of {voxels} voxels ({len(upload[1])} bytes of gzip): server grew {grew / voxels:.2f} bytes a voxel")


def _archive(kind: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members.items():
                entry = tarfile.TarInfo(name)
                entry.size = len(data)
                archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def _session_upload(url: str, name: str, data: bytes, uncompress: bool) -> requests.Response:
    return requests.put(
        f"{url}/session/", params={"uncompress": str(uncompress).lower()}, files=[("files", (name, data))], timeout=60
    )


def _image_bytes(root: Path) -> bytes:
    return (root / "studies" / "case_001.nii.gz").read_bytes()


def _label_bytes(root: Path, tmp_path: Path) -> tuple[str, bytes]:
    label, affine = organ_label(70, SHAPE)
    return nifti(tmp_path / "label.nii.gz", label, affine)


# name -> (request, expected status, text the message must hold); `r` is the server's root folder
TRAVERSALS = {
    "label tag that is an absolute path": (
        lambda url, r, t: put_label(url, "case_000", _label_bytes(r, t), tag=str(r / "escape_tag")),
        400,
        "is not allowed: use letters, digits",
    ),
    "label for an image id climbing out of the studies": (
        lambda url, r, t: put_label(url, "../studies/case_000", _label_bytes(r, t)),
        404,
        "image '../studies/case_000' is not in the datastore",
    ),
    "new image whose id is an absolute path": (
        lambda url, r, t: requests.put(
            f"{url}/datastore/image",
            params={"image": str(r / "escape_image")},
            files={"file": ("image.nii.gz", _image_bytes(r))},
            timeout=60,
        ),
        400,
        "is not allowed: use letters, digits",
    ),
    "inference in a session whose id climbs to a session-like folder": (
        lambda url, r, t: requests.post(
            f"{url}/infer/sdfsmis",
            params={"session_id": "../victim", "output": "json"},
            data={"params": "{}"},
            timeout=60,
        ),
        400,
        "session id '../victim' is not allowed",
    ),
    "reading the session '..'": (
        lambda url, r, t: requests.get(f"{url}/session/%2E%2E", timeout=60),
        400,
        "session id '..' is not allowed",
    ),
    "removing the session '..'": (
        lambda url, r, t: requests.delete(f"{url}/session/%2E%2E", timeout=60),
        400,
        "session id '..' is not allowed",
    ),
    "tar session archive with a member climbing out": (
        lambda url, r, t: _session_upload(
            url, "study.tar.gz", _archive("tar", {"a.nii.gz": _image_bytes(r), "../../escape_tar": b"x"}), True
        ),
        400,
        "session archive study.tar.gz refused",
    ),
    "zip session archive with a member climbing out": (
        lambda url, r, t: _session_upload(
            url, "study.zip", _archive("zip", {"a.nii.gz": _image_bytes(r), "../../escape_zip": b"x"}), True
        ),
        400,
        "member '../../escape_zip' would be written outside the session folder",
    ),
}


def _outside(root: Path) -> list[Path]:
    """Files a traversal left where no request may write: anything named *escape* in the test's
    root (the studies and the session store included: no id or tag above may create one there)."""
    return list(root.rglob("*escape*"))


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("case", list(TRAVERSALS))
def test_a_path_in_an_id_tag_or_archive_member_is_refused_and_writes_nothing(site, case, tmp_path):
    url, root = site
    request, status, message = TRAVERSALS[case]
    (root / "sessions").mkdir(exist_ok=True)
    before = stored(root / "studies"), _files(root / "sessions"), _files(root / "victim")
    response = request(url, root, tmp_path)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200  # still serving
    assert (stored(root / "studies"), _files(root / "sessions"), _files(root / "victim")) == before
    assert not _outside(root)


def test_a_session_archive_that_stays_inside_is_unpacked_and_an_upload_keeps_its_base_name(site):
    """The guards refuse only what climbs out: a plain archive makes a session of its files, and
    an uploaded file named with a path is stored under its base name in the session store, never
    written where its path points (here: over a file of the store beside this one)."""
    url, root = site
    victim = _files(root / "victim")
    image = _image_bytes(root)
    for name, kind in (("study.tar.gz", "tar"), ("study.zip", "zip")):
        response = _session_upload(url, name, _archive(kind, {"study/a.nii.gz": image, "b.nii.gz": image}), True)
        assert response.status_code == 200, response.text
        folder = Path(response.json()["session_info"]["image"])
        assert folder.parent.parent == root / "sessions"
        assert _files(folder) == dict.fromkeys(["study/a.nii.gz", "b.nii.gz"], hashlib.sha256(image).hexdigest())
        assert requests.delete(f"{url}/session/{response.json()['session_id']}", timeout=60).status_code == 200
        assert not folder.exists()

    climbing = "../" * 32 + str(root / "victim" / "kept.txt").lstrip("/")  # up to / from any temp folder, down
    response = _session_upload(url, climbing, image, False)
    assert response.status_code == 200, response.text
    stored_as = Path(response.json()["session_info"]["image"])
    assert stored_as.name == "kept.txt" and stored_as.parent.parent == root / "sessions"
    assert stored_as.read_bytes() == image
    assert _files(root / "victim") == victim
    assert requests.delete(f"{url}/session/{response.json()['session_id']}", timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------
# a demo site: untrained heads allowed, two inferences at once, SD-FSMIS served from a file that
# gets replaced by another checkpoint (two random heads, saved by the project's own save path)


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("demo")
    studies = _studies(root, 80)
    served = random_head_checkpoint(tiny_backbone, root / "served" / WEIGHTS_NAME, seed=0)
    random_head_checkpoint(tiny_backbone, root / "staged" / WEIGHTS_NAME, seed=1)
    conf = [
        ("backbone", tiny_backbone),
        ("model_dir", root / "model"),  # holds no DPL head: DPL is served untrained
        ("checkpoint", served),
        ("device", "cpu"),
        ("max_concurrent_infers", 2),
        ("allow_untrained", "true"),
        ("cache_mb", 0),  # every request does its whole work: a repeated one must still be in flight for a while
    ]
    with monailabel_server(studies, root / "server.log", *conf) as url:
        _submit_support(url, root, 80)
        yield url, root


def _publish(checkpoint: Path, served: Path) -> None:
    """Replace the served file atomically, as training publishes its result."""
    partial = served.with_name(served.name + ".partial")
    shutil.copy(checkpoint, partial)
    os.replace(partial, served)


def _agreement(result: np.ndarray, old: np.ndarray, new: np.ndarray) -> str:
    same = {name: int(np.all(result == model, axis=(0, 1)).sum()) for name, model in (("old", old), ("new", new))}
    return f"of {result.shape[2]} slices, {same['old']} are the old model's and {same['new']} the new one's"


def test_a_checkpoint_published_during_two_inferences_never_mixes_two_models(demo_site, tmp_path):
    url, root = demo_site
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    old_long, _ = _segment_long(client, root)  # each alone: what the first checkpoint gives
    old_short, _ = _segment(client, "case_001")

    long = Call(lambda: _segment_long(client, root))
    _wait_until_running(url, 1, long)
    time.sleep(1.0)  # it has its model by now and segments slice after slice
    _publish(root / "staged" / WEIGHTS_NAME, root / "served" / WEIGHTS_NAME)
    short = Call(lambda: _segment(client, "case_001"))
    _wait_until_running(url, 2, long, short)  # both in flight, after the new file is in place
    (during_long, long_params), (during_short, short_params) = long.outcome(), short.outcome()

    new_long, _ = _segment_long(client, root)  # each alone again: what the new checkpoint gives
    new_short, params = _segment(client, "case_001")
    assert params["trained"] is True and long_params["trained"] is True and short_params["trained"] is True
    assert not np.array_equal(new_long, old_long) and not np.array_equal(new_short, old_short)  # new one served
    # each result in flight is wholly one model's, never part one and part the other
    for during, old, new in ((during_long, old_long, new_long), (during_short, old_short, new_short)):
        assert np.array_equal(during, old) or np.array_equal(during, new), _agreement(during, old, new)


def test_an_untrained_head_is_served_when_allowed_and_its_result_says_so(demo_site, tmp_path):
    url, root = demo_site
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    status = client.info()["models"]["dpl"]["dpl"]
    assert status["available"] is True and status["trained"] is False
    result, params = client.infer("dpl", "case_001", {"support": "case_000"})
    assert params["method"] == "dpl" and params["trained"] is False
    assert "untrained" in params["warning"] and "not meaningful" in params["warning"]
    out, image = nib.load(result), nib.load(root / "studies" / "case_001.nii.gz")
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# authentication: a realm answering as Keycloak's /realms/NAME does, served on loopback


@pytest.fixture(scope="module")
def secured_site(tmp_path_factory, tiny_backbone, realm):
    root = tmp_path_factory.mktemp("secured")
    make_studies(root / "studies", 1, seed=90, shape=SHAPE)
    conf = [("backbone", tiny_backbone), ("model_dir", root / "model"), ("device", "cpu")]
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[0]}
    with monailabel_server(root / "studies", root / "server.log", *conf, env=env) as url:
        yield url


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(claims: dict, secret: bytes) -> str:
    """A JWT signed with HMAC-SHA256, built by hand (PyJWT refuses a PEM key as an HMAC secret)."""
    signed = f"{_b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signed}.{_b64url(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"


def test_a_token_signed_with_the_realm_public_key_as_hmac_secret_is_refused(secured_site, realm):
    url, (_, key) = secured_site, realm
    claims = {
        "preferred_username": "mallory",
        "exp": int(time.time() + 600),
        "realm_access": {"roles": ["monailabel-user", "monailabel-annotator", "monailabel-admin"]},
    }
    public = key.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    secrets = {  # the public key as anyone can fetch it from the realm, in the encodings a verifier may use
        "PEM as the server builds it from the realm": (
            f"-----BEGIN PUBLIC KEY-----\n{base64.b64encode(der).decode()}\n-----END PUBLIC KEY-----"
        ).encode(),
        "PEM": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "DER": der,
    }
    for encoding, secret in secrets.items():
        response = requests.get(
            f"{url}/info/", headers={"Authorization": f"Bearer {_hs256(claims, secret)}"}, timeout=30
        )
        assert response.status_code == 401, (encoding, response.status_code, response.text)
        assert "Could not validate credentials" in response.json()["detail"], encoding
    # the same claims signed with the realm's private key pass: the refusal is the algorithm's
    genuine = jwt.encode(claims, key, algorithm="RS256")
    response = requests.get(f"{url}/info/", headers={"Authorization": f"Bearer {genuine}"}, timeout=30)
    assert response.status_code == 200, response.text
