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

    python apps/propagation_analysis.py ceiling --data DST --backbone BACKBONE [--cases 5]
    python apps/propagation_analysis.py distance RESULTS.json [RESULTS.json ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdfsmis.config import load_config
from sdfsmis.evaluation.dataset import PreparedDataset
from sdfsmis.evaluation.protocol import organ_slices
from sdfsmis.models import load_model
from sdfsmis.volume import SliceGrid, axial_slices, load_volume


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * float((prediction & truth).sum()) / max(int(prediction.sum()) + int(truth.sum()), 1)


@torch.no_grad()
def ceiling(data: Path, backbone: Path, cases: int | None) -> str:
    dataset = PreparedDataset.load(data)
    config = load_config(None, backbone)
    codec = load_model("sdfsmis", backbone, config, None).eval().codec
    dpl = load_model("dpl", backbone, config, None)
    resolution, grid_side = config.model.resolution, config.dpl.image_size // dpl.dinov2.config.patch_size
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
                found[dataset.organ(label_id)][name].append(_dice(np.moveaxis(back, 0, -1), truth))
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
            for z, dice in zip(v["slice_z"], v["slice_dice"]):
                gap = min(abs(z - a) for a in v["annotated_slices"])
                table[v["method"]][min(gap, 4)].append(dice)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("ceiling")
    first.add_argument("--data", type=Path, required=True)
    first.add_argument("--backbone", type=Path, required=True)
    first.add_argument("--cases", type=int, default=None, help="only the first N cases")
    second = commands.add_parser("distance")
    second.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    print(ceiling(args.data, args.backbone, args.cases) if args.command == "ceiling" else distance(args.results))


if __name__ == "__main__":
    main()
