"""What eval's and bench's results say about themselves: which checkpoint was evaluated, the dataset's
real name and paths that hold from anywhere (``eval .`` was named ""), each protocol and engine run
once, a report that describes only the protocols that ran, and the first click's convention."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.evaluation import simulator
from SegAssistLib.evaluation.baselines import GrowCutEngine
from SegAssistLib.evaluation.bench import BenchConfig, run_bench, select_jobs
from SegAssistLib.evaluation.report import render_report
from SegAssistLib.evaluation.runner import EvalConfig, evaluate


def _dataset(folder: Path, names=("a",)) -> Path:
    """Cases ``names``: a bright ball (label 1) and a small block (label 2) on noise."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball", "2": "pip"}}))
    k, j, i = np.mgrid[:10, :24, :24]
    label = ((k - 5) ** 2 + (j - 12) ** 2 + (i - 12) ** 2 <= 16).astype(np.uint8)
    label[3:7, 2:6, 2:6] = 2
    image = (100.0 * (label > 0) + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return folder


def _quiet(line: str) -> None:
    pass


# --- 4. the checkpoint evaluated -----------------------------------------------------------------
def test_eval_records_the_checkpoint_it_evaluated(tmp_path, tiny_checkpoint, monkeypatch):
    """Results of the shipped weights and of a fine-tuned copy had the same config."""
    folder = _dataset(tmp_path / "ds")
    copy = tmp_path / "weights" / "my_finetuned.pt"
    copy.parent.mkdir()
    copy.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.chdir(copy.parent)
    result = evaluate(EvalConfig(folder, max_clicks=1, engine="builtin", model="my_finetuned.pt"), progress=_quiet)
    model = result["config"]["model"]
    assert model["checkpoint"] == str(copy.resolve())  # resolved: the path given was relative
    assert model["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert isinstance(model["weights_identity"], str) and len(model["weights_identity"]) == 16
    baseline = evaluate(EvalConfig(folder, max_clicks=1, engine="growcut"), progress=_quiet)
    assert baseline["config"]["model"] is None  # no weights


def test_eval_records_the_shipped_weights_or_only_the_identity_of_an_engine_given(tmp_path, shipped_checkpoint):
    from SegAssistLib.engine.builtin import load_default_engine

    folder = _dataset(tmp_path / "ds")
    shipped = evaluate(EvalConfig(folder, max_clicks=1, engine="builtin"), progress=_quiet)["config"]["model"]
    assert shipped["checkpoint"] == str(shipped_checkpoint.resolve())
    assert shipped["sha256"] == hashlib.sha256(shipped_checkpoint.read_bytes()).hexdigest()
    engine = load_default_engine(checkpoint=shipped_checkpoint)  # made by the caller: its file is not known
    given = evaluate(EvalConfig(folder, max_clicks=1), engine, progress=_quiet)["config"]["model"]
    assert given == {"checkpoint": None, "sha256": None, "weights_identity": shipped["weights_identity"]}


def test_bench_records_the_checkpoint_it_ran(tmp_path, tiny_checkpoint):
    folder = _dataset(tmp_path / "ds")
    config = BenchConfig(folders=[folder], engines=("builtin",), protocols=("clicks",), clicks=1,
                         model=str(tiny_checkpoint))
    with open(tmp_path / "log", "w") as stream:
        result = run_bench(config, stream=stream)
    weights = result["config"]["model_weights"]
    assert weights["checkpoint"] == str(tiny_checkpoint.resolve())
    assert weights["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


# --- 5. the dataset's name and paths -------------------------------------------------------------
def test_eval_of_dot_names_the_folder(tmp_path, monkeypatch):
    folder = _dataset(tmp_path / "my_dataset")
    monkeypatch.chdir(folder)
    config = evaluate(EvalConfig(".", max_clicks=1, engine="growcut"), progress=_quiet)["config"]
    assert config["dataset"] == str(folder) and config["dataset_name"] == "my_dataset"


def test_bench_of_dot_takes_the_datasets_selection(hippocampus_dir, monkeypatch):
    """``bench .`` inside hippocampus/ ran 5 cases of a dataset named "" instead of hippocampus's 10."""
    by_path = select_jobs(BenchConfig(folders=[hippocampus_dir], engines=("growcut",)))[0]
    monkeypatch.chdir(hippocampus_dir)
    by_dot = select_jobs(BenchConfig(folders=[Path(".")], engines=("growcut",)))[0]
    assert [(j.dataset, j.case.name) for j in by_dot] == [(j.dataset, j.case.name) for j in by_path]
    assert {j.dataset for j in by_dot} == {"hippocampus"} and len(by_dot) == 10


def test_bench_records_paths_that_hold_from_another_folder(tmp_path, monkeypatch, capsys):
    """Paths were recorded as typed: a report rendered again from elsewhere left the gallery out."""
    _dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "ds", "--engines", "growcut", "--protocols", "clicks", "--clicks", "1", "--out", "o"]) == 0
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["records"][0]["image"] == str(tmp_path / "ds" / "imagesTr" / "a.nii.gz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["bench", "--from-json", str(tmp_path / "o" / "results.json"), "--out", "again"]) == 0
    text = (elsewhere / "again" / "report.md").read_text()
    assert "picture left out" not in text and "](gallery/ds_best.png)" in text


# --- 8. each protocol and engine once ------------------------------------------------------------
def test_a_protocol_or_engine_given_twice_runs_once(tmp_path):
    """``--protocols clicks,clicks`` ran every session twice, and the report counted both."""
    config = BenchConfig(folders=[_dataset(tmp_path / "ds")], engines=("growcut", "growcut"),
                         protocols=("clicks", "clicks"), clicks=1)
    assert config.engines == ("growcut",) and config.protocols == ("clicks",)
    with open(tmp_path / "log", "w") as stream:
        result = run_bench(config, {"growcut": GrowCutEngine()}, stream=stream)
    assert sorted((r["structure"], r["protocol"]) for r in result["records"]) == [("ball", "clicks"),
                                                                                ("pip", "clicks")]
    assert result["config"]["protocols"] == ["clicks"]


# --- 9. the report describes what ran ------------------------------------------------------------
@pytest.fixture(scope="module")
def clicks_only(tmp_path_factory):
    folder = _dataset(tmp_path_factory.mktemp("data") / "ds")
    config = BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks",), clicks=2)
    with open(folder.parent / "log", "w") as stream:
        return run_bench(config, {"growcut": GrowCutEngine()}, stream=stream)


def test_the_report_of_clicks_only_describes_no_box_and_no_scribble(clicks_only, tmp_path):
    text = render_report(clicks_only, tmp_path).read_text()
    assert "- **Protocol** (every engine gets the same first click, and every later click by the same rule from " \
           "its own mask): clicks only (2 clicks). Each click" in text
    for absent in ("a scribble then", "then 5 clicks", "**Scribbles**", "box step computes nothing",
                   "a box alone paints no object seed"):
        assert absent not in text, absent


def test_the_report_of_every_protocol_describes_each(clicks_only, tmp_path):
    result = json.loads(json.dumps(clicks_only))
    for protocol in ("box+clicks", "scribble+clicks"):  # the same sessions under the other protocols' names
        result["records"] += [{**r, "protocol": protocol} for r in clicks_only["records"]]
    result["config"]["protocols"] = ["clicks", "box+clicks", "scribble+clicks"]
    text = render_report(result, tmp_path).read_text()
    assert "- **Protocols** (every engine gets the same box, scribble and first click, and every later click" in text
    assert ("clicks only (2 clicks); a box (the structure's 3D bounding box) then 5 clicks, as in the CVPR 2025 "
            "interactive 3D segmentation challenge; a scribble then 5 clicks.") in text
    assert "- **Scribbles** are drawn" in text and "box step computes nothing" in text


# --- 10. the first click's convention --------------------------------------------------------------
def test_the_first_click_is_in_the_largest_piece_and_the_results_say_so(tmp_path):
    """For an object in two pieces the first click goes to the most interior voxel of the larger piece
    (the next-click rule with nothing predicted), not to the deeper voxel of the smaller one: the
    benchmark's numbers depend on it, so it is kept and stated in every result."""
    target = np.zeros((40, 40, 130), np.uint8)
    k, j, i = np.mgrid[:40, :40, :130]
    target[(k - 20) ** 2 + (j - 20) ** 2 + (i - 15) ** 2 <= 64] = 1  # a ball: deepest voxel, 2,109 voxels
    target[17:24, 17:24, 40:125] = 1  # a longer, thinner bar: more voxels
    click = simulator.first_click(target)
    assert tuple(click.position) == (82, 20, 20)  # (i, j, k): mid-bar, not at the ball's centre (15, 20, 20)
    folder = _dataset(tmp_path / "ds")
    conventions = evaluate(EvalConfig(folder, max_clicks=1, engine="growcut"), progress=_quiet)["config"]["conventions"]
    assert "largest 6-connected piece" in conventions["first_click"]
    assert "not to the global maximum of the object's distance transform" in conventions["first_click"]
