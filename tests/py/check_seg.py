"""Independent reader for the PACS round-trip test (tests/tests/pacs_roundtrip.rs).

Reads a DICOM Segmentation that came back from the PACS with pydicom and highdicom, and checks it
against the source image series and the labels the Cosilo SDK computed:

- it is a BINARY Segmentation Storage object of the source's study, patient and frame of
  reference, referencing the source series;
- every frame's ImagePositionPatient equals that of the source instance it references, and the
  orientation and pixel spacing equal the source's;
- the label array rebuilt from the frames (by referenced SOP instance, segments mapped to label
  values by SegmentLabel) equals the SDK's labels voxel for voxel, once read by hand from the
  functional groups with pydicom and once with highdicom's ``get_pixels_by_source_instance``.

Usage: ``python check_seg.py SPEC.json``, where the spec names ``seg`` (the SEG file),
``source_files`` (the source series' files in slice order), ``labels`` (raw uint8, x fastest,
slice by slice), ``dims`` ([nx, ny, nz]) and ``segments`` ([{"label": name, "value": v}]).
Prints a JSON summary on success; exits 1 with the reasons otherwise.
"""

import json
import sys

import highdicom as hd
import numpy as np
import pydicom

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
TOL_MM = 1e-3


def close(a, b, tol=TOL_MM):
    a = [float(x) for x in a]
    b = [float(x) for x in b]
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    problems = []
    nx, ny, nz = spec["dims"]
    expected = np.fromfile(spec["labels"], dtype=np.uint8)
    if expected.size != nx * ny * nz:
        problems.append(f"labels file has {expected.size} bytes for {nx}x{ny}x{nz}")
        return problems, {}
    expected = expected.reshape(nz, ny, nx)

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in spec["source_files"]]
    if len(sources) != nz:
        problems.append(f"{len(sources)} source files for {nz} slices")
    uids = [str(s.SOPInstanceUID) for s in sources]
    slice_of = {u: k for k, u in enumerate(uids)}
    s0 = sources[0]

    seg = pydicom.dcmread(spec["seg"])
    if seg.SOPClassUID != SEG_SOP_CLASS:
        problems.append(f"SOPClassUID {seg.SOPClassUID} is not Segmentation Storage")
    if seg.Modality != "SEG" or seg.SegmentationType != "BINARY":
        problems.append(f"Modality {seg.Modality}, SegmentationType {seg.SegmentationType}")
    for attr in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID"):
        if str(getattr(seg, attr, "")) != str(getattr(s0, attr, "")):
            problems.append(
                f"{attr} {getattr(seg, attr, None)} differs from the source's {getattr(s0, attr, None)}"
            )
    if seg.SeriesInstanceUID == s0.SeriesInstanceUID:
        problems.append("the SEG reuses the source's SeriesInstanceUID")
    ref_series = [str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence]
    if ref_series != [str(s0.SeriesInstanceUID)]:
        problems.append(f"ReferencedSeriesSequence {ref_series} is not the source series")
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for r in seg.ReferencedSeriesSequence
        for i in r.ReferencedInstanceSequence
    }
    if not referenced <= set(uids):
        problems.append(f"{len(referenced - set(uids))} referenced instances not in the source")
    if (seg.Rows, seg.Columns) != (s0.Rows, s0.Columns) or (seg.Rows, seg.Columns) != (ny, nx):
        problems.append(f"SEG {seg.Rows}x{seg.Columns}, source {s0.Rows}x{s0.Columns}, labels {ny}x{nx}")

    value_of = {}
    for s in seg.SegmentSequence:
        match = [x["value"] for x in spec["segments"] if x["label"] == s.SegmentLabel]
        if len(match) != 1:
            problems.append(f"segment {s.SegmentNumber} label {s.SegmentLabel!r} is not one of ours")
            continue
        value_of[int(s.SegmentNumber)] = match[0]

    shared = seg.SharedFunctionalGroupsSequence[0]
    frames_fg = seg.PerFrameFunctionalGroupsSequence

    def fg_attr(fg, seq, attr):
        for group in (fg, shared):
            if seq in group:
                return getattr(group[seq][0], attr)
        return None

    # By hand: pydicom's unpacked frames placed by referenced SOP instance.
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    manual = np.zeros_like(expected)
    geometry_bad = 0
    for n, fg in enumerate(frames_fg):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sop = str(
            fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        if sop not in slice_of:
            problems.append(f"frame {n + 1} references {sop}, not in the source series")
            continue
        k = slice_of[sop]
        src = sources[k]
        ipp = fg_attr(fg, "PlanePositionSequence", "ImagePositionPatient")
        iop = fg_attr(fg, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = fg_attr(fg, "PixelMeasuresSequence", "PixelSpacing")
        if not (
            close(ipp, src.ImagePositionPatient)
            and close(iop, src.ImageOrientationPatient, 1e-5)
            and close(spacing, src.PixelSpacing, 1e-5)
        ):
            geometry_bad += 1
            if geometry_bad <= 3:
                problems.append(
                    f"frame {n + 1} geometry IPP {list(ipp)} IOP {list(iop)} spacing {list(spacing)}"
                    f" != source slice {k}: {list(src.ImagePositionPatient)}"
                    f" {list(src.ImageOrientationPatient)} {list(src.PixelSpacing)}"
                )
        value = value_of.get(number)
        if value is None:
            continue
        mask = pixels[n] > 0
        clash = mask & (manual[k] != 0) & (manual[k] != value)
        if clash.any():
            problems.append(f"frame {n + 1}: {int(clash.sum())} voxels in two segments")
        manual[k][mask] = value
    manual_diff = int((manual != expected).sum())
    if manual_diff:
        problems.append(f"pydicom reconstruction differs from the SDK labels in {manual_diff} voxels")

    # highdicom: its own frame-to-source mapping.
    hseg = hd.seg.segread(spec["seg"])
    numbers = sorted(value_of)
    arr = hseg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, cols, segments)
    rebuilt = np.zeros_like(expected)
    for i, number in enumerate(numbers):
        rebuilt[arr[..., i] > 0] = value_of[number]
    hd_diff = int((rebuilt != expected).sum())
    if hd_diff:
        problems.append(f"highdicom reconstruction differs from the SDK labels in {hd_diff} voxels")

    counts = {int(v): int((expected == v).sum()) for v in np.unique(expected)}
    summary = {
        "frames": len(frames_fg),
        "segments": {str(k): v for k, v in value_of.items()},
        "label_voxels": counts,
        "pydicom_mismatches": manual_diff,
        "highdicom_mismatches": hd_diff,
        "frames_with_bad_geometry": geometry_bad,
    }
    return problems, summary


if __name__ == "__main__":
    problems, summary = main(sys.argv[1])
    if problems:
        print("SEG check failed:\n- " + "\n- ".join(problems), file=sys.stderr)
        print(json.dumps(summary), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))
