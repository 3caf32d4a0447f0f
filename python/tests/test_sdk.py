"""The SDK from Python: NIfTI in and out (checked with nibabel as an independent reader),
segmentation of NumPy volumes, NIfTI files and DICOM series with geometry kept, DICOM SEG written
(read back with pydicom), and Rust errors as CosiloError with their chain."""

import json
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

import cosilo


def oblique_affine():
    a = np.eye(4)
    a[:3, :3] = [[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0], [0.0, 0.0, 2.5]]
    a[:3, 3] = [-10.0, 20.0, 5.5]
    return a


def test_nifti_round_trip_agrees_with_nibabel(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(7, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=(7, 5, 3)).astype(np.uint8)
    affine = oblique_affine()
    cosilo.write_nifti(tmp_path / "v.nii.gz", values, affine)
    cosilo.write_nifti(tmp_path / "l.nii.gz", labels, affine)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (7, 5, 3)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), values)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "l.nii.gz").dataobj), labels)
    back, back_affine = cosilo.read_nifti(tmp_path / "v.nii.gz")
    assert back.dtype == np.float32 and back.shape == (7, 5, 3)
    np.testing.assert_array_equal(back, values)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)


def test_bad_input_raises_cosilo_error_with_the_chain(tmp_path):
    with pytest.raises(cosilo.CosiloError) as e:
        cosilo.read_nifti(tmp_path / "missing.nii.gz")
    assert "missing.nii.gz" in str(e.value)
    assert isinstance(e.value.chain, list) and e.value.chain
    with pytest.raises(cosilo.CosiloError, match="4x4"):
        cosilo.write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2), np.uint8), np.eye(3))
    with pytest.raises(cosilo.CosiloError, match="uint8"):
        cosilo.write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2), np.int64), np.eye(4))
    with pytest.raises(cosilo.CosiloError) as e:
        cosilo.Segmenter(tmp_path / "no-bundle")
    assert "no-bundle" in str(e.value)
    assert not (tmp_path / "x.nii").exists()


def test_segment_numpy_nifti_and_dicom_keep_the_geometry(tmp_path, bundle, cohort, cosilo_bin):
    seg = cosilo.Segmenter(bundle)
    assert seg.classes[0] == "background" and len(seg.classes) > 2
    manifest = json.loads((cohort / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["split"] == "test")
    image, affine = cosilo.read_nifti(cohort / case["image"])
    labels, out_affine = seg.segment(image, affine)
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    np.testing.assert_allclose(out_affine, affine)
    assert labels.max() < len(seg.classes)
    # The same volume from the file gives the same labels.
    from_file, _ = seg.segment_nifti(cohort / case["image"])
    np.testing.assert_array_equal(from_file, labels)
    # A Fortran-ordered copy is read by index, not by memory layout: the same labels.
    fortran = np.asfortranarray(image)
    assert not fortran.flags.c_contiguous
    f_labels, _ = seg.segment(fortran, affine)
    np.testing.assert_array_equal(f_labels, labels)
    with pytest.raises(cosilo.CosiloError):
        seg.segment(image, np.full((4, 4), np.nan))

    # DICOM: the held-out case as an MR series; the SEG references it.
    dicom = tmp_path / "dicom"
    subprocess.run([str(cosilo_bin), "data", "dicom", "--out", str(dicom), "--cohort", str(cohort)],
                   check=True, capture_output=True)
    series = next(p for p in dicom.iterdir() if p.name.startswith("mr-"))
    out = tmp_path / "seg.dcm"
    d_labels, d_affine = seg.segment_dicom(series, seg_out=out)
    assert d_labels.ndim == 3 and d_affine.shape == (4, 4)
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG"
    src = pydicom.dcmread(next(series.iterdir()))
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    # Labels written back separately give a SEG too; a mis-shaped array is refused.
    out2 = tmp_path / "seg2.dcm"
    seg.write_dicom_seg(d_labels, series, out2)
    assert pydicom.dcmread(out2).Modality == "SEG"
    with pytest.raises(cosilo.CosiloError, match="voxels"):
        seg.write_dicom_seg(d_labels[:-1], series, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()
