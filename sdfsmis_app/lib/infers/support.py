"""Where the support of a request comes from, in order of precedence (what the user typed or
drew wins over anything implicit):

a. a labelmap uploaded with the request (Slicer's scribbles path: the file ``label``) -> the
   annotated slices of the SAME image are the support;
b. the request param ``support`` = the id of an image whose final label is the support, or a
   list of them (``"a,b"`` or ``["a", "b"]``: several patients, combined per query slice); a named
   support that cannot serve is an error naming it, never replaced by another one;
c. a submitted final label of the same image (a partially annotated volume) -> same as a.;
d. the most recently submitted final label in the datastore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from sdfsmis.dicom.seg import palette_colour
from sdfsmis.io.volume import Volume, VolumeError, check_same_geometry, load_volume
from sdfsmis.pipeline.segmenter import SupportVolume, select_label_ids

FINAL = DefaultLabelTag.FINAL.value
#: The name suffix of a review segment (param ``review_segment``): where the evidence disagreed,
#: not a structure; a label submitted with review voxels left in does not teach them as one.
REVIEW_SUFFIX = " - review"


def review_name(name: str) -> str:
    return f"{name}{REVIEW_SUFFIX}"


def is_review_name(name: str) -> bool:
    return name.endswith(REVIEW_SUFFIX)


class SupportNotFound(LookupError):
    """No usable support; the message says what to do."""


@dataclass
class Support:
    image: Path
    label: Path
    source: str  # "uploaded_label" | "support_param" | "same_image_label" | "latest_label"
    image_id: str | None
    label_names: dict[int, str] = field(default_factory=dict)
    label_colours: dict[int, list[int]] = field(default_factory=dict)

    def name(self, idx: int) -> str:
        return self.label_names.get(idx, f"label_{idx}")

    def colour(self, idx: int) -> list[int]:
        return self.label_colours.get(idx) or label_colour({"idx": idx, "name": self.name(idx)})

    def what(self) -> str:
        """The support as the user knows it, for error messages."""
        return {
            "uploaded_label": "the label uploaded with the request",
            "support_param": f"support '{self.image_id}' (param 'support')",
            "same_image_label": f"the final label of '{self.image_id}'",
        }.get(self.source, f"support '{self.image_id}' (the newest final label)")

    def load(self, query: Volume | None = None, max_voxels: int | None = None) -> tuple[Volume, Volume]:
        """Support image and label, checked (readable, one voxel grid, something drawn); an error
        names the support, so that a user sees which of their inputs to fix."""
        try:
            same = query is not None and self.image.resolve() == query.path.resolve()
            image = query if same else load_volume(self.image, max_voxels=max_voxels)
            label = load_volume(self.label, label=True, max_voxels=max_voxels)
            check_same_geometry(image, label)
            if review := [idx for idx, name in self.label_names.items() if is_review_name(name)]:
                label.data = np.where(np.isin(label.data, review), 0, label.data)  # background for every organ
            select_label_ids(label)
        except VolumeError as error:
            raise type(error)(f"{self.what()}: {error}") from error
        return image, label

    def volume(self, query: Volume | None = None, max_voxels: int | None = None) -> SupportVolume:
        """The loaded support as the segmenter takes it, named as the user knows it."""
        image, label = self.load(query, max_voxels)
        return SupportVolume(image, label, self.image_id or "uploaded label")

    def describe(self) -> dict:
        return {
            "source": self.source,
            "image": self.image_id,
            "label_names": {str(k): v for k, v in self.label_names.items()},
        }


def label_colour(entry: dict) -> list[int]:
    """A segment's colour: its own, else the anatomy colour of its name (as OHIF picks it), else a palette."""
    colour = entry.get("color") or GENERIC_ANATOMY_COLORS.get(str(entry.get("name", "")).lower())
    return [int(v) for v in (colour or palette_colour(int(entry["idx"])))[:3]]


def label_names_from_info(label_info: list | dict | None) -> dict[int, str]:
    """Slicer's ``label_info`` ([{"name", "idx"}, ...]) or a {name: idx} map -> {idx: name}."""
    if isinstance(label_info, dict):
        return {int(idx): str(name) for name, idx in label_info.items()}
    names = {}
    for entry in label_info or []:
        if isinstance(entry, dict) and "idx" in entry and "name" in entry:
            names[int(entry["idx"])] = str(entry["name"])
    return names


def label_colours_from_info(label_info: list | dict | None) -> dict[int, list[int]]:
    if not isinstance(label_info, list):
        return {}
    return {
        int(entry["idx"]): [int(v) for v in entry["color"][:3]]
        for entry in label_info
        if isinstance(entry, dict) and "idx" in entry and entry.get("color")
    }


def support_label_ids(datastore: Datastore) -> dict[str, int]:
    """Name -> id of every structure some stored support provides: what the model can segment now.

    In DICOMweb mode the SEG headers in the PACS are read (``seg_catalog``) instead of every label."""
    entries: list[dict] = []
    if catalog := getattr(datastore, "seg_catalog", None):
        entries = [segment for seg in catalog().values() for segment in seg["segments"]]
    else:
        for image in datastore.get_labeled_images(FINAL):
            info = datastore.get_label_info(datastore.get_label_by_image_id(image, FINAL), FINAL) or {}
            names = label_names_from_info(info.get("label_info") or info.get("label_names"))
            entries += [{"idx": idx, "name": name} for idx, name in names.items()]
    return {entry["name"]: int(entry["idx"]) for entry in entries if not is_review_name(str(entry["name"]))}


def _final_label(datastore: Datastore, image_id: str) -> Support | None:
    label_id = datastore.get_label_by_image_id(image_id, FINAL)
    if not label_id:
        return None
    info = datastore.get_label_info(label_id, FINAL) or {}
    return Support(
        image=Path(datastore.get_image_uri(image_id)),
        label=Path(datastore.get_label_uri(label_id, FINAL)),
        source="",
        image_id=image_id,
        label_names=label_names_from_info(info.get("label_info") or info.get("label_names")),
        label_colours=label_colours_from_info(info.get("label_info")),
    )


def named_support(datastore: Datastore, requested: object) -> Support:
    """The final label of the image named by param ``support``; an error naming it when there is none."""
    if not isinstance(requested, str) or requested not in datastore.list_images():
        raise SupportNotFound(f"support image '{requested}' (param 'support') is not in the datastore")
    support = _final_label(datastore, requested)
    if support is None:
        raise SupportNotFound(
            f"support image '{requested}' (param 'support') has no final label: submit a label for it first"
        )
    support.source = "support_param"
    return support


def support_ids(requested: object) -> list[str]:
    """Param ``support``: one image id, ``"a,b"`` or a list of ids."""
    items = requested if isinstance(requested, list) else str(requested).split(",")
    ids = [str(item).strip() for item in items if str(item).strip()]
    if not ids:
        raise SupportNotFound(f"param 'support' names no image: {requested!r}")
    return ids


def named_supports(datastore: Datastore, requested: object) -> list[Support]:
    """Every image named by param ``support``, each with its final label."""
    return [named_support(datastore, image) for image in support_ids(requested)]


def resolve_supports(request: dict, datastore: Datastore, image_id: str | None) -> list[Support]:
    """The supports of a request, by the precedence above."""
    if request.get("label"):
        return [
            Support(
                Path(request["image"]),
                Path(request["label"]),
                "uploaded_label",
                image_id,
                label_names_from_info(request.get("label_info") or request.get("label_names")),
                label_colours_from_info(request.get("label_info")),
            )
        ]
    if request.get("support"):
        return named_supports(datastore, request["support"])
    if image_id and (support := _final_label(datastore, image_id)):
        support.source = "same_image_label"
        return [support]
    latest = max(
        (
            (datastore.get_label_info(label_id, FINAL).get("ts", 0), image)
            for image in datastore.get_labeled_images(FINAL)
            if (label_id := datastore.get_label_by_image_id(image, FINAL))
        ),
        default=None,
    )
    if latest is None:
        raise SupportNotFound(
            "no support: annotate the structure on one slice and submit it as a final label "
            "('Submit Label' in Slicer), upload a label with the request, or name a labelled image in param 'support'"
        )
    support = _final_label(datastore, latest[1])
    support.source = "latest_label"
    return [support]
