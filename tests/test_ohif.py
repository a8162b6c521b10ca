"""The OHIF path end to end: Orthanc + DICOMweb on loopback, generated CT and MR volumes uploaded
as DICOM series, a DICOM SEG support as a viewer exports it, the real MONAI Label server in
DICOMweb mode (offline: no dcmqi download), and the bundled OHIF viewer driven in headless
Debian Chromium. Skips, saying why, only where Orthanc or Chromium cannot be installed
(`bash apps/system_packages.sh` installs them)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client.client import MONAILabelClient
from pydicom.dataset import Dataset

from app_server import monailabel_server
from sdfsmis.dicom.orthanc import store_instances
from sdfsmis.dicom.seg import labelmap_to_seg, segments_of
from sdfsmis.dicom.series import nifti_to_series
from sdfsmis.samples.synthetic import make_volume, write_nifti

ARTIFACTS = Path(os.environ.get("SDFSMIS_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
SUPPORT_INFO = [
    {"idx": 1, "name": "liver", "color": [221, 130, 101]},
    {"idx": 4, "name": "spleen", "color": [157, 108, 162]},
]
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}


def _upload(pacs, folder: Path, name: str, seed: int, modality: str, support: bool) -> dict:
    image, label, affine = make_volume(seed, modality=modality, orientation="LPS" if modality == "MR" else "RAS")
    image_path = write_nifti(folder / f"{name}.nii.gz", image.astype(np.int16) if modality == "CT" else image, affine)
    label[~np.isin(label, [1, 4])] = 0  # the radiologist annotated liver and spleen
    label_path = write_nifti(folder / f"{name}_label.nii.gz", label, affine, np.uint8)
    datasets = nifti_to_series(image_path, modality, patient_id=name)
    store_instances(datasets, pacs.dicomweb)
    entry = {"series": str(datasets[0].SeriesInstanceUID), "study": str(datasets[0].StudyInstanceUID)}
    if support:  # as OHIF or Slicer export an annotation: a SEG stored to the PACS
        store_instances([labelmap_to_seg(label_path, datasets, SUPPORT_INFO, "annotation")], pacs.dicomweb)
    return entry


@pytest.fixture(scope="module")
def studies(pacs, tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("nifti")
    return {
        "ct_support": _upload(pacs, folder, "ct-support", 21, "CT", support=True),
        "ct_query": _upload(pacs, folder, "ct-query", 22, "CT", support=False),
        "ct_ohif": _upload(pacs, folder, "ct-ohif", 23, "CT", support=False),
        "ct_ohif_dpl": _upload(pacs, folder, "ct-ohif-dpl", 26, "CT", support=False),
        "mr_support": _upload(pacs, folder, "mr-support", 24, "MR", support=True),
        "mr_query": _upload(pacs, folder, "mr-query", 25, "MR", support=False),
    }


@pytest.fixture(scope="module")
def server(pacs, studies, fitted_backbone, trained_checkpoint, trained_dpl, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb-app")
    conf = [("backbone", fitted_backbone), ("checkpoint", trained_checkpoint), ("model_dir", root / "model")]
    conf.append(("dpl_checkpoint", trained_dpl[1] / "dpl.safetensors"))
    # no internet, even where the machine has some: dcmqi must not be needed
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    with monailabel_server(pacs.dicomweb, root / "server.log", *conf, env=env) as url:
        yield url


def _segs_of(pacs, series_uid: str) -> list[dict]:
    """The SEG series in the PACS that reference an image series, with their segments."""
    found = []
    for seg in requests.get(f"{pacs.dicomweb}/series", params={"Modality": "SEG"}, timeout=10).json():
        study, uid = seg["0020000D"]["Value"][0], seg["0020000E"]["Value"][0]
        meta = requests.get(f"{pacs.dicomweb}/studies/{study}/series/{uid}/metadata", timeout=10).json()[0]
        header = Dataset.from_json(meta)
        if header.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            found.append({"uid": uid, "segments": segments_of(header)})
    return found


def test_dicomweb_mode_serves_ct_and_mr_series_offline(server, studies):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["datastore"]["total"] == 6  # 4 CT + 2 MR image series; the SEGs are labels, not images
    for model in ("sdfsmis", "dpl"):
        assert info["models"][model]["type"] == "segmentation"  # listed by OHIF's Auto-Segmentation tab
        # read from the SEG supports, each with its review segment (param review_segment) at id + 100
        expected = {"liver": 1, "liver - review": 101, "spleen": 4, "spleen - review": 104}
        assert info["models"][model]["labels"] == expected


def test_seg_support_on_another_study_segments_the_query_with_its_names_and_colours(server, studies, tmp_path):
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    params = {**OHIF_PARAMS, "support": studies["ct_support"]["series"]}
    result_file, result = client.infer("sdfsmis", studies["ct_query"]["series"], params)
    assert result["support"]["source"] == "support_param"
    assert result["label_names"] == {"liver": 1, "spleen": 4}
    assert result["label_colors"] == {"liver": [221, 130, 101], "spleen": [157, 108, 162]}
    assert result["trained"] is True and result["voxels"]["liver"] > 0
    labels = sitk.ReadImage(result_file)
    assert labels.GetSize() == (96, 96, 40)  # the query series' own grid
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 4}


def test_mr_series_with_mr_seg_support(server, studies, tmp_path):
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    params = {**OHIF_PARAMS, "support": studies["mr_support"]["series"]}
    _, result = client.infer("sdfsmis", studies["mr_query"]["series"], params)
    assert result["support"]["image"] == studies["mr_support"]["series"]
    assert set(result["label_names"]) == {"liver", "spleen"}


def test_final_label_is_stored_as_seg_and_becomes_the_next_support(server, pacs, studies, tmp_path):
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    query = studies["ct_query"]["series"]
    result_file, result = client.infer("sdfsmis", query, {"support": studies["ct_support"]["series"]})
    label_info = [{"idx": idx, "name": name} for name, idx in result["label_names"].items()]
    assert _segs_of(pacs, query) == []

    client.save_label(query, result_file, tag="final", params={"label_info": label_info})

    segs = _segs_of(pacs, query)
    assert len(segs) == 1
    assert {(s["idx"], s["name"]) for s in segs[0]["segments"]} == {(1, "liver"), (4, "spleen")}
    colours = {s["name"]: s["color"] for s in segs[0]["segments"]}
    assert np.abs(np.subtract(colours["liver"], [221, 130, 101])).max() <= 1  # the anatomy colour OHIF shows
    # propagation on the same study: the stored SEG is now this series' support
    _, again = client.infer("sdfsmis", query, {})
    assert again["support"]["source"] == "same_image_label"
    assert again["support"]["image"] == query


def _chromium_driver(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Debian chromium + chromium-driver are not installed (run: bash apps/system_packages.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    flags = "--headless=new --no-sandbox --disable-gpu --no-first-run --disable-background-networking "
    flags += "--disable-component-update --disable-sync --disable-quic --window-size=1600,1000"
    for flag in flags.split() + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


LABELMAP_STATE = """
const ss = window.services.segmentationService;
const volume = ss.getLabelmapVolume('1');
if (!volume) return null;
const segments = Object.values(ss.getSegmentation('1').segments).filter(Boolean);
const data = volume.voxelManager.getCompleteScalarDataArray();
const [nx, ny, nz] = volume.dimensions;
const perSlice = {};
for (let i = 0; i < data.length; i++) {
  if (!data[i]) continue;
  const k = Math.floor(i / (nx * ny));
  perSlice[data[i]] = perSlice[data[i]] || new Array(nz).fill(0);
  perSlice[data[i]][k]++;
}
return {segments: segments.map(s => [s.segmentIndex, s.label]), perSlice,
        origin: volume.origin, direction: volume.direction, spacing: volume.spacing, dimensions: volume.dimensions};
"""


def _slice_counts_by_world_z(image: sitk.Image, label_id: int) -> dict[float, int]:
    array = sitk.GetArrayFromImage(image)  # [z, y, x]
    return {
        round(image.TransformIndexToPhysicalPoint((0, 0, k))[2], 2): int((array[k] == label_id).sum())
        for k in range(array.shape[0])
    }


def _tick_model_option(driver, wait, model: str, option: str) -> None:
    """In OHIF's "Options / Configurations" dialog: the infer section, the model, tick a boolean, Confirm."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.find_element(By.XPATH, "//a[normalize-space()='Options / Configurations']").click()
    name = wait.until(lambda d: d.find_element(By.NAME, "selectName"))
    Select(name).select_by_value(model)
    box = wait.until(lambda d: d.find_element(By.ID, f"infer{model}{option}"))
    assert box.get_attribute("type") == "checkbox" and not box.is_selected()
    box.click()
    driver.find_element(By.XPATH, "//button[normalize-space()='Confirm']").click()
    wait.until(lambda d: not d.find_elements(By.NAME, "selectName"))


# sdfsmis as OHIF sends it by default; dpl with the option review_segment ticked in OHIF's dialog
@pytest.mark.parametrize("model, study, review", [("sdfsmis", "ct_ohif", False), ("dpl", "ct_ohif_dpl", True)])
def test_ohif_runs_the_model_and_displays_the_segmentation(model, study, review, server, pacs, studies, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = _chromium_driver(tmp_path / "profile")
    try:
        driver.get(f"{server}/ohif/monai-label?StudyInstanceUIDs={studies[study]['study']}")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import Select, WebDriverWait

        wait = WebDriverWait(driver, 120, poll_frequency=0.5)
        field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=text]"))
        name = study.replace("_", "-")
        wait.until(lambda d: f"CT {name}" in d.execute_script("return document.body.innerText"))
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(f"{server}/")
        field.find_element(By.XPATH, "following::button[1]").click()  # connect
        options = wait.until(lambda d: d.find_elements(By.XPATH, f"//option[normalize-space()='{model}']"))
        assert options, f"{model} is not listed in OHIF's MONAI Label panel"
        Select(options[0].find_element(By.XPATH, "..")).select_by_visible_text(model)
        if review:
            _tick_model_option(driver, wait, model, "review_segment")
        driver.get_log("browser")  # drop what came before the click

        run = driver.find_element(By.XPATH, "//button[normalize-space()='Run']")
        started = time.perf_counter()
        run.click()
        wait.until(lambda d: any("updated the segmentation" in e["message"] for e in d.get_log("browser")))
        seconds = time.perf_counter() - started
        state = driver.execute_script(LABELMAP_STATE)
        time.sleep(1.0)  # one more render before the picture
        driver.save_screenshot(str(ARTIFACTS / f"ohif_{model}_result.png"))
        page = driver.execute_script("return document.body.innerText")
    finally:
        driver.quit()
    print(f"OHIF: {model}: click on Run -> segmentation on screen in {seconds:.2f} s (tiny model, CPU)")
    (ARTIFACTS / f"ohif_{model}_timing.json").write_text(json.dumps({"click_to_display_s": round(seconds, 3)}))

    assert "Running Segmentation - Successful" in page
    # the same request as OHIF's, through the client, for the server's own answer
    client = MONAILabelClient(server, tmpdir=str(tmp_path))  # not /tmp: the server deletes its own copy there
    params = {**OHIF_PARAMS, "review_segment": True} if review else dict(OHIF_PARAMS)
    result_file, result = client.infer(model, studies[study]["series"], params)
    assert result["method"] == model
    ohif_index = {name: index for index, name in state["segments"]}
    assert set(result["label_names"]) <= set(ohif_index)  # OHIF segments carry the support's names
    reviewed = [name for name in result["label_names"] if name.endswith(" - review")]
    assert bool(reviewed) == review  # a review segment only when asked for, shown below like any other
    served = sitk.ReadImage(result_file)
    for name, label_id in result["label_names"].items():
        shown = state["perSlice"].get(str(ohif_index[name]), [0] * state["dimensions"][2])
        assert sum(shown) == result["voxels"][name] > 0
        # on the right slices: OHIF's slice k lies at origin + k * spacing along its slice axis
        step = state["spacing"][2] * state["direction"][8]
        z = [round(state["origin"][2] + k * step, 2) for k in range(len(shown))]
        expected = _slice_counts_by_world_z(served, label_id)
        assert dict(zip(z, shown)) == expected
    # the radiologist accepts the result as final (review voxels back to their organ): a DICOM SEG goes to the PACS
    names = result["label_names"]
    accepted = sitk.GetArrayFromImage(served)
    for name in reviewed:
        accepted[accepted == names[name]] = names[name.removesuffix(" - review")]
    accepted_image = sitk.GetImageFromArray(accepted)
    accepted_image.CopyInformation(served)
    sitk.WriteImage(accepted_image, str(tmp_path / "accepted.nrrd"))
    label_info = [{"idx": idx, "name": name} for name, idx in names.items() if name not in reviewed]
    client.save_label(
        studies[study]["series"], str(tmp_path / "accepted.nrrd"), tag="final", params={"label_info": label_info}
    )
    (seg,) = _segs_of(pacs, studies[study]["series"])
    assert {(s["idx"], s["name"]) for s in seg["segments"]} == {(e["idx"], e["name"]) for e in label_info}
