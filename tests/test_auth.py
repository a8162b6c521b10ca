"""MONAI Label's own authentication with the app, on the REAL server: ``MONAI_LABEL_AUTH_ENABLE``
with a realm that publishes its public key as Keycloak does (served here on loopback: no
Keycloak can run in CI). Tokens are checked on every route, the app's threaded ``/infer``
included, and MONAI Label's roles apply."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from app_server import monailabel_server
from rest import nifti, organ_label, random_head_checkpoint
from sdfsmis.io.weights import WEIGHTS_NAME
from sdfsmis.samples.synthetic import make_studies

SHAPE = (48, 48, 16)
USER, ANNOTATOR = "monailabel-user", "monailabel-annotator"  # MONAI Label's default role names


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone, realm):
    root = tmp_path_factory.mktemp("auth")
    make_studies(root / "studies", 2, seed=60, shape=SHAPE)
    random_head_checkpoint(tiny_backbone, root / "model" / WEIGHTS_NAME)
    conf = [("backbone", tiny_backbone), ("model_dir", root / "model"), ("device", "cpu")]
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[0]}
    with monailabel_server(root / "studies", root / "server.log", *conf, env=env) as url:
        yield url, root


def _token(key, roles: list[str], expires_in: float = 600, algorithm: str = "RS256") -> str:
    claims = {"preferred_username": "radiologist", "exp": int(time.time() + expires_in)}
    claims["realm_access"] = {"roles": roles}
    return jwt.encode(claims, key if algorithm != "none" else None, algorithm=algorithm)


def _calls(url: str, root, token: str | None) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    label, affine = organ_label(60, SHAPE)
    upload = nifti(root / "label.nii.gz", label, affine)
    return {
        "info": requests.get(f"{url}/info/", headers=headers, timeout=30).status_code,
        "datastore": requests.get(f"{url}/datastore/", headers=headers, timeout=30).status_code,
        "submit label": requests.put(
            f"{url}/datastore/label",
            params={"image": "case_000", "tag": "final"},
            files={"label": upload},
            headers=headers,
            timeout=30,
        ).status_code,
        "infer": requests.post(
            f"{url}/infer/sdfsmis",
            params={"image": "case_001", "output": "json"},
            data={"params": json.dumps({"support": "case_000"})},
            headers=headers,
            timeout=120,
        ).status_code,
    }


def test_tokens_are_checked_on_every_route_and_roles_apply(server, realm):
    url, root = server
    key = realm[1]
    refused = {"info": 401, "datastore": 401, "submit label": 401, "infer": 401}
    assert _calls(url, root, None) == refused
    assert _calls(url, root, "not-a-token") == refused
    assert _calls(url, root, _token(key, [USER, ANNOTATOR], expires_in=-60)) == refused  # expired
    assert _calls(url, root, _token(key, [USER, ANNOTATOR], algorithm="none")) == refused  # unsigned
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert _calls(url, root, _token(other, [USER, ANNOTATOR])) == refused  # signed by another key

    # a user may read and infer, not submit labels (an annotator's role); no label stored yet -> 400
    user = _calls(url, root, _token(key, [USER]))
    assert user == {"info": 200, "datastore": 200, "submit label": 403, "infer": 400}
    assert not list((root / "studies" / "labels").rglob("*.nii.gz"))  # the refused submission stored nothing
    annotator = _calls(url, root, _token(key, [USER, ANNOTATOR]))
    assert annotator == {"info": 200, "datastore": 200, "submit label": 200, "infer": 200}
