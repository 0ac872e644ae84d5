"""The seeded baselines behind the Engine interface, and the harness that drives them."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from SegAssistLib.datasets import list_cases, split_cases
from SegAssistLib.errors import PromptError, SegAssistError, SessionError
from SegAssistLib.evaluation import cli as eval_cli
from SegAssistLib.evaluation.baselines import GrowCutEngine, RandomWalkerEngine
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, parse_targets, run_session, write_json
from SegAssistLib.evaluation.simulator import first_click
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume, save_mask_nifti
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt

ENGINES = [GrowCutEngine, RandomWalkerEngine]


@pytest.fixture(scope="module")
def sphere():
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:24, :32, :32]
    target = ((k - 12) ** 2 + (j - 15) ** 2 + (i - 17) ** 2 <= 36).astype(np.uint8)
    image = (100.0 * target + rng.normal(0, 5, target.shape)).astype(np.float32)
    return Volume(image, spacing=(1.0, 1.0, 1.0)), target


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_one_click_segments_a_bright_sphere(engine_cls, sphere):
    volume, target = sphere
    engine = engine_cls(margin_mm=10)
    assert set(engine.capabilities().prompt_kinds) == {"point", "scribble", "box"}
    session = engine.open_session(volume)
    update = session.add_prompt(first_click(target))
    pred = np.zeros_like(target)
    update.apply_to(pred)
    assert np.array_equal(pred, session.result())
    assert dice(target, pred) > 0.9


@pytest.mark.parametrize("name", ["growcut", "randomwalker"])
def test_the_inside_variant_seeds_no_background_on_the_image_edge(name):
    """A structure the image cuts (ACDC's hearts span every slice): the shell on the clipped faces of
    the working box painted its edge voxels as background, which no user would do."""
    from SegAssistLib.evaluation.baselines import BASELINES

    rng = np.random.default_rng(1)
    k, j, i = np.mgrid[:10, :40, :40]
    target = ((j - 20) ** 2 + (i - 20) ** 2 <= 64).astype(np.uint8)  # a bright column through every slice
    volume = Volume((100.0 * target + rng.normal(0, 5, target.shape)).astype(np.float32), spacing=(1.0, 1.0, 1.0))
    click = first_click(target)
    results = {}
    for variant in (name, f"{name}-inside"):
        engine = BASELINES[variant](margin_mm=12)
        session = engine.open_session(volume)
        session.add_prompt(click)
        box = session.roi(session._states[session._current])
        seeds = session.seeds(session._states[session._current], box)
        on_edge = seeds[[0, -1], 1:-1, 1:-1]  # the k faces (the image's first and last slices), within the rim
        assert (on_edge == 2).any() == (variant == name), variant
        assert (seeds[:, 0] == 2).all() and (seeds[:, -1] == 2).all()  # faces inside the image keep the shell
        assert engine.capabilities().name == variant
        results[variant] = dice(target, session.result())
    assert results[f"{name}-inside"] > 0.9 > results[name]


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_session_history_and_rejected_prompts(engine_cls, sphere):
    volume, target = sphere
    session = engine_cls(margin_mm=10).open_session(volume)
    with pytest.raises(SessionError):
        session.undo()
    session.add_prompt(PointPrompt(position=(3, 3, 3), positive=False))
    assert not session.result().any()  # background seeds alone segment nothing
    session.add_prompt(PointPrompt(position=(17, 15, 12), positive=True))
    after = session.result()
    assert after.sum() > 0
    session.undo()
    assert not session.result().any()
    session.redo()
    assert np.array_equal(session.result(), after)
    assert [p.kind for p in session.prompt_log().prompts] == ["point", "point"]
    image = session.prompt_log().image  # where the log's voxel coordinates lie, placement included
    assert image.origin == tuple(volume.origin) and np.allclose(image.direction, np.reshape(volume.direction, (3, 3)))
    session.reset()
    assert not session.result().any() and session.can_undo
    with pytest.raises(PromptError, match="not support lasso"):
        session.add_prompt(LassoPrompt(points=[(10, 10, 8), (20, 10, 8), (15, 18, 8)]))
    with pytest.raises(PromptError, match="outside the image"):
        session.add_prompt(PointPrompt(position=(40, 3, 3)))


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_a_box_alone_segments_nothing_and_bounds_the_clicks(engine_cls, sphere):
    volume, target = sphere
    session = engine_cls(margin_mm=10).open_session(volume)
    session.add_prompt(BoxPrompt(min_corner=(11, 9, 6), max_corner=(23, 21, 18)))
    assert not session.result().any()  # a box paints no object seed
    session.add_prompt(first_click(target))
    result = session.result()
    assert dice(target, result) > 0.9
    # the background shell lies one voxel outside the box: nothing grows beyond it
    k, j, i = np.nonzero(result)
    assert i.min() >= 10 and i.max() <= 24 and j.min() >= 8 and j.max() <= 22 and k.min() >= 5 and k.max() <= 19


@pytest.mark.parametrize("name", ["growcut", "randomwalker", "growcut-inside", "randomwalker-inside"])
def test_a_box_on_the_image_edge_seeds_no_background_inside_the_box(name):
    """The working box is the box prompt plus one voxel, clipped to the image: where the box reached the
    image edge its clipped face was the box's own (object) voxels, and the engines that seed the image
    edge painted them background, against the box (Dice 0.13 after a click, 1.0 for the -inside ones)."""
    from SegAssistLib.evaluation.baselines import BASELINES
    from SegAssistLib.evaluation.simulator import box_prompt

    rng = np.random.default_rng(0)
    target = np.zeros((10, 40, 40), np.uint8)
    target[0:6, 10:30, 10:40] = 1  # on the image's first slice (k = 0) and last column (i = 39)
    volume = Volume((target + rng.normal(0, 0.05, target.shape)).astype(np.float32), spacing=(1.0, 1.0, 1.0))
    session = BASELINES[name]().open_session(volume)
    session.add_prompt(box_prompt(target))
    session.add_prompt(first_click(target))
    prompts = session._states[session._current]
    box = session.roi(prompts)
    assert box == (slice(0, 7), slice(9, 31), slice(9, 40))  # clipped at k = 0 and i = 39
    outside = np.ones((7, 22, 31), bool)
    outside[:6, 1:-1, 1:] = False  # the box's voxels: background only on the faces beyond it, none on the edge
    assert np.array_equal(session.seeds(prompts, box) == 2, outside)
    assert dice(target, session.result()) > 0.95
    # a box one voxel inside the image: the slice outside it, on the image edge, is background as without a box
    inner = target.copy()
    inner[0] = 0
    prompts = [box_prompt(inner), first_click(inner)]
    assert (session.seeds(prompts, session.roi(prompts))[0, 1:-1, 1:-1] == 2).all() == (not name.endswith("-inside"))


def test_a_positive_scribble_seeds_the_object(sphere):
    volume, target = sphere
    session = GrowCutEngine(margin_mm=10).open_session(volume)
    session.add_prompt(ScribblePrompt(points=[(14, 15, 12), (20, 15, 12)], positive=True))
    assert dice(target, session.result()) > 0.9


@pytest.fixture(scope="module")
def hippocampus_case(hippocampus_dir):
    case = split_cases(list_cases(hippocampus_dir), "evaluation")[1]
    return load_volume(case.image), (load_mask(case.label) == 1).astype(np.uint8)


@pytest.mark.parametrize("engine_cls,floor", [(GrowCutEngine, 0.5), (RandomWalkerEngine, 0.65)])
def test_baselines_on_a_real_hippocampus(engine_cls, floor, hippocampus_case):
    volume, target = hippocampus_case
    out = run_session(engine_cls(), volume, target, protocol="clicks", max_clicks=5)
    assert len(out["dice"]) == len(out["latency_s"]) == 5
    assert out["dice"][-1] > floor
    assert out["dice"][-1] > out["dice"][0]
    assert [p.kind for p in out["prompts"]] == ["point"] * 5


def test_eval_warms_the_engine_up_before_the_first_timed_interaction(hippocampus_dir):
    """The first record's first latency included the engine's one-off start (weights, allocations):
    about 60 % above the steady state with the shipped model."""
    from SegAssistLib.evaluation.baselines import GrowCutEngine

    engine, opened = GrowCutEngine(), []
    real_open = engine.open_session

    def open_session(volume, prompts=None):
        opened.append(time.perf_counter())
        return real_open(volume, prompts)

    engine.open_session = open_session
    result = evaluate(EvalConfig(hippocampus_dir, targets=parse_targets("1"), max_clicks=2, cases=1), engine,
                      progress=lambda line: None)  # fmt: skip
    assert len(result["records"]) == 1 and len(opened) == 2  # one untimed session, then the record's


def test_runner_writes_json_for_two_hippocampus_cases(hippocampus_dir, tmp_path):
    lines = []
    result = evaluate(
        EvalConfig(hippocampus_dir, targets=parse_targets("1,1+2"), max_clicks=3, cases=2, engine="growcut"),
        progress=lines.append,
    )
    path = write_json(result, tmp_path / "eval.json")
    data = json.loads(path.read_text())
    warning, *lines = lines  # the folder holds an image without a label and labels without an image
    assert warning.startswith(f"warning: {hippocampus_dir}: 1 image in imagesTr/ without a label")
    assert len(lines) == 2 and "hippocampus_" in lines[0]
    assert {(r["case"], r["target"]) for r in data["records"]} == {
        (c, t) for c in data["config"]["cases"] for t in ("1", "1+2")
    }
    for r in data["records"]:
        assert len(r["dice"]) == len(r["latency_s"]) == 3
        assert all(0.0 <= d <= 1.0 for d in r["dice"])
        assert set(r["noc"]) == set(r["reached"]) == {"80", "85", "90"}
        assert all(1 <= n <= 3 for n in r["noc"].values())
        assert r["peak_rss_mb"] > 0
        assert r["final_hd95_mm"] is None or r["final_hd95_mm"] >= 0
    s = data["summary"]
    assert s["records"] == 4 and len(s["mean_dice"]) == 3
    assert set(s["mean_noc"]) == {"80", "85", "90"} and s["median_latency_s"] > 0
    assert set(data["per_target"]) == {"1", "1+2"}


def test_runner_records_absent_targets_and_refuses_unsupported_protocols(hippocampus_dir, tmp_path):
    # a label dataset.json names that a case lacks is skipped in that case; one it does not name is refused
    folder = tmp_path / "with_seven"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        shutil.copy(hippocampus_dir / sub / "hippocampus_001.nii.gz", folder / sub)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"1": "a", "2": "b", "7": "seven"}}))
    result = evaluate(EvalConfig(folder, targets=parse_targets("7"), max_clicks=1, engine="growcut"),
                      progress=lambda line: None)  # fmt: skip
    assert result["records"] == []
    assert result["skipped"][0]["reason"] == "target label absent (the label map holds 0, 1, 2)"
    with pytest.raises(SegAssistError, match="label 7 not in"):
        evaluate(EvalConfig(hippocampus_dir, targets=parse_targets("7"), max_clicks=1, cases=1, engine="growcut"))
    with pytest.raises(SegAssistError, match="unknown protocol"):
        evaluate(EvalConfig(hippocampus_dir, protocol="lasso+clicks", cases=1, engine="growcut"))


def test_a_label_on_a_moved_grid_is_refused_not_scored(hippocampus_dir, tmp_path):
    case = list_cases(hippocampus_dir)[0]
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    shutil.copy(case.image, tmp_path / "imagesTr" / case.image.name)
    image = load_volume(case.image)
    flipped = Volume(image.array, image.spacing, image.origin, image.direction @ np.diag([1.0, -1.0, 1.0]))
    save_mask_nifti(load_mask(case.label), flipped, tmp_path / "labelsTr" / case.label.name)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    with pytest.raises(SegAssistError, match=rf"{case.name}: the label is not on the image's grid: its direction"):
        evaluate(EvalConfig(tmp_path, targets=parse_targets("1"), max_clicks=1, split="all", engine="growcut"),
                 progress=lambda line: None)


def test_box_protocol_feeds_the_baseline_the_same_box(hippocampus_dir):
    result = evaluate(
        EvalConfig(hippocampus_dir, targets=parse_targets("1"), protocol="box+clicks", max_clicks=2, cases=1,
                   engine="growcut"),
        progress=lambda line: None,
    )
    record = result["records"][0]
    assert record["interactions"] == ["box", "point", "point"]
    assert record["dice"][0] == 0.0 and record["hd95_mm"][0] is None  # the box alone: no object seed
    assert record["dice"][-1] > 0.3
    assert record["dice_auc"] == pytest.approx((record["dice"][1] + record["dice"][2]) / 2, abs=1e-5)


def test_eval_subcommand(hippocampus_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["eval", str(hippocampus_dir), "--labels", "2", "--engine", "growcut", "--protocol", "scribble+clicks",
         "--max-clicks", "2", "--cases", "1", "--json", str(out)]
    )
    assert args.func(args) == 0
    record = json.loads(out.read_text())["records"][0]
    assert record["interactions"] == ["scribble", "point", "point"] and len(record["dice"]) == 3
    assert "wrote" in capsys.readouterr().out


def test_bad_targets_are_explained():
    with pytest.raises(SegAssistError, match="label ids"):
        parse_targets("1,liver")
    with pytest.raises(SegAssistError, match="background"):
        parse_targets("0")


def test_eval_subcommand_runs_the_ablation_with_an_oblique_scribble(hippocampus_dir, tiny_checkpoint, tmp_path):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "ablation.json"
    args = parser.parse_args(
        ["eval", str(hippocampus_dir), "--labels", "1", "--engine", "ablation", "--model", str(tiny_checkpoint),
         "--protocol", "scribble+clicks", "--scribble-orientation", "oblique", "--scribble-source", "contour",
         "--scribble-jitter", "1", "--max-clicks", "1", "--cases", "1", "--json", str(out)]
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    record = data["records"][0]
    assert data["config"]["engine"]["name"].endswith("-nohistory")
    assert record["interactions"] == ["scribble", "point"] and len(record["hd95_mm"]) == 2
    # with jitter every case and target draws its own stream (the seed of bench's scribbles, from their names)
    seed = zlib.crc32(f"{record['case']}/1".encode())
    assert record["scribble"] == {"orientation": "oblique", "source": "contour", "jitter_mm": 1.0, "seed": seed}
    assert data["config"]["model"]["checkpoint"] == str(Path(tiny_checkpoint).resolve())


def test_eval_passes_the_correction_zoom_share_to_the_model_and_records_it(hippocampus_dir, tiny_checkpoint,
                                                                           tmp_path):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "builtin.json"
    args = parser.parse_args(
        ["eval", str(hippocampus_dir), "--labels", "1", "--engine", "builtin", "--model", str(tiny_checkpoint),
         "--correction-zoom-share", "0.1", "--max-clicks", "2", "--cases", "1", "--json", str(out)]
    )
    assert args.func(args) == 0
    config = json.loads(out.read_text())["config"]
    assert config["correction_zoom_share"] == 0.1 and config["refine_depth"] == 1


def test_eval_takes_the_channel_from_inside_a_4d_image_file(hippocampus_dir, tmp_path):
    """An MSD-style 4D file (all channels in one file): --channel was used only to pick ``_000N``
    files, so eval refused every 4D case ("choose a channel") whatever channel was chosen."""
    import SimpleITK as sitk

    from SegAssistLib.errors import ImageError

    image = sitk.ReadImage(str(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    folder = tmp_path / "four_d"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shutil.copy(hippocampus_dir / "dataset.json", folder)
    shutil.copy(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz", folder / "labelsTr")
    second = sitk.GetImageFromArray(array.max() - array)
    second.CopyInformation(image)
    four_d = sitk.JoinSeries([sitk.Cast(image, sitk.sitkFloat32), second])
    sitk.WriteImage(four_d, str(folder / "imagesTr" / "hippocampus_001.nii.gz"))
    runs = [evaluate(EvalConfig(folder, targets=parse_targets("1"), max_clicks=2, engine="growcut", channel=c),
                     progress=lambda line: None) for c in (0, 1)]  # fmt: skip
    assert all(len(r["records"]) == 1 for r in runs)
    assert runs[0]["records"][0]["dice"] != runs[1]["records"][0]["dice"]  # two different images
    with pytest.raises(ImageError, match="channel 2 does not exist"):
        evaluate(EvalConfig(folder, targets=parse_targets("1"), max_clicks=1, engine="growcut", channel=2),
                 progress=lambda line: None)  # fmt: skip
    with pytest.raises(ImageError, match="channel 3 does not exist"):  # a 3D file has one channel
        evaluate(EvalConfig(hippocampus_dir, targets=parse_targets("1"), max_clicks=1, cases=1, engine="growcut",
                            channel=3), progress=lambda line: None)  # fmt: skip


def test_an_unreadable_case_is_skipped_and_the_run_goes_on(hippocampus_dir, tmp_path):
    """One bad file (here a label on another grid) stopped the whole run and wrote nothing."""
    folder = tmp_path / "my_scans"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shutil.copy(hippocampus_dir / "dataset.json", folder)
    for name, image, label in (("a_bad", "hippocampus_008", "hippocampus_001"),
                               ("b_good", "hippocampus_001", "hippocampus_001")):
        shutil.copy(hippocampus_dir / "imagesTr" / f"{image}.nii.gz", folder / "imagesTr" / f"{name}.nii.gz")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{label}.nii.gz", folder / "labelsTr" / f"{name}.nii.gz")
    result = evaluate(EvalConfig(folder, targets=parse_targets("1"), max_clicks=1, engine="growcut"),
                      progress=lambda line: None)
    assert [r["case"] for r in result["records"]] == ["b_good"]
    (skip,) = result["skipped"]
    assert skip["case"] == "a_bad" and skip["reason"].startswith("case not read: a_bad: label grid")
