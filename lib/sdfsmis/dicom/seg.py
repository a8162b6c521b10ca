"""Labelmaps <-> DICOM SEG, keeping each segment's label id, name and display colour.

A radiologist's annotation reaches a PACS as a DICOM SEG (exported from OHIF or Slicer); our
results go back the same way. A SEG used as a support gives results with the same label ids,
names and colours. DICOM numbers a SEG's segments 1..N (PS3.3 C.8.20.2; OHIF and highdicom rely
on it), which cannot hold label ids such as 1 and 4, so each segment we write carries its label
id in its Tracking ID (:data:`TRACKING_ID`); a SEG of another tool is read with its segment
numbers as label ids. Written with pydicom-seg (no dcmqi binary needed, so it works offline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom_seg.template import from_dcmqi_metainfo, rgb_to_cielab

from sdfsmis.dicom.reader import DicomSeries
from sdfsmis.dicom.series import RAS_TO_LPS
from sdfsmis.io.volume import VolumeError, label_type

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: Tracking ID (0062,0020) of each segment we write: its label id. Segment Number must run 1..N
#: and Segment Label is the name the user reads; Tracking ID is the Segment Description Macro's
#: standard text for following one structure across objects (its Tracking UID (0062,0021) is
#: required beside it: a new UID per segment written), and SEG toolkits carry it (dcmqi's and
#: pydicom-seg's TrackingIdentifier, highdicom's tracking_id), where a private tag would need a
#: private creator and may be dropped. A form of our own, so that another tool's tracking text
#: ("lesion 1") is never read as a label id.
TRACKING_ID = "SDFSMIS label {}"
_TRACKED = re.compile(r"SDFSMIS label ([1-9][0-9]*)")

# a fixed palette for labels that come without a colour (id -> RGB), distinct at a glance
PALETTE = [(221, 130, 101), (185, 102, 83), (144, 238, 144), (157, 108, 162), (216, 101, 79), (111, 184, 210)]


def palette_colour(idx: int) -> tuple[int, int, int]:
    return PALETTE[(idx - 1) % len(PALETTE)]


def cielab_to_rgb(scaled: Sequence[int]) -> tuple[int, int, int]:
    """DICOM's scaled CIELab (0..65535) -> sRGB 0..255 (D65), the inverse of pydicom-seg's rgb_to_cielab."""
    lightness = scaled[0] * 100 / 65535
    a, b = scaled[1] * 255 / 65535 - 128, scaled[2] * 255 / 65535 - 128
    fy = (lightness + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    xyz = np.where(f**3 > 0.008856, f**3, (f - 16 / 116) / 7.787) * np.array([0.95047, 1.0, 1.08883])
    linear = (
        np.array(
            [
                [3.2404542, -1.5371385, -0.4985314],
                [-0.9692660, 1.8760108, 0.0415560],
                [0.0556434, -0.2040259, 1.0572252],
            ]
        )
        @ xyz
    )
    linear = np.clip(linear, 0, 1)
    srgb = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return tuple(int(round(float(v) * 255)) for v in srgb)


def label_ids(seg: Dataset) -> dict[int, int]:
    """Segment Number -> label id of a SEG dataset (header only is enough): the ids our Tracking
    IDs carry where every segment has one and they differ; else (a SEG of another tool, or one a
    tool extended) the segment numbers themselves, never a mix that could give two segments one id."""
    items = list(seg.get("SegmentSequence", []))
    numbers = [int(item.SegmentNumber) for item in items]
    tracked = [_TRACKED.fullmatch(str(item.get("TrackingID", ""))) for item in items]
    ids = [int(match.group(1)) for match in tracked if match]
    if len(ids) == len(numbers) and len(set(ids)) == len(ids):
        return dict(zip(numbers, ids))
    return {number: number for number in numbers}


def segments_of(seg: Dataset) -> list[dict]:
    """[{"idx", "name", "color"}] of a SEG dataset (header only is enough); idx is the label id."""
    segments = []
    ids = label_ids(seg)
    for item in seg.get("SegmentSequence", []):
        idx = ids[int(item.SegmentNumber)]
        entry = {"idx": idx, "name": str(item.get("SegmentLabel", f"label_{idx}"))}
        if "RecommendedDisplayCIELabValue" in item:
            entry["color"] = list(cielab_to_rgb([int(v) for v in item.RecommendedDisplayCIELabValue]))
        segments.append(entry)
    return segments


def _template(
    label_info: list[dict], present: list[int], description: str, algorithm: str, algorithm_type: str
) -> Dataset:
    """The SEG template: segment k (1..N) describes the k-th label id of ``present``."""
    by_idx = {int(entry["idx"]): entry for entry in label_info if "idx" in entry}
    attributes = []
    for number, idx in enumerate(present, 1):
        entry = by_idx.get(idx, {})
        name = str(entry.get("name") or f"label_{idx}")
        colour = [int(v) for v in list(entry.get("color") or palette_colour(idx))[:3]]
        attributes.append(
            {
                "labelID": number,
                "SegmentLabel": name,
                "SegmentDescription": name,
                "SegmentAlgorithmType": algorithm_type,
                "SegmentAlgorithmName": algorithm,
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "123037004",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Anatomical Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "85756007",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": name,
                },
                "recommendedDisplayRGBValue": colour,
            }
        )
    template = from_dcmqi_metainfo(
        {
            "ContentCreatorName": "SDFSMIS",
            "SeriesDescription": description,
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "ContentLabel": "SEGMENTATION",
            "ContentDescription": description,
            "ClinicalTrialSeriesID": "Session1",
            "ClinicalTrialTimePointID": "1",
            "ClinicalTrialCoordinatingCenterName": "SDFSMIS",
            "BodyPartExamined": "",
            "segmentAttributes": [attributes],
        }
    )
    # pydicom-seg fills RecommendedDisplayCIELabValue from the RGB value; keep it explicit for readers
    for item, attribute, idx in zip(template.SegmentSequence, attributes, present):
        item.RecommendedDisplayCIELabValue = rgb_to_cielab(attribute["recommendedDisplayRGBValue"])
        item.TrackingID = TRACKING_ID.format(idx)
        item.TrackingUID = generate_uid()
    return template


def labelmap_to_seg(
    label_path: str | Path,
    sources: Sequence[Dataset],
    label_info: list[dict],
    description: str,
    algorithm: str = "SD-FSMIS",
    algorithm_type: str = "SEMIAUTOMATIC",
    software_version: str | None = None,
):
    """A labelmap on the image's voxel grid (any ITK-readable file) and the image series' datasets
    (headers are enough) -> one DICOM SEG instance that references the series, its segments
    numbered 1..N in label-id order, each with its label id in its Tracking ID. Raises ValueError
    for an empty labelmap. ``algorithm`` names what drew the segments (each segment's
    SegmentAlgorithmName); ``software_version``, where given, is its version (SoftwareVersions,
    beside pydicom-seg's own), so that a reader can tell which release produced a result."""
    mask = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt16)
    ids = sitk.GetArrayViewFromImage(mask)
    present = sorted(int(v) for v in np.unique(ids) if v)
    if not present:
        raise ValueError("the label is empty: nothing to store as a DICOM SEG")
    to_number = np.zeros(present[-1] + 1, dtype=label_type(len(present)))
    to_number[present] = np.arange(1, len(present) + 1)
    numbered = sitk.GetImageFromArray(to_number[ids])
    numbered.CopyInformation(mask)
    writer = pydicom_seg.MultiClassWriter(
        template=_template(label_info, present, description, algorithm, algorithm_type),
        inplane_cropping=False,
        skip_empty_slices=False,
        skip_missing_segment=False,
    )
    seg = writer.write(numbered, sources)
    if software_version is not None:
        seg.SoftwareVersions = [f"{algorithm} {software_version}", f"pydicom-seg {seg.SoftwareVersions}"]
    seg.preamble = b"\0" * 128  # a complete Part-10 file, whatever writer sends it on
    return seg


def seg_to_labelmap(seg_path: str | Path, output: str | Path) -> list[dict]:
    """A DICOM SEG file -> a labelmap file (ids: :func:`label_ids`) and its segments' info."""
    seg = pydicom.dcmread(str(seg_path))
    if not seg.get("SegmentSequence"):
        raise ValueError(f"DICOM SEG {Path(seg_path).name} describes no segment: nothing to read as a label")
    result = pydicom_seg.MultiClassReader().read(seg)
    ids = label_ids(seg)
    to_id = np.zeros(max(ids) + 1, dtype=label_type(max(ids.values())))
    for number, idx in ids.items():
        to_id[number] = idx
    labels = sitk.GetImageFromArray(to_id[result.data])  # result.data: segment numbers, [k, j, i]
    labels.CopyInformation(result.image)
    sitk.WriteImage(labels, str(output), True)
    return segments_of(seg)


def seg_to_series_labels(seg: Dataset, series: DicomSeries, ids: Sequence[int]) -> np.ndarray:
    """The segments of label ids ``ids`` (:func:`label_ids`, as :func:`segments_of` gives them) of
    a SEG -> a label array of those ids on ``series``' voxel grid [i, j, k] (where segments
    overlap, the higher id wins). Each frame is put on the slice its ImagePositionPatient falls
    on, so a SEG that skips empty slices or crops its frames in-plane lands where it belongs;
    frames off the series' planes or grid are refused."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    frames = seg.pixel_array
    if frames.ndim == 2:  # pydicom decodes a single frame without its frame axis
        frames = frames[None]
    fractional = str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = float(seg.get("MaximumFractionalValue", 1)) / 2 if fractional else 0
    inverse = np.linalg.inv(RAS_TO_LPS @ series.affine)
    first = series.datasets[0]
    labels = np.zeros(series.data.shape, dtype=label_type(max(ids, default=0)))
    by_number: dict[int, list[int]] = {}
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        identification = group.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        by_number.setdefault(int(identification[0].ReferencedSegmentNumber), []).append(index)
    chosen = set(ids)
    for idx, number in sorted((idx, number) for number, idx in label_ids(seg).items() if idx in chosen):
        for index in by_number.get(number, []):
            group = seg.PerFrameFunctionalGroupsSequence[index]
            orientation = (group.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
            spacing = (group.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0].PixelSpacing
            same_plane = np.allclose(
                [float(v) for v in orientation.ImageOrientationPatient],
                [float(v) for v in first.ImageOrientationPatient],
                atol=1e-3,
            ) and np.allclose([float(v) for v in spacing], [float(v) for v in first.PixelSpacing], atol=1e-3)
            if not same_plane:
                raise VolumeError(
                    "the SEG's frames are not on the series' image planes (orientation or pixel spacing differ): "
                    "resampling a SEG is not supported"
                )
            position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
            voxel = inverse @ np.array([*position, 1.0])
            if np.abs(voxel[:3] - np.round(voxel[:3])).max() > 0.1:
                raise VolumeError(f"SEG frame {index + 1} lies between the series' slices or voxels ({position})")
            i0, j0, k = (int(v) for v in np.round(voxel[:3]))
            if not 0 <= k < labels.shape[2]:
                raise VolumeError(f"SEG frame {index + 1} lies outside the series ({position})")
            mask = (frames[index] > threshold).T  # frame rows follow j, columns i
            i1, j1 = min(i0 + mask.shape[0], labels.shape[0]), min(j0 + mask.shape[1], labels.shape[1])
            part = mask[max(0, -i0) : i1 - i0, max(0, -j0) : j1 - j0]
            labels[max(0, i0) : i1, max(0, j0) : j1, k][part] = idx
    return labels
