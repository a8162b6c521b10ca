"""DICOM in and out: image series read as volumes and written from them, DICOM SEG, and a local
Orthanc (DICOMweb) for OHIF."""
