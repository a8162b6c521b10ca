"""Real scans for development: Colin27 (one healthy adult's T1 MRI, 27 averaged scans, 1 mm) with
the AAL atlas of 116 regions on the same grid, as Debian's ``mricron-data`` package ships them
(``/usr/share/mricron/templates``: ``ch2.nii.gz``, ``aal.nii.gz``, ``aal.nii.txt``). Made into a
prepared data set (:mod:`.dataset`) with deep structures of different sizes, bilateral pairs
among them, so that propagation can be judged on anatomy nobody here generated.

Licence: the MRIcron package is BSD-3-clause (Chris Rorden); the Colin27 template is distributed
by the Montreal Neurological Institute for research, the AAL atlas (Tzourio-Mazoyer et al., 2002)
for research use with citation. The files are fetched and cached by ``apps/fetch_real_data.sh``
and never committed."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from sdfsmis.evaluation.dataset import PreparedDataset

#: AAL regions used as structures: small to large, both sides of four of them.
STRUCTURES = (
    "Amygdala_L",
    "Pallidum_L",
    "Caudate_L",
    "Caudate_R",
    "Putamen_L",
    "Putamen_R",
    "Thalamus_L",
    "Thalamus_R",
    "Hippocampus_L",
)


def aal_names(table: Path) -> dict[str, int]:
    """{region name: label id} from the atlas's ``aal.nii.txt`` (``id name code`` per line)."""
    names = {}
    for line in table.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[parts[1]] = int(parts[0])
    return names


def prepare_colin27(templates: Path, destination: Path) -> PreparedDataset:
    """``templates``: the package's template folder; writes the prepared set to ``destination``."""
    names = aal_names(templates / "aal.nii.txt")
    atlas = nib.load(str(templates / "aal.nii.gz"))
    image = nib.load(str(templates / "ch2.nii.gz"))
    if atlas.shape != image.shape or not np.allclose(atlas.affine, image.affine):
        raise ValueError("aal.nii.gz and ch2.nii.gz are not on the same grid")
    ids = {name.lower(): names[name] for name in STRUCTURES}
    regions = np.asarray(atlas.dataobj)
    label = np.where(np.isin(regions, list(ids.values())), regions, 0).astype(np.uint8)
    (destination / "labels" / "final").mkdir(parents=True, exist_ok=True)
    shutil.copy(templates / "ch2.nii.gz", destination / "colin27.nii.gz")
    nib.save(nib.Nifti1Image(label, atlas.affine), str(destination / "labels" / "final" / "colin27.nii.gz"))
    dataset = PreparedDataset(destination, "colin27", "MR", ids, sorted(ids.values()), ["colin27"])
    dataset.save()
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("templates", type=Path, help="mricron-data's templates folder")
    parser.add_argument("destination", type=Path)
    args = parser.parse_args()
    dataset = prepare_colin27(args.templates, args.destination)
    print(f"prepared {dataset.root}: {', '.join(dataset.labels)}")


if __name__ == "__main__":
    main()
