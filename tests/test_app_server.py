"""The MONAI Label app through the REAL server and the client class Slicer uses."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client.client import MONAILabelClient, MONAILabelClientException

from app_server import monailabel_server
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti

LABEL_INFO = [{"name": "liver", "idx": 1}, {"name": "left kidney", "idx": 3}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fitted_backbone, trained_checkpoint):
    root = tmp_path_factory.mktemp("server")
    make_studies(root / "studies", 3, seed=20)
    # a volume no episode can come from (air, a 6-voxel cube of tissue): training must skip it
    hopeless = np.full((64, 64, 24), -1000, np.int16)
    hopeless[30:36, 30:36, 9] = 40  # tissue on one slice: no supervoxel on two adjacent ones
    write_nifti(root / "studies" / "tiny_body.nii.gz", hopeless, np.diag([1.5, 1.5, 5.0, 1.0]))
    (root / "model").mkdir()
    shutil.copy(trained_checkpoint, root / "model" / "sdfsmis.safetensors")
    conf = [("backbone", fitted_backbone), ("model_dir", root / "model"), ("device", "cpu")]
    with monailabel_server(root / "studies", root / "server.log", *conf) as url:
        yield url, root


def _client(url: str, tmp_path: Path) -> MONAILabelClient:
    return MONAILabelClient(url, tmpdir=str(tmp_path))


def test_info_lists_infer_and_train_tasks(server, tmp_path):
    info = _client(server[0], tmp_path).info()
    assert info["models"]["sdfsmis"]["type"] == "segmentation"
    assert info["models"]["sdfsmis"]["sdfsmis"]["available"] is True
    assert "sdfsmis" in info["trainers"]


def test_submit_then_infer_another_image_then_uploaded_slice(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    _, label, affine = make_volume(20)  # case_000's anatomy
    label = np.where(np.isin(label, [1, 3]), label, 0).astype(np.uint8)
    write_nifti(tmp_path / "a.nii.gz", label, affine)
    saved = client.save_label("case_000", str(tmp_path / "a.nii.gz"), tag="final", params={"label_info": LABEL_INFO})
    assert saved["sdfsmis"]["support_available"] is True
    assert saved["sdfsmis"]["labels"] == ["liver", "left kidney"]

    started = time.perf_counter()
    result, params = client.infer("sdfsmis", "case_001", {})
    print(f"\nround (infer on another image, tiny model, CPU): {time.perf_counter() - started:.2f} s")
    out, image = nib.load(result), nib.load(root / "studies" / "case_001.nii.gz")
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 3}
    assert params["support"] == {
        "source": "latest_label",
        "image": "case_000",
        "label_names": {"1": "liver", "3": "left kidney"},
    }
    assert params["label_names"] == {"liver": 1, "left kidney": 3}
    assert set(params["voxels"]) == {"liver", "left kidney"} and params["trained"] is True

    # cohort flow by name; without a name, the label of the image itself serves
    _, params = client.infer("sdfsmis", "case_001", {"support": "case_000"})
    assert params["support"]["source"] == "support_param"
    _, params = client.infer("sdfsmis", "case_000", {})
    assert params["support"]["source"] == "same_image_label"
    # a named support wins over the image's own label: one that cannot serve is refused, naming it
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("sdfsmis", "case_000", {"support": "case_001"})
    assert "400" in str(error.value.msg) and "support image 'case_001' (param 'support')" in str(error.value.msg)

    # Slicer's path: a one-slice labelmap uploaded with the request, the rest of C segmented
    _, truth, affine = make_volume(22)
    z = int(np.flatnonzero((truth == 1).any(axis=(0, 1))).mean())
    one = np.zeros_like(truth)
    one[..., z] = truth[..., z] == 1
    write_nifti(tmp_path / "c.nii.gz", one, affine)
    result, params = client.infer(
        "sdfsmis", "case_002", {"label_info": [{"name": "liver", "idx": 1}]}, label_in=str(tmp_path / "c.nii.gz")
    )
    assert params["support"]["source"] == "uploaded_label" and params["support_slices"] == {"1": [z]}
    out = np.asarray(nib.load(result).dataobj)
    np.testing.assert_array_equal(out[..., z] == 1, one[..., z] == 1)  # the annotation is kept as drawn
    other = np.delete(np.arange(out.shape[2]), z)
    assert (out[..., other] == 1).sum() > 0  # and the structure is found on other slices
    assert (root / "studies" / "labels" / "final" / "case_000.nii.gz").is_file()


def test_batch_infer_segments_the_unlabeled_images_with_one_support(server, tmp_path):
    url, root = server
    final = (root / "studies" / "labels" / "final" / "case_000.nii.gz").read_bytes()
    request = urllib.request.Request(
        url + "/batch/infer/sdfsmis?run_sync=true",
        data=json.dumps({"support": "case_000"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        results = json.loads(response.read())
    assert {"case_001", "case_002"} <= set(results)
    client = _client(url, tmp_path)
    for image_id in ("case_001", "case_002"):
        assert results[image_id]["params"]["support"]["image"] == "case_000"
        stored = nib.load(root / "studies" / "labels" / "original" / f"{image_id}.nii.gz")
        image = nib.load(root / "studies" / f"{image_id}.nii.gz")
        assert stored.shape == image.shape and np.allclose(stored.affine, image.affine, atol=1e-5)
        # what the batch stored is what one request for that image with the same support returns
        single, _ = client.infer("sdfsmis", image_id, {"support": "case_000"})
        np.testing.assert_array_equal(np.asarray(stored.dataobj), np.asarray(nib.load(single).dataobj))
        assert np.asarray(stored.dataobj).any()
    assert (root / "studies" / "labels" / "final" / "case_000.nii.gz").read_bytes() == final  # nothing final touched


def test_train_task_completes_and_changes_next_inference(server, tmp_path):
    url, root = server
    client = _client(url, tmp_path)
    before, _ = client.infer("sdfsmis", "case_001", {"support": "case_000"})
    before = np.asarray(nib.load(before).dataobj).copy()
    client.train_start("sdfsmis", {"iterations": 10, "checkpoint_every": 5})
    deadline = time.time() + 300
    while (status := client.train_status()).get("status") in ("SUBMITTED", "RUNNING", "QUEUED"):
        assert time.time() < deadline
        time.sleep(1)
    assert status["status"] == "DONE", status
    stats = client.info()["train_stats"]["sdfsmis"]
    assert stats["status"] == "DONE" and stats["iteration"] == 10
    assert [s["image"] for s in stats["skipped"]] == ["tiny_body.nii.gz"]  # the rest of the datastore trained
    after, params = client.infer("sdfsmis", "case_001", {"support": "case_000"})
    assert not np.array_equal(before, np.asarray(nib.load(after).dataobj))


def test_offline_start_without_weights_gives_clear_error(tmp_path):
    make_studies(tmp_path / "studies", 1)
    conf = [("backbone", tmp_path / "no-such-backbone"), ("model_dir", tmp_path / "model")]
    with monailabel_server(tmp_path / "studies", tmp_path / "log", *conf) as url:
        client = _client(url, tmp_path)
        status = client.info()["models"]["sdfsmis"]["sdfsmis"]
        assert status["available"] is False and "no-such-backbone does not exist" in status["reason"]
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("sdfsmis", "case_000", {})
        assert "503" in str(error.value.msg) and "sdfsmis download" in str(error.value.msg)
        assert client.info()["name"] == "SD-FSMIS"  # still serving
