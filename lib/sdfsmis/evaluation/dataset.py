"""A prepared data set: what ``sdfsmis prepare`` writes and ``evaluate`` / ``train --fold`` read.

Layout (MONAI Label's datastore layout, so that a prepared folder can also be served or trained
on directly): ``DST/<case>.nii.gz`` (image), ``DST/labels/final/<case>.nii.gz`` (ground truth
with the protocol's label ids), ``DST/.supervoxels/`` (pseudo-label cache) and
``DST/dataset.json`` (this manifest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "dataset.json"


@dataclass
class PreparedDataset:
    root: Path
    name: str
    modality: str
    labels: dict[str, int]  # organ name -> label id
    test_labels: list[int]
    cases: list[str]  # sorted; the fold split is over this order
    preprocessing: dict = field(default_factory=dict)

    def image(self, case: str) -> Path:
        return self.root / f"{case}.nii.gz"

    def label(self, case: str) -> Path:
        return self.root / "labels" / "final" / f"{case}.nii.gz"

    def organ(self, label_id: int) -> str:
        return next((name for name, k in self.labels.items() if k == label_id), f"class_{label_id}")

    def save(self) -> Path:
        values = {k: v for k, v in asdict(self).items() if k != "root"}
        path = self.root / MANIFEST
        path.write_text(json.dumps(values, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, root: str | Path) -> PreparedDataset:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: prepare the data with `sdfsmis prepare` first")
        values = json.loads(path.read_text())
        dataset = cls(root=root, **values)
        missing = [c for c in dataset.cases if not dataset.image(c).is_file() or not dataset.label(c).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: image or label missing for cases {missing}")
        return dataset
