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
