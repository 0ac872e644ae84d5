"""Adapter training's settings, budget, hold-out split, registry and version files, as a review found them:

integral floats (as JSON writes them) stored as integers before a job starts; a first training step that
cannot fit in the time left is not taken, and a step that runs into the final validation's time is named as
the cause; ``max_val_cases`` bounds the validation's cases, whole subjects only; a new version is numbered
after every recorded one; a record of the wrong type is a damaged registry (one line at the command line);
settings the kind does not use are refused; a damaged fine-tuned weights file is a lasting ``AdapterError``;
an adapter handle left by ``remove_adapters`` refuses to merge.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from learning_fixtures import labelled_store, one_thread, tiny_checkpoint  # noqa: F401  (autouse fixture)
from torch import nn

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.engine.network import load_checkpoint
from SegAssistLib.learning import trainer as trainer_module
from SegAssistLib.learning.adapters import apply_adapter, base_identity, load_adapter, remove_adapters
from SegAssistLib.learning.deploy import (
    FINETUNE_FORMAT,
    FINETUNE_FORMAT_VERSION,
    EngineSync,
    load_full_version,
    save_full_version,
)
from SegAssistLib.learning.errors import AdapterError
from SegAssistLib.learning.loop_errors import CorruptRegistryError, TrainingError
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.learning.traindata import SUBJECT_KEY, holdout_number, holdout_split, subject_groups
from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training

GRACE_S = 0.5  # what docs/training.md allows past the budget


@pytest.fixture
def store(tmp_path: Path):
    return labelled_store(tmp_path, n_labelled=6)


# ---------------------------------------------------------------------------------------- settings


def test_integral_floats_are_stored_as_integers_and_a_run_with_them_registers(store):
    """``{"val_clicks": 2.0}`` passed check() and then failed the job after loading every case
    ("'float' object cannot be interpreted as an integer", error_code internal)."""
    store_root, ckpt = store
    cfg = AdapterTrainConfig.from_dict(
        {"kind": "salt", "rank": 2.0, "lora_rank": 1.0, "val_clicks": 2.0, "max_val_cases": 8.0, "threads": 1.0,
         "max_steps": 2.0, "batch_size": 2.0, "min_val_cases": 1.0, "max_correction_rounds": 1.0, "nice": 0.0,
         "label_value": 1.0, "validate_every": 0.0, "seed": np.int64(3), "time_budget_s": 60}
    )  # fmt: skip
    integers = ("rank", "lora_rank", "val_clicks", "max_val_cases", "threads", "max_steps", "batch_size",
                "min_val_cases", "max_correction_rounds", "nice", "label_value", "validate_every", "seed")  # fmt: skip
    assert {name: type(getattr(cfg, name)) for name in integers} == dict.fromkeys(integers, int)
    torch.set_num_threads(cfg.threads)  # what the job's worker does with it (refused a float)
    result = run_training(store_root, ckpt, cfg)
    assert result.state == "done" and result.steps == 2 and result.version is not None, result.reason
    assert result.version.config["val_clicks"] == 2 and isinstance(result.version.config["seed"], int)


def test_settings_the_kind_does_not_use_are_refused_naming_them():
    """They were accepted, ignored, and recorded in the version's config all the same."""
    with pytest.raises(TrainingError, match="lora_rank is a SALT setting.*kind 'lora'"):
        AdapterTrainConfig(kind="lora", rank=4, lora_rank=16).check()
    with pytest.raises(TrainingError, match="rank and lora_rank and alpha are adapter settings: kind 'full'"):
        AdapterTrainConfig(kind="full", rank=2, lora_rank=3, alpha=7.0).check()
    with pytest.raises(TrainingError, match="alpha is an adapter setting: kind 'full'"):
        AdapterTrainConfig(kind="full", alpha=7.0).check()
    with pytest.raises(TrainingError, match="lora_rank must be an integer from 1 to 256, got 0"):  # as CLI/HTTP
        AdapterTrainConfig(kind="salt", lora_rank=0).check()
    AdapterTrainConfig(kind="salt", rank=8, lora_rank=2, alpha=2.0).check()
    AdapterTrainConfig(kind="lora", rank=4, alpha=2.0).check()
    AdapterTrainConfig(kind="full").check()
    cores = os.cpu_count() or 1
    AdapterTrainConfig(threads=cores).check()
    with pytest.raises(TrainingError, match=f"threads must be an integer from 1 to {cores}, got 100000"):
        AdapterTrainConfig(threads=100_000).check()


# ---------------------------------------------------------------------------------------- the budget


def test_a_first_step_that_cannot_fit_in_the_time_left_is_not_taken(store):
    """Before any step the guard expected a step to take no time: a first step longer than the time left
    ran past the budget, and the job then blamed val_clicks and max_val_cases."""
    store_root, ckpt = store
    cfg = AdapterTrainConfig(kind="lora", rank=2, batch_size=64, max_correction_rounds=30, max_steps=100,
                             time_budget_s=3.0, val_clicks=1, seed=0)  # fmt: skip
    t0 = time.perf_counter()
    result = run_training(store_root, ckpt, cfg)
    assert time.perf_counter() - t0 <= cfg.time_budget_s + GRACE_S
    assert result.steps == 0 and result.version is None
    assert "too small for even one training step" in result.reason and "batch_size 64" in result.reason
    assert "val_clicks" not in result.reason
    estimate = trainer_module.first_step_estimate(load_checkpoint(ckpt).network, cfg, 32)
    assert estimate > cfg.time_budget_s  # 64 patches through up to 30 correction rounds


def test_the_next_step_is_expected_to_take_as_long_as_the_slowest_recent_one():
    """The guard used the median: with 0 to 3 correction rounds a step, one slower than typical started
    with only a typical step's time left and ran into the final validation's time."""
    cost = trainer_module._StepCost(estimate=2.0)
    assert cost.next() == 2.0  # before any step: the estimate
    for seconds in (0.1, 0.4, 0.1, 0.1, 0.1):
        cost.done(seconds)
    assert cost.next() == 0.4
    for _ in range(trainer_module.RECENT_STEP_TIMES):
        cost.done(0.2)
    assert cost.next() == 0.2  # an old slow step is forgotten


def test_a_step_that_ran_into_the_validations_time_is_named_as_the_cause(store, monkeypatch):
    """A step slower than every one before it (a loaded machine) eats the final validation's time: the
    reason said to give fewer val_clicks or max_val_cases, which would not have helped."""
    store_root, ckpt = store
    monkeypatch.setattr(trainer_module, "BuiltinEngine", functools.partial(BuiltinEngine, edge_snap=None))
    step = trainer_module.train_step

    def stalled_step(*args, **kwargs):  # the machine stalls for the rest of the budget during the first step
        time.sleep(4.0)
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", stalled_step)
    result = run_training(store_root, ckpt, AdapterTrainConfig(kind="lora", rank=2, max_steps=100, time_budget_s=4.0,
                                                               val_clicks=2, seed=0))  # fmt: skip
    assert result.steps == 1 and result.version is None
    assert "the last training step took 4." in result.reason
    assert "into the time kept for the validation" in result.reason
    assert "val_clicks" not in result.reason


# ---------------------------------------------------------------------------------------- the split


def low_subjects(n: int, below: float = 0.05):
    """``n`` subject names whose hold-out number is below ``below``: they validate first."""
    return [name for name in (f"p{i}" for i in range(5000)) if holdout_number(SUBJECT_KEY + name) < below][:n]


def test_max_val_cases_bounds_the_validation_cases_never_splitting_a_subject():
    """It counted subjects: ``max_val_cases=1`` held out a subject's 10 cases."""
    ids = [f"{i:016x}" for i in range(12)]
    big, small = low_subjects(2)
    subjects = {c: big for c in ids[:10]}  # one subject holding 10 cases, drawn first
    with pytest.raises(TrainingError, match="max_val_cases is 1.*the next in line holds 10 cases; give a larger"):
        holdout_split(ids, fraction=0.2, min_val=1, max_val=1, subjects=subjects)
    train, val = holdout_split(ids, fraction=0.2, min_val=1, max_val=10, subjects=subjects)
    assert sorted(val) == ids[:10] and sorted(train) == ids[10:]
    # a small subject drawn first, the large one next: the large one no longer fits, nor anything after it
    subjects.update({ids[10]: small})
    first = min((big, small), key=lambda name: holdout_number(SUBJECT_KEY + name))
    if first == small:
        assert holdout_split(ids, fraction=0.2, min_val=1, max_val=5, subjects=subjects)[1] == [ids[10]]
    rng = np.random.default_rng(3)
    for _ in range(300):  # random stores: never more validation cases than max_val, subjects whole
        n = int(rng.integers(4, 40))
        ids = [f"{int(x):016x}" for x in rng.integers(0, 2**62, n)]
        names = rng.integers(0, max(2, n // 3), n)
        subjects = {c: f"s{k}" for c, k in zip(ids, names)}
        max_val = int(rng.integers(1, 10))
        try:
            train, val = holdout_split(ids, 0.3, 1, max_val, subjects=subjects)
        except TrainingError:
            continue
        assert 1 <= len(val) <= max_val
        for members in subject_groups(ids, subjects).values():
            assert set(members) <= set(val) or set(members) <= set(train)


# ---------------------------------------------------------------------------------------- the registry


def write_bytes(path: Path, version_id: str) -> None:
    path.write_bytes(b"x")


FIELDS = dict(base_identity="abc", val_dice=0.5, incumbent=None, incumbent_dice=0.4)


def test_a_new_version_is_numbered_after_every_recorded_one(tmp_path: Path):
    """With ``next_number`` behind the records and that version's file removed, a second v2 was recorded
    and the registry could no longer be read."""
    registry = AdapterRegistry(tmp_path)
    registry.add_version("lora", write_bytes, dict(FIELDS), promote=True, expected_current=None)
    registry.add_version("lora", write_bytes, dict(FIELDS), promote=False, expected_current="v1")
    (registry.folder / "v2-lora.pt").unlink()  # a rejected version's file removed to free space
    data = json.loads(registry.path.read_text())
    registry.path.write_text(json.dumps(dict(data, next_number=2)))
    record = registry.add_version("lora", write_bytes, dict(FIELDS), promote=False, expected_current="v1")
    assert record.id == "v3" and [v.id for v in registry.versions()] == ["v1", "v2", "v3"]
    del data["next_number"]  # missing (read as 1), and v3 unlisted again: its file is kept, never replaced
    registry.path.write_text(json.dumps(data))
    assert registry.add_version("lora", write_bytes, dict(FIELDS), promote=False, expected_current="v1").id == "v4"
    assert [v.id for v in registry.versions()] == ["v1", "v2", "v4"]


@pytest.mark.parametrize("field_, value, said", [
    ("number", "2", "its number is '2', not an integer"),
    ("number", True, "its number is True, not an integer"),
    ("file", None, "its file is None, not text"),
    ("status", "current", "its status is 'current', not one of promoted, rejected, rolled_back"),
    ("base_identity", 7, "its base_identity is 7, not text"),
    ("val_dice", "0.5", "its val_dice is '0.5', not a number"),
    ("train_cases", "abc", "its train_cases is 'abc', not a list"),
    ("train_cases", [1, 2], "its train_cases holds something other than case ids"),
    ("id", "v9", "its id 'v9' does not match its number 2"),
])  # fmt: skip
def test_a_record_of_the_wrong_type_is_a_damaged_registry_said_in_one_line(tmp_path: Path, capsys, field_, value,
                                                                           said):  # fmt: skip
    """``"number": "2"`` read as valid, and ``learn rollback`` then failed with a TypeError traceback."""
    from SegAssistLib.cli import main
    from SegAssistLib.learning import Datastore

    Datastore(tmp_path).close()
    registry = AdapterRegistry(tmp_path)
    registry.add_version("lora", write_bytes, dict(FIELDS), promote=True, expected_current=None)
    registry.add_version("lora", write_bytes, dict(FIELDS), promote=True, expected_current="v1")
    data = json.loads(registry.path.read_text())
    data["versions"][1][field_] = value
    registry.path.write_text(json.dumps(data))
    with pytest.raises(CorruptRegistryError, match=f"invalid version record .*{said}.*rollback --to base"):
        registry.read()
    assert main(["learn", "rollback", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and said in err


# ---------------------------------------------------------------------------------------- version files


def full_file(path: Path, identity: str, state) -> Path:
    torch.save({"format": FINETUNE_FORMAT, "format_version": FINETUNE_FORMAT_VERSION, "base_identity": identity,
                "config": {}, "state_dict": state, "meta": {}}, path)  # fmt: skip
    return path


def test_a_damaged_fine_tuned_weights_file_is_a_lasting_adapter_error(tmp_path: Path):
    """A ``state_dict`` that is a list raised a TypeError, which a server's EngineSync took for a passing
    failure and read again at every refresh; an int64 tensor in place of a weight loaded unnoticed."""
    base = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt"))
    good = {k: v.clone() for k, v in base.network.state_dict().items()}
    first = next(iter(good))
    damaged = (
        ([1, 2], "holds no valid 'state_dict'"),
        (dict(good, **{first: "junk"}), "holds no valid 'state_dict'"),
        (dict(good, **{first: torch.zeros(good[first].shape, dtype=torch.int64)}), f"{first} is torch.int64"),
    )
    for state, said in damaged:
        with pytest.raises(AdapterError, match=said):
            load_full_version(base, full_file(tmp_path / "v1-full.pt", base.identity, state))
    # in a server: tried once, and not again until the registry changes
    root = tmp_path / "store"
    registry = AdapterRegistry(root)
    registry.add_version("full", lambda path, _: full_file(path, base.identity, [1, 2]),
                         dict(FIELDS, base_identity=base.identity), promote=True, expected_current=None)  # fmt: skip
    engine, sync = BuiltinEngine(base), EngineSync(registry)
    assert not sync.refresh(engine) and "holds no valid 'state_dict'" in sync.last_error
    save_full_version(registry.folder / "v1-full.pt.good", base.network, base.config, base.identity, {})
    os.replace(registry.folder / "v1-full.pt.good", registry.folder / "v1-full.pt")  # the registry unchanged
    assert not sync.refresh(engine) and engine.version == "tiny-1"  # not read again at each refresh


def test_an_adapter_file_with_integer_weights_is_refused(tmp_path: Path):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    adapters = apply_adapter(network, "lora", 2)
    adapters.save(tmp_path / "a.pt")
    adapters.remove()
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    name = next(iter(payload["state"]))
    payload["state"][name] = torch.ones(payload["state"][name].shape, dtype=torch.int64)
    torch.save(payload, tmp_path / "a.pt")
    with pytest.raises(AdapterError, match=f"parameter {name}: expected floating point values, got torch.int64"):
        load_adapter(network, tmp_path / "a.pt")
    assert not any(type(m).__name__.endswith("Layer") for m in network.modules())  # left as it was


def test_a_handle_left_by_remove_adapters_refuses_to_change_the_network():
    """After ``remove_adapters(network)`` the old handle merged W + dW into what looked like a plain
    base network."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    before = base_identity(network)
    handle = apply_adapter(network, "lora", 2)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(0.1)
    remove_adapters(network)
    for use in (handle.merge, handle.unmerge, lambda: handle.load_state_dict(handle.state_dict()), handle.remove):
        with pytest.raises(AdapterError, match="removed from its network.*remove_adapters"):
            use()
    assert base_identity(network) == before
    fresh = apply_adapter(network, "lora", 2)  # a new adapter on the same network works as ever
    fresh.merge()
    fresh.remove()
    assert base_identity(network) == before
