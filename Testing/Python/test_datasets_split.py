"""The fixed evaluation split follows the cases, not the folder's name: a copy of a known dataset under
another name keeps its training cases out of evaluation (they once all counted as evaluation, so a
score on the model's own training cases would have been reported as held out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from SegAssistLib.datasets import Case, list_cases, load_splits, split_cases


def test_a_renamed_copy_of_a_known_dataset_keeps_its_split(shared_data: Path, tmp_path: Path):
    renamed = tmp_path / "Task04_Hippocampus"
    renamed.symlink_to(shared_data / "hippocampus", target_is_directory=True)
    original = split_cases(list_cases(shared_data / "hippocampus"), "evaluation")
    copied = split_cases(list_cases(renamed), "evaluation")
    assert [c.name for c in copied] == [c.name for c in original]
    assert sorted(c.name for c in original) == sorted(load_splits()["hippocampus"])
    training = split_cases(list_cases(renamed), "training")
    assert training and not {c.name for c in training} & {c.name for c in copied}


def test_a_folder_of_unknown_cases_is_all_evaluation_and_an_ambiguous_one_too(tmp_path: Path):
    def cases(dataset, names):
        return [Case(dataset, n, tmp_path / f"{n}.nii.gz", tmp_path / f"{n}_label.nii.gz") for n in names]

    new = cases("new_dataset", ["scan_a", "scan_b"])
    assert split_cases(new, "evaluation") == new and split_cases(new, "training") == []
    splits = load_splits()
    mixed = cases("mixed", [splits["hippocampus"][0], splits["left_atrium"][0], "hippocampus_999"])
    assert split_cases(mixed, "evaluation") == mixed  # names of two datasets: no guess, all evaluation


def test_one_patients_cases_never_sit_on_both_sides(tmp_path: Path, monkeypatch):
    def cases(dataset, names):
        return [Case(dataset, n, tmp_path / f"{n}.nii.gz", tmp_path / f"{n}_label.nii.gz") for n in names]

    # a split that names one frame of a patient (or one crop of a scan) takes the others along
    monkeypatch.setattr("SegAssistLib.datasets.load_splits",
                        lambda: {"acdc": ["patient001_frame01"], "totalsegmentator_examples": ["aorta_crop"]})
    acdc = cases("acdc", ["patient001_frame01", "patient001_frame12", "patient002_frame01"])
    assert [c.name for c in split_cases(acdc, "evaluation")] == ["patient001_frame01", "patient001_frame12"]
    crops = cases("totalsegmentator_examples", ["aorta_crop", "example_mr_sm", "pulmonary_crop"])
    assert [c.name for c in split_cases(crops, "training")] == ["example_mr_sm"]


def test_the_shipped_split_keeps_every_scan_on_one_side(shared_data: Path):
    """aorta_crop and pulmonary_crop are cut from one CT (same in-plane origin, 36 mm apart along z):
    they were once split across the sides, so the model trained on most of an evaluation image."""
    import SimpleITK as sitk

    folder = shared_data / "totalsegmentator_examples"
    training = {c.name: c for c in split_cases(list_cases(folder), "training")}
    assert {"aorta_crop", "pulmonary_crop"} <= set(training)
    origins = [sitk.ReadImage(str(training[n].image)).GetOrigin() for n in ("aorta_crop", "pulmonary_crop")]
    assert origins[0][:2] == origins[1][:2]  # the evidence that they are one scan
    for folder in sorted(p for p in shared_data.iterdir() if (p / "imagesTr").is_dir()):
        found = list_cases(folder)
        sides = [{c.patient for c in split_cases(found, part)} for part in ("evaluation", "training")]
        assert not sides[0] & sides[1], folder.name


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"labels": ["background", "blob"]}', "'labels' must map label ids to names"),  # once an AttributeError
        ("not json", "is not a dataset.json"),  # once a JSONDecodeError
        ('{"labels": {"\\u00b2": "squared", "0": "background"}}', "names no numeric labels"),  # once int('²')
        ("[1, 2]", "is not a dataset.json"),
    ],
)
def test_an_odd_dataset_json_is_named_for_eval_and_bench(tmp_path, text, message):
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.evaluation.runner import default_targets
    from SegAssistLib.evaluation.selection import structures_from_dataset_json

    (tmp_path / "dataset.json").write_text(text)
    for read in (default_targets, structures_from_dataset_json):
        with pytest.raises(SegAssistError, match=message):
            read(tmp_path)


def test_labels_of_a_dataset_json_and_targets_given_twice(tmp_path):
    from SegAssistLib.datasets import dataset_labels
    from SegAssistLib.evaluation.runner import parse_targets

    (tmp_path / "dataset.json").write_text('{"labels": {"0": "background", "2": "b", "10": "j", "1": "a", "x": "y"}}')
    assert dataset_labels(tmp_path) == {1: "a", 2: "b", 10: "j"}
    assert parse_targets("2,2,1+2,2+1") == [(2,), (1, 2)]  # each once: a repeat counted twice in the summary
