"""Commands and training behaviours users depend on, checked against values computed here from the
files they read and write: ground-truth episodes at ``training.gt_rate``, ``sdfsmis
evaluate-loop`` on a prepared look-alike set, ``sdfsmis sample-data``'s geometry and anatomy, and
``sdfsmis orthanc`` + ``sdfsmis upload-dicom`` read back through DICOMweb from a real Orthanc."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from app_server import free_port
from sdfsmis.cli import main
from sdfsmis.dicom.orthanc import OrthancServer, OrthancUnavailable
from sdfsmis.dicom.series import nifti_to_series
from sdfsmis.evaluation.dataset import MANIFEST, PreparedDataset
from sdfsmis.evaluation.lookalike import write_chaos
from sdfsmis.evaluation.prepare import prepare
from sdfsmis.io.weights import save_weights
from sdfsmis.methods import load_model
from sdfsmis.samples.synthetic import make_volume, write_nifti
from sdfsmis.settings import load_config
from sdfsmis.training.supervoxels import supervoxel_cache_path
from sdfsmis.training.trainer import Trainer, TrainingRun

# --- training.gt_rate: episodes on ground truth -------------------------------------------------


def _boxes(shape: tuple[int, int, int]) -> np.ndarray:
    """Ground truth no image edge explains (so no supervoxel can equal it): two boxes that move
    one voxel every second slice."""
    label = np.zeros(shape, dtype=np.uint8)
    for z in range(2, shape[2] - 2):
        label[10 + z // 2 : 40 + z // 2, 12:29, z] = 1
        label[40:58, 30 + z // 2 : 52 + z // 2, z] = 2
    return label


def _slice_masks(path: Path) -> set[bytes]:
    """Every (slice, id) region of a labelmap file as a float32 mask's bytes, in voxel order (the
    volumes are RAS and as large as the model slice, so a model slice is a voxel slice)."""
    data = np.asarray(nib.load(path).dataobj)
    return {
        (data[..., z] == k).astype(np.float32).tobytes()
        for z in range(data.shape[2])
        for k in np.unique(data[..., z])
        if k
    }


@pytest.fixture(scope="module")
def gt_studies(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("gt_rate")
    images = []
    for seed in (0, 1):
        image, _, affine = make_volume(seed, shape=(64, 64, 16), spacing=(3.0, 3.0, 5.0))
        images.append(write_nifti(root / f"case_{seed}.nii.gz", np.rint(image).astype(np.int16), affine))
        write_nifti(root / "labels" / "final" / f"case_{seed}.nii.gz", _boxes(image.shape), affine, np.uint8)
    return images


def _episode_sources(backbone: Path, images: list[Path], rate: float, count: int) -> list[str]:
    """The training sampler of a run with ``training.gt_rate = rate``; for each episode, what its
    masks are: "ground truth" or "supervoxel" when one side (the one augmentation left alone)
    equals a region of that file on a slice, "neither" otherwise. Whole-slice episodes, so that a
    mask is a slice of the file at model resolution (zoomed ones are crops of it)."""
    config = load_config(backbone=backbone)
    assert config.model.resolution == 64
    config.training.gt_rate = rate
    config.training.zoom_episodes = False
    run = TrainingRun(backbone, images, images[0].parent / f"out_{rate}", config, iterations=1, progress=False)
    trainer = Trainer(run)
    truth = set().union(*(_slice_masks(p.parent / "labels" / "final" / p.name) for p in images))
    supervoxels = set().union(*(_slice_masks(supervoxel_cache_path(p)) for p in images))
    sources = []
    for i in range(count):
        episode = trainer.sampler.episode(i)
        sides = [m[0, 0].numpy().astype(np.float32).tobytes() for m in (episode.support_mask, episode.query_mask)]
        in_truth, in_supervoxels = any(s in truth for s in sides), any(s in supervoxels for s in sides)
        assert not (in_truth and in_supervoxels)
        sources.append("ground truth" if in_truth else "supervoxel" if in_supervoxels else "neither")
    return sources


def test_gt_rate_mixes_ground_truth_episodes_at_that_rate(tiny_backbone, gt_studies):
    assert set(_episode_sources(tiny_backbone, gt_studies, 1.0, 40)) == {"ground truth"}
    assert set(_episode_sources(tiny_backbone, gt_studies, 0.0, 40)) == {"supervoxel"}
    # Each episode is ground truth with probability 0.25: over n = 200 the share has standard
    # deviation sqrt(0.25 * 0.75 / 200) = 0.031, and is off by more than 0.12 (3.9 of them) with
    # probability < 1e-4 (binomial tails).
    sources = _episode_sources(tiny_backbone, gt_studies, 0.25, 200)
    assert set(sources) == {"ground truth", "supervoxel"}
    assert abs(sources.count("ground truth") / len(sources) - 0.25) <= 0.12


# --- sdfsmis evaluate-loop ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_data(tmp_path_factory, tiny_backbone) -> tuple[PreparedDataset, Path]:
    """Five look-alike CHAOS patients, prepared, and a DPL checkpoint (random head: the loop's
    figures are checked, not the model's quality)."""
    root = tmp_path_factory.mktemp("loop")
    write_chaos(root / "raw", 5, shape=(64, 64, 10), spacing=(5.0, 5.0, 8.0))
    dataset = prepare("chaos", root / "raw", root / "prepared", supervoxel_min_size=2000, log=lambda _: None)
    torch.manual_seed(0)
    checkpoint = save_weights(
        load_model("dpl", tiny_backbone, load_config(backbone=tiny_backbone)), root / "dpl.safetensors"
    )
    return dataset, checkpoint


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _world_z(image: nib.Nifti1Image) -> np.ndarray:
    """Superior coordinate (RAS z, mm) of each slice's first voxel."""
    return np.array([(image.affine @ [0, 0, k, 1])[2] for k in range(image.shape[2])])


def _table(markdown: str, first: str) -> list[list[str]]:
    """Cells of the rows of a markdown table whose first cell is ``first``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return [row for row in rows if row[0] == first]


def test_evaluate_loop_figures_match_the_files(loop_data, tiny_backbone, tmp_path):
    dataset, checkpoint = loop_data
    output = tmp_path / "loop"
    common = ["--backbone", str(tiny_backbone), "--method", "dpl", "--dpl-checkpoint", str(checkpoint)]
    sizes = ["--pairs", "1", "--queries", "1"]
    main(["evaluate-loop", "--data", str(dataset.root), *common, *sizes, "--output", str(output)])
    results = json.loads((output / "loop.json").read_text())
    markdown = (output / "loop.md").read_text()
    cases, query = dataset.cases, dataset.cases[0]
    truth = _labels(dataset.label(query))

    # Dice from 1, 2 and 4 patients: the cases after the query, segmented as `sdfsmis infer` does
    # with those supports, scored here against the ground-truth file.
    for count in (1, 2, 4):
        supports = []
        for case in cases[1 : 1 + count]:
            supports += ["--support-image", str(dataset.image(case)), "--support-label", str(dataset.label(case))]
        predicted = tmp_path / f"infer_{count}.nii.gz"
        infer = ["infer", *common[:2], "--method", "dpl", "--checkpoint", str(checkpoint), *supports]
        main([*infer, "--image", str(dataset.image(query)), "--labels", "1,2,3,4", "--output", str(predicted)])
        prediction = _labels(predicted)
        rows = [r for r in results["supports"] if r["supports"] == count]
        assert {(r["query"], r["organ"]) for r in rows} == {(query, organ) for organ in dataset.labels}
        for row in rows:
            label = dataset.labels[row["organ"]]
            assert row["dice"] == pytest.approx(_dice(prediction == label, truth == label), abs=1e-9), row["organ"]
        shown = _table(markdown, "dpl")[[1, 2, 4].index(count)]
        organs = sorted(dataset.labels)  # the table's columns, by name
        dice = [100 * next(r["dice"] for r in rows if r["organ"] == organ) for organ in organs]
        assert shown[1] == str(count) and shown[2:6] == [f"{d:.2f}" for d in dice]
        assert shown[6] == f"**{np.mean(dice):.2f}**"

    # Placement: each field of view written is the query patient's scan cut or extended as named,
    # and each record's figures follow from its label file.
    source = nib.load(dataset.image(cases[1]))
    source_z, source_data = _world_z(source), np.asarray(source.dataobj, dtype=np.float32)
    slice_mm, depth = float(source.affine[2, 2]), source.shape[2]
    assert slice_mm > 0  # prepared volumes are RAS: a higher slice index is more superior
    expected_ends = {  # (superior end, inferior end) of the field of view, in slices moved inwards
        "full": (0, 0),
        "upper 20 % cut": (round(0.2 * depth), 0),
        "upper 40 % cut": (round(0.4 * depth), 0),
        "lower 30 % cut": (0, round(0.3 * depth)),
        "extended 50 % below": (0, -round(0.5 * depth)),
    }
    records = results["placement"]
    assert {r["field_of_view"] for r in records} == set(expected_ends)
    for name, (superior, inferior) in expected_ends.items():
        folder = output / "fields_of_view" / f"{cases[1]}-0-{name}"
        image, label = nib.load(folder / "image.nii.gz"), _labels(folder / "label.nii.gz")
        z = _world_z(image)
        assert z[-1] == pytest.approx(source_z[-1] - superior * slice_mm, abs=1e-3)
        assert z[0] == pytest.approx(source_z[0] + inferior * slice_mm, abs=1e-3)
        data = np.asarray(image.dataobj, dtype=np.float32)
        kept = [k for k in range(len(z)) if z[k] >= source_z[0] - 1e-3]
        first = int(round((z[kept[0]] - source_z[0]) / slice_mm))
        np.testing.assert_array_equal(data[..., kept], source_data[..., first : first + len(kept)])
        np.testing.assert_array_equal(
            label[..., kept], _labels(dataset.label(cases[1]))[..., first : first + len(kept)]
        )
        assert not label[..., : kept[0]].any()  # slices added below hold no organ
        for record in (r for r in records if r["field_of_view"] == name):
            organ_slices = int((label == dataset.labels[record["organ"]]).any(axis=(0, 1)).sum())
            assert record["organ_slices"] == organ_slices
            inside = record["covered"] * organ_slices
            assert inside == pytest.approx(round(inside)) and 1 <= record["segmented"] <= len(z)
            assert record["needless"] == record["segmented"] - round(inside)
        for rule in ("registration", "relative"):
            rows = [r for r in records if r["field_of_view"] == name and r["method"] == rule]
            missing = sum(r["covered"] < 1 for r in rows)
            assert _table(markdown, name)[("registration", "relative").index(rule)][1:] == [
                rule,
                f"{100 * np.mean([r['covered'] for r in rows]):.1f} %",
                f"{np.mean([r['needless'] for r in rows]):.1f}",
                f"{missing} of {len(rows)}",
            ]


def test_evaluate_loop_refuses_a_set_without_four_other_patients(loop_data, tiny_backbone, tmp_path):
    """With 4 volumes, "4 other patients" would include the query itself: its own ground truth."""
    dataset, checkpoint = loop_data
    smaller = tmp_path / "four"
    shutil.copytree(dataset.root, smaller, ignore=shutil.ignore_patterns(".supervoxels"))
    manifest = json.loads((smaller / MANIFEST).read_text())
    manifest["cases"] = manifest["cases"][:4]
    (smaller / MANIFEST).write_text(json.dumps(manifest))
    args = ["evaluate-loop", "--data", str(smaller), "--backbone", str(tiny_backbone), "--method", "dpl"]
    args += ["--dpl-checkpoint", str(checkpoint), "--pairs", "0", "--queries", "1", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="at least 5 volumes"):
        main(args)
    assert not (tmp_path / "out" / "loop.json").exists()


# --- sdfsmis sample-data ------------------------------------------------------------------------


def _centroid(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World (RAS, mm) centre of a voxel mask: the affine is linear, so the mean index maps to it."""
    return (affine @ [*np.argwhere(mask).mean(axis=0), 1.0])[:3]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_sample_data_volumes_have_real_geometry_and_anatomy_where_it_belongs(tmp_path, modality, capsys):
    main(["sample-data", str(tmp_path), "--count", "2", "--with-labels", "--modality", modality, "--seed", "3"])
    assert "2 generated" in capsys.readouterr().out
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        image, label = nib.load(tmp_path / name), nib.load(tmp_path / "labels" / "final" / name)
        affine = image.affine
        # scanner geometry in mm, the same for every reader (qform = sform) and for the label
        assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
        np.testing.assert_allclose(label.affine, affine, atol=1e-6)
        assert image.shape == label.shape and len(image.shape) == 3
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), image.header.get_zooms(), rtol=1e-5)
        assert np.linalg.det(affine[:3, :3]) > 0 and np.abs(affine[:3, 3]).max() > 1.0  # not a unit grid at 0
        data, labels = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert data.dtype == (np.int16 if modality == "CT" else np.float32)
        corners = data[[0, 0, -1, -1]][:, [0, -1, 0, -1]]
        if modality == "CT":  # air outside the body, in HU
            assert abs(float(np.median(corners)) + 1000) < 50
            body = data > -500
        else:  # magnitude MR: never negative, dark air (noise only)
            air = float(np.median(corners))
            assert data.min() >= 0 and air < 0.1 * float(np.percentile(data, 99))
            body = data > 4 * air
        # the documented CHAOS ids (liver 1, right kidney 2, left kidney 3, spleen 4), all present
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
        assert body[labels > 0].mean() > 0.99  # labelled organs lie in the body, not in air
        centre = _centroid(affine, body)
        liver, right_kidney, left_kidney, spleen = (_centroid(affine, labels == k) for k in (1, 2, 3, 4))
        # RAS world axes: +x is the patient's right, +y anterior, +z superior
        assert liver[0] > centre[0] and right_kidney[0] > centre[0]
        assert spleen[0] < centre[0] and left_kidney[0] < centre[0]
        assert liver[2] > max(right_kidney[2], left_kidney[2])  # the liver lies above the kidneys
        assert max(right_kidney[1], left_kidney[1]) < liver[1]  # the kidneys lie behind it


# --- sdfsmis orthanc + sdfsmis upload-dicom -----------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """``sdfsmis orthanc DIR`` as a user starts it, its output going to a log file (so Python
    buffers it, as under any supervisor): (DICOMweb URL, DICOM port, folder, log)."""
    folder = tmp_path_factory.mktemp("orthanc")
    try:
        OrthancServer(0, 0, folder / "probe").write_config()
    except OrthancUnavailable as error:
        pytest.skip(f"{error} (run: bash apps/system_packages.sh)")
    http, dicom = free_port(), free_port()
    log = folder / "orthanc.out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [sys.executable, "-m", "sdfsmis.cli", "orthanc", str(folder / "pacs"), "--http-port", str(http)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--dicom-port", str(dicom)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{http}/dicom-web"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, f"sdfsmis orthanc exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "Orthanc did not answer within 120 s"
            try:
                if requests.get(f"{url}/studies", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        yield url, dicom, folder / "pacs", log
    finally:
        process.terminate()
        process.wait(timeout=30)


def _non_loopback_address() -> str | None:
    """This machine's own address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _volume_of(instances: list[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (real values) and RAS affine of a DICOM image series, computed from the standard
    attributes: pixel (row r, column c) of a slice is at ImagePositionPatient + c * column
    spacing * row direction + r * row spacing * column direction (LPS); slices in order along the
    normal of their plane; array axes (column, row, slice)."""
    row_dir = np.array(instances[0].ImageOrientationPatient[:3], dtype=float)
    col_dir = np.array(instances[0].ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    instances = sorted(instances, key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in instances])
    row_spacing, col_spacing = (float(v) for v in instances[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * col_spacing, col_dir * row_spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(instances) - 1)
    lps[:3, 3] = positions[0]
    data = np.stack(
        [ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in instances], axis=-1
    )
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _uploaded(output: str) -> dict[str, str]:
    """File name -> series UID, from `sdfsmis upload-dicom`'s report."""
    return dict(re.findall(r"^(\S+): \d+ slices -> \S+, series (\S+)$", output, re.MULTILINE))


def _series(client: DICOMwebClient, series_uid: str) -> list[Dataset]:
    found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
    assert len(found) == 1, f"series {series_uid} not on the server"
    return client.retrieve_series(found[0]["0020000D"]["Value"][0], series_uid)


def test_orthanc_command_announces_where_it_serves_and_stores(orthanc):
    url, _, folder, log = orthanc
    assert f"Orthanc on {url} (loopback only), storage in {folder}" in log.read_text()
    assert (folder / "orthanc.json").is_file() and (folder / "storage").is_dir()


def test_upload_dicom_reads_back_with_the_nifti_voxels_and_geometry(orthanc, tmp_path, capsys):
    url, _, folder, _ = orthanc
    image, label, affine = make_volume(11, shape=(48, 40, 12), spacing=(0.9, 1.3, 4.0))
    ct = write_nifti(tmp_path / "ct.nii.gz", np.rint(image).astype(np.int16), affine)
    label[~np.isin(label, [1, 4])] = 0
    support = write_nifti(tmp_path / "ct_label.nii.gz", label, affine, np.uint8)
    image, _, affine = make_volume(12, (40, 48, 10), (1.2, 0.8, 5.0), modality="MR", oblique=True, orientation="LPS")
    mr = write_nifti(tmp_path / "mr.nii.gz", image, affine)
    args = ["--url", url, "--support-label", str(support), "--label-names", "1=liver,4=spleen"]
    main(["upload-dicom", str(ct), *args])
    main(["upload-dicom", str(mr), "--modality", "MR", "--url", url])
    series = _uploaded(capsys.readouterr().out)
    assert set(series) == {"ct.nii.gz", "mr.nii.gz"}
    assert any((folder / "storage").rglob("*")), "nothing stored under the orthanc folder"

    client, read_affines = DICOMwebClient(url), {}
    for path, modality in ((ct, "CT"), (mr, "MR")):
        source = nib.load(path)
        expected = np.asarray(source.dataobj, dtype=np.float64)
        instances = _series(client, series[path.name])
        assert len(instances) == source.shape[2] and {ds.Modality for ds in instances} == {modality}
        data, read_affine = _volume_of(instances)
        np.testing.assert_allclose(read_affine, source.affine, atol=1e-3)
        read_affines[path.name] = read_affine
        if modality == "CT":  # integer HU are stored as they are
            np.testing.assert_array_equal(data, expected)
        else:  # coded linearly on 16 bits: at most half a step off
            step = (expected.max() - expected.min()) / 65535
            assert np.abs(data - expected).max() <= step / 2 + 1e-6 * np.abs(expected).max()

    # the support label as a DICOM SEG of the CT series: its segments and every frame's mask
    segs = []
    for found in client.search_for_series(search_filters={"Modality": "SEG"}):
        seg = client.retrieve_series(found["0020000D"]["Value"][0], found["0020000E"]["Value"][0])[0]
        if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["ct.nii.gz"]:
            segs.append(seg)
    assert len(segs) == 1
    seg = segs[0]
    # DICOM numbers segments 1..N; each carries its label id (1, 4) in its Tracking ID (docs/dicom.md)
    segments = [(int(s.SegmentNumber), str(s.SegmentLabel), str(s.TrackingID)) for s in seg.SegmentSequence]
    assert segments == [(1, "liver", "SDFSMIS label 1"), (2, "spleen", "SDFSMIS label 4")]
    to_voxel = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ read_affines["ct.nii.gz"])  # LPS mm -> voxel
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        idx = (1, 4)[int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) - 1]  # segment 1, 2
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        k = int(round((to_voxel @ [*position, 1.0])[2]))
        np.testing.assert_array_equal(frame.T.astype(bool), label[..., k] == idx)
        seen.add((idx, k))
    assert {(n, k) for n in (1, 4) for k in range(label.shape[2]) if (label[..., k] == n).any()} <= seen


def test_orthanc_command_lets_no_other_host_in(orthanc, tmp_path):
    """Loopback only: from this machine's own non-loopback address, neither DICOMweb answers nor
    does the DICOM port take an instance."""
    url, dicom_port, _, _ = orthanc
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    try:
        status = requests.get(url.replace("127.0.0.1", address) + "/studies", timeout=10).status_code
    except requests.ConnectionError:
        status = None
    assert status != 200
    image, _, affine = make_volume(13, shape=(16, 16, 2))
    path = write_nifti(tmp_path / "intruder.nii.gz", np.rint(image).astype(np.int16), affine)
    instance = nifti_to_series(path, "CT", patient_id="intruder")[0]
    entity = AE()
    entity.add_requested_context(CTImageStorage)
    association = entity.associate(address, dicom_port)
    if association.is_established:
        association.send_c_store(instance)
        association.release()
    found = DICOMwebClient(url).search_for_studies(search_filters={"PatientID": "intruder"})
    assert found == [], "a non-loopback host stored an instance through the DICOM port"
