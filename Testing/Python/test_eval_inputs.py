"""``segassist eval`` on the inputs a reviewer found it mishandled: nnU-Net's ignore label, sessions
that stop early, folders with no usable case, label maps with other values, targets no box can be
sent for, a parent folder given for a dataset, and the model's options given with a baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.engine.base import Capabilities, MaskUpdate
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation import aggregate, metrics, simulator
from SegAssistLib.evaluation import cli as eval_cli
from SegAssistLib.evaluation.runner import (
    EvalConfig,
    evaluate,
    make_engine,
    parse_targets,
    progress_part,
    summarise,
)

SHAPE = (12, 16, 18)  # [k, j, i]


def _cube() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:9, 4:12, 5:14] = 1
    return labels


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _folder(root: Path, cases: Dict[str, np.ndarray], labels: Optional[dict] = None) -> Path:
    """A dataset folder: per case an image bright where its label map is not 0, and the label map."""
    for name, label in cases.items():
        image = 100.0 * (label > 0) + np.random.default_rng(1).normal(0, 1, label.shape)
        _write(root / "imagesTr" / f"{name}.nii.gz", image.astype(np.float32))
        _write(root / "labelsTr" / f"{name}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"labels": labels or {"0": "background", "1": "cube"}}))
    return root


class Answering:
    """An engine that answers every prompt with one fixed mask (the simulated user then sees exactly
    the errors that mask has)."""

    def __init__(self, answer: np.ndarray):
        self.answer = answer.astype(np.uint8)

    def capabilities(self) -> Capabilities:
        return Capabilities("answering", "0", "none", ("point", "box", "scribble"), (8, 8, 8), "cpu")

    def open_session(self, volume, prompts=None):
        return _AnsweringSession(self.answer)


class _AnsweringSession:
    def __init__(self, answer: np.ndarray):
        self.answer, self.mask = answer, np.zeros_like(answer)

    def add_prompt(self, prompt) -> MaskUpdate:
        update = MaskUpdate.between(self.mask, self.answer)
        self.mask = self.answer.copy()
        return update

    def result(self) -> np.ndarray:
        return self.mask.copy()

    def close(self) -> None:
        pass


def _run(folder: Path, engine=None, **options):
    lines = []
    config = EvalConfig(folder, targets=parse_targets("1"), **{"split": "all", "max_clicks": 5, **options})
    result = evaluate(config, engine=engine, progress=lines.append)
    return result, lines


# --- 1. nnU-Net's ignore label -------------------------------------------------------------------
def _ignore_case() -> np.ndarray:
    labels = _cube()
    labels[6:9][labels[6:9] == 1] = 2  # half the object left unannotated
    return labels


def test_ignore_voxels_are_not_scored_and_not_clicked_in():
    """The ignore voxels counted as background: an answer covering the whole object lost Dice there and
    the simulated user clicked negative inside the unannotated part."""
    labels = _ignore_case()
    target, ignore, whole = labels == 1, labels == 2, labels > 0
    assert metrics.dice(target, whole) < 0.7  # without the ignore mask: the unannotated half is spill
    assert metrics.dice(target, whole, ignore) == 1.0
    assert metrics.hd95(target, whole, ignore=ignore) == 0.0
    assert simulator.next_click(target, whole, ignore=ignore) is None  # nothing left to correct
    click = simulator.next_click(target, np.zeros_like(target), ignore=ignore)
    assert click.positive and labels[tuple(int(x) for x in click.position[::-1])] == 1
    spill = whole.copy()
    spill[0, 0, 0] = True  # one spilled voxel outside the ignore region: the only place to click
    click = simulator.next_click(target, spill, ignore=ignore)
    assert not click.positive and click.position == (0.0, 0.0, 0.0)


def test_eval_reads_the_ignore_label_of_dataset_json(tmp_path):
    from SegAssistLib.datasets import dataset_ignore_label

    labels = _ignore_case()
    folder = _folder(tmp_path / "ign", {"c1": labels}, {"background": 0, "cube": 1, "ignore": 2})
    assert dataset_ignore_label(folder) == 2
    result, _ = _run(folder, Answering(labels > 0))
    (record,) = result["records"]
    assert record["dice"] == [1.0] and record["stopped"] == "dice 1.0"
    assert record["final_hd95_mm"] == 0.0 and record["ignored_voxels"] == int((labels == 2).sum())
    assert result["config"]["ignore_label"] == 2
    # MSD layout, no ignore label: the same answer spills
    plain = _folder(tmp_path / "plain", {"c1": labels}, {"0": "background", "1": "cube", "2": "other"})
    assert dataset_ignore_label(plain) is None
    assert _run(plain, Answering(labels > 0))[0]["records"][0]["dice"][0] < 0.7


# --- 2. sessions that stop early -----------------------------------------------------------------
def test_a_session_that_stops_early_records_only_the_interactions_made(tmp_path):
    """Dice and HD95 were padded to the planned count after a perfect mask while latency_s and
    interactions held the real ones; the progress line said "@5" for a session stopped after 1."""
    labels = _cube()
    result, lines = _run(_folder(tmp_path / "ds", {"c1": labels}), Answering(labels))
    (record,) = result["records"]
    per_interaction = ("dice", "hd95_mm", "latency_s", "interactions", "prompts")
    assert {key: len(record[key]) for key in per_interaction} == dict.fromkeys(per_interaction, 1)
    assert record["stopped"] == "dice 1.0" and record["interactions_allowed"] == 5
    assert record["noc"] == {"80": 1, "85": 1, "90": 1} and record["dice_auc_norm"] == 1.0
    assert result["summary"]["mean_dice"] == [1.0] * 5  # the aggregate carries the last value forward
    line = next(line for line in lines if "target 1" in line)
    assert "@1 1.000 (stopped after 1: dice 1.0)" in line and "@5" not in line


def test_means_per_interaction_carry_a_stopped_record_to_the_number_allowed():
    noc = {"80": 1, "85": 1, "90": 2}
    common = {"noc": noc, "reached": dict.fromkeys(noc, True), "latency_s": [0.1], "peak_rss_mb": 1.0,
              "final_hd95_mm": 0.0, "dice_auc": 3.0, "case": "c", "dataset": "d", "dice_auc_norm": 1.0}
    stopped = {**common, "dice": [0.5, 1.0], "hd95_mm": [2.0, 0.0], "final_dice": 1.0, "interactions_allowed": 4}
    assert summarise([stopped])["mean_dice"] == [0.5, 1.0, 1.0, 1.0]
    full = {**common, "dice": [0.2, 0.4, 0.6, 0.8], "hd95_mm": [4.0] * 4, "final_dice": 0.8,
            "interactions_allowed": 4}
    assert summarise([stopped, full])["mean_dice"] == pytest.approx([0.35, 0.7, 0.8, 0.9])
    s = aggregate.summarise([stopped])
    assert [e.mean for e in s.dice_curve] == [0.5, 1.0, 1.0, 1.0] and s.hd95_median_curve == [2.0, 0, 0, 0]
    # results written before: Dice padded, no interactions_allowed; read as they were
    padded = {**common, "dice": [0.5, 1.0, 1.0, 1.0], "hd95_mm": [2.0, 0.0, 0.0, 0.0], "final_dice": 1.0}
    assert summarise([padded])["mean_dice"] == [0.5, 1.0, 1.0, 1.0]
    assert [e.mean for e in aggregate.summarise([padded]).dice_curve] == [0.5, 1.0, 1.0, 1.0]


def test_the_progress_line_of_a_padded_record_from_an_older_file_is_unchanged():
    record = {"target": "1", "dice": [0.6, 1.0, 1.0], "noc": {"85": 2}, "reached": {"85": True}, "latency_s": [0.2]}
    assert progress_part(record) == "target 1: Dice @1 0.600 @3 1.000, NoC@85 2, median latency 0.20 s"


# --- 3. folders with no usable case ----------------------------------------------------------------
def test_no_pairs_says_how_many_images_and_labels_and_names_one_of_each(tmp_path):
    folder = tmp_path / "ds"
    _write(folder / "imagesTr" / "scan_a.nii.gz", _cube())
    _write(folder / "labelsTr" / "seg_a.nii.gz", _cube())
    (folder / "dataset.json").write_text(json.dumps({"labels": {"1": "cube"}}))
    for split in ("evaluation", "all"):
        with pytest.raises(SegAssistError) as caught:
            _run(folder, Answering(_cube()), split=split)
        text = str(caught.value)
        assert "none of the 1 image(s) in imagesTr/ has a label" in text and "among the 1 in labelsTr/" in text
        assert "e.g. image scan_a.nii.gz, label seg_a.nii.gz" in text and "no all cases" not in text
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "labelsTr").mkdir()
    with pytest.raises(SegAssistError, match="none of the 0 image"):
        _run(empty, Answering(_cube()), split="all")


def test_a_known_dataset_holding_only_training_cases_says_pass_split_all(tmp_path):
    folder = _folder(tmp_path / "hippocampus", {"hippocampus_003": _cube()})  # a training case of the split
    with pytest.raises(SegAssistError, match="none of its 1 cases is among that dataset's evaluation cases") as caught:
        evaluate(EvalConfig(folder, targets=parse_targets("1")), engine=Answering(_cube()), progress=print)
    assert "pass --split all" in str(caught.value)
    result, _ = _run(folder, Answering(_cube()))  # --split all
    assert len(result["records"]) == 1


def test_files_without_a_partner_are_said_with_their_count(tmp_path):
    from SegAssistLib.datasets import unpaired_files

    folder = _folder(tmp_path / "ds", {"a": _cube(), "b": _cube()})
    _write(folder / "imagesTr" / "lonely.nii.gz", _cube())
    _write(folder / "labelsTr" / "orphan.nii.gz", _cube())
    _write(folder / "imagesTr" / "multi_0000.nii.gz", _cube())  # a per-channel case: paired
    _write(folder / "imagesTr" / "multi_0001.nii.gz", _cube())
    _write(folder / "labelsTr" / "multi.nii.gz", _cube())
    assert unpaired_files(folder) == (["lonely.nii.gz"], ["orphan.nii.gz"])
    result, lines = _run(folder, Answering(_cube()))
    assert len(result["records"]) == 3
    assert (f"warning: {folder}: 1 image in imagesTr/ without a label (lonely.nii.gz) and 1 label in labelsTr/ "
            "without an image (orphan.nii.gz): left out") in lines


# --- 4. label maps with other values -------------------------------------------------------------
def test_an_absent_target_says_which_values_the_label_map_holds(tmp_path):
    folder = _folder(tmp_path / "m255", {"c1": _cube() * 255})
    result, lines = _run(folder, Answering(_cube()))
    assert result["skipped"] == [{"case": "c1", "target": "1",
                                  "reason": "target label absent (the label map holds 0, 255)"}]
    assert any("skipped (target label absent (the label map holds 0, 255))" in line for line in lines)


def test_a_label_map_of_values_that_are_not_whole_numbers_is_refused_with_the_values(tmp_path):
    folder = _folder(tmp_path / "flt", {"c1": _cube().astype(np.float32) * np.float32(0.9999999)})
    with pytest.raises(SegAssistError, match=r"c1: the label map holds values that are not whole numbers "
                                             r"\(0\.9999999; dtype float32\)"):
        _run(folder, Answering(_cube()))
    whole = _folder(tmp_path / "whole", {"c1": _cube().astype(np.float32)})  # 0.0 and 1.0: label ids
    assert len(_run(whole, Answering(_cube()))[0]["records"]) == 1


# --- 5. a target no box can be sent for ------------------------------------------------------------
@pytest.mark.parametrize("region", [(6, 8, 9), (6, 8, slice(3, 12))], ids=["voxel", "line"])
def test_a_flat_target_starts_box_clicks_with_a_click(tmp_path, region):
    """A target flat along two axes was skipped with the raw validation message of the box."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[region] = 1
    result, lines = _run(_folder(tmp_path / "flat", {"c1": labels}), make_engine("growcut"), protocol="box+clicks",
                         max_clicks=2)
    assert result["skipped"] == []
    (record,) = result["records"]
    assert record["first_prompt"] == "click (box degenerate)" and record["interactions"][0] == "point"
    assert record["interactions_allowed"] == 3
    assert "first prompt a click (box degenerate)" in lines[-1]
    slab = np.zeros(SHAPE, np.uint8)
    slab[6, 4:12, 5:14] = 1  # flat along one axis: a 2D box, sent as it is
    box_record = _run(_folder(tmp_path / "slab", {"c1": slab}), make_engine("growcut"), protocol="box+clicks",
                      max_clicks=1)[0]["records"][0]
    assert box_record["first_prompt"] == "box" and box_record["interactions"][0] == "box"


# --- 6. a parent folder ----------------------------------------------------------------------------
def test_a_folder_of_datasets_is_named_as_such_not_asked_for_labels(tmp_path, capsys):
    parent = tmp_path / "data"
    for name in ("alpha", "beta"):
        _folder(parent / name, {"c1": _cube()})
    with pytest.raises(SegAssistError, match="is not a dataset folder") as caught:
        evaluate(EvalConfig(parent, engine="growcut"), progress=print)
    assert "it holds 2 dataset folders (alpha, beta): pass one of them" in str(caught.value)
    assert main(["eval", str(parent), "--engine", "growcut", "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "not a dataset folder" in err and "dataset.json" not in err


# --- 7. the model's options with a baseline --------------------------------------------------------
@pytest.mark.parametrize("option", [["--device", "cuda"], ["--refine-depth", "2"], ["--edge-band", "1"],
                                    ["--correction-zoom-share", "0.1"]])
def test_the_models_options_are_refused_with_a_baseline(tmp_path, capsys, option):
    folder = _folder(tmp_path / "ds", {"c1": _cube()})
    out = tmp_path / "o.json"
    assert main(["eval", str(folder), "--engine", "growcut", *option, "--split", "all", "--json", str(out)]) == 2
    assert (f"{option[0]} applies to the builtin and ablation engines only, not growcut"
            in capsys.readouterr().err) and not out.exists()
    value = option[1] if option[0] == "--device" else float(option[1])
    with pytest.raises(SegAssistError, match="applies to the builtin and ablation engines only"):
        make_engine("randomwalker", **{option[0][2:].replace("-", "_"): value})
    make_engine("growcut", device="cpu")  # where the baselines run anyway


def test_the_default_engine_is_the_command_lines():
    import argparse

    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "ds", "--json", "o.json"])
    assert EvalConfig("ds").engine == args.engine == "builtin"


def test_bench_leaves_ignore_voxels_out_and_its_report_carries_a_stopped_session_forward(tmp_path):
    """``segassist bench`` builds its records with the same session: the ignore label and the early stop
    hold there too, and the report's table of the box then clicks still has a cell for every click."""
    import io

    from SegAssistLib.evaluation.bench import BenchConfig, run_bench
    from SegAssistLib.evaluation.report import render_report

    labels = _ignore_case()
    folder = _folder(tmp_path / "ign", {"c1": labels}, {"background": 0, "cube": 1, "ignore": 2})
    config = BenchConfig(folders=[folder], labels="1", engines=("growcut",), protocols=("box+clicks",), clicks=3,
                         refine_clicks=3, out=tmp_path / "o")  # fmt: skip
    result = run_bench(config, {"growcut": Answering(labels > 0)}, stream=io.StringIO())
    (record,) = result["records"]
    assert record["dice"] == [1.0] and record["stopped"] == "dice 1.0" and record["interactions_allowed"] == 4
    text = render_report(result, tmp_path / "o").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ign | Grow from seeds |"))
    assert row.split("|")[3:7] == [" 1.000 "] * 4  # the challenge's table: the box and 3 clicks
