"""The pictures (issue 16): montages that put contours where the masks are, shown the
radiological way; TensorBoard events and curves of a real `sdfsmis train`; the `infer --preview`
of a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdfsmis.cli import main
from sdfsmis.evaluation.lookalike import write_chaos
from sdfsmis.evaluation.prepare import prepare
from sdfsmis.figures.boxplot import BOXPLOT_PX
from sdfsmis.figures.curves import CURVES_PX
from sdfsmis.figures.display import PREDICTION, REFERENCE
from sdfsmis.figures.montage import HEADER_PX, TILE_PX, TITLE_PX, Tile, render_montage, tile_box
from sdfsmis.samples.synthetic import make_studies

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _sdfsmis(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "sdfsmis.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _colour_pixels(image: np.ndarray, colour: str) -> np.ndarray:
    """Where a rendered RGB image shows ``colour`` (#rrggbb), allowing for antialiasing."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(image.astype(int) - rgb) < 70).all(axis=-1)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_montage_draws_contours_where_the_masks_are_shown_radiologically():
    side = 64
    rng = np.random.default_rng(0)
    image = rng.normal(size=(side, side)).astype(np.float32)  # [X, Y] in RAS voxel order
    square = np.zeros((side, side), dtype=bool)
    square[44:54, 40:56] = True  # high X: the patient's right; high Y: anterior
    tiles = [
        Tile(image, (-3.0, 3.0), "reference", [(square, REFERENCE)]),
        Tile(image, (-3.0, 3.0), "prediction", [(square, PREDICTION)]),
    ]
    pixels = render_montage([tiles, [None, tiles[1]]], "synthetic", {"reference": REFERENCE, "prediction": PREDICTION})
    assert pixels.shape == (HEADER_PX + 2 * (TITLE_PX + TILE_PX), 2 * TILE_PX, 3)
    # Radiological: the patient's right on the viewer's left, anterior up. Voxel (x, y) lands at
    # column side-1-x, row side-1-y: the square spans columns 10..19 and rows 8..23 of 64.
    scale = TILE_PX / side
    expected = (10 * scale, 8 * scale, 20 * scale, 24 * scale)  # left, top, right, bottom in tile pixels
    for (row, column), colour, other in (
        ((0, 0), REFERENCE, PREDICTION),
        ((0, 1), PREDICTION, REFERENCE),
        ((1, 1), PREDICTION, REFERENCE),
    ):
        left, top, right, bottom = tile_box(row, column)
        tile = pixels[top:bottom, left:right]
        ys, xs = np.nonzero(_colour_pixels(tile, colour))
        assert xs.size > 40, f"no {colour} contour in tile {row, column}"
        assert not _colour_pixels(tile, other).any()
        # the contour runs along the square's edges, and nowhere else
        assert abs(xs.min() - expected[0]) <= 3 and abs(xs.max() - expected[2]) <= 3
        assert abs(ys.min() - expected[1]) <= 3 and abs(ys.max() - expected[3]) <= 3
        inside = tile[int(expected[1]) + 6 : int(expected[3]) - 6, int(expected[0]) + 6 : int(expected[2]) - 6]
        assert not _colour_pixels(inside, colour).any()
    empty_left, empty_top, empty_right, empty_bottom = tile_box(1, 0)  # a None cell stays black
    assert pixels[empty_top:empty_bottom, empty_left:empty_right].max() == 0


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory) -> tuple[Path, Path]:
    """A short real `sdfsmis train --method dpl --plot` (studies with labels: val_dice_gt too)."""
    root = tmp_path_factory.mktemp("figures")
    make_studies(root / "studies", 3, with_labels=True, shape=(64, 64, 20))
    output = root / "ckpt"
    _sdfsmis(
        "train", "--method", "dpl", "--backbone", str(tiny_backbone), "--images", str(root / "studies"),
        "--output", str(output), "--iterations", "20", "--checkpoint-every", "10", "--validate-every", "10",
        "--batch-size", "2", "--plot",
    )  # fmt: skip
    return root / "studies", output


def test_training_writes_tensorboard_events_curves_and_the_validation_montage(trained, tmp_path):
    _, output = trained
    events = list(output.glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(output), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    scalars = set(board.Tags()["scalars"])
    losses = {f"loss/{term}" for term in ("loss", "seg", "align", "diff", "threshold")}
    assert losses | {"train/it_per_s", "lr/group0", "validation/val_dice", "validation/val_dice_gt"} <= scalars
    assert [e.step for e in board.Scalars("loss/loss")] == [10, 20]
    assert [e.step for e in board.Scalars("validation/val_dice")] == [10, 20]
    assert board.Scalars("lr/group0")[0].value == pytest.approx(1e-3)  # the tiny preset's DPL rate
    images = board.Images("validation/episodes")
    assert [i.step for i in images] == [10, 20]

    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    montage = Path(next(r for r in reversed(log) if "val_dice" in r)["validation_montage"])
    assert montage == output / "validation_montage.png"
    pixels = _png(montage)  # 4 episodes x (support, query, pseudo-label, prediction)
    assert pixels.shape == (HEADER_PX + 4 * (TITLE_PX + TILE_PX), 4 * TILE_PX, 3)
    assert (images[-1].height, images[-1].width) == pixels.shape[:2]
    support = pixels[slice(*tile_box(0, 0)[1::2]), slice(*tile_box(0, 0)[0::2])]
    assert _colour_pixels(support, REFERENCE).any()  # the support's mask is drawn

    curves = _png(output / "training_curves.png")  # written by --plot
    assert curves.shape == (CURVES_PX[1], CURVES_PX[0], 3)
    main(["report-train", str(output), "--output", str(tmp_path / "curves.png")])
    assert _png(tmp_path / "curves.png").shape == curves.shape


def test_infer_preview_shows_prediction_and_uncertainty(trained, tiny_backbone, tmp_path, capsys):
    studies, output = trained
    preview = tmp_path / "preview.png"
    main([
        "infer", "--method", "dpl", "--backbone", str(tiny_backbone), "--checkpoint", str(output),
        "--support-image", str(studies / "case_000.nii.gz"),
        "--support-label", str(studies / "labels" / "final" / "case_000.nii.gz"),
        "--image", str(studies / "case_001.nii.gz"), "--output", str(tmp_path / "out.nii.gz"),
        "--labels", "1", "--preview", str(preview),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert summary["preview"] == str(preview)
    pixels = _png(preview)
    # one label: its row (3 supports + 6 query slices), then DPL's uncertainty row
    assert pixels.shape == (HEADER_PX + 2 * (TITLE_PX + TILE_PX), 9 * TILE_PX, 3)
    first_query = pixels[slice(*tile_box(0, 3)[1::2]), slice(*tile_box(0, 3)[0::2])]
    assert _colour_pixels(first_query, PREDICTION).any()
    assert not _colour_pixels(first_query, REFERENCE).any()  # no ground truth at inference
    under_support = pixels[slice(*tile_box(1, 0)[1::2]), slice(*tile_box(1, 0)[0::2])]
    assert under_support.max() == 0
    uncertainty = pixels[slice(*tile_box(1, 3)[1::2]), slice(*tile_box(1, 3)[0::2])].astype(int)
    assert (np.abs(uncertainty[..., 0] - uncertainty[..., 2]) > 60).any()  # a colour map, not grey


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("href", "src")]


def test_evaluate_writes_boxplot_montages_and_a_report_linking_only_existing_files(tmp_path):
    write_chaos(tmp_path / "raw", 4, shape=(64, 64, 10), spacing=(5.0, 5.0, 8.0))
    data = prepare("chaos", tmp_path / "raw", tmp_path / "prepared", supervoxel_min_size=2000, log=lambda _: None)
    out = tmp_path / "out"
    main(["evaluate", "--data", str(data.root), "--method", "prototype", "--folds", "2", "--montages", "1"]
         + ["--output", str(out)])  # fmt: skip
    assert _png(out / "boxplot.png").shape == (BOXPLOT_PX[1], BOXPLOT_PX[0], 3)
    # one montage: the first fold's first query volume, a row per class (4), supports then query slices
    montages = sorted((out / "montages").rglob("*.png"))
    assert montages == [out / "montages" / "prototype" / "chaos_02.png"]
    pixels = _png(montages[0])
    assert pixels.shape[0] == HEADER_PX + 4 * (TITLE_PX + TILE_PX) and pixels.shape[1] % TILE_PX == 0
    assert _colour_pixels(pixels, REFERENCE).sum() > 100 and _colour_pixels(pixels, PREDICTION).sum() > 100

    parser = _Links()
    report = (out / "report.html").read_text()
    parser.feed(report)
    assert parser.links and all((out / link).is_file() for link in parser.links)
    assert {"boxplot.png", "montages/prototype/chaos_02.png", "results.json", "table.md"} <= set(parser.links)
    assert "<table>" in report and "prototype matcher" in report


def test_app_train_task_names_its_last_validation_montage_in_train_stats(tiny_backbone, tmp_path, monkeypatch):
    from monailabel.datastore.local import LocalDatastore

    from app_server import APP

    monkeypatch.syspath_prepend(str(APP))  # the app's own `lib`, as MONAI Label loads it
    from lib.configs import AppSettings, ModelRuntime
    from lib.server.concurrency import InferenceGate
    from lib.trainers import OneShotTrain

    make_studies(tmp_path / "studies", 3, shape=(64, 64, 20))
    conf = {"backbone": str(tiny_backbone), "model_dir": str(tmp_path / "model"), "device": "cpu"}
    settings = AppSettings.from_conf(conf, str(APP))
    task = OneShotTrain(ModelRuntime(settings, InferenceGate(1, 0, 1.0), "dpl"))
    task(
        {"iterations": 10, "checkpoint_every": 10}, LocalDatastore(str(tmp_path / "studies"), extensions=("*.nii.gz",))
    )
    stats = task.stats()  # what /info/ shows as train_stats.dpl
    assert stats["status"] == "DONE"
    montage = Path(stats["validation_montage"])
    assert montage == tmp_path / "model" / "train_dpl" / "validation_montage.png"
    assert _png(montage).shape == (HEADER_PX + 4 * (TITLE_PX + TILE_PX), 4 * TILE_PX, 3)
