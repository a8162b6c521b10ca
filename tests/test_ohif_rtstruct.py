"""DICOMweb mode with RTSTRUCTs: an RT Structure Set stored in Orthanc for a series is that series'
final label and serves as a support (ROI names and colours kept), a saved final label goes back
as an RTSTRUCT with ``--conf result_format rtstruct``, the bundled OHIF runs the model with an
RTSTRUCT support and lists the stored RTSTRUCT and SEG results (its Basic Viewer mode draws the
RTSTRUCT and loads the SEG with its segment names), and an unknown result_format stops the
server at start. The real MONAI Label server (tiny backbone, untrained heads allowed: what is
checked here is where labels come from and go, not segmentation quality) and Orthanc on
loopback. Expected voxels are the generated labels, compared in RAS by nibabel."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from monailabel.client.client import MONAILabelClient
from pydicom.dataset import Dataset
from test_ohif import LABELMAP_STATE, OHIF_PARAMS, _chromium_driver

from app_server import monailabel_server
from sdfsmis.dicom.orthanc import store_instances
from sdfsmis.dicom.reader import read_series_folder
from sdfsmis.dicom.rtstruct import labels_to_rtstruct, referenced_series_uids
from sdfsmis.dicom.series import nifti_to_series, write_series
from sdfsmis.dicom.volume import load_segmentation, onto_series_grid, series_volume
from sdfsmis.io.volume import load_volume
from sdfsmis.samples.synthetic import make_studies, make_volume, write_nifti

# ROI names and colours that no anatomy table gives: what is served must come from the RTSTRUCT
ROIS = [
    {"idx": 1, "name": "Liver_CTV", "color": [12, 200, 34]},
    {"idx": 4, "name": "Spleen_CTV", "color": [230, 20, 210]},
]


def _canonical(path: Path) -> np.ndarray:
    """A label file's voxels in RAS order (nibabel), whatever voxel order it was written in."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.int64)


def _upload(pacs, folder: Path, name: str, seed: int, orientation: str, rtstruct: bool) -> dict:
    """A CT series in Orthanc; with ``rtstruct``, its liver and spleen as an RTSTRUCT beside it."""
    image, label, affine = make_volume(seed, orientation=orientation)
    image_path = write_nifti(folder / f"{name}.nii.gz", image.astype(np.int16), affine)
    label[~np.isin(label, [1, 4])] = 0
    label_path = write_nifti(folder / f"{name}_label.nii.gz", label, affine, np.uint8)
    datasets = nifti_to_series(image_path, "CT", patient_id=name)
    store_instances(datasets, pacs.dicomweb)
    write_series(datasets, folder / name)
    if rtstruct:  # as a planning system exports contours: an RTSTRUCT stored to the PACS
        series = read_series_folder(folder / name)
        grid = series_volume(series, folder / name)
        labels = grid.to_original(onto_series_grid(load_volume(label_path, label=True), grid).data)
        store_instances([labels_to_rtstruct(labels, series, ROIS, "planning", "TPS", "1")], pacs.dicomweb)
    return {
        "series": str(datasets[0].SeriesInstanceUID),
        "study": str(datasets[0].StudyInstanceUID),
        "label": label_path,
        "folder": folder / name,
    }


@pytest.fixture(scope="module")
def studies(pacs, tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("nifti-rt")
    return {
        "rt_support": _upload(pacs, folder, "rt-support", 31, "RAS", rtstruct=True),
        "rt_ohif": _upload(pacs, folder, "rt-ohif", 32, "RAS", rtstruct=False),
        "rt_save": _upload(pacs, folder, "rt-save", 33, "LPS", rtstruct=False),
        "rt_view": _upload(pacs, folder, "rt-view", 34, "RAS", rtstruct=False),
    }


@pytest.fixture(scope="module")
def server(pacs, studies, tiny_backbone, tmp_path_factory):
    with _app(pacs, tiny_backbone, tmp_path_factory.mktemp("dicomweb-rt-app"), "rtstruct") as url:
        yield url


@contextmanager
def _app(pacs, tiny_backbone, root: Path, result_format: str) -> Iterator[str]:
    """The app in DICOMweb mode on ``pacs``, storing saved final labels as ``result_format``."""
    conf = [("backbone", tiny_backbone), ("model_dir", root / "model"), ("allow_untrained", "true")]
    conf.append(("result_format", result_format))
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    with monailabel_server(pacs.dicomweb, root / "server.log", *conf, env=env) as url:
        yield url


def _labels_in_pacs(pacs, modality: str, series_uid: str) -> list[Dataset]:
    """The headers of the SEG or RTSTRUCT series in the PACS that reference an image series."""
    found = []
    for entry in requests.get(f"{pacs.dicomweb}/series", params={"Modality": modality}, timeout=10).json():
        study, uid = entry["0020000D"]["Value"][0], entry["0020000E"]["Value"][0]
        meta = requests.get(f"{pacs.dicomweb}/studies/{study}/series/{uid}/metadata", timeout=10).json()[0]
        header = Dataset.from_json(meta)
        referenced = (
            referenced_series_uids(header)
            if modality == "RTSTRUCT"
            else {str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence", [])}
        )
        if series_uid in referenced:
            found.append(header)
    return found


def test_rtstruct_in_orthanc_is_listed_as_a_label_and_serves_as_support(server, studies, tmp_path):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["datastore"]["total"] == 4  # the four CT series; the RTSTRUCT is a label, not an image
    assert info["datastore"]["completed"] == 1  # rt-support is labelled, by its RTSTRUCT
    labels = info["models"]["sdfsmis"]["labels"]
    assert {name: labels[name] for name in ("Liver_CTV", "Spleen_CTV")} == {"Liver_CTV": 1, "Spleen_CTV": 4}

    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    params = {**OHIF_PARAMS, "support": studies["rt_support"]["series"]}
    _, result = client.infer("sdfsmis", studies["rt_ohif"]["series"], params)
    assert result["support"]["source"] == "support_param"
    assert result["support"]["image"] == studies["rt_support"]["series"]
    assert result["label_names"] == {"Liver_CTV": 1, "Spleen_CTV": 4}
    assert result["label_colors"] == {"Liver_CTV": [12, 200, 34], "Spleen_CTV": [230, 20, 210]}

    # the support the model got: the RTSTRUCT's contours filled on the series' grid, voxel for voxel
    served = requests.get(
        f"{server}/datastore/label", params={"label": studies["rt_support"]["series"], "tag": "final"}, timeout=30
    )
    assert served.status_code == 200
    (tmp_path / "served.nii.gz").write_bytes(served.content)
    np.testing.assert_array_equal(_canonical(tmp_path / "served.nii.gz"), _canonical(studies["rt_support"]["label"]))


def test_ohif_runs_the_model_with_an_rtstruct_support(server, studies, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _chromium_driver(tmp_path / "profile")
    try:
        driver.get(f"{server}/ohif/monai-label?StudyInstanceUIDs={studies['rt_ohif']['study']}")
        wait = WebDriverWait(driver, 120, poll_frequency=0.5)
        field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=text]"))
        wait.until(lambda d: "CT rt-ohif" in d.execute_script("return document.body.innerText"))
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(f"{server}/")
        field.find_element(By.XPATH, "following::button[1]").click()  # connect
        options = wait.until(lambda d: d.find_elements(By.XPATH, "//option[normalize-space()='sdfsmis']"))
        Select(options[0].find_element(By.XPATH, "..")).select_by_visible_text("sdfsmis")
        driver.get_log("browser")
        driver.find_element(By.XPATH, "//button[normalize-space()='Run']").click()
        wait.until(lambda d: any("updated the segmentation" in e["message"] for e in d.get_log("browser")))
        state = driver.execute_script(LABELMAP_STATE)
        page = driver.execute_script("return document.body.innerText")
    finally:
        driver.quit()
    assert "Running Segmentation - Successful" in page
    # OHIF's segments are named after the RTSTRUCT's ROIs: the support OHIF's request got was the RTSTRUCT
    assert {"Liver_CTV", "Spleen_CTV"} <= {label for _, label in state["segments"]}
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    _, result = client.infer("sdfsmis", studies["rt_ohif"]["series"], dict(OHIF_PARAMS))
    assert result["support"]["source"] == "latest_label"
    assert result["support"]["image"] == studies["rt_support"]["series"]
    ohif_index = {label: index for index, label in state["segments"]}
    for name in result["label_names"]:
        shown = state["perSlice"].get(str(ohif_index[name]), [])
        assert sum(shown) == result["voxels"][name]


def test_result_format_rtstruct_stores_a_saved_label_as_rtstruct(server, pacs, studies, tmp_path):
    study = studies["rt_save"]
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    assert _labels_in_pacs(pacs, "RTSTRUCT", study["series"]) == []

    client.save_label(study["series"], str(study["label"]), tag="final", params={"label_info": ROIS})

    assert _labels_in_pacs(pacs, "SEG", study["series"]) == []  # result_format rtstruct: no SEG
    (header,) = _labels_in_pacs(pacs, "RTSTRUCT", study["series"])
    assert header.StudyInstanceUID == study["study"]
    (stored,) = DICOMwebClient(url=pacs.dicomweb).retrieve_series(header.StudyInstanceUID, header.SeriesInstanceUID)
    stored.save_as(str(tmp_path / "rt.dcm"))
    back, structures = load_segmentation(tmp_path / "rt.dcm", read_series_folder(study["folder"]))
    assert [(s["idx"], s["name"], s["color"]) for s in structures] == [
        (1, "Liver_CTV", [12, 200, 34]),
        (4, "Spleen_CTV", [230, 20, 210]),
    ]
    np.testing.assert_array_equal(back.data, _canonical(study["label"]))  # the saved voxels, read back

    # and it is now that series' support, read from the PACS like any other RTSTRUCT
    _, again = client.infer("sdfsmis", study["series"], dict(OHIF_PARAMS))
    assert again["support"]["source"] == "same_image_label"
    assert again["label_names"] == {"Liver_CTV": 1, "Spleen_CTV": 4}


# what OHIF holds once a study is open: its display sets (one per series and SOP class handler),
# and each segmentation with its segments and how the viewports draw it (Labelmap, Contour)
OHIF_STATE = """
if (!window.services) return {displaySets: [], segmentations: []};  // the viewer is still starting
const {displaySetService, segmentationService, viewportGridService} = window.services;
let viewports = [];
try {
  viewports = [...viewportGridService.getState().viewports.keys()];
} catch (error) {}  // the grid is not laid out yet: nothing is drawn
return {
  displaySets: displaySetService.getActiveDisplaySets().map(d => [d.Modality, d.SeriesDescription]),
  segmentations: segmentationService.getSegmentations().map(s => ({
    segments: Object.values(s.segments).filter(Boolean).map(x => [x.segmentIndex, x.label]),
    drawn: viewports.flatMap(v => segmentationService
      .getSegmentationRepresentations(v, {segmentationId: s.segmentationId}).map(r => r.type)),
  })),
};
"""


@pytest.fixture(scope="module")
def results_in_pacs(server, pacs, studies, tiny_backbone, tmp_path_factory) -> dict:
    """rt-view's label saved as the app's result twice: an RTSTRUCT (``server``) and a SEG (the
    same app with ``result_format seg``), both in the PACS beside the CT series."""
    study = studies["rt_view"]
    folder = tmp_path_factory.mktemp("rt-view-results")
    MONAILabelClient(server, tmpdir=str(folder)).save_label(
        study["series"], str(study["label"]), tag="final", params={"label_info": ROIS}
    )
    (folder / "seg-app").mkdir()
    with _app(pacs, tiny_backbone, folder / "seg-app", "seg") as seg_server:
        MONAILabelClient(seg_server, tmpdir=str(folder)).save_label(
            study["series"], str(study["label"]), tag="final", params={"label_info": ROIS}
        )
    assert [len(_labels_in_pacs(pacs, kind, study["series"])) for kind in ("RTSTRUCT", "SEG")] == [1, 1]
    return study


def _open_study(driver, server: str, mode: str, study: dict):
    """OHIF at ``/ohif/<mode>`` on a study, once its series thumbnails are listed."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{server}/ohif/{mode}?StudyInstanceUIDs={study['study']}")
    wait = WebDriverWait(driver, 120, poll_frequency=0.5)
    wait.until(lambda d: len(d.execute_script(OHIF_STATE)["displaySets"]) == 3)
    return wait


def _load_series(driver, wait, modality: str) -> None:
    """Double-click a series' thumbnail, as a user loads it into the viewport."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    thumbnail = driver.find_element(By.XPATH, f"//*[normalize-space(text())='{modality}']")
    ActionChains(driver).double_click(thumbnail).perform()


def test_ohif_lists_the_rtstruct_and_seg_results_of_a_study(server, results_in_pacs, tmp_path):
    driver = _chromium_driver(tmp_path / "profile")
    try:  # the MONAI Label mode, where the app's users work
        _open_study(driver, server, "monai-label", results_in_pacs)
        state = driver.execute_script(OHIF_STATE)
        page = driver.execute_script("return document.body.innerText")
    finally:
        driver.quit()
    # CT "<name>.nii.gz" as nifti_to_series names it; both results as labels_to_rtstruct and labelmap_to_seg do
    assert sorted(state["displaySets"]) == [
        ["CT", "CT rt-view.nii.gz"],
        ["RTSTRUCT", "SD-FSMIS label"],
        ["SEG", "SD-FSMIS label"],
    ]
    # the study browser's thumbnails: modality, description, series number (301 RTSTRUCT, 300 SEG)
    assert re.search(r"RTSTRUCT\s+SD-FSMIS label\s+S:301", page)
    assert re.search(r"SEG\s+SD-FSMIS label\s+S:300", page)


def test_ohif_basic_viewer_draws_the_rtstruct_result_with_its_roi_names(server, results_in_pacs, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _chromium_driver(tmp_path / "profile")
    try:  # the MONAI Label mode has no RTSTRUCT handler: the Basic Viewer (/ohif/viewer) has
        wait = _open_study(driver, server, "viewer", results_in_pacs)
        _load_series(driver, wait, "RTSTRUCT")
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Yes']"))[0].click()
        wait.until(lambda d: any(s["drawn"] for s in d.execute_script(OHIF_STATE)["segmentations"]))
        (segmentation,) = driver.execute_script(OHIF_STATE)["segmentations"]
    finally:
        driver.quit()
    assert segmentation == {"segments": [[1, "Liver_CTV"], [4, "Spleen_CTV"]], "drawn": ["Contour"]}


def test_ohif_loads_the_seg_result_with_its_segment_names(server, results_in_pacs, tmp_path):
    """The SEG numbers its segments 1..N as DICOM asks (labels 1 and 4 are segments 1 and 2, the
    ids in their Tracking IDs): the bundled OHIF 3.10, which reads segment k as the k-th item of
    the Segment Sequence, loads it as a labelmap with the segment names (it failed on 1, 4)."""
    from selenium.webdriver.common.by import By

    driver = _chromium_driver(tmp_path / "profile")
    try:
        wait = _open_study(driver, server, "viewer", results_in_pacs)
        driver.get_log("browser")
        _load_series(driver, wait, "SEG")
        failed = []  # OHIF's own error, if it comes, ends the wait: the assertion below says what was shown
        wait.until(
            lambda d: (
                d.find_elements(By.XPATH, "//button[normalize-space()='Yes']")
                or failed.extend(e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE")
                or failed
            )
        )
        if not failed:
            driver.find_element(By.XPATH, "//button[normalize-space()='Yes']").click()
            wait.until(lambda d: any(s["drawn"] for s in d.execute_script(OHIF_STATE)["segmentations"]))
        segmentations = driver.execute_script(OHIF_STATE)["segmentations"]
    finally:
        driver.quit()
    assert segmentations == [{"segments": [[1, "Liver_CTV"], [2, "Spleen_CTV"]], "drawn": ["Labelmap"]}], failed


@pytest.mark.parametrize("studies_source", ["folder", "dicomweb"])
def test_unknown_result_format_stops_the_server_naming_the_key_and_the_formats(
    studies_source, pacs, tiny_backbone, tmp_path
):
    if studies_source == "folder":
        make_studies(tmp_path / "studies", 1)
    source = tmp_path / "studies" if studies_source == "folder" else pacs.dicomweb
    conf = [("backbone", tiny_backbone), ("model_dir", tmp_path / "model"), ("result_format", "nrrd")]
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
    with pytest.raises(RuntimeError, match="server did not start") as refused:
        with monailabel_server(source, tmp_path / "server.log", *conf, env=env):
            pass
    assert "--conf result_format 'nrrd' is not one of: seg, rtstruct" in str(refused.value)
