"""Fast cases of the app in-process, with FastAPI's TestClient on MONAI Label's own app."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app_server import APP
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti


@pytest.fixture()
def client(tmp_path, tiny_backbone):
    from monailabel.config import settings
    from monailabel.interfaces.utils import app as app_utils

    make_studies(tmp_path / "studies", 2)
    settings.MONAI_LABEL_APP_DIR = str(APP)
    settings.MONAI_LABEL_STUDIES = str(tmp_path / "studies")
    settings.MONAI_LABEL_APP_CONF = {
        "backbone": str(tiny_backbone),
        "model_dir": str(tmp_path / "model"),
        "allow_untrained": "true",
        "device": "cpu",
    }
    app_utils.clear_cache()
    from monailabel.app import app

    with TestClient(app) as test_client:
        yield test_client
    app_utils.clear_cache()


def test_untrained_demo_mode_is_flagged_and_uploaded_label_is_the_support(client, tmp_path):
    status = client.get("/info/").json()["models"]["sdfsmis"]["sdfsmis"]
    assert status["available"] is True and status["trained"] is False
    _, label, affine = make_volume(1)
    write_nifti(tmp_path / "l.nii.gz", (label == 1).astype(np.uint8), affine)
    with open(tmp_path / "l.nii.gz", "rb") as f:
        response = client.post(
            "/infer/sdfsmis?image=case_001&output=json",
            data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
            files={"label": ("l.nii.gz", f)},
        )
    assert response.status_code == 200, response.text
    params = response.json()  # output=json: the result params alone
    assert params["trained"] is False and "untrained" in params["warning"]
    assert params["support"]["source"] == "uploaded_label" and params["label_names"] == {"liver": 1}


def test_no_support_and_unknown_support_are_clear_errors(client):
    response = client.post("/infer/sdfsmis?image=case_000&output=json", data={"params": "{}"})
    assert response.status_code == 400 and "no support" in response.json()["detail"]
    response = client.post(
        "/infer/sdfsmis?image=case_000&output=json", data={"params": json.dumps({"support": "nobody"})}
    )
    assert (
        response.status_code == 400
        and "'nobody' (param 'support') is not in the datastore" in response.json()["detail"]
    )
    response = client.post(
        "/infer/sdfsmis?image=case_000&output=json", data={"params": json.dumps({"support": "case_001"})}
    )
    assert response.status_code == 400 and "has no final label" in response.json()["detail"]
    assert client.get("/info/").status_code == 200


def test_empty_submitted_label_is_refused_and_not_stored(client, tmp_path):
    _, label, affine = make_volume(0)
    write_nifti(tmp_path / "empty.nii.gz", np.zeros_like(label), affine)
    with open(tmp_path / "empty.nii.gz", "rb") as f:
        response = client.put("/datastore/label?image=case_000&tag=final", files={"label": ("empty.nii.gz", f)})
    assert response.status_code == 422 and "label for 'case_000' is empty" in response.json()["detail"]
    assert client.get("/datastore/?output=all").json()["objects"]["case_000"]["labels"] == {}
