"""The local datastore, checked before anything is stored.

MONAI Label's ``PUT /datastore/label`` and ``PUT /datastore/image`` hand the upload straight to
the datastore, which copies it into place. Here an upload is validated first, so that a bad
label never replaces a good stored one (a submitted final label is the support of later
inferences), and ids and tags that would name a path outside the studies folder are refused.
A label is also written atomically: ``LocalDatastore.save_label`` copies onto the stored file in
place, and an inference reading that label as its support could see it half-written.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from sdfsmis.io.volume import VolumeError, VolumeTooLarge, check_same_geometry, load_volume, read_geometry

#: image ids and label tags: a plain file name (DICOM UIDs fit), never a path
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise HTTPException(
            status_code=400,
            detail=f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' only (no path)",
        )
    return value


def _unusable(error: VolumeError) -> HTTPException:
    return HTTPException(status_code=413 if isinstance(error, VolumeTooLarge) else 422, detail=str(error))


class ValidatingDatastore(LocalDatastore):
    def __init__(self, *args, max_voxels: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_voxels = max_voxels

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_name(image_id, "image id")
        try:
            load_volume(image_filename, max_voxels=self.max_voxels)
        except VolumeError as error:
            raise _unusable(error) from error
        return super().add_image(image_id, image_filename, image_info)

    def validate_label(self, image_id: str, label_filename: str, label_tag: str) -> None:
        """Raise an HTTP 4xx unless the file is a label of ``image_id``'s voxel grid (a final one not empty)."""
        check_name(label_tag, "label tag")
        image = self.get_image_uri(image_id)
        if not image:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        try:
            label = load_volume(label_filename, label=True, max_voxels=self.max_voxels)
            check_same_geometry(read_geometry(image), label)
        except VolumeError as error:
            raise _unusable(error) from error
        if label_tag == DefaultLabelTag.FINAL.value and not np.any(label.data):
            raise HTTPException(
                status_code=422,
                detail=f"the submitted label for '{image_id}' is empty: draw the structure first "
                "(an empty final label is not stored; the previous one, if any, is kept)",
            )

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        self.validate_label(image_id, label_filename, label_tag)
        _, ext = self._to_id(os.path.basename(label_filename))
        folder = Path(self._datastore.label_path(label_tag))
        destination = folder / self._filename(image_id, ext)
        with FileLock(self._lock_file):
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".upload-", suffix=".partial", delete=False) as tmp:
                tmp.write(Path(label_filename).read_bytes())
            os.replace(tmp.name, destination)
            obj = self._datastore.objects[image_id]
            previous = obj.labels.get(label_tag)
            if previous is not None and previous.ext != ext:  # e.g. a .nrrd replacing a .nii.gz
                (folder / self._filename(image_id, previous.ext)).unlink(missing_ok=True)
            info = dict(label_info or {}, name=destination.name, ts=int(time.time()))
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id
