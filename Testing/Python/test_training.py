"""The training script: synthetic data, simulated interactions, checkpoints, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from SegAssistLib.cli import main
from SegAssistLib.engine.encoding import draw_prompts
from SegAssistLib.engine.network import load_checkpoint
from SegAssistLib.training import simulation
from SegAssistLib.training.synthetic import synthetic_case


def test_synthetic_volumes_vary_and_hold_objects():
    rng = np.random.default_rng(0)
    cases = [synthetic_case(rng, size=48) for _ in range(3)]
    for case in cases:
        assert case.image.dtype == np.float32 and np.isfinite(case.image).all()
        assert case.labels.shape == case.image.shape and case.labels.max() >= 2
    means = [float(c.image.mean()) for c in cases]
    assert len({round(m, 4) for m in means}) == 3  # three different volumes


def test_simulated_prompts_land_on_the_object_and_corrections_on_the_error():
    rng = np.random.default_rng(1)
    target = np.zeros((32, 32, 32), bool)
    target[8:24, 10:22, 6:26] = True
    for _ in range(20):
        prompt = simulation.first_prompt(target, rng)
        ch = draw_prompts([prompt], 32)
        ink = ch.any(0)
        assert ink.any()
        if prompt.kind in ("point", "scribble"):
            assert (ink & target).sum() >= 0.5 * ink.sum()
    prediction = target.copy()
    prediction[8:24, 10:22, 6:12] = False  # a missed slab: the correction must be positive, inside it
    click = simulation.correction_prompt(target, prediction, np.random.default_rng(2))
    k, j, i = np.rint(click.coords[0]).astype(int)
    assert click.positive and target[k, j, i] and not prediction[k, j, i]


def test_training_runs_checkpoints_and_resumes(tmp_path, capsys):
    cfg = {
        "data_root": "",  # synthetic data only: the test does not depend on ../shared
        "network": {"channels": [4, 8], "strides": [2], "patch_size": 24},
        "batch_size": 2, "minutes": 5, "max_steps": 3, "loader_workers": 0, "max_correction_rounds": 1,
        "simulation_workers": 1,  # the correction clicks found in a pool, as on a GPU machine
    }
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--config", str(config), "--seed", "3"]) == 0
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 3
    model = load_checkpoint(out / "model.pt")
    assert model.meta["steps"] == 3 and model.config.patch_size == 24
    cfg["max_steps"], cfg["simulation_workers"] = 5, 0
    config.write_text(json.dumps(cfg))
    assert main(["train", "--out", str(out), "--config", str(config), "--resume", str(out / "state.pt")]) == 0
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 5
    # without --config a resumed run keeps its own settings (once: the default network, a traceback,
    # and config.json overwritten with defaults)
    assert main(["train", "--out", str(out), "--resume", str(out / "state.pt"), "--minutes", "5"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["network"]["channels"] == [4, 8] and torch.load(out / "state.pt", weights_only=True)["step"] == 5
    # a file that is not a training state is named, and nothing is written
    before = (out / "config.json").read_bytes()
    for bad, message in ((out / "model.pt", "lacks model, optimizer"), (tmp_path / "empty.pt", "not a readable")):
        bad.touch()
        assert main(["train", "--out", str(out), "--resume", str(bad)]) == 2
        assert message in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before
    # a finished run's weights are never replaced by a new run without being asked
    weights = (out / "model.pt").read_bytes()
    assert main(["train", "--out", str(out), "--config", str(config)]) == 2
    assert (out / "model.pt").read_bytes() == weights
    # asked to start afresh, the run's log holds only the new run
    cfg["max_steps"] = 25
    config.write_text(json.dumps(cfg))
    assert main(["train", "--out", str(out), "--config", str(config), "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [25] and torch.load(out / "state.pt", weights_only=False)["step"] == 25


@pytest.mark.parametrize("change, argv, message", [
    ({}, ["--minutes", "0"], "more than 0 minutes, got 0.0"),
    ({"data_root": "no/such/folder"}, [], "training data folder not found: no/such/folder"),
    ({"data_root": "."}, [], "holds no dataset folders"),  # once: synthetic data only, exit 0
    ({"learning_rat": 0.1}, [], r"unknown field\(s\) learning_rat"),
    ({"minutes": "abc"}, [], r"wrong type of minutes \(text, not a number\)"),  # once a TypeError traceback
    ({"batch_size": 2.5, "network": []}, [],
     r"wrong type of batch_size \(a number, not a whole number\), network \(a list, not an object\)"),
    ({}, ["--device", "bogus"], "invalid device 'bogus'"),
    ({}, ["--resume", "no_such_state.pt"], "no such checkpoint file"),
])
def test_train_refuses_bad_settings_before_it_starts(tmp_path, capsys, change, argv, message):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_root": "", "max_steps": 1, **change}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_the_default_training_data_is_found_as_bench_finds_it_not_from_the_current_folder(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # ../shared/data from here is nothing
    monkeypatch.setenv("SEGASSIST_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert main(["train", "--out", str(tmp_path / "run"), "--minutes", "1"]) == 2
    assert f"training data folder not found: {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    monkeypatch.delenv("SEGASSIST_SHARED_DATA")
    from SegAssistLib.datasets import REPO_ROOT, default_data_root

    assert default_data_root() == REPO_ROOT.parent / "shared" / "data"


def test_the_training_entry_point_for_gpu_machines_reports_errors_in_one_line(tmp_path, capsys):
    from SegAssistLib.training.__main__ import main as training_main

    assert training_main(["train", "--out", str(tmp_path / "run"), "--minutes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m SegAssistLib.training train: error: the training budget")
    assert "Traceback" not in err
    assert training_main(["pack-training", str(tmp_path / "nope"), str(tmp_path / "pack")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_a_file_or_folder_problem_is_one_line_naming_the_path(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the training config" in err and str(tmp_path) in err and err.count("\n") == 1
    (tmp_path / "out.json").mkdir()
    assert main(["eval", str(tmp_path), "--labels", "1", "--json", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert "out.json is a folder: give a file name" in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path / "nope"), "--json", str(tmp_path / "r.json")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--labels", "", "--json", str(tmp_path / "r.json")]) == 2
    assert "no targets in ''" in capsys.readouterr().err  # not every label of dataset.json
    (tmp_path / "dataset.json").write_text("{not json")
    assert main(["eval", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    assert "is not a dataset.json" in capsys.readouterr().err
    # a learn subcommand's error names the subcommand, not only "learn"
    assert main(["learn", "cases", "--store", str(tmp_path / "no_store")]) == 2
    assert capsys.readouterr().err.startswith("segassist learn cases: error: ")


def test_unions_of_touching_structures_start_from_a_box_or_an_outline_never_a_click():
    from SegAssistLib.training.data import TrainCase, _targets

    labels = np.zeros((20, 20, 20), np.int16)
    labels[4:16, 4:10, 4:16], labels[4:16, 10:16, 4:16] = 1, 2
    heart = TrainCase("heart", labels.astype(np.float32), labels, (1.0, 1.0, 1.0), "MR", _targets(labels))
    tumour = TrainCase("tumour", labels.astype(np.float32), labels, (1.0, 1.0, 1.0), "MR", _targets(labels),
                       click_unions=True)
    assert (1, 2) in heart.targets
    assert heart.first_prompt_kinds((1,)) == simulation.FIRST_KINDS
    assert heart.first_prompt_kinds((1, 2)) == simulation.EXTENT_KINDS
    assert tumour.first_prompt_kinds((1, 2)) == simulation.FIRST_KINDS
    rng = np.random.default_rng(4)
    union = np.isin(labels, (1, 2))
    kinds = {simulation.first_prompt(union, rng, heart.first_prompt_kinds((1, 2))).kind for _ in range(40)}
    assert kinds == {"box", "lasso"}


def test_the_committed_training_config_of_the_shipped_weights_loads():
    from pathlib import Path

    from SegAssistLib.training.train import TrainConfig

    path = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "training_config_v0.3.0.json"
    cfg = TrainConfig(**json.loads(path.read_text()))
    assert cfg.learning_rate == 1e-3 and cfg.click_union_datasets == ["brats"] and cfg.network["patch_size"] == 64


def test_the_gpu_training_config_loads_and_its_model_file_fits_a_transfer(tmp_path):
    """scripts/gpu/train_config.json (docs/training.md): a valid config whose model.pt stays under the
    16 MiB a file may have to come back from a GPU machine."""
    from pathlib import Path

    from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint
    from SegAssistLib.training.train import TrainConfig

    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "train_config.json"
    cfg = TrainConfig(**json.loads(path.read_text()))
    assert cfg.device == "cuda" and cfg.simulation_workers > 0 and cfg.data_root == ".pack"
    net_cfg = NetworkConfig.from_dict(cfg.network)
    save_checkpoint(tmp_path / "model.pt", build_network(net_cfg), net_cfg, {"train_config": {}})
    assert (tmp_path / "model.pt").stat().st_size < 16 * 2**20


def test_correction_clicks_are_the_same_from_the_simulation_pool(tmp_path):
    from SegAssistLib.training.train import TrainConfig, Trainer

    rng = np.random.default_rng(5)
    targets, predictions = [], []
    for _ in range(6):
        target = np.zeros((24, 24, 24), bool)
        lo = rng.integers(2, 8, 3)
        target[lo[0] : lo[0] + 12, lo[1] : lo[1] + 10, lo[2] : lo[2] + 14] = True
        prediction = np.roll(target, int(rng.integers(-4, 5)), axis=int(rng.integers(3)))
        targets.append(target)
        predictions.append(prediction)
    answers = []
    for workers in (0, 1):
        cfg = TrainConfig(data_root="", network={"channels": [4, 8], "strides": [2], "patch_size": 24},
                          loader_workers=0, simulation_workers=workers)
        trainer = Trainer(cfg, tmp_path / f"run{workers}")
        answers.append(trainer.corrections(targets, predictions))
        trainer.close()
    assert all(a is not None for a in answers[0])
    for a, b in zip(*answers):
        assert (a.kind, a.positive) == (b.kind, b.positive) and np.array_equal(a.coords, b.coords)
        k, j, i = np.rint(a.coords[0]).astype(int)
        assert 0 <= k < 24 and 0 <= j < 24 and 0 <= i < 24


def test_samples_come_from_a_loader_process_with_their_start_drawn_and_steps_add_the_corrections(tmp_path):
    """A loader process gives each patch its start (a first prompt, or a corrupted prior and its
    correction) already drawn; each correction round of a training step then draws only its new
    click, into the same channels, so they always show every prompt of the sample."""
    from SegAssistLib.training.train import TrainConfig, Trainer

    cfg = TrainConfig(data_root="", network={"channels": [4, 8], "strides": [2], "patch_size": 24}, batch_size=3,
                      loader_workers=1, max_correction_rounds=2, corrupt_share=0.5, seed=7)
    trainer = Trainer(cfg, tmp_path / "run")
    seen = []
    stream = trainer.stream

    class Keep:
        def __next__(self):
            batch = next(stream)
            seen.append((batch, [len(s.prompts) for s in batch]))
            return batch

    trainer.stream = Keep()
    try:
        rounds = [trainer.train_step()["rounds"] for _ in range(6)]
    finally:
        trainer.close()
    assert any(rounds), "no step ran a correction round"
    for (batch, start_lengths), n_rounds in zip(seen, rounds):
        for sample, start_length in zip(batch, start_lengths):
            assert sample.image.shape == (24, 24, 24) and sample.target.any() and start_length >= 1
            assert start_length <= len(sample.prompts) <= start_length + n_rounds
            assert np.array_equal(sample.channels.numpy(), draw_prompts(sample.prompts, 24))
    assert any(len(s.prompts) > n for (batch, lengths), r in zip(seen, rounds) if r for s, n in zip(batch, lengths))


def test_a_sample_starts_from_a_corrupted_prior_at_the_configured_share():
    rng = np.random.default_rng(8)
    target = np.zeros((24, 24, 24), bool)
    target[6:18, 5:17, 7:19] = True
    plain = [simulation.starting_point(target, rng, corrupt_share=0.0) for _ in range(10)]
    assert all(prior is None and len(prompts) == 1 for prompts, prior in plain)
    mixed = [simulation.starting_point(target, rng, corrupt_share=0.3) for _ in range(300)]
    share = np.mean([prior is not None for _, prior in mixed])
    assert 0.22 < share < 0.38
    corrupted = [simulation.starting_point(target, rng, corrupt_share=1.0) for _ in range(40)]
    assert all(prior is not None and prior.shape == target.shape for _, prior in corrupted)
    assert any(not np.array_equal(prior, target) for _, prior in corrupted)
    # half keep the first prompt before the correction, half start from the correction alone
    lengths = {len(prompts) for prompts, _ in corrupted}
    assert lengths == {1, 2}


def test_drawing_into_channels_of_the_wrong_shape_is_refused():
    import pytest

    with pytest.raises(ValueError, match="prompt channels"):
        draw_prompts([], 16, out=np.zeros((5, 8, 8, 8), bool))


def test_a_dataset_the_data_root_lacks_is_named_before_training(shared_data, tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_root": str(shared_data), "datasets": ["hipocampus"], "max_steps": 1}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "datasets hipocampus are not in" in err and "hippocampus" in err and not (tmp_path / "run").exists()
    # a dataset's own folder given as the data root
    assert main(["train", "--out", str(tmp_path / "run"), "--data-root", str(shared_data / "hippocampus")]) == 2
    assert "holds no dataset folders" in capsys.readouterr().err


def test_the_exact_training_click_is_the_evaluation_protocols_click():
    """Training took the first maximum in array order over the whole mask; evaluation breaks ties
    towards the centre and clicks the largest component."""
    from SegAssistLib.evaluation.simulator import first_click
    from SegAssistLib.training.simulation import interior_point

    rng = np.random.default_rng(0)
    box = np.zeros((60, 30, 30), bool)
    box[10:50, 5:25, 5:25] = True  # a long box: the maximum is a tie along k
    slab_and_cube = np.zeros((40, 60, 60), bool)
    slab_and_cube[2:8, 2:58, 2:58] = True  # large and thin: the largest component
    slab_and_cube[14:32, 20:38, 20:38] = True  # small and thick, apart: the deepest voxel overall
    for mask in (box, slab_and_cube):
        expected = first_click(mask.astype(np.uint8)).position[::-1]  # (i, j, k) -> (k, j, i)
        assert tuple(interior_point(mask, rng, exact=True)) == tuple(float(x) for x in expected)


def _tiny_run(tmp_path, name, seed, **change):
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"data_root": "", "network": {"channels": [4, 8], "strides": [2], "patch_size": 16},
                                  "batch_size": 1, "max_steps": 1, "loader_workers": 0, "max_correction_rounds": 0,
                                  **change}))
    return config


def test_a_resumed_state_never_replaces_another_run_unasked(tmp_path, capsys):
    """--resume of another run's state into a folder holding a run replaced that run without
    --overwrite."""
    config = _tiny_run(tmp_path, "cfg", 0)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), "--config", str(config), "--seed", "1"]) == 0
    assert main(["train", "--out", str(b), "--config", str(config), "--seed", "2"]) == 0
    capsys.readouterr()
    held = {name: (b / name).read_bytes() for name in ("model.pt", "state.pt", "config.json", "log.jsonl")}
    assert main(["train", "--out", str(b), "--config", str(config), "--resume", str(a / "state.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{b} already holds model.pt and state.pt of another run than --resume {a / 'state.pt'}" in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert {name: (b / name).read_bytes() for name in held} == held
    # the run's own state, by any path to it, continues it
    other_path = tmp_path / "." / "b" / ".." / "b" / "state.pt"
    assert main(["train", "--out", str(b), "--resume", str(other_path), "--minutes", "5"]) == 0
    # asked to, another run's state replaces the run: its state continues, the old log goes
    config = _tiny_run(tmp_path, "cfg", 0, max_steps=2)
    (b / "log.jsonl").write_text('{"step": 25}\n')
    assert main(["train", "--out", str(b), "--config", str(config), "--resume", str(a / "state.pt"),
                 "--overwrite"]) == 0
    assert torch.load(b / "state.pt", weights_only=True)["step"] == 2 and not (b / "log.jsonl").read_text()


def test_a_state_of_other_network_settings_is_refused_before_anything_is_written(tmp_path, capsys):
    """Other strides or another patch size take the same tensors: the weights loaded without a
    word. A resume refused for its weights still rewrote config.json first."""
    a = tmp_path / "a"
    assert main(["train", "--out", str(a), "--config", str(_tiny_run(tmp_path, "cfg", 0))]) == 0
    capsys.readouterr()
    before = (a / "config.json").read_bytes()
    for network in ({"channels": [8, 16], "strides": [2], "patch_size": 16},  # weights that do not fit
                    {"channels": [4, 8], "strides": [1], "patch_size": 16},  # weights that fit: same tensors
                    {"channels": [4, 8], "strides": [2], "patch_size": 24}):
        other = _tiny_run(tmp_path, "other", 0, network=network, max_steps=2)
        assert main(["train", "--out", str(a), "--config", str(other), "--resume", str(a / "state.pt")]) == 2
        assert (a / "config.json").read_bytes() == before
        err = capsys.readouterr().err
        assert "the state was trained with other network settings" in err and err.count("\n") == 1


def test_resuming_with_a_config_takes_its_weight_decay_not_the_states(tmp_path):
    from SegAssistLib.training.train import TrainConfig, Trainer

    network = {"channels": [4, 8], "strides": [2], "patch_size": 16}
    first = Trainer(TrainConfig(data_root="", network=network, loader_workers=0, weight_decay=1e-5), tmp_path / "a")
    first.save()
    first.close()
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    cfg = TrainConfig(data_root="", network=network, loader_workers=0, weight_decay=0.5)
    resumed = Trainer(cfg, tmp_path / "b", state)
    resumed.close()
    assert [g["weight_decay"] for g in resumed.opt.param_groups] == [0.5]


def _start_training_until_step_25(config: Path, out: Path, signum: int, **popen) -> subprocess.Popen:
    """``segassist train`` in a process that takes ``signum`` as from a shell (not whatever ignore or mask
    the test runner passes down), read until its first log line (25 steps done, none saved yet)."""

    def default_signal() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.signal(signum, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "SegAssistLib.cli", "train", "--out", str(out), "--config",
                                str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_signal, **popen)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:
            if line.startswith('{"step": 25'):
                return process
            assert time.monotonic() < deadline, "no training step in 120 s"
        raise AssertionError("the run ended before its first log line")
    except BaseException:
        process.kill()
        raise


def test_ctrl_c_saves_the_state_and_says_how_to_resume(tmp_path):
    """Ctrl-C exited 130 but saved nothing: the work since the last checkpoint (every 5 minutes) was lost."""
    import signal

    cfg = {"data_root": "", "network": {"channels": [4, 8], "strides": [2], "patch_size": 24}, "batch_size": 1,
           "minutes": 5, "max_steps": 100000, "loader_workers": 0, "max_correction_rounds": 0}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    process = _start_training_until_step_25(config, out, signal.SIGINT)
    try:
        assert not (out / "state.pt").exists()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)  # a loaded 2-core CI machine: saving is not instant
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().endswith("interrupted"), stderr[-2000:]
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert step >= 25 and load_checkpoint(out / "model.pt").meta["steps"] == step
    resume = out / "state.pt"
    assert re.search(rf"interrupted at step {step}: saved .*; continue with --resume {re.escape(str(resume))}$",
                     stdout.strip()), stdout[-1000:]
    cfg["max_steps"] = step + 1  # the hint works: the run goes on from there
    config.write_text(json.dumps(cfg))
    assert main(["train", "--out", str(out), "--config", str(config), "--resume", str(resume)]) == 0
    assert torch.load(resume, weights_only=True)["step"] == step + 1


def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (Linux: /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # ended meanwhile
            pass
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the loader process through /proc")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_save_the_state_like_ctrl_c_and_leave_no_loader_process(tmp_path, signame):
    """`timeout`, a batch system, systemd or a closed SSH session end a run with SIGTERM or SIGHUP: the
    process died at once, saved nothing (up to checkpoint_minutes of work lost), and its loader process,
    blocked on a queue nobody read, ran on for good. Patches of 32 voxels: a batch is more than a pipe holds."""
    import signal

    signum = getattr(signal, signame)
    cfg = {"data_root": "", "network": {"channels": [4, 8], "strides": [2], "patch_size": 32}, "batch_size": 1,
           "minutes": 5, "max_steps": 100000, "loader_workers": 1, "max_correction_rounds": 0}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    process = _start_training_until_step_25(config, out, signum, start_new_session=True)
    loaders = []
    try:
        loaders = _children(process.pid)
        assert loaders and not (out / "state.pt").exists()
        process.send_signal(signum)  # to the training process alone, as kill does
        stdout, stderr = process.communicate(timeout=60)  # a loader left behind holds the pipes open
    finally:
        for pid in [process.pid, *loaders]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == -signum, stderr[-2000:]  # ended by the signal, once saved: 128 + n in a shell
    assert "Traceback" not in stderr, stderr[-2000:]
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert step >= 25 and load_checkpoint(out / "model.pt").meta["steps"] == step
    resume = out / "state.pt"
    hint = rf"stopped by {signame} at step {step}: saved .*; continue with --resume {re.escape(str(resume))}$"
    assert re.search(hint, stdout.strip()), stdout[-1000:]
    assert not [pid for pid in loaders if _running(pid)]


def test_a_config_holding_a_path_saves_a_run_that_loads_and_one_holding_objects_is_refused_at_once(tmp_path):
    """A Path in the config (the field is text; an easy mistake from Python) trained and saved without a
    word, and then neither model.pt nor state.pt could be loaded (weights_only=True): the run was lost."""
    from pathlib import Path

    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.training.train import TrainConfig, Trainer, read_training_state

    network = {"channels": [4, 8], "strides": [2], "patch_size": 16}
    trainer = Trainer(TrainConfig(data_root=Path(tmp_path / "data"), network=network, loader_workers=0),
                      tmp_path / "run")
    try:
        trainer.save()
    finally:
        trainer.close()
    assert read_training_state(tmp_path / "run" / "state.pt")["config"]["data_root"] == str(tmp_path / "data")
    assert load_checkpoint(tmp_path / "run" / "model.pt").meta["train_config"]["data_root"] == str(tmp_path / "data")
    with pytest.raises(SegAssistError, match=r"the training config must be plain data \(JSON-compatible\): "
                                             r"a value of type object at \['datasets'\]\[0\]"):  # fmt: skip
        Trainer(TrainConfig(data_root="", network=network, loader_workers=0, datasets=[object()]), tmp_path / "new")
    assert not (tmp_path / "new").exists()  # refused before anything is written, not after the training


def test_a_resume_under_other_draws_goes_on_with_a_warning(tmp_path, capsys):
    """--seed, batch_size or loader_workers changed on resume was taken without a word, though each
    batch's draws depend on them: the run no longer went on as the interrupted one would have."""
    first = _tiny_run(tmp_path, "cfg", 0)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--config", str(first), "--seed", "1"]) == 0
    same = _tiny_run(tmp_path, "same", 0, max_steps=2)
    resume = ["--resume", str(out / "state.pt")]
    assert main(["train", "--out", str(out), "--config", str(same), "--seed", "1", *resume]) == 0
    assert "warning" not in capsys.readouterr().err
    other = _tiny_run(tmp_path, "other", 0, max_steps=3, batch_size=2)  # and its seed, 0
    assert main(["train", "--out", str(out), "--config", str(other), *resume]) == 0
    err = capsys.readouterr().err
    assert ("warning: resuming with seed 0 (the state's run had 1), batch_size 2 (the state's run had 1): the run "
            "goes on, but no longer exactly as the interrupted run would have") in err
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3


def test_a_loader_process_says_nothing_of_a_connection_its_trainer_dropped():
    """SIGTERM while the trainer fetched a batch's shared memory: the loader's handle-sharing thread printed
    a ConnectionResetError traceback (seen once in a CI run); other errors still print."""
    script = """
import sys
from SegAssistLib.training.train import _quiet_when_the_trainer_leaves
_quiet_when_the_trainer_leaves(0)
for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"),
              ValueError("a real error")):
    sys.excepthook(type(error), error, None)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ValueError: a real error" in done.stderr, done.stderr
    assert "Connection" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr
