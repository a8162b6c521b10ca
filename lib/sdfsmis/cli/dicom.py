"""``sdfsmis upload-dicom`` and ``sdfsmis orthanc``: serve NIfTI collections to OHIF."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _label_names(text: str) -> list[dict]:
    """'1=liver,2=right kidney' -> [{"idx": 1, "name": "liver", "color": ...}, ...], coloured by
    name as MONAI Label and OHIF colour anatomy (when MONAI Label is installed)."""
    try:
        from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS as anatomy
    except ImportError:
        anatomy = {}
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        idx, _, name = item.partition("=")
        entry = {"idx": int(idx), "name": name.strip() or f"label_{idx}"}
        if colour := anatomy.get(entry["name"].lower()):
            entry["color"] = list(colour)
        entries.append(entry)
    return entries


def cmd_upload_dicom(args: argparse.Namespace) -> None:
    from sdfsmis.dicom.orthanc import store_instances
    from sdfsmis.dicom.seg import labelmap_to_seg
    from sdfsmis.dicom.series import nifti_to_series

    for index, path in enumerate(args.images):
        datasets = nifti_to_series(path, args.modality)
        store_instances(datasets, args.url)
        first = datasets[0]
        print(f"{path.name}: {len(datasets)} slices -> {first.PatientID}, series {first.SeriesInstanceUID}")
        if index == 0 and args.support_label:
            seg = labelmap_to_seg(args.support_label, datasets, _label_names(args.label_names), "support annotation")
            store_instances([seg], args.url)
            print(f"  + DICOM SEG support from {args.support_label.name}: series {seg.SeriesInstanceUID}")


def cmd_orthanc(args: argparse.Namespace) -> None:
    from sdfsmis.dicom.orthanc import OrthancServer

    server = OrthancServer(args.http_port, args.dicom_port, Path(args.dir))
    config = server.write_config()
    # flushed: exec replaces the process, and output to a file or a pipe is still in Python's buffer
    print(f"Orthanc on {server.dicomweb} (loopback only), storage in {args.dir}", flush=True)
    os.execvp("Orthanc", ["Orthanc", str(config)])


def register(commands: argparse._SubParsersAction) -> None:
    upload = commands.add_parser("upload-dicom", help="NIfTI volumes -> DICOM series stored on a DICOMweb server")
    upload.add_argument("images", nargs="+", type=Path)
    upload.add_argument("--url", default="http://127.0.0.1:8042/dicom-web", help="DICOMweb root (STOW-RS)")
    upload.add_argument("--modality", default="CT", choices=["CT", "MR"])
    upload.add_argument("--support-label", type=Path, default=None, help="a labelmap of the FIRST image, stored as SEG")
    upload.add_argument(
        "--label-names", default="1=liver,2=right kidney,3=left kidney,4=spleen", help="segment names: ID=NAME,..."
    )
    upload.set_defaults(run=cmd_upload_dicom)

    orthanc = commands.add_parser("orthanc", help="run a local Orthanc with DICOMweb on loopback (foreground)")
    orthanc.add_argument("dir", help="storage and configuration folder")
    orthanc.add_argument("--http-port", type=int, default=8042)
    orthanc.add_argument("--dicom-port", type=int, default=4242)
    orthanc.set_defaults(run=cmd_orthanc)
