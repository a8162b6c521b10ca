"""Bad input against the REAL server: each case gets a 4xx naming the problem, the server keeps
answering and the datastore is unchanged. The server stays responsive while a long inference
runs, and refuses work beyond its queue with a clear 503."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests

from app_server import monailabel_server
from rest import infer, nifti, organ_label, put_label, random_head_checkpoint, stored
from sdfsmis.io.weights import WEIGHTS_NAME
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti

SHAPE = (48, 48, 16)
SLOW_SHAPE = (96, 96, 240)  # a long volume: 2 labels x 240 slices x 2 supports keep the tiny model busy
LABEL_INFO = [{"name": "liver", "idx": 1}, {"name": "left kidney", "idx": 3}]
MAX_VOXELS = 3_000_000
MAX_UPLOAD_MB = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("bad_inputs")
    studies = root / "studies"
    make_studies(studies, 3, seed=30, shape=SHAPE)
    image, _, affine = make_volume(40, shape=SHAPE, modality="MR")
    write_nifti(studies / "case_mr.nii.gz", image, affine)
    image, _, affine = make_volume(41, shape=SLOW_SHAPE)
    write_nifti(studies / "case_slow.nii.gz", np.rint(image).astype(np.int16), affine)
    # labels placed on disk by hand (the datastore lists them): one empty, one on another grid
    image, label, affine = make_volume(42, shape=SHAPE)
    write_nifti(studies / "case_empty.nii.gz", np.rint(image).astype(np.int16), affine)
    write_nifti(studies / "labels" / "final" / "case_empty.nii.gz", np.zeros(SHAPE, np.uint8), affine)
    write_nifti(studies / "case_grid.nii.gz", np.rint(image).astype(np.int16), affine)
    write_nifti(studies / "labels" / "final" / "case_grid.nii.gz", label[:, :, :10], affine)
    random_head_checkpoint(tiny_backbone, root / "model" / WEIGHTS_NAME)
    conf = [
        ("backbone", tiny_backbone),
        ("model_dir", root / "model"),
        ("device", "cpu"),
        ("max_voxels", MAX_VOXELS),
        ("max_upload_mb", MAX_UPLOAD_MB),
        ("max_concurrent_infers", 1),
        ("max_queued_infers", 1),
    ]
    with monailabel_server(studies, root / "server.log", *conf) as url:
        label, affine = organ_label(30, SHAPE)  # case_000's anatomy: its stored final label, the good support
        response = put_label(
            url, "case_000", nifti(root / "good.nii.gz", label, affine), params={"label_info": LABEL_INFO}
        )
        assert response.status_code == 200, response.text
        yield url, root


def _grid(root: Path, image_id: str) -> np.ndarray:
    return nib.load(root / "studies" / f"{image_id}.nii.gz").affine


def _shifted(affine: np.ndarray, mm: float = 7.0) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += mm
    return moved


def _blob(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    label = np.zeros(shape, dtype=dtype)
    label[10:30, 10:30, 4:12] = 1
    return label


def _nrrd(path: Path, array: np.ndarray, header: dict | None = None) -> tuple[str, bytes]:
    nrrd.write(str(path), array, {"encoding": "gzip", **(header or {})})
    return path.name, path.read_bytes()


def _truncated(upload: tuple[str, bytes]) -> tuple[str, bytes]:
    return upload[0], upload[1][: len(upload[1]) // 2]


# name -> (request, expected status, text the message must hold); `r` is the server's root folder
CASES = {
    "support label empty": (
        lambda url, r: infer(
            url, "case_001", label=nifti(r / "e.nii.gz", np.zeros(SHAPE, np.uint8), _grid(r, "case_001"))
        ),
        422,
        "is empty",
    ),
    "support label of another shape than its image": (
        lambda url, r: infer(url, "case_001", label=nifti(r / "s.nii.gz", _blob((48, 48, 10)), _grid(r, "case_001"))),
        422,
        "has shape (48, 48, 10) but its image",
    ),
    "support label with another affine than its image": (
        lambda url, r: infer(url, "case_001", label=nifti(r / "a.nii.gz", _blob(), _shifted(_grid(r, "case_001")))),
        422,
        "different affines",
    ),
    "2-D query image": (
        lambda url, r: infer(url, file=nifti(r / "q2d.nii.gz", np.ones((48, 48), np.float32), np.eye(4))),
        422,
        "has shape (48, 48): a 3-D volume is expected",
    ),
    "single-slice query image": (
        lambda url, r: infer(url, file=nifti(r / "q1.nii.gz", np.ones((48, 48, 1), np.float32), np.eye(4))),
        422,
        "a 2-D slice, a 3-D volume is expected",
    ),
    "4-D query image": (
        lambda url, r: infer(url, file=nifti(r / "q4d.nii.gz", np.ones((*SHAPE, 2), np.float32), np.eye(4))),
        422,
        "has shape (48, 48, 16, 2): a 3-D volume is expected",
    ),
    "RGB NIfTI query image": (
        lambda url, r: infer(
            url, file=nifti(r / "rgb.nii.gz", np.zeros(SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4))
        ),
        422,
        "RGB",
    ),
    "RGB NRRD support label": (
        lambda url, r: infer(
            url,
            "case_001",
            label=_nrrd(r / "rgb.nrrd", np.zeros((3, *SHAPE), np.uint8), {"kinds": ["RGB-color", *["domain"] * 3]}),
        ),
        422,
        "3 components per voxel",
    ),
    "truncated NIfTI support label": (
        lambda url, r: infer(url, "case_001", label=_truncated(nifti(r / "t.nii.gz", _blob(), _grid(r, "case_001")))),
        422,
        "is not a readable NIfTI or NRRD volume",
    ),
    "truncated NRRD support label": (
        lambda url, r: infer(url, "case_001", label=_truncated(_nrrd(r / "t.nrrd", _blob()))),
        422,
        "is not a readable NIfTI or NRRD volume",
    ),
    "non-image upload": (
        lambda url, r: infer(url, "case_001", label=("label.nii.gz", b"%PDF-1.4 a report, not an image\n" * 50)),
        422,
        "is not a readable NIfTI or NRRD volume",
    ),
    "unknown image id": (lambda url, r: infer(url, "case_999"), 404, "image 'case_999' is not in the datastore"),
    "support param naming an image with no label": (
        lambda url, r: infer(url, "case_001", {"support": "case_002"}),
        400,
        "'case_002' (param 'support') has no final label",
    ),
    "label id not in the support": (
        lambda url, r: infer(url, "case_001", {"support": "case_000", "labels": "2"}),
        422,
        "label ids [2] are not in the support label",
    ),
    "label name not in the support's label_info": (
        lambda url, r: infer(url, "case_001", {"support": "case_000", "labels": "liver,spleen"}),
        400,
        "'spleen' is neither a label id nor a label name of the support: 1 liver, 3 left kidney",
    ),
    "volume beyond max_voxels": (
        lambda url, r: infer(url, file=nifti(r / "huge.nii.gz", np.zeros((200, 200, 100), np.int16), np.eye(4))),
        413,
        f"has 4000000 voxels (shape (200, 200, 100)), more than the limit of {MAX_VOXELS}",
    ),
    "NaN voxels in the query": (
        lambda url, r: infer(url, file=nifti(r / "nan.nii.gz", np.where(_blob() > 0, np.nan, 1.0), np.eye(4))),
        422,
        "contains NaN or infinite voxels",
    ),
    "inf voxels in the support label": (
        lambda url, r: infer(
            url, "case_001", label=nifti(r / "inf.nii.gz", np.where(_blob() > 0, np.inf, 0.0), _grid(r, "case_001"))
        ),
        422,
        "must hold non-negative integer label ids",
    ),
    "upload beyond max_upload_mb": (
        lambda url, r: infer(url, "case_001", label=("big.nii.gz", np.random.default_rng(0).bytes(3 * 2**20))),
        413,
        f"upload too large: the limit is {MAX_UPLOAD_MB} MB",
    ),
    "params naming a server path": (
        lambda url, r: infer(url, "case_001", {"label": "/etc/passwd"}),
        400,
        "params ['label'] are set by the server",
    ),
    "image id with ../": (lambda url, r: infer(url, "../studies/case_000"), 404, "is not in the datastore"),
    "image id that is a server path": (
        lambda url, r: infer(url, str(r / "studies" / "case_001.nii.gz")),
        404,
        "is not in the datastore",
    ),
    "support param naming an unlabelled image, while the image has its own label": (
        lambda url, r: infer(url, "case_000", {"support": "case_002"}),
        400,
        "support image 'case_002' (param 'support') has no final label",
    ),
    "support param naming an unknown image": (
        lambda url, r: infer(url, "case_000", {"support": "case_999"}),
        400,
        "support image 'case_999' (param 'support') is not in the datastore",
    ),
    "support param naming an image whose stored label is empty": (
        lambda url, r: infer(url, "case_000", {"support": "case_empty"}),
        422,
        "support 'case_empty' (param 'support'): support label case_empty.nii.gz is empty",
    ),
    "support param naming an image whose stored label is on another grid": (
        lambda url, r: infer(url, "case_000", {"support": "case_grid"}),
        422,
        "support 'case_grid' (param 'support'): label case_grid.nii.gz has shape (48, 48, 10)",
    ),
    "batch support naming an unlabelled image (asynchronous batch)": (
        lambda url, r: requests.post(f"{url}/batch/infer/sdfsmis", json={"support": "case_002"}),
        400,
        "support image 'case_002' (param 'support') has no final label",
    ),
    "batch support naming an image whose stored label is empty": (
        lambda url, r: requests.post(f"{url}/batch/infer/sdfsmis?run_sync=true", json={"support": "case_empty"}),
        422,
        "support 'case_empty' (param 'support')",
    ),
    "support id with ../": (
        lambda url, r: infer(url, "case_001", {"support": "../studies/case_000"}),
        400,
        "support image '../studies/case_000' (param 'support') is not in the datastore",
    ),
    "session id with ..": (
        lambda url, r: requests.post(
            f"{url}/infer/sdfsmis", params={"session_id": "..", "output": "json"}, data={"params": "{}"}
        ),
        400,
        "session id '..' is not allowed",
    ),
    "batch params naming a server path": (
        lambda url, r: requests.post(f"{url}/batch/infer/sdfsmis?run_sync=true", json={"label": "/etc/passwd"}),
        400,
        "params ['label'] are set by the server",
    ),
    "submitted label truncated": (
        lambda url, r: put_label(url, "case_000", _truncated(nifti(r / "t.nii.gz", _blob(), _grid(r, "case_000")))),
        422,
        "is not a readable NIfTI or NRRD volume",
    ),
    "submitted label of another shape": (
        lambda url, r: put_label(url, "case_000", nifti(r / "s.nii.gz", _blob((48, 48, 10)), _grid(r, "case_000"))),
        422,
        "has shape (48, 48, 10) but its image",
    ),
    "submitted label empty": (
        lambda url, r: put_label(
            url, "case_000", nifti(r / "e.nii.gz", np.zeros(SHAPE, np.uint8), _grid(r, "case_000"))
        ),
        422,
        "the submitted label for 'case_000' is empty",
    ),
    "submitted label beyond max_upload_mb": (
        lambda url, r: put_label(url, "case_000", ("big.nii.gz", np.random.default_rng(1).bytes(3 * 2**20))),
        413,
        "upload too large",
    ),
    "submitted label for an unknown image": (
        lambda url, r: put_label(url, "case_999", nifti(r / "l.nii.gz", _blob(), _grid(r, "case_000"))),
        404,
        "image 'case_999' is not in the datastore",
    ),
    "submitted label with a ../ tag": (
        lambda url, r: put_label(
            url, "case_000", nifti(r / "l.nii.gz", _blob(), _grid(r, "case_000")), tag="../../escape"
        ),
        400,
        "label tag '../../escape' is not allowed",
    ),
    "new image with a ../ id": (
        lambda url, r: requests.put(
            f"{url}/datastore/image",
            params={"image": "../escape"},
            files={"file": nifti(r / "n.nii.gz", _blob(), np.eye(4))},
        ),
        400,
        "image id '../escape' is not allowed",
    ),
    "new image corrupt": (
        lambda url, r: requests.put(
            f"{url}/datastore/image", params={"image": "case_new"}, files={"file": ("n.nii.gz", b"not an image")}
        ),
        422,
        "is not a readable NIfTI or NRRD volume",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_client_error_and_changes_nothing(server, case):
    url, root = server
    request, status, message = CASES[case]
    before = stored(root / "studies")
    response = request(url, root)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=5).status_code == 200  # still serving
    assert stored(root / "studies") == before  # nothing stored, nothing replaced
    assert not list(root.rglob("*escape*"))  # nothing written outside the studies folder


def test_nrrd_label_and_nrrd_query_are_served(server):
    """Slicer uploads NRRD: a submitted NRRD label is stored and serves as a support, an NRRD query is segmented."""
    url, root = server
    affine = _grid(root, "case_002")
    label, _ = organ_label(32, SHAPE)
    flip = np.diag([-1.0, -1.0, 1.0])  # NRRD's space here: left-posterior-superior; one row per axis
    header = {"space": "left-posterior-superior", "space directions": (flip @ affine[:3, :3]).T}
    header["space origin"] = flip @ affine[:3, 3]
    response = put_label(
        url, "case_002", _nrrd(root / "case_002.nrrd", label, header), params={"label_info": LABEL_INFO}
    )
    assert response.status_code == 200, response.text
    assert response.json()["sdfsmis"]["labels"] == ["liver", "left kidney"]
    assert (root / "studies" / "labels" / "final" / "case_002.nrrd").is_file()

    image = nib.load(root / "studies" / "case_001.nii.gz")
    query = _nrrd(root / "query.nrrd", np.asarray(image.dataobj), header)
    response = infer(url, file=query, params={"support": "case_002"})
    assert response.status_code == 200, response.text
    assert response.json()["support"]["image"] == "case_002" and set(response.json()["voxels"]) == {
        "liver",
        "left kidney",
    }


def test_support_of_another_modality_is_served(server):
    """Cross-domain (a CT support, an MR query) is a setting of the paper, not an error: each
    volume is normalised on its own."""
    url, _ = server
    response = infer(url, "case_mr", {"support": "case_000"})
    assert response.status_code == 200, response.text
    assert response.json()["support"]["image"] == "case_000"


def test_server_answers_during_a_long_inference_and_refuses_beyond_its_queue(server):
    url, root = server
    affine = _grid(root, "case_slow")
    support = np.zeros(SLOW_SHAPE, np.uint8)
    for k in range(2):  # two structures drawn on a few slices: each is segmented in all 240 slices, from 2 supports
        support[20 + 15 * k : 30 + 15 * k, 30:50, 100:103] = k + 1
    upload = nifti(root / "slow_label.nii.gz", support, affine)
    results: dict[str, requests.Response] = {}

    def send(name: str, *args, **kwargs) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, infer(url, *args, **kwargs)))
        thread.start()
        return thread

    def inferences() -> dict:
        return requests.get(f"{url}/info/", timeout=5).json()["models"]["sdfsmis"]["sdfsmis"]["inferences"]

    started = time.perf_counter()
    slow = send("slow", "case_slow", label=upload)
    while inferences()["running"] == 0:
        assert slow.is_alive(), results["slow"].text
        time.sleep(0.05)
    queued = send("queued", "case_001", {"support": "case_000"})
    while inferences()["waiting"] == 0:
        time.sleep(0.05)

    refused = infer(url, "case_001", {"support": "case_000"})  # one running, one waiting: the queue is full
    assert (
        refused.status_code == 503 and "server busy: 1 inference(s) running and 1 waiting" in refused.json()["detail"]
    )
    assert refused.headers["Retry-After"]

    # each answer counts when an inference was still running after it came: the server answered
    # while it segmented; the 5 s timeout is a deadline against a blocked server, not a measurement
    latencies: dict[str, list[float]] = {"/info/": [], "/datastore/": []}
    while slow.is_alive() or queued.is_alive():
        for path, seconds in latencies.items():
            sent = time.perf_counter()
            assert requests.get(url + path, timeout=5).status_code == 200
            if inferences()["running"]:
                seconds.append(time.perf_counter() - sent)
        time.sleep(0.1)
    slow.join()
    queued.join()
    answers = [s for seconds in latencies.values() for s in seconds]
    print(
        f"\ninferences {time.perf_counter() - started:.1f} s; {len(answers)} /info/ and /datastore/ answers during "
        f"them: max {max(answers, default=0) * 1000:.0f} ms, median {np.median(answers or [0]) * 1000:.0f} ms"
    )
    assert results["slow"].status_code == 200, results["slow"].text
    assert results["queued"].status_code == 200, results["queued"].text
    assert len(results["slow"].json()["voxels"]) == 2
    assert all(latencies.values()), {path: len(s) for path, s in latencies.items()}  # both answered meanwhile
