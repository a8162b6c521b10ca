"""The app's DICOMweb datastore (Orthanc, or any DICOMweb PACS), as OHIF uses it.

What it changes in MONAI Label's DICOMWebDatastore, and why:
- images are the series of every modality in ``modalities`` (CT and MR by default: one QIDO
  query per modality, because Orthanc does not match a list of modalities in one query);
- a final label is a DICOM SEG or an RTSTRUCT in the PACS that references the image series. The
  newest such object of a series is that series' final label, converted on demand into a labelmap
  on the series' grid in the local cache with its segments' (ROIs') ids, names and colours
  (``label_info``), so that a SEG exported from OHIF or Slicer, or an RTSTRUCT from a planning
  system, serves as a support;
- saving a final label writes a DICOM SEG with pydicom-seg, or an RTSTRUCT (``--conf
  result_format rtstruct``), ids, names and colours kept, and stores it with STOW-RS: no dcmqi
  binary, so the server also starts and works offline.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cachetools import TTLCache, cached
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import dcmread
from pydicom.dataset import Dataset

from lib.configs.runtime import RESULT_FORMATS
from lib.infers.support import label_colour
from sdfsmis import __version__
from sdfsmis.dicom.reader import read_series_folder
from sdfsmis.dicom.rtstruct import labels_to_rtstruct, referenced_series_uids, structures_of
from sdfsmis.dicom.seg import labelmap_to_seg, seg_to_labelmap, segments_of
from sdfsmis.dicom.volume import RTSTRUCT, SEG, load_segmentation, onto_series_grid, series_volume
from sdfsmis.io.volume import check_same_geometry, load_volume

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
SEG_CATALOG_TTL_S = 5  # a SEG exported from a viewer is seen within seconds
#: the DICOM series' dates and times that may stamp a label object, first found wins
_STAMPS = (
    ("SeriesDate", "SeriesTime"),
    ("ContentDate", "ContentTime"),
    ("StructureSetDate", "StructureSetTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
)


def connect(url: str, modalities: list[str], result_format: str = "seg") -> SDFSMISDICOMWebDatastore:
    """The datastore for ``--studies http(s)://.../dicom-web`` with MONAI Label's own settings
    (credentials, QIDO/WADO/STOW prefixes, cache path, search filter); a saved final label is
    stored as ``result_format`` (``seg`` or ``rtstruct``)."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    search_filter = {k: v for k, v in settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER.items() if k != "Modality"}
    return SDFSMISDICOMWebDatastore(client, modalities, search_filter, cache_path, result_format)


def _seg_timestamp(meta: Dataset) -> float:
    """When a SEG or RTSTRUCT was made: the newest is a series' final label. An RTSTRUCT has no
    series date of its own (ours: structure set date and time)."""
    date, time_of_day = next(
        ((str(meta.get(d) or ""), str(meta.get(t) or "")) for d, t in _STAMPS if meta.get(d)), ("", "")
    )
    stamp = f"{date}{time_of_day}"
    try:
        return time.mktime(time.strptime(stamp[:14].ljust(14, "0"), "%Y%m%d%H%M%S"))
    except ValueError:
        return 0.0


class SDFSMISDICOMWebDatastore(DICOMWebDatastore):
    def __init__(
        self, client, modalities: list[str], search_filter: dict, cache_path: str | None, result_format: str = "seg"
    ):
        super().__init__(client=client, search_filter=search_filter, cache_path=cache_path, convert_to_nifti=True)
        if result_format not in RESULT_FORMATS:
            raise ValueError(f"result_format {result_format!r}: use one of {', '.join(RESULT_FORMATS)}")
        self._modalities = [m.strip().upper() for m in modalities if m.strip()]
        self._result_format = result_format
        self._label_lock = threading.Lock()

    @cached(cache=TTLCache(maxsize=4, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def list_images(self) -> list[str]:
        series: list[str] = []
        for modality in self._modalities:
            for found in self._client.search_for_series(search_filters={**self._search_filter, "Modality": modality}):
                series.append(str(Dataset.from_json(found)["SeriesInstanceUID"].value))
        return series

    @cached(cache=TTLCache(maxsize=4, ttl=SEG_CATALOG_TTL_S))
    def seg_catalog(self) -> dict[str, dict[str, Any]]:
        """Every SEG and RTSTRUCT series in the PACS -> its kind, the image series it labels, its
        segments (ROIs with closed contours: points and open lines are no areas) and its time."""
        catalog = {}
        for kind in (SEG, RTSTRUCT):
            for found in self._client.search_for_series(search_filters={"Modality": kind}):
                seg = Dataset.from_json(found)
                meta = Dataset.from_json(
                    self._client.retrieve_series_metadata(str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID))[0]
                )
                if kind == SEG:
                    referenced = [str(item.SeriesInstanceUID) for item in meta.get("ReferencedSeriesSequence", [])]
                    segments = segments_of(meta)
                else:
                    referenced = sorted(referenced_series_uids(meta))
                    segments = [entry for entry in structures_of(meta) if entry["idx"] in _closed_rois(meta)]
                if not referenced:
                    logger.warning(f"{kind} {seg.SeriesInstanceUID} references no image series: ignored")
                    continue
                catalog[str(seg.SeriesInstanceUID)] = {
                    "kind": kind,
                    "image": referenced[0],
                    "study": str(seg.StudyInstanceUID),
                    "segments": segments,
                    "ts": _seg_timestamp(meta),
                }
        return catalog

    def _newest_seg(self, image_id: str) -> str | None:
        segs = [(entry["ts"], uid) for uid, entry in self.seg_catalog().items() if entry["image"] == image_id]
        return max(segs)[1] if segs else None

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        images = set(self.list_images())
        return sorted({entry["image"] for entry in self.seg_catalog().values() if entry["image"] in images})

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        if tag != FINAL:
            return LocalDatastore.get_label_by_image_id(self, image_id, tag)
        newest = self._newest_seg(image_id)
        if newest is None:
            return ""
        with self._label_lock:
            label_id = LocalDatastore.get_label_by_image_id(self, image_id, FINAL)
            if label_id and self.get_label_info(label_id, FINAL).get("SeriesInstanceUID") == newest:
                return label_id
            return self._import_seg(image_id, newest)

    def _import_seg(self, image_id: str, seg_uid: str) -> str:
        """Download a SEG or an RTSTRUCT and keep it in the local cache, as a labelmap on the
        series' grid, as the image's final label."""
        entry = self.seg_catalog()[seg_uid]
        self.get_image_uri(image_id)  # the image must be in the local cache before its label
        with tempfile.TemporaryDirectory() as folder:
            dicom_web_download_series(entry["study"], seg_uid, folder, self._client, self._fetch_by_frame)
            seg_file = next(Path(folder).glob("*.dcm"))
            labelmap = Path(folder, "label.nii.gz")
            if entry.get("kind") == RTSTRUCT:  # contours filled on the series' own grid (its cached slices)
                label, segments = load_segmentation(seg_file, read_series_folder(self._series_dir(image_id)))
                label.save_label(label.data, labelmap)
            else:
                segments = seg_to_labelmap(seg_file, labelmap)
            label_info = [{**s, "color": label_colour(s)} for s in segments]
            label_id = LocalDatastore.save_label(
                self, image_id, str(labelmap), FINAL, {"label_info": label_info, "SeriesInstanceUID": seg_uid}
            )
        self.update_label_info(label_id, FINAL, {"ts": entry["ts"] or time.time()})
        logger.info(
            f"{entry.get('kind', SEG)} {seg_uid} is now the final label of {image_id}: {[s['name'] for s in segments]}"
        )
        return label_id

    def _series_dir(self, image_id: str) -> Path:
        """The image series' DICOM slices in the local cache (downloaded by ``get_image_uri``)."""
        return Path(self._datastore.image_path(), image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if label_tag != FINAL:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        image_uri = self.get_image_uri(image_id)
        converted = ""
        if label_filename.endswith(".bin"):  # OHIF's raw labelmap upload
            label_filename = converted = binary_to_image(image_uri, label_filename)
        entries = [
            {**entry, "color": label_colour(entry)}
            for entry in (label_info.get("label_info") or [])
            if isinstance(entry, dict) and "idx" in entry
        ]
        series_dir = self._series_dir(image_id)
        try:
            if self._result_format == "rtstruct":
                seg = self._rtstruct(label_filename, series_dir, entries)
            else:
                sources = [dcmread(str(path), stop_before_pixels=True) for path in sorted(series_dir.glob("*.dcm"))]
                seg = labelmap_to_seg(label_filename, sources, entries, "SD-FSMIS label")
            self._client.store_instances([seg])
            info = {**label_info, "label_info": entries, "SeriesInstanceUID": str(seg.SeriesInstanceUID)}
            with self._label_lock:
                label_id = LocalDatastore.save_label(self, image_id, label_filename, FINAL, info)
            self.seg_catalog.cache_clear()
        finally:
            if converted:
                os.unlink(converted)
        logger.info(f"final label of {image_id} stored as {seg.Modality} {seg.SeriesInstanceUID}")
        return label_id

    @staticmethod
    def _rtstruct(label_filename: str, series_dir: Path, entries: list[dict]) -> Dataset:
        """A labelmap on the image's grid (any voxel order of it) -> an RTSTRUCT on its series;
        a label on another grid is refused rather than contoured onto the wrong anatomy."""
        series = read_series_folder(series_dir)
        image = series_volume(series, series_dir)
        label = onto_series_grid(load_volume(label_filename, label=True), image)
        check_same_geometry(image, label)
        return labels_to_rtstruct(
            image.to_original(label.data), series, entries, "SD-FSMIS label", "SD-FSMIS", __version__
        )


def _closed_rois(meta: Dataset) -> set[int]:
    """The ROI numbers of an RTSTRUCT that have closed planar contours (areas)."""
    return {
        int(item.ReferencedROINumber)
        for item in meta.get("ROIContourSequence", [])
        for contour in item.get("ContourSequence", [])
        if str(contour.get("ContourGeometricType", "")) == "CLOSED_PLANAR"
    }
