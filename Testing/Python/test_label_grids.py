"""A label map that holds its image's grid with some axes stored in reverse order (every voxel at the
same place in space) is read onto the image's grid, reversed back, by ``segassist eval`` and
``segassist demo``; a label on another grid is still refused. The DICOM CT of ../shared/data and the
NIfTI label written from it (j reversed: direction diag(1, -1, 1), origin at the other end) were
refused as "not on the image's grid"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.datasets import Case
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, label_on_image_grid, load_case, parse_targets
from SegAssistLib.io import load_mask, load_volume

SHAPE_KJI = (9, 14, 17)
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-12.0, 30.5, 7.25)


def _rotation() -> np.ndarray:
    """An oblique, right-handed direction (columns: the i, j and k axes)."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _grid_pair(folder: Path):
    """An image and its label map (labels 1 to 3, no symmetry, so a wrong flip shows) on one grid."""
    rng = np.random.default_rng(3)
    k, j, i = np.mgrid[: SHAPE_KJI[0], : SHAPE_KJI[1], : SHAPE_KJI[2]]
    label = np.zeros(SHAPE_KJI, np.uint8)
    label[((k - 3) ** 2 + (j - 5) ** 2 + (i - 6) ** 2) <= 9] = 1
    label[1:3, 9:13, 11:16] = 2
    label[6:8, 2:4, 12:15] = 3
    image = (60.0 * label + rng.normal(0, 4, SHAPE_KJI)).astype(np.float32)

    def on_grid(array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.SetSpacing(SPACING)
        out.SetOrigin(ORIGIN)
        out.SetDirection(_rotation().ravel().tolist())
        return out

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(on_grid(image), str(folder / "image.nii.gz"))
    sitk.WriteImage(on_grid(label), str(folder / "label.nii.gz"))
    return folder / "image.nii.gz", folder / "label.nii.gz", label


def _write_reversed(label_path: Path, out: Path, axes_ijk: Sequence[int], origin_shift=(0.0, 0.0, 0.0),
                    spacing=None) -> Path:
    """The label of ``label_path`` stored with the axes ``axes_ijk`` in reverse order: voxels flipped,
    those direction columns negated, the origin at the voxel that was last along them (then moved by
    ``origin_shift`` mm, or given another ``spacing``, for a grid that is really another)."""
    original = sitk.ReadImage(str(label_path))
    array = sitk.GetArrayFromImage(original)
    size = original.GetSize()
    corner = [size[a] - 1 if a in axes_ijk else 0 for a in range(3)]
    origin = np.asarray(original.TransformIndexToPhysicalPoint(corner)) + np.asarray(origin_shift)
    direction = np.asarray(original.GetDirection()).reshape(3, 3)
    direction[:, list(axes_ijk)] *= -1
    reversed_ = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=tuple(2 - a for a in axes_ijk))))
    reversed_.SetSpacing(original.GetSpacing() if spacing is None else spacing)
    reversed_.SetOrigin(origin.tolist())
    reversed_.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(reversed_, str(out))
    return out


@pytest.mark.parametrize("axes_ijk", [(1,), (0, 2), (2,), (0, 1, 2)])
def test_a_label_stored_with_axes_reversed_is_read_onto_the_image_grid_voxel_for_voxel(tmp_path, axes_ijk):
    image, label, expected = _grid_pair(tmp_path)
    reversed_label = _write_reversed(label, tmp_path / "reversed.nii.gz", axes_ijk)
    stored = load_mask(reversed_label)
    assert not np.array_equal(stored, expected)  # the file really holds the voxels in another order
    # where each voxel lies: the same place in space as the original label's voxel of the same value
    volume = load_volume(image)
    aligned, problem = label_on_image_grid(reversed_label, stored, volume)
    assert problem is None and aligned.dtype == expected.dtype
    assert np.array_equal(aligned, expected)
    _, labels = load_case(Case("synthetic", "case", image, reversed_label))
    assert np.array_equal(labels, expected) and labels.flags["C_CONTIGUOUS"]
    resampled = sitk.Resample(sitk.ReadImage(str(reversed_label)), sitk.ReadImage(str(image)), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)  # fmt: skip
    assert np.array_equal(sitk.GetArrayFromImage(resampled), expected)  # the writer's geometry is right


@pytest.mark.parametrize(
    "axes_ijk, shift, spacing, what",
    [
        ((), (0.0, 0.0, 3.0), None, "origin"),  # moved, nothing reversed
        ((1,), (0.0, 1.5, 0.0), None, "origin"),  # reversed, then moved: another grid
        ((0, 2), (0.0, 0.0, 0.0), (0.8, 1.1, 2.0), "spacing"),  # reversed on another spacing
    ],
)
def test_a_label_on_another_grid_is_still_refused(tmp_path, axes_ijk, shift, spacing, what):
    image, label, _ = _grid_pair(tmp_path)
    other = _write_reversed(label, tmp_path / "other.nii.gz", axes_ijk, shift, spacing)
    stored = load_mask(other)
    aligned, problem = label_on_image_grid(other, stored, load_volume(image))
    assert problem is not None and problem.startswith(f"the label is not on the image's grid: its {what}")
    assert aligned is stored  # nothing reversed or resampled
    with pytest.raises(SegAssistError, match=f"^case: the label is not on the image's grid: its {what}"):
        load_case(Case("synthetic", "case", image, other))


def test_a_direction_negated_without_the_origin_at_the_other_end_is_refused(tmp_path):
    """Voxels reversed and direction negated but the origin left where it was: every voxel elsewhere."""
    image, label, expected = _grid_pair(tmp_path)
    original = sitk.ReadImage(str(label))
    wrong = sitk.GetImageFromArray(np.ascontiguousarray(expected[:, ::-1]))
    wrong.CopyInformation(original)
    direction = np.asarray(original.GetDirection()).reshape(3, 3)
    direction[:, 1] *= -1
    wrong.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(wrong, str(tmp_path / "wrong.nii.gz"))
    with pytest.raises(SegAssistError, match="the label is not on the image's grid: its direction"):
        load_case(Case("synthetic", "case", image, tmp_path / "wrong.nii.gz"))


def test_eval_scores_a_reversed_label_as_the_label_itself(tmp_path):
    """``segassist eval`` on a dataset whose label file stores j and k reversed gives the records of the
    same dataset with the label stored as the image is (it skipped the case: "case not read")."""
    records = []
    for name, axes in (("plain", ()), ("reversed", (1, 2))):
        folder = tmp_path / name
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball", "2": "box"}}))
        image, label, _ = _grid_pair(tmp_path / f"{name}_src")
        (folder / "imagesTr" / "c1.nii.gz").write_bytes(image.read_bytes())
        _write_reversed(label, folder / "labelsTr" / "c1.nii.gz", axes)
        result = evaluate(EvalConfig(folder, targets=parse_targets("1,2"), max_clicks=2, engine="growcut",
                                     split="all"), progress=lambda line: None)  # fmt: skip
        assert result["skipped"] == [], result["skipped"]
        records.append([(r["target"], r["dice"], r["target_voxels"], r["prompts"]) for r in result["records"]])
    assert records[0] == records[1] and len(records[0]) == 2


def test_the_shared_dicom_ct_and_its_nifti_label_line_up(shared_data: Path):
    """The 20-slice DICOM CT and dicom_ct_seg.nii.gz (j reversed) of totalsegmentator_examples: read as
    ITK's nearest-neighbour resampling of the label onto the series puts it, voxel for voxel."""
    folder = shared_data / "totalsegmentator_examples"
    dicom, seg = folder / "dicom_ct", folder / "dicom_ct_seg.nii.gz"
    if not (dicom.is_dir() and seg.is_file()):
        pytest.skip(f"{dicom} or {seg} not found in the shared data")
    from SegAssistLib.dicom import read_dicom_series

    volume, labels = load_case(Case("totalsegmentator_examples", "dicom_ct", dicom, seg))
    series = read_dicom_series(dicom)
    resampled = sitk.Resample(sitk.ReadImage(str(seg)), series, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = sitk.GetArrayFromImage(resampled)
    assert labels.shape == volume.array.shape == expected.shape
    assert not np.array_equal(load_mask(seg), expected)  # stored in another order
    assert np.array_equal(labels, expected) and (labels == 1).any()
