"""Geometry that cannot be fooled: one asymmetric phantom, defined in world (RAS millimetre)
coordinates and sampled on voxel grids of several orientations (RAS, LPS, a coronal acquisition,
an oblique in-plane rotation), segmented through the CLI, the real MONAI Label server and the
evaluation harness. The structure lies off-centre in x, y and z and widens towards the head, so a
result that is mirrored, flipped or shifted in any axis misses the truth on the drawn slices; and
RAS, LPS and coronal files of the same voxel centres must give the same labels at every world point.

Nothing here uses the product to place the truth: each grid's voxel centres go through its affine
(numpy only) and the phantom is evaluated there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client.client import MONAILabelClient

from app_server import monailabel_server
from sdfsmis.cli import main

SPACING = np.array([4.0, 4.0, 5.0])
SHAPE = (44, 36, 16)  # RAS grid: x -86..86, y -70..70, z -35..40 mm
ORIGIN = np.array([-86.0, -70.0, -35.0])
STRUCTURE = 1
# the structure's slices: world z 0..30 mm -> RAS slices 7..13; drawn at 1/6, 1/2, 5/6 of them
# (the harness's propagation protocol, organ slice int(7 p)): slices 8, 10, 12, i.e. z = 5, 15,
# 25 mm; a flip in z (about the volume's centre, z = 2.5 mm) sends them to 0, -10, -20 mm
DRAWN_Z_MM = (5.0, 15.0, 25.0)


def ras_affine() -> np.ndarray:
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return affine


def grid(orientation: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(affine, shape) of the phantom's file in ``orientation``. RAS, LPS and coronal share the
    RAS grid's voxel centres (only the voxel order differs); oblique is rotated 12 degrees about
    the world's z axis (slices stay axial, their in-plane sampling differs)."""
    nx, ny, nz = SHAPE
    ras = ras_affine()
    if orientation == "RAS":
        return ras, SHAPE
    if orientation == "LPS":  # i runs right-to-left, j anterior-to-posterior
        flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
        return ras @ flip, SHAPE
    if orientation == "coronal":  # i: x, j: z from head to feet, k (the file's slices): y
        permute = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, nz - 1], [0, 0, 0, 1]], dtype=float)
        return ras @ permute, (nx, nz, ny)
    if orientation == "oblique":
        angle = np.deg2rad(12.0)
        rotation = np.eye(4)
        rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        return rotation @ ras, SHAPE
    raise ValueError(orientation)


def world_centres(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """[X, Y, Z, 3] world coordinates (mm) of every voxel centre."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    return index @ affine[:3, :3].T + affine[:3, 3]


def phantom(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(CT-like image in HU, label) at world points [..., 3]: a body ellipse, a spine on the
    posterior midline and the structure (see ``_structure``)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    body = (x / 80.0) ** 2 + (y / 62.0) ** 2 < 1
    image = np.where(body, 40.0, -1000.0)
    image += 15.0 * np.sin(0.11 * x) * np.cos(0.07 * y + 0.05 * z)  # texture, a function of the world point
    image = np.where((x / 9.0) ** 2 + ((y + 45.0) / 9.0) ** 2 < 1, 450.0, image)  # spine, posterior midline
    label = _structure(x, y, z)
    image = np.where(label, 190.0 + 0.5 * z, image)
    return image.astype(np.float32), label.astype(np.uint8) * STRUCTURE


def _structure(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """An elliptic cylinder on the patient's right and back (RAS: x = +30, y = -18 mm), between
    z = -2 and 34 mm, its x radius growing from 10 to 20 mm towards the head: no flip of an axis
    maps it onto itself."""
    rx = 10.0 + 10.0 * (z + 2.0) / 36.0
    inside = ((x - 30.0) / rx) ** 2 + ((y + 18.0) / 9.0) ** 2 < 1
    return inside & (z >= -2.0) & (z <= 34.0)


def write_phantom(folder: Path, name: str, orientation: str) -> dict:
    """Image, full truth and the support (truth on the drawn axial slices) of one orientation."""
    affine, shape = grid(orientation)
    points = world_centres(affine, shape)
    image, truth = phantom(points)
    drawn = np.isin(np.round(points[..., 2], 3), DRAWN_Z_MM)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, array in (("image", image.astype(np.int16)), ("truth", truth), ("support", truth * drawn)):
        paths[kind] = folder / f"{name}_{kind}.nii.gz" if kind != "image" else folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(paths[kind]))
    return {**paths, "truth_array": truth, "drawn": drawn, "points": points, "affine": affine}


def on_ras_grid(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A label array of a file whose voxel centres are the RAS grid's, put in RAS grid order by
    its world coordinates (numpy only, independent of the product's reorientation)."""
    points = world_centres(affine, labels.shape)
    index = np.round((points - ORIGIN) / SPACING).astype(int)
    out = np.full(SHAPE, -1, dtype=np.int32)
    out[index[..., 0], index[..., 1], index[..., 2]] = labels
    assert (out >= 0).all()  # every RAS grid point covered once
    return out


ORIENTATIONS = ("RAS", "LPS", "coronal", "oblique")
SAME_CENTRES = ("RAS", "LPS", "coronal")


def _check_drawn_slices(result: Path, case: dict) -> np.ndarray:
    """The result lies on the case's grid and, on the drawn slices, equals the truth voxel by voxel."""
    written = nib.load(str(result))
    assert written.shape == case["truth_array"].shape
    np.testing.assert_allclose(written.affine, case["affine"], atol=1e-4)
    labels = np.asarray(written.dataobj).astype(np.int32)
    drawn = case["drawn"]
    assert drawn.any() and case["truth_array"][drawn].any()
    np.testing.assert_array_equal(labels[drawn], case["truth_array"][drawn])
    return labels


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("phantoms")
    return {o: write_phantom(root, f"phantom_{o.lower()}", o) for o in ORIENTATIONS}


@pytest.fixture(scope="module")
def dpl_checkpoint(trained_dpl) -> Path:
    return Path(trained_dpl[0]["checkpoint"])


def _infer(backbone: Path, checkpoint: Path, support: dict, query: dict, output: Path, capsys) -> dict:
    torch.manual_seed(0)
    main(
        [
            "infer", "--method", "dpl", "--backbone", str(backbone), "--checkpoint", str(checkpoint),
            "--support-image", str(support["image"]), "--support-label", str(support["support"]),
            "--image", str(query["image"]), "--output", str(output),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


@pytest.fixture(scope="module")
def cli_outputs(phantoms, tiny_backbone, dpl_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Same-volume propagation of every orientation through ``sdfsmis infer``: {orientation: file}."""
    out = tmp_path_factory.mktemp("cli")
    for orientation, case in phantoms.items():
        torch.manual_seed(0)
        main(
            [
                "infer", "--method", "dpl", "--backbone", str(tiny_backbone), "--checkpoint", str(dpl_checkpoint),
                "--support-image", str(case["image"]), "--support-label", str(case["support"]),
                "--image", str(case["image"]), "--output", str(out / f"{orientation}.nii.gz"),
            ]
        )  # fmt: skip
    return {o: out / f"{o}.nii.gz" for o in phantoms}


@pytest.fixture(scope="module")
def cli_reference(cli_outputs, phantoms) -> np.ndarray:
    """The CLI's labels for the RAS file, on the RAS grid."""
    return on_ras_grid(np.asarray(nib.load(str(cli_outputs["RAS"])).dataobj), phantoms["RAS"]["affine"])


def test_phantom_is_asymmetric_in_every_axis(phantoms):
    truth = on_ras_grid(phantoms["RAS"]["truth_array"], phantoms["RAS"]["affine"])
    for axis in range(3):  # a flip about any axis (the volume's centre) moves the structure
        flipped = np.flip(truth, axis)
        assert (flipped & truth).sum() < 0.5 * truth.sum(), axis
    for shift in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):  # so does a one-voxel shift, on the drawn slices
        moved = np.roll(truth, shift, axis=(0, 1, 2))
        drawn = on_ras_grid(phantoms["RAS"]["drawn"].astype(np.int32), phantoms["RAS"]["affine"]).astype(bool)
        assert (moved[drawn] != truth[drawn]).any(), shift
    # the same voxel centres in RAS, LPS and coronal files: the same truth at every world point
    for orientation in SAME_CENTRES:
        case = phantoms[orientation]
        np.testing.assert_array_equal(on_ras_grid(case["truth_array"], case["affine"]), truth)


def test_cli_result_is_the_truth_on_drawn_slices_and_the_same_at_every_world_point(cli_outputs, phantoms):
    results = {o: _check_drawn_slices(cli_outputs[o], phantoms[o]) for o in ORIENTATIONS}
    reference = on_ras_grid(results["RAS"], phantoms["RAS"]["affine"])
    drawn = on_ras_grid(phantoms["RAS"]["drawn"].astype(np.int32), phantoms["RAS"]["affine"]).astype(bool)
    assert (reference[~drawn] == STRUCTURE).any()  # propagated beyond the drawn slices
    for orientation in ("LPS", "coronal"):
        found = on_ras_grid(results[orientation], phantoms[orientation]["affine"])
        np.testing.assert_array_equal(found, reference, err_msg=orientation)


def test_cli_support_and_query_in_different_orientations_agree_in_world(
    phantoms, tiny_backbone, dpl_checkpoint, tmp_path, capsys
):
    # another "patient": the support stored RAS; the query stored LPS then coronal gives the same
    # labels at every world point (registration, placement and the model see the same RAS arrays)
    found = {}
    for orientation in ("LPS", "coronal"):
        output = tmp_path / f"{orientation}.nii.gz"
        _infer(tiny_backbone, dpl_checkpoint, phantoms["RAS"], phantoms[orientation], output, capsys)
        found[orientation] = on_ras_grid(np.asarray(nib.load(str(output)).dataobj), phantoms[orientation]["affine"])
    np.testing.assert_array_equal(found["LPS"], found["coronal"])


def test_server_result_is_the_truth_on_drawn_slices_and_equals_the_cli(
    phantoms, cli_reference, tiny_backbone, dpl_checkpoint, tmp_path
):
    studies = tmp_path / "studies"
    studies.mkdir()
    for orientation in ORIENTATIONS:
        shutil.copy(phantoms[orientation]["image"], studies / phantoms[orientation]["image"].name)
    (tmp_path / "model").mkdir()
    shutil.copy(dpl_checkpoint, tmp_path / "model" / "dpl.safetensors")
    conf = [("backbone", tiny_backbone), ("model_dir", tmp_path / "model"), ("device", "cpu")]
    with monailabel_server(studies, tmp_path / "server.log", *conf) as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        for orientation in ("LPS", "coronal", "oblique"):
            case = phantoms[orientation]
            image_id = case["image"].name.removesuffix(".nii.gz")
            client.save_label(
                image_id, str(case["support"]), tag="final", params={"label_info": [{"name": "lesion", "idx": 1}]}
            )
            result, params = client.infer("dpl", image_id, {})
            assert params["support"]["source"] == "same_image_label"
            labels = _check_drawn_slices(Path(result), case)
            if orientation != "oblique":  # the server's answer is the CLI's, at every world point
                np.testing.assert_array_equal(on_ras_grid(labels, case["affine"]), cli_reference)


def test_harness_prediction_is_the_truth_on_drawn_slices_and_equals_the_cli(
    phantoms, cli_reference, tiny_backbone, dpl_checkpoint, tmp_path
):
    from sdfsmis.evaluation.dataset import PreparedDataset
    from sdfsmis.evaluation.harness import Evaluator
    from sdfsmis.evaluation.methods import MethodFactory
    from sdfsmis.settings import load_config

    root = tmp_path / "prepared"
    (root / "labels" / "final").mkdir(parents=True)
    cases = []
    for orientation in ORIENTATIONS:
        case = phantoms[orientation]
        name = case["image"].name.removesuffix(".nii.gz")
        shutil.copy(case["image"], root / f"{name}.nii.gz")
        shutil.copy(case["truth"], root / "labels" / "final" / f"{name}.nii.gz")
        cases.append(name)
    dataset = PreparedDataset(root, "phantom", "CT", {"lesion": STRUCTURE}, [STRUCTURE], sorted(cases))
    dataset.save()
    config = load_config(backbone=tiny_backbone)
    predictions = {}

    def keep(record, support, query, prediction):  # the harness's own hook: [X, Y, Z] in RAS working order
        predictions[(record["method"], record["case"])] = query.image.to_original(prediction).astype(np.int32)

    evaluator = Evaluator(dataset, config.inference, "propagation", on_prediction=keep)
    factory = MethodFactory(tiny_backbone, {"dpl": str(dpl_checkpoint)}, config)
    torch.manual_seed(0)
    records, _ = evaluator.run(["nearest-slice", "dpl"], factory, 1, log=lambda _: None)
    assert len(records) == 2 * len(ORIENTATIONS) and not any(r.get("failed") for r in records)
    by_orientation = {o: phantoms[o]["image"].name.removesuffix(".nii.gz") for o in ORIENTATIONS}
    for orientation, name in by_orientation.items():
        case = phantoms[orientation]
        for method in ("nearest-slice", "dpl"):
            labels = predictions[(method, name)]
            np.testing.assert_array_equal(labels[case["drawn"]], case["truth_array"][case["drawn"]])
        if orientation in SAME_CENTRES:  # the harness scored what the CLI returns, at every world point
            np.testing.assert_array_equal(on_ras_grid(predictions[("dpl", name)], case["affine"]), cli_reference)
    dice = {(r["method"], r["case"]): r["dice"] for r in records}
    for method in ("nearest-slice", "dpl"):  # the scores do not depend on the voxel order of the files
        assert len({round(dice[(method, by_orientation[o])], 6) for o in SAME_CENTRES}) == 1
