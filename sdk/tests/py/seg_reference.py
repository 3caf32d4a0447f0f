"""Independent reference readings and writings of DICOM SEG for Cosilo's SDK tests.

Uses pydicom and highdicom (not Cosilo's code) so the Rust tests can compare voxel for voxel.

  labels SEG SERIES_DIR OUT       highdicom's label array of SEG on the series, sorted by position
  fractional SERIES_DIR SEG OUT   writes a FRACTIONAL SEG with highdicom, and the thresholded labels
  frames SEG OUT                  pydicom's frames of SEG (uint8, one byte per pixel)
  pixels IMAGE OUT                pydicom's rescaled pixel values of a single-frame image (float32)
  testfile NAME                   the path of one of pydicom's own test files

OUT files hold uint8 voxels, slice-major then row then column (Cosilo's x-fastest order); a JSON
summary goes to stdout.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import highdicom as hd


def sorted_series(series_dir):
    """The series' datasets sorted along the slice normal (pydicom only)."""
    ds = [pydicom.dcmread(p) for p in sorted(Path(series_dir).iterdir()) if p.is_file()]
    iop = np.array(ds[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(ds, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))


def labels(seg_path, series_dir, out):
    seg = hd.seg.segread(seg_path)
    series = sorted_series(series_dir)
    uids = [d.SOPInstanceUID for d in series]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    referenced = set(uid for _, _, uid in seg.get_source_image_uids())
    present = [u for u in uids if u in referenced]
    volume = np.zeros((len(uids), series[0].Rows, series[0].Columns), dtype=np.uint8)
    if present:
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=present,
            segment_numbers=numbers,
            combine_segments=True,
            relabel=False,
        )
        for i, u in enumerate(present):
            volume[uids.index(u)] = arr[i]
    volume.tofile(out)
    raw = pydicom.dcmread(seg_path)
    print(json.dumps({
        "frames": int(raw.NumberOfFrames),
        "segments": numbers,
        "labels": [str(s.SegmentLabel) for s in seg.SegmentSequence],
        "property_types": [str(s.SegmentedPropertyType.value) for s in seg.SegmentDescriptions] if hasattr(seg, "SegmentDescriptions") else [str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence],
        "patient_id": str(raw.PatientID),
        "study_uid": str(raw.StudyInstanceUID),
        "frame_of_reference_uid": str(raw.FrameOfReferenceUID),
        "referenced_instances": len(raw.ReferencedSeriesSequence[0].ReferencedInstanceSequence),
        "voxels": int((volume > 0).sum()),
    }))


def fractional(series_dir, seg_path, out):
    series = sorted_series(series_dir)
    n, rows, cols = len(series), series[0].Rows, series[0].Columns
    k, j, i = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    # Two overlapping soft blobs; fractions in 0..1.
    c = np.array([n / 2, rows / 2, cols / 2])
    r1 = np.sqrt(((k - c[0]) / max(n / 3, 1)) ** 2 + ((j - c[1]) / (rows / 3)) ** 2 + ((i - c[2]) / (cols / 3)) ** 2)
    r2 = np.sqrt(((k - c[0]) / max(n / 4, 1)) ** 2 + ((j - c[1] * 0.8) / (rows / 5)) ** 2 + ((i - c[2] * 1.2) / (cols / 5)) ** 2)
    f1 = np.clip(1.5 - r1, 0, 1).astype(np.float32)
    f2 = np.clip(1.2 - r2, 0, 1).astype(np.float32)
    fractions = np.stack([f1, f2], axis=-1)
    algo = hd.AlgorithmIdentificationSequence(
        name="reference", version="1", family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s + 1, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo)
        for s, (name, code, meaning) in enumerate([("grey", "389081007", "Gray Matter"), ("white", "389080008", "White Matter")])
    ]
    seg = hd.seg.Segmentation(
        source_images=series,
        pixel_array=fractions,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=77, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="reference", manufacturer_model_name="highdicom", software_versions=hd.__version__,
        device_serial_number="1", max_fractional_value=255,
        omit_empty_frames=True,
    )
    seg.save_as(seg_path)
    # What a reader should find: stored = round(f * 255); set where stored >= 127.5; segment 2 over 1.
    stored = np.round(fractions * 255)
    expected = np.zeros((n, rows, cols), dtype=np.uint8)
    expected[stored[..., 0] >= 127.5] = 1
    expected[stored[..., 1] >= 127.5] = 2
    expected.tofile(out)
    print(json.dumps({"frames": int(seg.NumberOfFrames), "voxels": int((expected > 0).sum()),
                      "transfer_syntax": str(seg.file_meta.TransferSyntaxUID)}))


def frames(seg_path, out):
    d = pydicom.dcmread(seg_path)
    arr = d.pixel_array
    if arr.ndim == 2:
        arr = arr[None]
    arr.astype(np.uint8).tofile(out)
    info = []
    for f in d.PerFrameFunctionalGroupsSequence:
        info.append({
            "position": [float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient],
            "source_uid": str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
            "source_class": str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPClassUID),
            "segment": int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
        })
    shared = d.SharedFunctionalGroupsSequence[0]
    print(json.dumps({
        "rows": int(d.Rows), "columns": int(d.Columns), "frames": info,
        "orientation": [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        "pixel_spacing": [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing],
        "slice_thickness": float(shared.PixelMeasuresSequence[0].SliceThickness),
    }))


def pixels(image_path, out):
    from pydicom.pixels import apply_modality_lut
    d = pydicom.dcmread(image_path)
    v = apply_modality_lut(d.pixel_array, d).astype(np.float32)
    v.tofile(out)
    print(json.dumps({"rows": int(d.Rows), "columns": int(d.Columns),
                      "transfer_syntax": str(d.file_meta.TransferSyntaxUID)}))


def testfile(name):
    from pydicom.data import get_testdata_file
    print(json.dumps({"path": str(get_testdata_file(name))}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"labels": labels, "fractional": fractional, "frames": frames, "pixels": pixels,
     "testfile": testfile}[cmd](*args)
