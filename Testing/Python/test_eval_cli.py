"""``segassist eval`` and ``segassist bench`` from the command line: a label that the dataset's
``dataset.json`` does not name is refused before any engine loads, and eval's per-case progress line
says what each figure is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, parse_targets, progress_part


def _dataset(folder: Path, dataset_json: object = None) -> Path:
    """One case ``a``: a bright ball, label 1, and a small label 2 beside it."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    labels = {"0": "background", "1": "ball", "2": "pip"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json if dataset_json is not None else {"labels": labels}))
    k, j, i = np.mgrid[:10, :24, :24]
    label = ((k - 5) ** 2 + (j - 12) ** 2 + (i - 12) ** 2 <= 16).astype(np.uint8)
    label[4:6, 2:4, 2:4] = 2
    image = (100.0 * (label > 0) + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / "a.nii.gz"))
    return folder


@pytest.mark.parametrize("labels, unknown", [("7", "label 7 not in"), ("1,7", "label 7 not in"),
                                             ("1+7,8", "labels 7, 8 not in")])
def test_a_label_the_dataset_json_lacks_is_refused_before_the_engine_loads(tmp_path, capsys, labels, unknown):
    """``eval --labels 7`` on a dataset of labels 1 and 2 wrote empty results (exit 1); with ``--labels 1,7``
    it exited 0 and dropped 7 case by case. The same for ``bench``."""
    folder = _dataset(tmp_path / "ds")
    missing = tmp_path / "no-such-model.pt"  # never loaded: the refusal comes first
    expected = f"{unknown} {folder / 'dataset.json'}, which has 1 (ball), 2 (pip)"
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--labels", labels, "--model", str(missing), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"segassist eval: error: --labels: {expected}\n" and not out.exists()
    bench_out = tmp_path / "bench"
    assert main(["bench", str(folder), "--labels", labels, "--model", str(missing), "--out", str(bench_out)]) == 2
    err = capsys.readouterr().err
    assert err == f"segassist bench: error: --labels: {expected}\n" and not bench_out.exists()


def test_labels_are_taken_as_given_where_dataset_json_names_none(tmp_path):
    """A dataset.json without top-level numeric labels (per-case labels, as brain_structures has) is no reason
    to refuse: the evaluation runs on the labels given."""
    folder = _dataset(tmp_path / "ds", {"labels": {"a": {"1": "ball"}}})
    result = evaluate(EvalConfig(folder, targets=parse_targets("1"), max_clicks=1, engine="growcut", split="all"),
                      progress=lambda line: None)
    assert result["summary"]["records"] == 1
    with pytest.raises(SegAssistError, match="--labels: label 7 not in"):
        evaluate(EvalConfig(_dataset(tmp_path / "named"), targets=parse_targets("7"), engine="growcut"))


def test_the_progress_line_names_each_click_count_once_and_says_not_reached():
    """``Dice@1 0.732 @2 0.823 @2 0.823 NoC85 2* 1.20 s``: @5 repeated as @2 with 2 clicks, the latency
    unlabelled, '*' unexplained."""
    record = {"target": "1", "dice": [0.732, 0.823], "noc": {"85": 2}, "reached": {"85": False},
              "latency_s": [1.1, 1.3]}
    assert progress_part(record) == "target 1: Dice @1 0.732 @2 0.823, NoC@85 not reached, median latency 1.20 s"
    record = {"target": "1+2", "dice": [0.5, 0.6, 0.7, 0.8, 0.86, 0.9, 0.91], "noc": {"85": 5},
              "reached": {"85": True}, "latency_s": [0.1] * 7}
    assert progress_part(record) == ("target 1+2: Dice @1 0.500 @5 0.860 @7 0.910, NoC@85 5, "
                                     "median latency 0.10 s")
    assert progress_part({**record, "dice": [0.9], "latency_s": []}).startswith("target 1+2: Dice @1 0.900, ")


def test_eval_prints_the_line_for_each_case(tmp_path, capsys):
    folder = _dataset(tmp_path / "ds")
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--labels", "1", "--engine", "growcut", "--max-clicks", "2", "--split", "all",
                 "--json", str(out)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[1/1] a "))
    assert line.startswith("[1/1] a target 1: Dice @1 ") and "median latency" in line and "*" not in line, line
    assert line.count("@2 ") == 1, line


def test_earlier_results_are_refused_up_front_unless_replacing_them_is_asked(tmp_path):
    """``eval --json F`` replaced earlier results without a word (the check behind eval's --overwrite)."""
    from SegAssistLib.evaluation.runner import check_json_output

    out = tmp_path / "eval.json"
    check_json_output(out, overwrite=False)  # a new file: fine
    out.write_text("earlier results")
    with pytest.raises(SegAssistError, match=r"eval.json exists \(earlier results\): pass --overwrite to replace it"):
        check_json_output(out, overwrite=False)
    check_json_output(out, overwrite=True)
    with pytest.raises(SegAssistError, match="is a folder"):
        check_json_output(tmp_path, overwrite=True)


def test_eval_replaces_earlier_results_only_with_overwrite(tmp_path, capsys):
    """``eval --json F`` replaced earlier results without a word; now refused before any work."""
    folder = _dataset(tmp_path / "ds")
    out = tmp_path / "eval.json"
    out.write_text("earlier results")
    missing = tmp_path / "no-such-model.pt"  # never loaded: the refusal comes first
    assert main(["eval", str(folder), "--labels", "1", "--model", str(missing), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"segassist eval: error: --json {out} exists (earlier results): pass --overwrite to replace it, "
                   "or choose another file\n")
    assert out.read_text() == "earlier results"
    argv = ["eval", str(folder), "--labels", "1", "--engine", "growcut", "--max-clicks", "1", "--split", "all",
            "--json", str(out), "--overwrite"]
    assert main(argv) == 0
    assert json.loads(out.read_text())["summary"]["records"] == 1


NNUNET_LABELS = {"background": 0, "ball": 1, "pip": 2}  # nnU-Net v2: name -> value (MSD: "1": "ball")


@pytest.mark.parametrize("labels", [{"0": "background", "1": "ball", "2": "pip"}, NNUNET_LABELS,
                                    {"pip": 2, "background": 0, "ball": 1}])
def test_the_labels_of_an_nnunet_dataset_json_are_known_and_checked(tmp_path, capsys, labels):
    """nnU-Net v2's ``{"ball": 1}`` was "names no numeric labels ...: pass --labels", and a --labels id it
    did not name was not refused up front (it gave empty results)."""
    folder = _dataset(tmp_path / "ds", {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"})
    missing = tmp_path / "no-such-model.pt"  # never loaded: the refusal comes first
    for command, out in (("eval", ["--json", str(tmp_path / "eval.json")]), ("bench", ["--out", str(tmp_path / "b")])):
        assert main([command, str(folder), "--labels", "1,7", "--model", str(missing), *out]) == 2
        err = capsys.readouterr().err
        assert err == (f"segassist {command}: error: --labels: label 7 not in {folder / 'dataset.json'}, "
                       "which has 1 (ball), 2 (pip)\n")
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--split", "all",
                 "--json", str(out)]) == 0  # every label of dataset.json: no --labels needed
    saved = json.loads(out.read_text())
    assert saved["config"]["targets"] == ["1", "2"] and saved["summary"]["records"] == 2


def test_the_regions_of_an_nnunet_dataset_json_are_union_targets(tmp_path, capsys):
    """Region-based nnU-Net (``"both": [1, 2]``): a region is the union of its labels, and a label named
    only inside a region is known."""
    folder = _dataset(tmp_path / "ds", {"labels": {"background": 0, "both": [1, 2], "pip": 2}})
    missing = tmp_path / "no-such-model.pt"
    assert main(["eval", str(folder), "--labels", "1+3", "--model", str(missing), "--json", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == (f"segassist eval: error: --labels: label 3 not in {folder / 'dataset.json'}, "
                                       "which has 2 (pip), 1+2 (both)\n")
    result = evaluate(EvalConfig(folder, max_clicks=1, engine="growcut", split="all"), progress=lambda line: None)
    assert result["config"]["targets"] == ["2", "1+2"] and result["summary"]["records"] == 2
    result = evaluate(EvalConfig(folder, targets=parse_targets("1"), max_clicks=1, engine="growcut", split="all"),
                      progress=lambda line: None)  # fmt: skip
    assert result["summary"]["records"] == 1  # label 1, named only in the region: not refused


def test_a_channel_the_dataset_lacks_is_named(tmp_path, capsys):
    """``eval --channel 1`` on a single-channel ``_0000`` dataset answered "no evaluation cases in ds"."""
    folder = _dataset(tmp_path / "ds")
    (folder / "imagesTr" / "a.nii.gz").rename(folder / "imagesTr" / "a_0000.nii.gz")
    expected = f"channel 1 does not exist in {folder}: its images have channel 0 (imagesTr/<case>_0000...)\n"
    assert main(["eval", str(folder), "--channel", "1", "--engine", "growcut", "--json", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == f"segassist eval: error: {expected}"
    assert main(["eval", str(folder), "--channel", "0", "--engine", "growcut", "--max-clicks", "1", "--split", "all",
                 "--json", str(tmp_path / "e")]) == 0
