"""``learn import`` never takes label maps for images to annotate, in the common layouts that slipped
through: a dataset's labelsTr given itself, ACDC's ``_gt`` ground truths, a ``<series>_seg`` label map
beside its DICOM series folder, and a Slicer ``.seg.nrrd`` given alone (all imported, exit 0, nothing
said). ``--include-label-maps`` still imports them when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.image import Volume
from SegAssistLib.io import save_segmentation_nrrd, volume_to_sitk

SHAPE = (8, 10, 12)


def image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (rng.random(SHAPE) * 100 + seed).astype(np.int16)
    sitk.WriteImage(volume_to_sitk(Volume(array, spacing=(1.0, 1.0, 2.0))), str(path))
    return path


def label(path: Path, seed: int) -> Path:
    array = np.zeros(SHAPE, np.uint8)
    array[2:5, 3:6, 4 + seed % 3 : 8] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume_to_sitk(Volume(array, spacing=(1.0, 1.0, 2.0))), str(path))
    return path


def dicom_series(folder: Path, slices: int = 4) -> Path:
    """A CT series of ``slices`` DICOM files (as a scanner's export folder holds)."""
    folder.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.2.1125.1.4343"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        plane = sitk.GetImageFromArray((np.arange(100).reshape(10, 10) + k).astype(np.int16))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.3.{k + 1}",
                "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{2.0 * k}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2"}  # fmt: skip
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)
    return folder


def run_import(capsys, source: Path, store: Path, *extra: str) -> Tuple[int, dict, str]:
    code = main(["learn", "import", str(source), "--store", str(store), "--user", "admin", "--json", *extra])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


def added(report: dict) -> List[str]:
    return sorted(c["name"] for c in report.get("added", []))


def test_a_label_folder_given_itself_is_refused_unless_label_maps_are_wanted(tmp_path: Path, capsys):
    labels = tmp_path / "ds" / "labelsTr"
    for i in range(2):
        label(labels / f"case_{i}.nii.gz", i)
    code, _, err = run_import(capsys, labels, tmp_path / "s1")
    assert code == 2 and "it is a folder of labels (labelsTr), not images to annotate" in err, err
    assert "--include-label-maps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s1").exists()  # no store made
    code, report, err = run_import(capsys, labels, tmp_path / "s1", "--include-label-maps")
    assert code == 0 and added(report) == ["case_0", "case_1"], err


def test_acdc_ground_truths_are_passed_over_beside_their_frames(tmp_path: Path, capsys):
    patient = tmp_path / "acdc" / "patient001"
    image(patient / "patient001_frame01.nii.gz", 1)
    label(patient / "patient001_frame01_gt.nii.gz", 1)
    image(patient / "patient001_frame12.nii.gz", 2)
    label(patient / "patient001_frame12_gt.nii.gz", 2)
    code, report, err = run_import(capsys, tmp_path / "acdc", tmp_path / "s2", "--subject-pattern", r"^(patient\d+)_")
    assert code == 0, err
    assert added(report) == ["patient001_frame01", "patient001_frame12"]
    assert sorted(Path(r["file"]).name for r in report["not_read"]) == [
        "patient001_frame01_gt.nii.gz", "patient001_frame12_gt.nii.gz"
    ]  # fmt: skip


def test_a_label_map_beside_its_dicom_series_folder_is_passed_over(tmp_path: Path, capsys):
    folder = tmp_path / "dcm"
    dicom_series(folder / "ct")
    label(folder / "ct_seg.nii.gz", 0)
    image(folder / "other_seg.nii.gz", 3)  # no image nor series named "other": an image
    code, report, err = run_import(capsys, folder, tmp_path / "s4")
    assert code == 0, err
    assert added(report) == ["ct", "other_seg"]
    assert [(Path(r["file"]).name, r["reason"].split(",")[0]) for r in report["not_read"]] == [
        ("ct_seg.nii.gz", "the label map of ct beside it")
    ]


def test_a_slicer_segmentation_given_alone_is_refused(tmp_path: Path, capsys):
    reference = Volume(np.zeros((0, 0, 0), np.uint8), spacing=(1.0, 1.0, 2.0))
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:4, 2:5, 3:6] = 1
    seg = save_segmentation_nrrd(mask, reference, tmp_path / "x.seg.nrrd")
    code, _, err = run_import(capsys, seg, tmp_path / "s5")
    assert code == 2 and "x.seg.nrrd: it is a Slicer segmentation, not images to annotate" in err, err
    assert not (tmp_path / "s5").exists()
    code, report, err = run_import(capsys, seg, tmp_path / "s5", "--include-label-maps")
    assert code == 0 and added(report) == ["x"], err


def test_an_image_given_alone_is_still_imported(tmp_path: Path, capsys):
    scan = image(tmp_path / "brain_mask.nii.gz", 4)  # a label-map name, but no image beside it
    code, report, err = run_import(capsys, scan, tmp_path / "s6")
    assert code == 0 and added(report) == ["brain_mask"], err
