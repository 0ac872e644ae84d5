"""Training input checks found by review D: cases read as evaluation reads them (NIfTI too), every config
value and the network checked before anything is written, data problems told in one line before an
--overwrite replaces a run, a data root of packs and dataset folders refused, a spent budget refused on
resume, and the packaging scripts' errors in one line."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import brats_like_folder

from SegAssistLib.cli import main
from SegAssistLib.errors import SegAssistError

REPO = Path(__file__).resolve().parents[2]
TINY_NETWORK = {"channels": [4, 8], "strides": [2], "patch_size": 16}


def _write_nifti(folder: Path, name: str, image: np.ndarray, labels: np.ndarray) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / f"{name}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return folder / "imagesTr" / f"{name}.nii.gz"


def _nifti_dataset(root: Path) -> Path:
    """brats/ with one good NIfTI case, one with NaN voxels and one whose image file was cut short."""
    folder, image, labels = brats_like_folder(root)
    with_nan = image.copy()
    with_nan[2:4, 2:4, 2:4] = np.nan
    _write_nifti(folder, "brats_new_ok", image, labels)
    _write_nifti(folder, "brats_new_nan", with_nan, labels)
    cut = _write_nifti(folder, "brats_new_cut", image, labels)
    cut.write_bytes(cut.read_bytes()[:2000])
    return folder


def test_nifti_training_cases_with_nan_voxels_or_cut_short_are_skipped_and_named_and_never_packed(tmp_path, capsys):
    """ITK reads a NaN of a NIfTI file as 0 and a file cut short with zeros where its data ends: both
    were trained on (and packed for good), where evaluation and the engine refuse them."""
    from SegAssistLib.training import pack
    from SegAssistLib.training.data import load_training_cases

    _nifti_dataset(tmp_path / "data")
    loaded = load_training_cases(tmp_path / "data")
    assert [c.name for c in loaded["brats"]] == ["brats_new_ok"]
    out = capsys.readouterr().out
    assert "skipped training case brats_new_nan: image has 8 NaN or infinite voxels" in out
    assert "skipped training case brats_new_cut: cannot read" in out and "the file is truncated" in out
    summary = pack.write_pack(tmp_path / "data", tmp_path / "pack", patch=16, progress=lambda _: None)
    assert summary.cases == {"brats": 1}


@pytest.mark.parametrize("change, argv, message", [
    ({"batch_size": 0}, [], "batch_size must be a whole number of at least 1, got 0"),
    ({"learning_rate": float("nan")}, [], "learning_rate must be a finite number above 0, got nan"),
    ({"learning_rate": -1}, [], "learning_rate must be a finite number above 0, got -1"),
    ({"weight_decay": -1}, [], "weight_decay must be a finite number of at least 0, got -1"),
    ({"threads": 0}, [], "threads must be a whole number of at least 1, got 0"),
    ({"loader_workers": -1}, [], "loader_workers must be a whole number of at least 0, got -1"),
    ({"simulation_workers": -1}, [], "simulation_workers must be a whole number of at least 0, got -1"),
    ({"max_correction_rounds": -1}, [], "max_correction_rounds must be a whole number of at least 0, got -1"),
    ({"max_steps": 0}, [], "max_steps must be a whole number of at least 1, got 0"),
    ({"synthetic_share": 1.5}, [], "synthetic_share must be from 0 to 1, got 1.5"),
    ({"checkpoint_minutes": 0}, [], "checkpoint_minutes must be more than 0, got 0"),
    ({"seed": -1}, [], "seed must be a whole number from 0 to 9223372036854775807, got -1"),
    ({"datasets": [1]}, [], "datasets must be a list of dataset folder names"),
    ({"network": {"patch_size": 36}}, [], "network: patch_size 36 must be 8 to 512 and a multiple of the strides"),
    ({"network": {"channels": [8, 16, 600], "strides": [2, 2], "patch_size": 32}}, [],
     r"network: channels must be 1 to 512 .* \(the engine would not load the trained model\)"),
    ({"network": {"out_channels": 2, "patch_size": 32}}, [], "network: its network gives 2 output channels"),
    ({}, ["--seed=-1"], "--seed must be from 0 to 9223372036854775807, got -1"),
    ({}, ["--seed", str(10**23)], f"--seed must be from 0 to 9223372036854775807, got {10**23}"),
])
def test_every_config_value_is_checked_before_anything_is_written(tmp_path, capsys, change, argv, message):
    """Each of these was a traceback (some after the run folder was written), or a model.pt the engine
    refuses to load."""
    import re

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_root": "", "max_steps": 1, "loader_workers": 0, **change}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_whole_numbers_written_as_floats_are_taken_as_whole_numbers(tmp_path, capsys):
    """``"batch_size": 1.0`` passed the type check and then failed in torch with a traceback."""
    from SegAssistLib.training.cli import load_config

    config = tmp_path / "cfg.json"
    fields = {"data_root": "", "max_steps": 1.0, "batch_size": 1.0, "threads": 1.0, "loader_workers": 0.0,
              "simulation_workers": 0.0, "max_correction_rounds": 1.0, "seed": 3.0,
              "network": {"channels": [4.0, 8], "strides": [2.0], "patch_size": 16.0}}
    config.write_text(json.dumps(fields))
    cfg = load_config(config)
    for name in ("max_steps", "batch_size", "threads", "loader_workers", "simulation_workers",
                 "max_correction_rounds", "seed"):
        assert type(getattr(cfg, name)) is int, name
    assert cfg.network == TINY_NETWORK and all(type(v) is int for v in cfg.network["channels"])
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config)]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 1


def _finished_run(tmp_path: Path) -> Path:
    config = tmp_path / "synthetic.json"
    config.write_text(json.dumps({"data_root": "", "network": TINY_NETWORK, "batch_size": 1, "max_steps": 1,
                                  "loader_workers": 0, "max_correction_rounds": 0}))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--config", str(config)]) == 0
    return out


def _held(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _pack_of_nifti_cases(tmp_path: Path) -> Path:
    from SegAssistLib.training import pack

    folder, image, labels = brats_like_folder(tmp_path / "data")
    for n in range(2):
        _write_nifti(folder, f"brats_new_{n}", np.roll(image, n, 0), labels)
    return pack.write_pack(tmp_path / "data", tmp_path / "pack", patch=16, progress=lambda _: None).folder


def _train_over(out: Path, data_root: Path, tmp_path: Path, **change) -> int:
    config = tmp_path / "real.json"
    config.write_text(json.dumps({"data_root": str(data_root), "network": TINY_NETWORK, "batch_size": 1,
                                  "max_steps": 1, "loader_workers": 1, "max_correction_rounds": 0, **change}))
    return main(["train", "--out", str(out), "--config", str(config), "--overwrite"])


def test_a_damaged_pack_is_told_in_one_line_before_overwrite_replaces_the_run(tmp_path, capsys):
    """A pack file damaged in transfer came out as the loader worker's traceback, after --overwrite had
    deleted the earlier run's weights."""
    out = _finished_run(tmp_path)
    before = _held(out)
    folder = _pack_of_nifti_cases(tmp_path)
    capsys.readouterr()
    damaged = sorted(folder.glob("*.npz"))[0]
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])  # its archive directory is gone: found before the run
    assert _train_over(out, folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"cannot read packed case {damaged}" in err and "Traceback" not in err and err.count("\n") == 1
    assert _held(out) == before
    # damaged inside, its directory whole: only the loader finds it, and says so in one line
    broken = bytearray(whole)
    with zipfile.ZipFile(io.BytesIO(whole)) as archive:
        info = archive.getinfo("labels.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    broken[start + 5 : start + 45] = bytes(40)
    damaged.write_bytes(bytes(broken))
    assert _train_over(out, folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"cannot read packed case {damaged}" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert _held(out) == before


def test_a_pack_holding_evaluation_cases_or_an_incomplete_dataset_folder_is_refused_before_the_run(
    tmp_path, capsys, monkeypatch
):
    out = _finished_run(tmp_path)
    before = _held(out)
    folder = _pack_of_nifti_cases(tmp_path)
    from SegAssistLib import datasets

    real = datasets.load_splits()
    monkeypatch.setattr(datasets, "load_splits", lambda: {**real, "brats": real["brats"] + ["brats_new_0"]})
    capsys.readouterr()
    assert _train_over(out, folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert "holds brats case(s) of the evaluation split (brats_new_0" in err
    assert "Traceback" not in err and err.count("\n") == 1 and _held(out) == before
    monkeypatch.undo()
    (tmp_path / "data" / "broken" / "imagesTr").mkdir(parents=True)  # no labelsTr/
    assert _train_over(out, tmp_path / "data", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'broken'} is not a dataset folder" in err
    assert "Traceback" not in err and err.count("\n") == 1 and _held(out) == before


def test_a_data_root_of_packs_beside_dataset_folders_is_refused_naming_both(tmp_path, capsys):
    """One pack under the data root hid every dataset folder there: the run trained without them, silently."""
    from SegAssistLib.training import pack
    from SegAssistLib.training.data import load_training_cases

    folder, image, labels = brats_like_folder(tmp_path / "data")
    _write_nifti(folder, "brats_new_0", image, labels)
    pack.write_pack(tmp_path / "data", tmp_path / "data" / "mypack", patch=16, progress=lambda _: None)
    with pytest.raises(SegAssistError, match=r"holds both training packs \(mypack\) and dataset folders \(brats\)"):
        load_training_cases(tmp_path / "data")
    assert _train_over(tmp_path / "run", tmp_path / "data", tmp_path) == 2
    err = capsys.readouterr().err
    assert "holds both training packs (mypack) and dataset folders (brats)" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_resume_whose_budget_is_spent_is_refused_naming_what_to_pass(tmp_path, capsys):
    """It trained 0 steps, printed done, exited 0 and saved the weights again as final."""
    from SegAssistLib.training.train import TrainConfig, Trainer

    cfg = TrainConfig(data_root="", network=TINY_NETWORK, batch_size=1, max_steps=3, loader_workers=0,
                      max_correction_rounds=0, minutes=2)
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        trainer.train_step()
        trainer.elapsed = 120.0  # the whole budget: as a run ended by its time
        trainer.save(final=True)
    finally:
        trainer.close()
    state = tmp_path / "run" / "state.pt"
    before = _held(tmp_path / "run")
    capsys.readouterr()
    for argv in ([], ["--minutes", "1.5"]):
        assert main(["train", "--out", str(tmp_path / "run"), "--resume", str(state), *argv]) == 2
        err = capsys.readouterr().err
        assert "the state has used 2 of the run's" in err and "give --minutes above 2 (the total budget" in err
        assert err.count("\n") == 1 and _held(tmp_path / "run") == before
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", str(state), "--minutes", "3"]) == 0
    assert torch.load(state, weights_only=True)["step"] == 3
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "total wall-clock budget, including earlier sessions" in " ".join(capsys.readouterr().out.split())


def test_a_resume_with_other_threads_warns(tmp_path, capsys):
    """CPU kernels' results depend on threads (docs/training.md): a resume that changed it said nothing."""
    out = _finished_run(tmp_path)
    config = tmp_path / "threads.json"
    config.write_text(json.dumps({"data_root": "", "network": TINY_NETWORK, "batch_size": 1, "max_steps": 2,
                                  "loader_workers": 0, "max_correction_rounds": 0, "threads": 2}))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--config", str(config), "--resume", str(out / "state.pt")]) == 0
    assert "warning: resuming with threads 2 (the state's run had 1)" in capsys.readouterr().err


def _script(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *argv], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_package_model_and_make_splits_report_bad_input_in_one_line(tmp_path):
    done = _script("package_model.py", str(tmp_path / "nope"), "--version", "1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("package_model.py: error: ") and str(tmp_path / "nope") in done.stderr
    (tmp_path / "data" / "broken" / "imagesTr").mkdir(parents=True)
    done = _script("make_splits.py", str(tmp_path / "data"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"make_splits.py: error: {tmp_path / 'data' / 'broken'} is not a dataset folder" in done.stderr


def test_package_model_names_the_runs_state_not_an_option_never_given(tmp_path):
    from SegAssistLib.training.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(data_root="", network=TINY_NETWORK, loader_workers=0), tmp_path / "run")
    try:
        trainer.save()
    finally:
        trainer.close()
    state = tmp_path / "run" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # cut short
    spec = importlib.util.spec_from_file_location("package_model", REPO / "scripts" / "package_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.DEFAULT_CHECKPOINT = tmp_path / "shipped" / "segassist_unet.pt"  # never the repository's
    with pytest.raises(SegAssistError) as caught:
        script.main([str(tmp_path / "run"), "--version", "1"])
    assert str(caught.value).startswith(f"the run's state.pt ({state}): not a readable training state")
    assert "--resume" not in str(caught.value) and not (tmp_path / "shipped").exists()
