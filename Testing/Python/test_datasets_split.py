"""The fixed evaluation split follows the cases, not the folder's name: a copy of a known dataset under
another name keeps its training cases out of evaluation (they once all counted as evaluation, so a
score on the model's own training cases would have been reported as held out)."""

from __future__ import annotations

import json
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


def _channel_files(folder: Path, cases: dict) -> Path:
    """Files of ``imagesTr/<case>_<channel>.nii.gz`` (empty: only their names are read) and labels."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case, channels in cases.items():
        for channel in channels:
            (folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz").write_bytes(b"")
        (folder / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "cases, channel, message",
    [
        ({"c1": (0,), "c2": (0,)}, 1, r"channel 1 does not exist in \S*ds: its images have channel 0 \(imagesTr/"),
        ({"c1": (0, 1)}, 2, r"channel 2 does not exist in \S*ds: its images have channels 0, 1 \(imagesTr/"),
        ({"c1": (1, 2)}, 0, r"channel 0 does not exist in \S*ds: its images have channels 1, 2 \(imagesTr/<case>_0001"),
    ],
)
def test_a_channel_the_cases_lack_is_named_not_no_cases(tmp_path, cases, channel, message):
    """``eval --channel 1`` on a single-channel ``_0000`` dataset answered "no evaluation cases in ds"."""
    from SegAssistLib.errors import SegAssistError

    folder = _channel_files(tmp_path / "ds", cases)
    with pytest.raises(SegAssistError, match=message):
        list_cases(folder, channel=channel)
    present = sorted(cases.values())[0][0]
    assert [c.name for c in list_cases(folder, channel=present)] == sorted(c for c in cases if present in cases[c])


def test_cases_that_lack_the_channel_are_named_when_others_have_it(tmp_path):
    """A mean over fewer cases than the folder holds is said, not reached in silence."""
    import warnings

    folder = _channel_files(tmp_path / "ds", {"c1": (0, 1), "c2": (0,), "c3": (0, 1)})
    with pytest.warns(UserWarning, match=r"1 labelled case\(s\) have no channel 1 file and are left out: c2$"):
        assert [c.name for c in list_cases(folder, channel=1)] == ["c1", "c3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case has channel 0: nothing to say
        assert [c.name for c in list_cases(folder, channel=0)] == ["c1", "c2", "c3"]


def test_a_folder_without_per_channel_files_still_lists_no_cases_quietly(tmp_path):
    folder = tmp_path / "ds"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTr" / "unlabelled_0000.nii.gz").write_bytes(b"")  # no label: not a case, no channel
    assert list_cases(folder, channel=1) == []
    (folder / "imagesTr" / "c1.nii.gz").write_bytes(b"")
    (folder / "labelsTr" / "c1.nii.gz").write_bytes(b"")
    assert [(c.name, c.channel) for c in list_cases(folder, channel=1)] == [("c1", 1)]  # inside the file


@pytest.mark.parametrize(
    "labels, targets",
    [
        ({"0": "background", "2": "b", "1": "a"}, {(1,): "a", (2,): "b"}),  # MSD: id -> name
        ({"background": 0, "b": 2, "a": 1}, {(1,): "a", (2,): "b"}),  # nnU-Net v2: name -> value
        ({"background": 0, "whole": [1, 2, 3], "core": [3, 2], "enhancing": 3},  # nnU-Net v2 regions
         {(3,): "enhancing", (1, 2, 3): "whole", (2, 3): "core"}),
        ({"background": 0, "all": [0, 1, 2], "one": [1]}, {(1,): "one", (1, 2): "all"}),
        ({"note": "see class_map.json", "liver": 1, "on": True, "half": 1.5}, {(1,): "liver"}),
        ({"background": 0, "liver": 1, "ignore": 2}, {(1,): "liver"}),  # nnU-Net's unannotated voxels
    ],
)
def test_dataset_json_labels_in_the_msd_and_the_nnunet_layouts(tmp_path, labels, targets):
    """nnU-Net v2's ``{"liver": 1}`` was "names no numeric labels ...: pass --labels"."""
    from SegAssistLib.datasets import dataset_labels, dataset_targets
    from SegAssistLib.evaluation.runner import default_targets

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert dataset_targets(tmp_path) == targets and list(dataset_targets(tmp_path)) == list(targets)
    assert default_targets(tmp_path) == list(targets)
    assert dataset_labels(tmp_path) == {ids[0]: name for ids, name in targets.items() if len(ids) == 1}


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"background": 0, "whole": [1, "2"]}, r"""label 'whole' is \[1, "2"\]: an nnU-Net region lists label"""),
        ({"background": 0, "whole": []}, r"label 'whole' is \[\]: an nnU-Net region lists label values"),
        ({"background": 0, "none": [0]}, "names no numeric labels at its top level: pass --labels"),
    ],
)
def test_an_nnunet_region_that_lists_no_label_values_is_named(tmp_path, labels, message):
    from SegAssistLib.datasets import dataset_targets
    from SegAssistLib.errors import SegAssistError

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(SegAssistError, match=message):
        dataset_targets(tmp_path)


def test_a_dataset_json_of_regions_only_tells_bench_to_pass_them(tmp_path):
    from SegAssistLib.datasets import dataset_labels
    from SegAssistLib.errors import SegAssistError

    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3]}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(SegAssistError, match=r"names only nnU-Net regions, 1\+2\+3 \(whole\), 2\+3 \(core\): pass "):
        dataset_labels(tmp_path)
