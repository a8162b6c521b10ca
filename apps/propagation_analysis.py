"""Why a one-shot method does or does not beat the nearest-slice copy (docs/evaluation.md,
"Same-volume propagation"). Two measurements, no training:

``ceiling``: per class, the Dice of the GROUND TRUTH itself after each method's in-plane
bottleneck, over the organ slices: what the method would score if it were perfect.
  - model grid: the slice resampled to the preset's ``model.resolution`` (64 for tiny) and back,
    as ``VolumeSegmenter`` does (every method of the product path runs at that grid);
  - DPL patch grid: then area-averaged onto DPL's patch grid (``dpl.image_size`` / DINOv2 patch,
    16 x 16 for tiny) and bilinear back, as DPL's similarity map is;
  - SD-FSMIS VAE: then coded as a mask latent by the backbone's VAE and decoded, as SD-FSMIS's
    prediction is (a perfect UNet would output exactly that latent).
``distance``: from a propagation ``results.json``, each method's mean 2-D Dice of the
non-annotated organ slices by their distance (in slices) to the nearest annotated slice.
``reach``: a method's propagation Dice as the product gives it (every slice of the volume
segmented) and with its prediction cut to the nearest-slice copy's reach (the annotated range
+- half the median gap): how much of the gap to the copy is false positives beyond the organ.

    python apps/propagation_analysis.py ceiling --data DST --backbone BACKBONE [--cases 5] [--dpl-grid 32]
    python apps/propagation_analysis.py distance RESULTS.json [RESULTS.json ...]
    python apps/propagation_analysis.py reach --data DST --backbone BACKBONE --method dpl \
        --checkpoint 'CKPT/fold{fold}/dpl.safetensors' [--folds 5] [--supports-per-query 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.evaluation.methods import MethodFactory
from sdfsmis.evaluation.nearest_slice import NearestSliceCopy
from sdfsmis.evaluation.protocol import annotated_slices, make_folds, organ_slices
from sdfsmis.io.volume import SliceGrid, axial_slices, load_volume
from sdfsmis.methods import DPL, METHODS, SDFSMIS, load_model
from sdfsmis.metrics import dice
from sdfsmis.pipeline.segmenter import VolumeSegmenter
from sdfsmis.settings import load_config


@torch.no_grad()
def ceiling(data: Path, backbone: Path, cases: int | None, dpl_grid: int | None = None) -> str:
    dataset = PreparedDataset.load(data)
    config = load_config(None, backbone)
    codec = load_model(SDFSMIS.method, backbone, config, None).eval().codec
    dpl = load_model(DPL.method, backbone, config, None)
    resolution = config.resolution
    grid_side = dpl_grid or config.dpl.image_size // dpl.dinov2.config.patch_size
    found: dict = defaultdict(lambda: defaultdict(list))
    for case in dataset.cases[:cases]:
        label = load_volume(dataset.label(case), label=True).data
        for label_id in dataset.test_labels:
            z = organ_slices(label, label_id)
            if z.size == 0:
                continue
            truth = label[..., z] == label_id
            grid = SliceGrid(*label.shape[:2], resolution)
            at_model = grid.to_model(axial_slices((label == label_id).astype(np.float32), z), pad_value=0.0)
            coarse = F.interpolate(at_model, size=(grid_side,) * 2, mode="area")
            patches = F.interpolate(coarse, size=(resolution,) * 2, mode="bilinear", align_corners=False)
            binary = (at_model > 0.5).float()
            decoded = codec.decode_probability(codec.encode_mask(binary))
            maps = {"model grid": at_model, "DPL patch grid": patches, "SD-FSMIS VAE": decoded}
            for name, probability in maps.items():
                back = grid.from_model(probability.float())[:, 0].numpy() >= 0.5  # [N, X, Y]
                found[dataset.organ(label_id)][name].append(dice(np.moveaxis(back, 0, -1), truth))
    names = ["model grid", "DPL patch grid", "SD-FSMIS VAE"]
    side = f"{resolution} px model grid, {grid_side} x {grid_side} DPL patch grid"
    lines = [
        f"{dataset.name}, {side}: Dice (%) of the ground truth through each bottleneck "
        "(organ slices, mean over volumes)",
        "",
        "| class | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for organ, values in found.items():
        lines.append(f"| {organ} | " + " | ".join(f"{100 * np.mean(values[n]):.1f}" for n in names) + " |")
    return "\n".join(lines)


def distance(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        results = json.loads(path.read_text())
        titles, table = {}, defaultdict(lambda: defaultdict(list))
        for v in results["volumes"]:
            if v.get("failed"):
                continue
            titles[v["method"]] = v["title"]
            for z, score in zip(v["slice_z"], v["slice_dice"]):
                gap = min(abs(z - a) for a in v["annotated_slices"])
                table[v["method"]][min(gap, 4)].append(score)
        gaps = sorted({g for rows in table.values() for g in rows})
        heads = [f"{g}" if g < 4 else ">= 4" for g in gaps]
        lines += [
            f"{path.parent.name}: mean slice Dice (%) by distance to the nearest annotated slice (slices), "
            "number of slices in brackets",
            "",
            "| method | " + " | ".join(heads) + " |",
            "| --- | " + " | ".join("---:" for _ in gaps) + " |",
        ]
        for method, rows in table.items():
            cells = [f"{100 * np.mean(rows[g]):.1f} ({len(rows[g])})" if rows[g] else "n/a" for g in gaps]
            lines.append(f"| {titles[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


@torch.no_grad()
def reach(data: Path, backbone: Path, key: str, checkpoint: str, folds: int, supports_per_query: int | None) -> str:
    dataset = PreparedDataset.load(data)
    config = load_config(None, backbone)
    if supports_per_query is not None:
        config.inference.supports_per_query = supports_per_query
    factory = MethodFactory(backbone, dict.fromkeys(METHODS, checkpoint), config)
    found: dict = defaultdict(lambda: defaultdict(list))
    for fold in make_folds(dataset.cases, folds):
        method = factory(key, fold.index)
        segmenter = VolumeSegmenter(method.model, config.inference, progress=False)
        for case in fold.cases:
            image, label = load_volume(dataset.image(case)), load_volume(dataset.label(case), label=True)
            for label_id in dataset.test_labels:
                truth = label.data == label_id
                drawn_z = annotated_slices(label.data, label_id)
                if len(drawn_z) == len(organ_slices(label.data, label_id)):
                    continue
                drawn = np.zeros_like(truth)
                drawn[..., drawn_z] = truth[..., drawn_z]
                support = dataclasses.replace(label, data=np.where(drawn, label_id, 0).astype(label.data.dtype))
                prediction = segmenter.segment(image, support, image, [label_id]).labels == label_id
                prediction[..., drawn_z] = truth[..., drawn_z] = False  # scored without the annotated slices
                low, high = NearestSliceCopy.reach(np.asarray(drawn_z), truth.shape[2])
                cut = np.zeros_like(prediction)
                cut[..., low : high + 1] = prediction[..., low : high + 1]
                organ = dataset.organ(label_id)
                found[organ]["as given"].append(dice(prediction, truth))
                found[organ]["cut to the copy's reach"].append(dice(cut, truth))
    names = ["as given", "cut to the copy's reach"]
    lines = [
        f"{dataset.name}, {method.title}: propagation 3-D Dice (%) over the non-annotated slices, mean over volumes",
        "",
        "| class | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for organ, values in found.items():
        lines.append(f"| {organ} | " + " | ".join(f"{100 * np.mean(values[n]):.1f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("ceiling")
    first.add_argument("--data", type=Path, required=True)
    first.add_argument("--backbone", type=Path, required=True)
    first.add_argument("--cases", type=int, default=None, help="only the first N cases")
    first.add_argument("--dpl-grid", type=int, default=None, help="another DPL patch grid side (e.g. 32: 448 px)")
    second = commands.add_parser("distance")
    second.add_argument("results", type=Path, nargs="+")
    third = commands.add_parser("reach")
    third.add_argument("--data", type=Path, required=True)
    third.add_argument("--backbone", type=Path, required=True)
    third.add_argument("--method", default=DPL.method, help="a method or a baseline's key, as in sdfsmis evaluate")
    third.add_argument("--checkpoint", default=None, help="the method's weights, a pattern with {fold}")
    third.add_argument("--folds", type=int, default=5)
    third.add_argument("--supports-per-query", type=int, default=None)
    args = parser.parse_args()
    if args.command == "ceiling":
        print(ceiling(args.data, args.backbone, args.cases, args.dpl_grid))
    elif args.command == "distance":
        print(distance(args.results))
    else:
        print(reach(args.data, args.backbone, args.method, args.checkpoint, args.folds, args.supports_per_query))


if __name__ == "__main__":
    main()
