"""Labelmaps <-> DICOM SEG, keeping each segment's label id, name and display colour.

A radiologist's annotation reaches a PACS as a DICOM SEG (exported from OHIF or Slicer); our
results go back the same way. Segment numbers are the label ids, so a SEG used as a support
gives results with the same ids, names and colours. Written with pydicom-seg (no dcmqi binary
needed, so it works offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom_seg.template import from_dcmqi_metainfo, rgb_to_cielab

from sdfsmis.dicom.reader import DicomSeries
from sdfsmis.dicom.series import RAS_TO_LPS
from sdfsmis.io.volume import VolumeError, label_type

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

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


def segments_of(seg: Dataset) -> list[dict]:
    """[{"idx", "name", "color"}] of a SEG dataset (header only is enough)."""
    segments = []
    for item in seg.get("SegmentSequence", []):
        entry = {"idx": int(item.SegmentNumber), "name": str(item.get("SegmentLabel", f"label_{item.SegmentNumber}"))}
        if "RecommendedDisplayCIELabValue" in item:
            entry["color"] = list(cielab_to_rgb([int(v) for v in item.RecommendedDisplayCIELabValue]))
        segments.append(entry)
    return segments


def _template(
    label_info: list[dict], present: list[int], description: str, algorithm: str, algorithm_type: str
) -> Dataset:
    by_idx = {int(entry["idx"]): entry for entry in label_info if "idx" in entry}
    attributes = []
    for idx in present:
        entry = by_idx.get(idx, {})
        name = str(entry.get("name") or f"label_{idx}")
        colour = [int(v) for v in list(entry.get("color") or palette_colour(idx))[:3]]
        attributes.append(
            {
                "labelID": idx,
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
    for item, attribute in zip(template.SegmentSequence, attributes):
        item.RecommendedDisplayCIELabValue = rgb_to_cielab(attribute["recommendedDisplayRGBValue"])
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
    (headers are enough) -> one DICOM SEG instance that references the series. Raises ValueError
    for an empty labelmap. ``algorithm`` names what drew the segments (each segment's
    SegmentAlgorithmName); ``software_version``, where given, is its version (SoftwareVersions,
    beside pydicom-seg's own), so that a reader can tell which release produced a result."""
    mask = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt16)
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(mask)) if v)
    if not present:
        raise ValueError("the label is empty: nothing to store as a DICOM SEG")
    writer = pydicom_seg.MultiClassWriter(
        template=_template(label_info, present, description, algorithm, algorithm_type),
        inplane_cropping=False,
        skip_empty_slices=False,
        skip_missing_segment=False,
    )
    seg = writer.write(mask, sources)
    if software_version is not None:
        seg.SoftwareVersions = [f"{algorithm} {software_version}", f"pydicom-seg {seg.SoftwareVersions}"]
    seg.preamble = b"\0" * 128  # a complete Part-10 file, whatever writer sends it on
    return seg


def seg_to_labelmap(seg_path: str | Path, output: str | Path) -> list[dict]:
    """A DICOM SEG file -> a labelmap file (ids = segment numbers) and its segments' info."""
    seg = pydicom.dcmread(str(seg_path))
    result = pydicom_seg.MultiClassReader().read(seg)
    sitk.WriteImage(result.image, str(output), True)
    return segments_of(seg)


def seg_to_series_labels(seg: Dataset, series: DicomSeries, numbers: Sequence[int]) -> np.ndarray:
    """The segments ``numbers`` of a SEG -> a label array on ``series``' voxel grid [i, j, k]
    (ids = segment numbers; where segments overlap, the higher number wins). Each frame is put on
    the slice its ImagePositionPatient falls on, so a SEG that skips empty slices or crops its
    frames in-plane lands where it belongs; frames off the series' planes or grid are refused."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    frames = seg.pixel_array
    if frames.ndim == 2:  # pydicom decodes a single frame without its frame axis
        frames = frames[None]
    fractional = str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = float(seg.get("MaximumFractionalValue", 1)) / 2 if fractional else 0
    inverse = np.linalg.inv(RAS_TO_LPS @ series.affine)
    first = series.datasets[0]
    labels = np.zeros(series.data.shape, dtype=label_type(max(numbers, default=0)))
    by_number: dict[int, list[int]] = {}
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        identification = group.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        by_number.setdefault(int(identification[0].ReferencedSegmentNumber), []).append(index)
    for number in sorted(numbers):
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
            labels[max(0, i0) : i1, max(0, j0) : j1, k][part] = number
    return labels
