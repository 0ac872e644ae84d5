"""What eval and bench say about what they leave out or cannot take: a mistyped bench folder, cases
without the channel's file (a raw Python UserWarning, nothing in the JSON), dataset.json entries meant
as labels but passed over, the ignore label given as a target, ``--cases`` beyond the cases there, and
the scribble jitter drawn independently per case."""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.baselines import GrowCutEngine
from SegAssistLib.evaluation.bench import BenchConfig, run_bench, select_jobs
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, parse_targets
from SegAssistLib.evaluation.scribbles import ScribbleSpec


def _label() -> np.ndarray:
    k, j, i = np.mgrid[:10, :24, :24]
    label = ((k - 5) ** 2 + (j - 12) ** 2 + (i - 12) ** 2 <= 16).astype(np.uint8)
    label[3:7, 2:6, 2:6] = 2
    return label


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _dataset(folder: Path, labels: object = None, names: Sequence[str] = ("a",),
             channels: Dict[str, Sequence[int]] = None) -> Path:
    """Cases ``names`` (labels 1 and 2), or per-channel files ``<case>_000C`` for ``channels``."""
    label = _label()
    image = (100.0 * (label > 0) + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
    for name in names if channels is None else channels:
        _write(folder / "labelsTr" / f"{name}.nii.gz", label)
        if channels is None:
            _write(folder / "imagesTr" / f"{name}.nii.gz", image)
        for channel in (channels or {}).get(name, ()):
            _write(folder / "imagesTr" / f"{name}_{channel:04d}.nii.gz", image)
    labels = labels if labels is not None else {"0": "background", "1": "ball", "2": "pip"}
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


# --- 6. a mistyped bench folder ------------------------------------------------------------------
def test_bench_names_a_missing_folder_as_eval_does(tmp_path, capsys):
    """It said "nowhere/dataset.json not found: pass --labels"."""
    missing = tmp_path / "no_such_dataset"
    assert main(["bench", str(missing), "--engines", "growcut", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"segassist bench: error: dataset folder not found: {missing}\n"
    (tmp_path / "empty").mkdir()  # a folder, but no dataset: said so, not asked for --labels
    with pytest.raises(SegAssistError, match=r"empty is not a dataset folder: it needs imagesTr/ and labelsTr/"):
        select_jobs(BenchConfig(folders=[tmp_path / "empty"], engines=("growcut",)))


# --- 7. cases without the channel's file -----------------------------------------------------------
def test_eval_says_which_cases_lack_the_channel_in_a_warning_line_and_the_json(tmp_path, capsys):
    folder = _dataset(tmp_path / "ds", channels={"c1": (0, 1), "c2": (0,)})
    out = tmp_path / "o.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw Python warning with its source line
        assert main(["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--channel", "1",
                     "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert (f"warning: {folder}: 1 labelled case(s) have no channel 1 file and are left out: c2\n"
            in captured.err) and "UserWarning" not in captured.err + captured.out
    config = json.loads(out.read_text())["config"]
    assert config["cases"] == ["c1"]
    assert config["left_out"] == {"images_without_label": [], "labels_without_image": [],
                                  "cases_without_channel": ["c2"], "label_entries_passed_over": []}


def test_bench_says_which_cases_lack_the_channel(tmp_path):
    folder = _dataset(tmp_path / "ds", channels={"c1": (0,), "c2": (1,)})
    log = tmp_path / "log"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open(log, "w") as stream:
            result = run_bench(BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks",), clicks=1),
                               {"growcut": GrowCutEngine()}, stream=stream)
    assert f"bench: warning: {folder}: 1 labelled case(s) have no channel 0 file and are left out: c2\n" \
        in log.read_text()
    assert result["config"]["left_out"] == {"ds": ["c2"]}


# --- 11. dataset.json entries, the ignore label, --cases -------------------------------------------
def test_the_ignore_label_given_as_a_target_is_named_as_such(tmp_path):
    """It said "label 3 not in dataset.json", which holds it as "ignore"."""
    folder = _dataset(tmp_path / "ds", {"background": 0, "a": 1, "b": 2, "ignore": 3})
    with pytest.raises(SegAssistError) as caught:
        evaluate(EvalConfig(folder, targets=parse_targets("3"), engine="growcut"), progress=print)
    assert str(caught.value) == (f'--labels: label 3 is the "ignore" label of {folder / "dataset.json"} (voxels left '
                                 "unannotated, never a target); its structures are 1 (a), 2 (b)")


def test_labels_written_as_floats_are_named_as_the_reason(tmp_path, capsys):
    """It said only "names no numeric labels at its top level"."""
    folder = _dataset(tmp_path / "ds", {"background": 0, "a": 1.0, "b": 2.0})
    assert main(["eval", str(folder), "--engine", "growcut", "--json", str(tmp_path / "o.json")]) == 2
    assert capsys.readouterr().err == (
        f"segassist eval: error: {folder / 'dataset.json'} names no numeric labels at its top level; passed over: "
        '"a": 1.0 (a label value is a whole number: 1, not 1.0); "b": 2.0 (a label value is a whole number: 2, '
        'not 2.0): write each label as MSD "1": "liver" or nnU-Net "liver": 1, or pass --labels\n')
    assert main(["bench", str(folder), "--engines", "growcut", "--out", str(tmp_path / "o")]) == 2
    assert "names no numeric labels at its top level; passed over: \"a\": 1.0" in capsys.readouterr().err


def test_a_label_entry_passed_over_is_warned_about(tmp_path, capsys):
    """``" 1": "a"`` was dropped without a word: only label 2 was evaluated."""
    folder = _dataset(tmp_path / "ds", {"0": "background", " 1": "a", "2": "b", "see": "notes.txt"})
    lines = []
    result = evaluate(EvalConfig(folder, max_clicks=1, engine="growcut"), progress=lines.append)
    assert result["config"]["targets"] == ["2"]
    expected = (f'warning: {folder / "dataset.json"}: labels entry passed over, not evaluated: " 1": "a" (a label '
                "id is written with the digits 0-9 alone, no spaces, signs or decimals)")
    assert expected in lines  # the note "see" is no label: not mentioned
    assert result["config"]["left_out"]["label_entries_passed_over"] == [expected.split("evaluated: ")[1]]
    with pytest.raises(SegAssistError, match=r'label 1 not in .*which has 2 \(b\) \(passed over: " 1": "a"'):
        evaluate(EvalConfig(folder, targets=parse_targets("1"), engine="growcut"), progress=lines.append)
    with open(tmp_path / "log", "w") as stream:  # bench, taking its structures from the same file
        run_bench(BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks",), clicks=1),
                  {"growcut": GrowCutEngine()}, stream=stream)
    assert f"bench: {expected}\n" in (tmp_path / "log").read_text()


def test_cases_beyond_those_there_are_said(tmp_path):
    folder = _dataset(tmp_path / "ds", names=("a", "b", "c"))
    lines = []
    result = evaluate(EvalConfig(folder, targets=parse_targets("1"), cases=100, max_clicks=1, engine="growcut"),
                      progress=lines.append)
    assert f"warning: --cases 100: {folder} has 3 evaluation case(s); all 3 are evaluated" in lines
    assert result["config"]["cases"] == ["a", "b", "c"]
    lines.clear()
    evaluate(EvalConfig(folder, targets=parse_targets("1"), cases=3, max_clicks=1, engine="growcut"),
             progress=lines.append)
    assert not any(line.startswith("warning:") for line in lines)


# --- the scribble jitter, per case ------------------------------------------------------------------
def _scribble_seeds(folder: Path, jitter: float) -> Dict[str, int]:
    config = EvalConfig(folder, targets=parse_targets("1"), protocol="scribble+clicks", max_clicks=1,
                        engine="growcut", scribble=ScribbleSpec("oblique", "skeleton", jitter))
    return {r["case"]: r["scribble"]["seed"] for r in evaluate(config, progress=print)["records"]}


def test_scribble_jitter_is_drawn_per_case_and_no_jitter_stays_as_it_was(tmp_path):
    """Every case and target drew the same noise stream (seed 0): the jitter was not independent."""
    folder = _dataset(tmp_path / "ds", names=("a", "b"))
    assert _scribble_seeds(folder, 1.0) == {"a": zlib.crc32(b"a/1"), "b": zlib.crc32(b"b/1")}
    assert _scribble_seeds(folder, 0.0) == {"a": 0, "b": 0}  # without jitter: unchanged, oblique tilt included
