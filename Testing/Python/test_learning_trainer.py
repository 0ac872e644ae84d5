"""The background trainer: real (tiny) training runs on a datastore of synthetic cases, progress,
cancel in a separate process, the time budget, promotion only when better, version history with
rollback, and the hot swap of a version into a running engine."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from learning_fixtures import (
    adapter_settings,
    make_store,
    one_thread,  # noqa: F401  (autouse fixture)
    synthetic_case,
    tiny_checkpoint,
)

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.errors import SegAssistError
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, save_mask_nifti
from SegAssistLib.learning import AdapterError
from SegAssistLib.learning import trainer as trainer_module
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.deploy import EngineSync, activate, network_identity, version_network
from SegAssistLib.learning.errors import CaseLockedError, DatastoreError
from SegAssistLib.learning.jobs import get_job, list_jobs, start_training, training_running
from SegAssistLib.learning.loop_errors import RegistryError, TrainingBusyError, TrainingError
from SegAssistLib.learning.registry import AdapterRegistry, adapter_id_of, model_version
from SegAssistLib.learning.traindata import holdout_split
from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training
from SegAssistLib.prompts import PointPrompt


@pytest.fixture
def setup(tmp_path: Path):
    store, cases = make_store(tmp_path / "store", n_labelled=5, n_new=1)
    store.close()
    return tmp_path / "store", tiny_checkpoint(tmp_path / "tiny.pt"), cases


def quick(**kw) -> AdapterTrainConfig:
    """A run of a few seconds on the tiny network."""
    defaults = dict(kind="lora", rank=2, lora_rank=2, max_steps=12, time_budget_s=60.0, val_clicks=2, seed=0)
    base = adapter_settings(defaults, kw)
    return AdapterTrainConfig(**base)


def test_holdout_split_is_deterministic_stable_and_disjoint():
    rng = np.random.default_rng(0)
    ids = [f"{int(x):016x}" for x in rng.integers(0, 2**62, 40)]
    train, val = holdout_split(ids[:10], fraction=0.2)
    assert (train, val) == holdout_split(list(ids[:10]), fraction=0.2)
    assert val and train and not set(train) & set(val) and set(train) | set(val) == set(ids[:10])
    # as the store grows, no case ever moves from training into validation
    for n in range(11, 41):
        train_n, val_n = holdout_split(ids[:n], fraction=0.2, max_val=8)
        assert not set(train) & set(val_n)
        assert len(val_n) <= 8
        train, val = train_n, val_n
    assert holdout_split(ids[:2]) == holdout_split(ids[:2]) and len(holdout_split(ids[:2])[1]) == 1
    with pytest.raises(TrainingError, match="at least 2 submitted cases"):
        holdout_split(ids[:1])


def test_a_small_store_whose_cases_are_all_held_out_waits_for_one_more_case():
    """Two cases both drawn for validation: training on one of them (to have something to train on)
    would put it in validation as soon as a third case arrives, and the version trained on it would
    be scored on it. Refused instead, with what to do."""
    from SegAssistLib.learning.traindata import holdout_number

    ids = [f"{n:016x}" for n in range(2000)]
    low = [c for c in ids if holdout_number(c) < 0.2][:2]
    high = next(c for c in ids if holdout_number(c) >= 0.2)
    with pytest.raises(TrainingError, match="all 2 usable labelled cases are held out.*one more case"):
        holdout_split(low, fraction=0.2)
    assert holdout_split([*low, high], fraction=0.2) == ([high], low)
    with pytest.raises(TrainingError, match="all 2 usable"):  # min_val alone can hold out every case too
        holdout_split([high, ids[-1]], fraction=0.0, min_val=2)
    # small stores growing case by case: a case trained on never validates later
    rng = np.random.default_rng(7)
    for _ in range(200):
        trained: set = set()
        order = [ids[i] for i in rng.choice(len(ids), 6, replace=False)]
        for n in range(2, 7):
            try:
                train, val = holdout_split(order[:n], fraction=0.2)
            except TrainingError:
                continue
            assert not trained & set(val)
            trained |= set(train)


def test_a_case_trained_on_never_validates_even_when_validation_cases_leave():
    """A reviewer rejects the validation case (or a draft reopens it): the next-ranked case, which
    the current version was trained on, used to become the validation case its successor is
    promoted on. Cases a stored version learned from are never chosen to validate."""
    rng = np.random.default_rng(3)
    ids = [f"{int(x):016x}" for x in rng.integers(0, 2**62, 12)]
    train, val = holdout_split(ids[:6], fraction=0.2)
    remaining = [c for c in ids[:6] if c not in val]  # every validation case left the usable set
    with pytest.raises(TrainingError, match=r"were trained on by an earlier version.*submit \d+ more case"):
        holdout_split(remaining, fraction=0.2, trained_on=train)
    assert holdout_split(remaining, fraction=0.2)[1]  # without the history it validated on a trained case
    grown = remaining + ids[6:]  # new cases arrive: validation comes from them only
    train_2, val_2 = holdout_split(grown, fraction=0.2, trained_on=train)
    assert val_2 and not set(val_2) & set(train) and set(train) <= set(train_2)


def test_the_held_out_cases_follow_the_images_not_their_random_case_ids():
    rng = np.random.default_rng(1)
    images = [f"{int(x):016x}" for x in rng.integers(0, 2**62, 30)]  # content hashes
    ids_a = [f"a{int(x):015x}" for x in rng.integers(0, 2**58, 30)]  # two stores, two sets of random ids
    ids_b = [f"b{int(x):015x}" for x in rng.integers(0, 2**58, 30)]
    _, val_a = holdout_split(ids_a, keys=dict(zip(ids_a, images)))
    _, val_b = holdout_split(ids_b, keys=dict(zip(ids_b, images)))
    assert len(val_a) >= 2
    assert [images[ids_a.index(c)] for c in val_a] == [images[ids_b.index(c)] for c in val_b]
    _, by_id_a = holdout_split(ids_a)
    _, by_id_b = holdout_split(ids_b)
    assert {images[ids_a.index(c)] for c in by_id_a} != {images[ids_b.index(c)] for c in by_id_b}


def test_model_version_names_the_answering_adapter_version():
    assert model_version("0.1.0", None) == "0.1.0" and model_version("0.1.0", "v3") == "0.1.0+v3"
    assert adapter_id_of("0.1.0+v3") == "v3" and adapter_id_of(model_version("0.2.0+local", "v12")) == "v12"
    # the base model alone, even one whose version carries build metadata, credits no adapter
    for version in (None, "", "0.1.0", "0.2.0+local", "tiny-1+v", "0.1.0+v3x"):
        assert adapter_id_of(version) is None, version


def test_training_reports_progress_and_promotes_only_when_better(setup):
    store_root, ckpt, _ = setup
    seen = []
    status_path = store_root.parent / "status.json"
    cfg = quick(kind="full", learning_rate=3e-3, max_steps=30, warm_start=False, status_every_s=0.0)
    first = run_training(store_root, ckpt, cfg, status_path=status_path, on_progress=seen.append)

    steps = [s["step"] for s in seen if s.get("phase") == "training"]
    assert steps[-1] == 30 and steps == sorted(steps)
    assert all(np.isfinite(s["loss"]) for s in seen if "loss" in s)
    assert [p for p in dict.fromkeys(s.get("phase") for s in seen)] == [
        "loading", "validating incumbent", "training", "validating", "registering", "finished"
    ]
    final = json.loads(status_path.read_text())
    assert final["state"] == "done" and final["val_dice"] == first.val_dice
    assert final["incumbent_dice"] == first.incumbent_dice and final["result"]["version"]["id"] == "v1"
    # the random base network segments nothing useful; 30 steps on the structure do better
    assert first.state == "done" and first.version.id == "v1"
    assert first.val_dice > first.incumbent_dice and first.promoted and first.current == "v1"
    assert first.version.trainable_share == 1.0 and first.version.incumbent is None

    # the same weights again (warm start, learning rate 0): equal, so not better, so not promoted
    second = run_training(store_root, ckpt, quick(kind="full", learning_rate=0.0, max_steps=3))
    assert second.version.warm_start == "v1" and second.incumbent == "v1"
    assert second.val_dice == pytest.approx(second.incumbent_dice, abs=1e-12)
    assert not second.promoted and second.version.status == "rejected" and second.current == "v1"

    registry = AdapterRegistry(store_root)
    state = registry.read()
    assert state.current == "v1" and [(v.id, v.status) for v in state.versions] == [
        ("v1", "promoted"), ("v2", "rejected")
    ]
    assert all(registry.file_path(v).is_file() for v in state.versions)
    # the split is recorded and disjoint; both runs validated on the same held-out cases
    v1, v2 = state.versions
    assert v1.val_cases == v2.val_cases and not set(v1.train_cases) & set(v1.val_cases)
    with Datastore(store_root, create=False) as store:  # held out by image content, not by case id
        content = {c.id: c.content_hash for c, _ in store.training_cases()}
    assert v1.val_cases == holdout_split(list(content), keys=content)[1]
    assert [e["action"] for e in state.events] == ["promote", "reject"]


def test_a_cancel_during_the_final_validation_registers_nothing(setup):
    store_root, ckpt, _ = setup
    cancel = threading.Event()

    def on_progress(status: dict) -> None:
        if status.get("phase") == "registering":  # validation done, the version not yet written
            cancel.set()

    result = run_training(store_root, ckpt, quick(status_every_s=0.0), on_progress=on_progress,
                          should_stop=cancel.is_set)
    assert cancel.is_set() and result.state == "cancelled" and result.version is None
    assert AdapterRegistry(store_root).read().versions == []


def test_time_budget_is_respected(setup, monkeypatch):
    """Against the base model, then against a promoted version (whose validation, first in the run,
    counts against the budget too): the run ends within its budget plus the grace docs/training.md
    states. Edge snapping off: its solver's time on a loaded machine follows numpy's threads (the
    job process runs with one), not the trainer. Slower clicks: test_learning_trainer_budget.py."""
    store_root, ckpt, _ = setup
    monkeypatch.setattr(trainer_module, "BuiltinEngine", functools.partial(BuiltinEngine, edge_snap=None))
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch's first optimiser imports for seconds
    for incumbent in ("base", "promoted"):
        if incumbent == "promoted":  # a version of full fine-tuning, promoted whatever it scores
            promoted = run_training(store_root, ckpt, quick(kind="full", max_steps=3, min_improvement=-1.0))
            assert promoted.promoted
            incumbent = promoted.version.id
        t0 = time.perf_counter()
        result = run_training(store_root, ckpt, quick(max_steps=100_000, time_budget_s=3.0))
        wall = time.perf_counter() - t0
        assert result.incumbent == incumbent
        assert result.state == "done" and 0 < result.steps < 100_000
        assert result.total_seconds <= 3.0 + 0.5 and wall <= 3.0 + 1.0
    # a budget that cannot even hold the validation registers nothing and says why
    tiny = run_training(store_root, ckpt, quick(time_budget_s=0.01))
    assert tiny.steps == 0 and tiny.version is None and "time budget" in tiny.reason


def test_rollback_history_and_hot_swap(setup, tmp_path: Path):
    store_root, ckpt, _ = setup
    registry = AdapterRegistry(store_root)
    # force promotions (min_improvement -1: any Dice above the incumbent's minus 1) and a rejection (+1:
    # above the incumbent's plus 1, never) to build a history quickly; promotion itself is tested above
    v1 = run_training(store_root, ckpt, quick(kind="lora", learning_rate=2e-2, min_improvement=-1.0))
    v2 = run_training(store_root, ckpt, quick(kind="salt", learning_rate=2e-2, min_improvement=-1.0))
    v3 = run_training(store_root, ckpt, quick(kind="salt", max_steps=2, min_improvement=1.0))
    assert (v1.version.id, v2.version.id, v3.version.id) == ("v1", "v2", "v3")
    assert v1.promoted and v2.promoted and not v3.promoted and registry.read().current == "v2"
    assert v2.version.warm_start is None  # a SALT candidate cannot continue from a LoRA version
    assert 0 < v1.version.trainable_share < 0.2 and 0 < v2.version.trainable_share < 0.2

    engine = BuiltinEngine.from_checkpoint(ckpt)
    volume, truth = synthetic_case(777)
    x = torch.randn(1, 7, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    click = PointPrompt(position=(14.0, 14.0, 10.0), positive=True)

    def outputs():
        with torch.no_grad():
            logits = engine.network(x)
        session = engine.open_session(volume)
        session.add_prompt(click)
        return logits, session.result(), session.prompt_log().model

    base_logits, base_mask, base_model = outputs()
    assert engine.version == "tiny-1"

    sync = EngineSync(registry)
    assert sync.refresh(engine) and engine.version == "tiny-1+v2"
    assert not sync.refresh(engine)  # nothing changed since
    v2_logits, v2_mask, v2_model = outputs()
    assert not torch.allclose(v2_logits, base_logits) and not np.array_equal(v2_mask, base_mask)
    assert v2_model.endswith("tiny-1+v2") and base_model.endswith("tiny-1")  # the session says who answered
    # the engine runs the merged adapter: the same function as the adapted network, plain layers
    assert not any("lora" in n or "scale" in n for n, _ in engine.network.named_parameters())

    assert registry.rollback().id == "v1"  # one step back
    assert registry.get("v2").status == "rolled_back"
    assert sync.refresh(engine) and engine.version == "tiny-1+v1"
    expected = version_network(engine.model, registry, registry.get("v1"))
    assert network_identity(engine.network) == network_identity(expected)

    assert registry.rollback() is None  # back to the base model: exactly the base weights again
    assert sync.refresh(engine) and engine.version == "tiny-1"
    assert torch.equal(outputs()[0], base_logits)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    with pytest.raises(RegistryError, match="rejected"):
        registry.rollback(to="v3")
    assert registry.rollback(to="v2").id == "v2" and registry.read().current == "v2"
    assert [e["action"] for e in registry.read().events][-3:] == ["rollback", "rollback", "rollback"]

    # the next training compares with (and warm-starts from) the current version
    v4 = run_training(store_root, ckpt, quick(kind="salt", max_steps=2, learning_rate=0.0))
    assert v4.incumbent == "v2" and v4.version.warm_start == "v2" and not v4.promoted

    # a version refuses other base weights; the engine keeps answering with what it had
    other = BuiltinEngine.from_checkpoint(tiny_checkpoint(tmp_path / "other.pt", seed=1))
    with pytest.raises(AdapterError, match="base model"):
        activate(other, registry)
    other_sync = EngineSync(registry)
    assert not other_sync.refresh(other) and "base model" in other_sync.last_error
    assert other.version == "tiny-1"

    # a swap that fails for another reason (out of memory) is tried again at the next job: once the
    # version was never applied and last_error stayed None
    fresh = BuiltinEngine.from_checkpoint(ckpt)
    real_swap, attempts = fresh.swap_network, []

    def swap_once_out_of_memory(network, version):
        attempts.append(version)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_swap(network, version)

    fresh.swap_network = swap_once_out_of_memory
    retrying = EngineSync(registry)
    assert not retrying.refresh(fresh) and "OutOfMemoryError" in retrying.last_error and fresh.version == "tiny-1"
    assert retrying.refresh(fresh) and fresh.version == "tiny-1+v2" and retrying.last_error is None


def test_background_job_progress_cancel_and_exclusive(setup):
    store_root, ckpt, _ = setup
    job = start_training(store_root, ckpt, quick(max_steps=1_000_000, time_budget_s=300.0).to_dict())
    try:
        deadline = time.monotonic() + 120
        status = job.status()
        while status.get("step", 0) < 3 and status["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"no progress: {status}"
            time.sleep(0.3)
            status = job.status()
        assert status["state"] == "running" and status["phase"] == "training", status
        assert status["threads"] == 1 and np.isfinite(status["loss"]) and "incumbent_dice" in status
        assert training_running(store_root)
        with pytest.raises(TrainingBusyError, match=job.job_id):
            start_training(store_root, ckpt, quick())
        t_cancel = time.monotonic()
        job.cancel()
        final = job.wait(timeout=60)
        assert final["state"] == "cancelled", final
        assert time.monotonic() - t_cancel < 30
        assert job.process.returncode == 0
    finally:
        job.kill()
    assert not training_running(store_root)  # the lock went with the process
    assert AdapterRegistry(store_root).read().versions == []  # a cancelled job registers nothing
    assert get_job(store_root).job_id == job.job_id and list_jobs(store_root)[0]["state"] == "cancelled"
    # a worker that died without a word (killed, power cut) shows as failed to any other process
    ghost = job.folder.parent / "29990101-000000-dead00"
    ghost.mkdir()
    (ghost / "status.json").write_text(json.dumps({"state": "running", "phase": "training", "step": 7}))
    status = get_job(store_root).status()
    assert status["job_id"] == ghost.name and status["state"] == "failed" and "unexpectedly" in status["error"]
    from SegAssistLib.cli import main

    assert main(["learn", "cancel", "--store", str(store_root)]) == 1  # nothing to stop: not "asked to stop"
    assert not (ghost / "cancel").exists()


def test_bad_requests_fail_clearly(tmp_path: Path, setup):
    store_root, ckpt, _ = setup
    with pytest.raises(TrainingError, match="unknown training kind"):
        AdapterTrainConfig(kind="dora").check()
    with pytest.raises(TrainingError, match="unknown training settings: epochs"):
        AdapterTrainConfig.from_dict({"epochs": 3})
    with pytest.raises(TrainingError, match="invalid device"):
        AdapterTrainConfig(device="tpu9").check()
    for budget in (0, 1e300):  # a budget beyond a week would overflow the job's watchdog timer
        with pytest.raises(TrainingError, match="time_budget_s"):
            AdapterTrainConfig(time_budget_s=budget).check()
    for seed in (-1, 2**70, 1.5, True):  # numpy and torch refuse these only inside the job
        with pytest.raises(TrainingError, match="seed must be an integer"):
            AdapterTrainConfig(seed=seed).check()
    for bad in (float("nan"), float("-inf"), 1.5):  # NaN would never promote, -inf always
        with pytest.raises(TrainingError, match="min_improvement"):
            AdapterTrainConfig(min_improvement=bad).check()
    with pytest.raises(TrainingError, match="weight_decay"):
        AdapterTrainConfig(weight_decay=float("nan")).check()
    for bad in (float("nan"), 0.0, -1.0, "2"):  # once refused only inside the job, after its first validation
        with pytest.raises(TrainingError, match="alpha must be a positive number"):
            AdapterTrainConfig(alpha=bad).check()
    for field_, bad in (("rank", 0), ("rank", 10**6), ("rank", 2.5), ("lora_rank", -1)):
        with pytest.raises(TrainingError, match=f"{field_} must be an integer"):
            AdapterTrainConfig(kind="salt", **{field_: bad}).check()
    AdapterTrainConfig(kind="salt", rank=8, lora_rank=1, alpha=2.0).check()
    with pytest.raises(TrainingError, match="checkpoint not found"):
        start_training(store_root, tmp_path / "missing.pt")
    with pytest.raises(TrainingError, match="no SegAssist datastore"):
        start_training(tmp_path / "nowhere", ckpt)
    lonely, _ = make_store(tmp_path / "lonely", n_labelled=1, n_new=1)
    lonely.close()
    with pytest.raises(TrainingError, match="at least 2 submitted cases"):
        run_training(tmp_path / "lonely", ckpt, quick())
    with pytest.raises(TrainingError, match="at least 2 submitted cases.*has 1"):  # refused before a process starts
        start_training(tmp_path / "lonely", ckpt, quick())
    assert list_jobs(tmp_path / "lonely") == [] and not training_running(tmp_path / "lonely")


def test_learn_cli(setup, capsys, monkeypatch):
    from SegAssistLib.learning.cli import register

    store_root, ckpt, cases = setup
    parser = argparse.ArgumentParser(prog="segassist")
    register(parser.add_subparsers(dest="command"))

    def run(*argv: str):
        capsys.readouterr()  # what a command that raised printed (its progress line) is not the next one's
        args = parser.parse_args(["learn", *argv])
        code = args.func(args)
        return code, capsys.readouterr().out

    code, out = run("status", "--store", str(store_root), "--json")
    data = json.loads(out)
    assert code == 0 and data["cases"]["submitted"] == 5 and data["current_version"] is None
    code, out = run("versions", "--store", str(store_root))
    assert code == 0 and "current: base" in out
    with pytest.raises(RegistryError, match="nothing to roll back"):
        run("rollback", "--store", str(store_root))
    code, out = run("next", "--store", str(store_root), "--strategy", "first", "--no-proposal", "--json")
    assert code == 0 and json.loads(out)["case"]["id"] == cases[-1].id
    with pytest.raises(SegAssistError, match="cannot go with --no-proposal"):  # once wrote nothing, exit 0
        run("next", "--store", str(store_root), "--strategy", "first", "--no-proposal", "--out",
            str(store_root.parent / "never.nii.gz"))
    proposal = store_root.parent / "proposal.nii.gz"
    code, out = run("next", "--store", str(store_root), "--strategy", "first", "--checkpoint", str(ckpt),
                    "--out", str(proposal))
    assert code == 0 and proposal.is_file() and "proposal by tiny-1" in out
    # the proposal file is the annotator's to edit: asking again keeps it unless told to replace it
    edited = proposal.read_bytes()
    with pytest.raises(SegAssistError, match="exists and is kept"):
        run("next", "--store", str(store_root), "--strategy", "first", "--checkpoint", str(ckpt),
            "--out", str(proposal))
    assert proposal.read_bytes() == edited
    code, out = run("next", "--store", str(store_root), "--strategy", "first", "--checkpoint", str(ckpt),
                    "--out", str(proposal), "--overwrite")
    assert code == 0 and proposal.is_file() and not list(proposal.parent.glob(".*proposal.nii.gz"))
    loud = store_root.parent / "PROPOSAL.SEG.NRRD"  # a Slicer segmentation whatever the case of its name
    code, out = run("next", "--store", str(store_root), "--strategy", "first", "--checkpoint", str(ckpt),
                    "--out", str(loud))
    assert code == 0 and sitk.ReadImage(str(loud)).HasMetaDataKey("Segment0_Name")
    # an output that cannot be written is refused before the case is locked, and a write that fails
    # after the lock (here: a full disk) releases it: nobody holds a case whose proposal never came
    not_a_folder = store_root.parent / "afile"
    not_a_folder.write_text("x")
    next_args = ("next", "--store", str(store_root), "--strategy", "first", "--checkpoint", str(ckpt), "--lock",
                 "--user", "bob")
    for out, message in ((not_a_folder / "p.nii.gz", "is a file, not a folder"), (proposal.with_suffix(".txt"),
                                                                                  "write the proposal as")):
        with pytest.raises(SegAssistError, match=message):
            run(*next_args, "--out", str(out))
    import SegAssistLib.io

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(SegAssistLib.io, "save_mask_nifti", disk_full)
        with pytest.raises(OSError, match="No space left"):
            run(*next_args, "--out", str(store_root.parent / "new_proposal.nii.gz"))
    with Datastore(store_root) as ds:
        assert all(c.locked_by is None for c in ds.list_cases())

    # the annotator's round from a terminal: find the new case, lock it, save the corrected mask
    new_case = cases[-1]
    code, out = run("cases", "--store", str(store_root), "--status", "new", "--json")
    assert code == 0 and [c["id"] for c in json.loads(out)] == [new_case.id]
    code, out = run("lock", new_case.id, "--store", str(store_root), "--user", "carol")
    assert code == 0 and "locked by carol" in out and "in_progress" in out
    with pytest.raises(CaseLockedError):
        run("save", new_case.id, str(proposal), "--store", str(store_root), "--user", "dave")
    wrong_grid = store_root.parent / "wrong.nii.gz"
    save_mask_nifti(np.zeros((4, 4, 4), np.uint8), Volume(np.zeros((4, 4, 4), np.float32)), wrong_grid)
    with pytest.raises(DatastoreError, match=r"not on the case's voxel grid: shape \[4, 4, 4\]"):
        run("save", new_case.id, str(wrong_grid), "--store", str(store_root), "--user", "carol")
    # the right shape on another grid (shifted by a voxel, or flipped) would be stored misplaced
    with Datastore(store_root) as ds:
        reference = ds.reference_geometry(new_case.id)
    proposal_mask = load_mask(proposal)
    for change, what in ((dict(origin=tuple(np.add(reference.origin, reference.spacing))), "origin"),
                         (dict(direction=np.diag([-1.0, 1.0, 1.0]) @ reference.direction), "direction")):
        moved = Volume(np.zeros(proposal_mask.shape, np.float32), **{**dict(spacing=reference.spacing,
                       origin=reference.origin, direction=reference.direction), **change})
        save_mask_nifti(proposal_mask, moved, wrong_grid)
        with pytest.raises(DatastoreError, match=f"not on the case's voxel grid: {what}"):
            run("save", new_case.id, str(wrong_grid), "--store", str(store_root), "--user", "carol")
    # the case's grid with k stored in reverse (Slicer's labelmap of a left-handed image): reversed back
    last_k = proposal_mask.shape[0] - 1
    reversed_k = Volume(np.zeros(proposal_mask.shape, np.float32), reference.spacing,
                        tuple(reference.ijk_to_physical((0, 0, last_k))),
                        np.asarray(reference.direction) * [1.0, 1.0, -1.0])  # fmt: skip
    slicer_copy = store_root.parent / "slicer_copy.nii.gz"
    save_mask_nifti(np.ascontiguousarray(proposal_mask[::-1]), reversed_k, slicer_copy)
    code, out = run("save", new_case.id, str(slicer_copy), "--store", str(store_root), "--user", "carol",
                    "--seconds", "30", "--model", "tiny-1+v2")
    assert code == 0 and "label version 1" in out and "submitted" in out
    with Datastore(store_root) as ds:
        assert np.array_equal(ds.load_label(ds.latest_label(new_case.id).id), proposal_mask)
    code, out = run("cases", "--store", str(store_root), "--status", "submitted")
    assert out.count("submitted") == 6
    export = store_root.parent / "export"
    code, out = run("export", str(export), "--store", str(store_root), "--label-name", "ellipsoid")
    dataset = json.loads((export / "dataset.json").read_text())
    assert code == 0 and dataset["numTraining"] == 6 and dataset["labels"]["1"] == "ellipsoid"
    assert len(list((export / "segmentations").glob("*.seg.nrrd"))) == 6
    provenance = {c["case_id"]: c for c in dataset["segassist"]["cases"]}
    assert provenance[new_case.id]["user"] == "carol" and provenance[new_case.id]["seconds_spent"] == 30.0
    assert (provenance[new_case.id]["model"], provenance[new_case.id]["adapter_version"]) == ("tiny-1+v2", "v2")


def test_a_job_in_its_own_session_really_runs_below_the_server(tmp_path):
    """The job starts in a new session; with Linux autogroups a plain nice would rank it only
    against itself, so lower_priority also lowers its scheduling group."""
    import subprocess
    import sys

    code = (
        "import json, os; from SegAssistLib.learning.jobs import lower_priority; "
        "applied = lower_priority(7); "
        "print(json.dumps({'applied': applied, 'priority': os.getpriority(os.PRIO_PROCESS, 0)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         start_new_session=True, timeout=60)
    data = json.loads(out.stdout)
    assert data["priority"] >= 7 and data["applied"]["nice"] == data["priority"]
    if Path("/proc/self/autogroup").is_file():
        assert data["applied"]["autogroup_nice"] == 7


def test_a_job_whose_worker_died_is_failed_even_while_another_job_runs(tmp_path: Path):
    """Seen from another process (no handle on the worker), a job is judged by its worker's pid first:
    the datastore's training lock, held by a newer job, once made a killed job look running."""
    from SegAssistLib.learning import jobs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    folder = jobs.jobs_folder(tmp_path) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    held = jobs._try_lock(tmp_path)  # a newer job's worker holds the training lock
    try:
        for pid, state in ((dead_pid, "failed"), (os.getpid(), "training")):
            (folder / "status.json").write_text(json.dumps({"state": "training", "pid": pid}))
            assert jobs.TrainingJob(folder.name, folder, tmp_path).status()["state"] == state
    finally:
        os.close(held)
    (folder / "status.json").write_text(json.dumps({"state": "training", "pid": os.getpid()}))
    assert jobs.TrainingJob(folder.name, folder, tmp_path).status()["state"] == "failed"  # nobody holds the lock


def test_the_newest_job_is_the_one_started_last_whatever_its_id_says(tmp_path: Path):
    """Ids carried local time: after the clocks went back an hour (or in another time zone) a newer
    job's id sorted first, and ``learn cancel`` (the newest job by default) picked the wrong one."""
    from SegAssistLib.learning import jobs

    folder = jobs.jobs_folder(tmp_path)
    for name, started in (("20261025-025900-aaaaaa", 1000.0), ("20261025-021500-bbbbbb", 2000.0)):
        (folder / name).mkdir(parents=True)
        (folder / name / "job.json").write_text("{}")
        (folder / name / "status.json").write_text(json.dumps({"state": "done", "job_id": name}))
        os.utime(folder / name / "job.json", (started, started))
    assert jobs.get_job(tmp_path).job_id == "20261025-021500-bbbbbb"
    assert [j["job_id"] for j in jobs.list_jobs(tmp_path)] == ["20261025-021500-bbbbbb", "20261025-025900-aaaaaa"]


def test_a_start_waits_out_an_instant_probe_of_the_training_lock(tmp_path: Path):
    """Polling a job's status takes the lock for an instant; a start at that instant is not busy."""
    from SegAssistLib.learning import jobs

    probe = jobs._try_lock(tmp_path)
    threading.Timer(0.2, os.close, [probe]).start()
    fd = jobs._take_lock(tmp_path, patience_s=5.0)
    assert fd is not None
    assert jobs._take_lock(tmp_path, patience_s=0.2) is None  # really held: busy after the patience
    os.close(fd)


def test_a_worker_killed_before_its_first_status_write_is_failed_to_other_processes(setup):
    """The parent records the worker's pid as soon as it starts it: a worker killed before its own first
    status write (while importing torch) once read as a live "starting" job to every process without its
    handle for as long as a later job held the training lock, and ``learn cancel`` "asked it to stop"."""
    from SegAssistLib.learning import jobs

    store_root, ckpt, _ = setup
    job = start_training(store_root, ckpt, quick().to_dict())
    job.kill()
    assert json.loads((job.folder / "status.json").read_text())["pid"] == job.process.pid
    held = jobs._try_lock(store_root)  # a later job's worker holds the training lock
    assert held is not None
    try:
        status = get_job(store_root, job.job_id).status()
        assert status["state"] == "failed" and "unexpectedly" in status["error"], status
        assert jobs.cancel_job(store_root, job.job_id)["state"] == "failed"
        assert not (job.folder / "cancel").exists()
    finally:
        os.close(held)


def test_a_job_that_ends_while_its_status_is_read_is_not_reported_failed(tmp_path: Path, monkeypatch):
    """With a handle on the worker, its status was read before its exit was polled: a worker that wrote
    "done" and exited between the two was reported "failed (exit code 0)"."""
    from SegAssistLib.learning import jobs

    folder = jobs.jobs_folder(tmp_path) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    status_path = folder / "status.json"
    status_path.write_text(json.dumps({"state": "running", "phase": "training"}))
    finish = (  # on a line from the test: write the final status (whole), then exit 0
        "import json, os, sys; sys.stdin.readline(); tmp = sys.argv[1] + '.tmp'; "
        "open(tmp, 'w').write(json.dumps({'state': 'done'})); os.replace(tmp, sys.argv[1])"
    )
    worker = subprocess.Popen([sys.executable, "-c", finish, str(status_path)], stdin=subprocess.PIPE)
    job = jobs.TrainingJob(folder.name, folder, tmp_path, worker)
    read = jobs._read_json

    def read_then_the_worker_finishes(path: Path):
        data = read(path)  # "running" ...
        monkeypatch.setattr(jobs, "_read_json", read)
        worker.communicate(b"finish\n", timeout=30)  # ... then it writes "done" and exits
        return data

    monkeypatch.setattr(jobs, "_read_json", read_then_the_worker_finishes)
    try:
        assert job.status()["state"] == "running"  # what it was when its exit was polled
        assert worker.returncode == 0 and job.status()["state"] == "done"
    finally:
        job.kill()


def test_salts_singular_value_scales_are_not_pulled_towards_zero(tmp_path: Path):
    """AdamW's weight decay pulls every parameter towards 0; SALT's scales start at 1 (no change), so
    decaying them shrank the top singular values with nothing to learn. They are not decayed; the
    other adapter parameters are."""
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning.trainer import _Candidate

    base = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"))
    cfg = quick(kind="salt", weight_decay=0.5)
    candidate = _Candidate(base, AdapterRegistry(tmp_path), None, cfg)
    groups = candidate.param_groups()
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == candidate.trainable
    optimiser = torch.optim.AdamW(groups, lr=1e-2, weight_decay=cfg.weight_decay)
    shift_like = list(groups[0]["params"])
    with torch.no_grad():
        for p in shift_like:
            p.fill_(0.1)
    for _ in range(50):  # zero gradients: only the decay moves anything
        optimiser.zero_grad()
        for p in candidate.parameters:
            p.grad = torch.zeros_like(p)
        optimiser.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in candidate.undecayed)
    assert all(float(p.detach().abs().max()) < 0.1 for p in shift_like)  # decayed, as before
    assert len(_Candidate(base, AdapterRegistry(tmp_path), None, quick(kind="lora")).param_groups()) == 1


def test_a_loss_that_is_not_finite_stops_the_run_and_registers_nothing(setup, tmp_path: Path):
    """A learning rate far too high sends the loss to NaN within a few steps: the run stops there,
    names the cause, and registers nothing (a NaN version would answer nothing and, promoted,
    poison every retraining warm-started from it)."""
    store_root, ckpt, _ = setup
    with pytest.raises(TrainingError, match="lower learning_rate") as failure:
        run_training(store_root, ckpt, quick(learning_rate=1e12, max_steps=40, min_improvement=-1.0))
    assert failure.value.code == "training_diverged"
    assert AdapterRegistry(store_root).read().versions == []


def test_fine_tuned_weights_holding_nan_are_refused(tmp_path: Path):
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning.deploy import base_copy, load_full_version, save_full_version

    base = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"))
    network = base_copy(base)
    with torch.no_grad():
        next(network.parameters()).view(-1)[0] = float("nan")
    save_full_version(tmp_path / "v1-full.pt", network, base.config, base.identity, {})
    with pytest.raises(AdapterError, match="NaN"):
        load_full_version(base, tmp_path / "v1-full.pt")


def test_each_run_draws_its_own_seed_unless_given_one_and_records_it(setup):
    """Two retrainings on the same labels would otherwise replay the same patches and prompts."""
    store_root, ckpt, _ = setup
    first = run_training(store_root, ckpt, quick(seed=None, max_steps=2))
    second = run_training(store_root, ckpt, quick(seed=None, max_steps=2))
    given = run_training(store_root, ckpt, quick(seed=7, max_steps=2))
    seeds = [r.version.config["seed"] for r in (first, second, given)]
    assert all(isinstance(s, int) and 0 <= s <= 2**32 - 1 for s in seeds)
    assert seeds[0] != seeds[1] and seeds[2] == 7
    assert AdapterTrainConfig().seed is None


# ------------------------------------------------------------------ settings, failures, loading, memory


BAD_SETTINGS = [
    ({"label_value": 0}, "label_value must be an integer from 1 to 255"),  # 0 learned the background
    ({"label_value": -3}, "label_value"),
    ({"label_value": 256}, "label_value"),
    ({"label_value": "1"}, "label_value"),
    ({"val_fraction": 1.5}, r"val_fraction must be a number in \[0, 1\)"),
    ({"val_fraction": "0.2"}, "val_fraction"),
    ({"min_val_cases": 9, "max_val_cases": 8}, "min_val_cases .9. must not be above max_val_cases"),
    ({"time_budget_s": "300"}, "time_budget_s must be a positive number"),
    ({"validate_every": None}, "validate_every must be a non-negative integer"),
    ({"max_steps": "x"}, "max_steps must be a positive integer"),
    ({"nice": "x"}, "nice must be an integer from 0 to 19"),
    ({"nice": -5}, "nice"),
    ({"status_every_s": float("nan")}, "status_every_s"),
    ({"corrupt_share": None}, "corrupt_share"),
    ({"learning_rate": "1e-3"}, "learning_rate"),
    ({"warm_start": "no"}, "warm_start must be true or false"),
    ({"device": 0}, "device must be text"),
    ({"max_case_memory_gib": 0}, "max_case_memory_gib must be a positive number"),
]


@pytest.mark.parametrize("bad, message", BAD_SETTINGS, ids=[str(b) for b, _ in BAD_SETTINGS])
def test_every_setting_is_checked_before_a_job_starts(setup, bad: dict, message: str):
    """``start_training`` promises that a dict of settings is checked at once: ``label_value`` 0 once
    trained (and promoted) a model of the background, ``nice`` "x" crashed the worker before its first
    status write, and bad types raised raw TypeErrors inside the job."""
    store_root, ckpt, _ = setup
    with pytest.raises(TrainingError, match=message):
        AdapterTrainConfig.from_dict(dict(quick().to_dict(), **bad))
    with pytest.raises(TrainingError, match=message):
        start_training(store_root, ckpt, dict(quick().to_dict(), **bad))
    assert list_jobs(store_root) == []


def test_a_worker_that_fails_before_training_says_why_in_its_status(setup):
    """Everything the worker does after reading its job (its settings, its priority, torch's threads)
    is inside the handler that writes the failure to the status: a bad ``nice`` once ended the process
    before any status write, and the job read "ended unexpectedly (exit code 1)"."""
    from SegAssistLib.learning import jobs

    store_root, ckpt, _ = setup
    folder = jobs.jobs_folder(store_root) / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    config = dict(quick().to_dict(), nice="x")  # as a job.json written by hand, or by an older release
    (folder / "job.json").write_text(json.dumps({"store_root": str(store_root), "checkpoint": str(ckpt),
                                                 "config": config, "job_id": folder.name}))  # fmt: skip
    (folder / "status.json").write_text(json.dumps({"state": "starting", "job_id": folder.name}))
    env = dict(os.environ, PYTHONPATH=str(jobs.REPO_ROOT))
    worker = subprocess.run([sys.executable, "-m", "SegAssistLib.learning.jobs", str(folder)], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    status = json.loads((folder / "status.json").read_text())
    assert worker.returncode == 1 and status["state"] == "failed", (status, worker.stderr)
    assert "nice must be an integer" in status["error"] and status["error_code"] == "training_error"


def test_a_failed_jobs_status_names_no_file_by_its_path(setup, tmp_path: Path):
    """A job's status is served over HTTP as it is: a worker's failure once read "adapter file not found:
    /srv/.../store/adapters/v1-lora.pt", and a dead worker's log tail carried its traceback's paths. The
    status names a datastore file from the store and any other by its last part; worker.log keeps all."""
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning import jobs

    store_root, ckpt, _ = setup
    registry = AdapterRegistry(store_root)
    fields = {"base_identity": load_checkpoint(ckpt).identity, "val_dice": 0.5, "incumbent": None,
              "incumbent_dice": 0.4}  # fmt: skip
    record = registry.add_version("lora", lambda path, _: path.write_bytes(b"weights"), fields, promote=True,
                                  expected_current=None)  # fmt: skip
    registry.file_path(record).unlink()  # the current version's file is lost: the job fails loading it
    job = start_training(store_root, ckpt, quick().to_dict())
    final = job.wait(timeout=120)
    assert final["state"] == "failed" and record.file in final["error"], final
    assert str(tmp_path) not in json.dumps(final) and str(tmp_path) not in json.dumps(list_jobs(store_root))
    assert str(store_root) in (job.folder / "worker.log").read_text()  # the details stay in the log
    # a worker that died mid-traceback: its log tail, in the status of any process, names no path either
    ghost = jobs.jobs_folder(store_root) / "29990101-000000-dead00"
    ghost.mkdir()
    (ghost / "status.json").write_text(json.dumps({"state": "running", "phase": "training", "pid": 2**22 + 7}))
    (ghost / "worker.log").write_text(
        f'Traceback (most recent call last):\n  File "{jobs.__file__}", line 1, in main\n'
        f"OSError: [Errno 5] Input/output error: '{store_root}/images/0123456789abcdef.nii.gz'\n"
    )
    status = get_job(store_root, ghost.name).status()
    assert status["state"] == "failed" and "images/0123456789abcdef.nii.gz" in status["log_tail"], status
    assert str(tmp_path) not in json.dumps(status) and str(jobs.REPO_ROOT) not in json.dumps(status)
    assert '"\u2026/jobs.py", line 1' in status["log_tail"]


def test_a_cancel_while_loading_stops_before_the_next_case(setup):
    """Loading read every case before the first poll of ``should_stop`` (in the incumbent's validation):
    minutes on a large store, with a cancel ignored. Now each case load reports its progress and a
    cancel stops the run between two of them."""
    store_root, ckpt, _ = setup
    seen: list = []

    def asked_to_stop() -> bool:
        return any(s.get("progress") == "loading case 2 of 5" for s in seen)

    result = run_training(store_root, ckpt, quick(status_every_s=0.0), on_progress=seen.append,
                          should_stop=asked_to_stop)  # fmt: skip
    assert result.state == "cancelled" and "loading" in result.reason, result
    progress = [s["progress"] for s in seen if s.get("progress")]
    assert progress == ["loading case 1 of 5", "loading case 2 of 5"]
    assert [p for p in dict.fromkeys(s.get("phase") for s in seen)] == ["loading", "finished"]
    assert AdapterRegistry(store_root).read().versions == []


def test_the_training_cases_beyond_the_memory_budget_are_left_out_the_newest_kept(setup):
    """Every usable case was read into memory with no bound (a store of 50 CT scans: about 24 GB, and
    the worker was killed). The validation cases count first; the training cases fit in what is left,
    the most recently submitted first; the status and the result say how many were left out."""
    from SegAssistLib.learning.traindata import load_labelled, training_bytes, usable_cases, validation_bytes

    gib = 1024**3

    store_root, ckpt, _ = setup
    with Datastore(store_root, create=False) as store:
        pairs = usable_cases(store)
        content = {c.id: c.content_hash for c, _ in pairs}
        val_ids = holdout_split(list(content), keys=content)[1]
        val = [(c, lv) for c, lv in pairs if c.id in val_ids]
        train = [(c, lv) for c, lv in pairs if c.id not in val_ids]
        loaded = load_labelled(store, val[:1])[0]  # the estimates, made before reading, are what is held
        assert validation_bytes(store, val[0][0]) == loaded.volume.array.nbytes + loaded.target.nbytes
        held = load_labelled(store, train[:1])[0].train_case()
        assert training_bytes(train[0][0]) == held.image.nbytes + held.labels.nbytes
        val_bytes = sum(validation_bytes(store, c) for c, _ in val)
    room_for_two = (val_bytes + training_bytes(train[0][0]) * 2.5) / gib
    seen: list = []
    result = run_training(store_root, ckpt, quick(max_case_memory_gib=room_for_two, status_every_s=0.0),
                          on_progress=seen.append)  # fmt: skip
    newest_two = [c.id for c, _ in train][-2:]  # make_store submits in import order
    assert result.state == "done" and result.version.train_cases == newest_two
    assert result.version.val_cases == val_ids
    note = f"{len(train) - 2} of the {len(train)} training cases left out"
    assert note in seen[-1]["memory_note"] and note in result.reason and "max_case_memory_gib" in result.reason
    with pytest.raises(TrainingError, match=r"validation case\(s\) alone would take"):
        run_training(store_root, ckpt, quick(max_case_memory_gib=val_bytes / 2 / gib))
    with pytest.raises(TrainingError, match="no training case fits"):
        run_training(store_root, ckpt, quick(max_case_memory_gib=(val_bytes + 1000) / gib))


def test_a_refusal_for_too_few_labels_names_the_voxel_minimum_and_the_cases_too_small(tmp_path: Path):
    """Two submitted, non-empty labels, one a 20-voxel lesion: the refusal said the store had 1 "with a
    non-empty label", so the user could not tell why a non-empty label did not count."""
    store = Datastore(tmp_path / "store")
    for name, kept in (("big", None), ("small_lesion", 20)):
        volume, mask = synthetic_case(len(name))
        if kept is not None:
            small = np.zeros_like(mask)
            small[tuple(np.argwhere(mask)[:kept].T)] = 1
            mask = small
        case = store.import_volume(volume, name=name, user="admin")
        store.save_label(case.id, mask, user="alice")
    store.close()
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    expected = r"at least 30 voxels.*has 1; left out, their label holding fewer than 30 voxels: 'small_lesion'"
    with pytest.raises(TrainingError, match=expected):
        start_training(tmp_path / "store", ckpt, quick().to_dict())
    with pytest.raises(TrainingError, match=expected):
        run_training(tmp_path / "store", ckpt, quick())
