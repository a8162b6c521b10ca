"""A short soak of the REAL server on loopback: several client threads send a fixed number of mixed
requests (inference, label submission, info, datastore, bad input) at once. No label may be
lost, no answer may be a 5xx, every answer must be the expected one. Prints the figures (JSON and
a table): throughput and latency are measured, never asserted."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict

import nibabel as nib
import numpy as np
import pytest
import requests

from app_server import monailabel_server
from rest import infer, nifti, organ_label, put_label, random_head_checkpoint
from sdfsmis.io.weights import WEIGHTS_NAME
from sdfsmis.samples.synthetic import ABDOMINAL_LABELS, make_studies

SHAPE = (48, 48, 16)
CLIENTS = 4  # client i owns image case_00i for its submissions: "the last acknowledged label" is well defined
REQUESTS = 160  # all of them are sent, however long the machine takes: each has its own HTTP timeout
SEED = 70
LABEL_INFO = [{"name": name, "idx": idx} for name, idx in ABDOMINAL_LABELS.items()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("soak")
    make_studies(root / "studies", CLIENTS, seed=SEED, shape=SHAPE)
    random_head_checkpoint(tiny_backbone, root / "model" / WEIGHTS_NAME)
    conf = [
        ("backbone", tiny_backbone),
        ("model_dir", root / "model"),
        ("device", "cpu"),
        ("max_concurrent_infers", 1),
        ("max_queued_infers", CLIENTS),  # every client may wait: no "busy" is expected here
    ]
    with monailabel_server(root / "studies", root / "server.log", *conf) as url:
        yield url, root


class Client:
    """One annotator's client: a seeded mix of requests, each with the answer it must get."""

    def __init__(self, url: str, root, index: int):
        self.url, self.root, self.index = url, root, index
        self.image = f"case_{index:03d}"
        self.rng = random.Random(SEED + index)
        self.last_label: np.ndarray | None = None  # the last submission the server acknowledged
        self.records: list[tuple[str, int, int, float]] = []  # (kind, expected, got, seconds)
        self.unexpected: list[str] = []

    def label(self) -> np.ndarray:
        """A fresh annotation of this client's image: the liver and a random subset of the other
        organs, a random slice left out."""
        ids = (1, *sorted(self.rng.sample([2, 3, 4], self.rng.randint(0, 3))))
        label, _ = organ_label(SEED + self.index, SHAPE, ids)
        kept = label.copy()
        kept[..., self.rng.randrange(SHAPE[2])] = 0
        return kept if kept.any() else label

    def submit(self, label: np.ndarray) -> requests.Response:
        affine = nib.load(self.root / "studies" / f"{self.image}.nii.gz").affine
        upload = nifti(self.root / f"client{self.index}.nii.gz", label, affine)
        return put_label(self.url, self.image, upload, params={"label_info": LABEL_INFO})

    def one(self) -> None:
        kind = self.rng.choices(["info", "datastore", "submit", "infer", "bad"], [30, 10, 20, 25, 15])[0]
        other = f"case_{self.rng.randrange(CLIENTS):03d}"
        label = None
        started = time.perf_counter()
        if kind == "info":
            expected, response = 200, requests.get(f"{self.url}/info/", timeout=60)
        elif kind == "datastore":
            expected, response = 200, requests.get(f"{self.url}/datastore/?output=all", timeout=60)
        elif kind == "submit":
            label = self.label()
            expected, response = 200, self.submit(label)
        elif kind == "infer":  # the image's own label (being replaced by its owner meanwhile) or another's
            params = self.rng.choice([{}, {"labels": "1"}, {"support": other, "labels": "liver"}])
            expected, response = 200, infer(self.url, other, params)
        else:
            kind, expected, response = self.rng.choice(
                [
                    ("bad: unknown image", 404, lambda: infer(self.url, "case_999")),
                    ("bad: ../ image id", 404, lambda: infer(self.url, "../studies/case_000")),
                    ("bad: labels param", 400, lambda: infer(self.url, other, {"labels": "heart"})),
                    (
                        "bad: truncated label",
                        422,
                        lambda: put_label(self.url, self.image, ("l.nii.gz", b"\x1f\x8b\x08")),
                    ),
                ]
            )
            response = response()
        self.records.append((kind, expected, response.status_code, time.perf_counter() - started))
        if response.status_code != expected:
            self.unexpected.append(f"{kind}: {response.status_code} {response.text[:300]}")
        if kind == "submit" and response.status_code == 200:
            self.last_label = label

    def run(self, quota: int) -> None:
        while len(self.records) < quota:
            self.one()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else 0.0


def test_soak_mixed_requests_from_several_clients(server):
    url, root = server
    clients = [Client(url, root, i) for i in range(CLIENTS)]
    for client in clients:  # every image starts annotated, so every inference has a support
        client.last_label = client.label()
        assert client.submit(client.last_label).status_code == 200

    started = time.time()
    threads = [threading.Thread(target=c.run, args=(REQUESTS // CLIENTS,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.time() - started

    records = [r for c in clients for r in c.records]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, _, _, latency in records:
        by_kind[kind.split(":")[0]].append(latency)
    failures = [r for r in records if r[1] != r[2]]
    server_errors = [r for r in records if r[2] >= 500]
    lost = []
    stored = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    for client in clients:
        name = stored[client.image]["labels"].get("final", {}).get("info", {}).get("name")
        path = root / "studies" / "labels" / "final" / str(name)
        if not name or not np.array_equal(np.asarray(nib.load(path).dataobj), client.last_label):
            lost.append(client.image)

    figures = {
        "clients": CLIENTS,
        "requests": len(records),
        "seconds": round(seconds, 1),
        "requests_per_s": round(len(records) / seconds, 1),
        "failures": len(failures),
        "server_errors_5xx": len(server_errors),
        "lost_labels": len(lost),
        "latency_ms": {
            kind: {
                "n": len(values),
                "p50": round(_percentile(values, 50), 1),
                "p95": round(_percentile(values, 95), 1),
                "max": round(max(values) * 1000, 1),
            }
            for kind, values in sorted({**by_kind, "all": [r[3] for r in records]}.items())
        },
    }
    print("\nsoak " + json.dumps(figures))
    print(f"{'kind':<10}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for kind, row in figures["latency_ms"].items():
        print(f"{kind:<10}{row['n']:>6}{row['p50']:>10}{row['p95']:>10}{row['max']:>10}")

    assert not failures, [u for c in clients for u in c.unexpected][:10]
    assert not server_errors
    assert not lost, f"labels lost for {lost}"
    assert len(records) == REQUESTS  # every client sent its share, none stopped on an exception
    assert requests.get(f"{url}/info/", timeout=5).status_code == 200
