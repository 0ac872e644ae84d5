"""The adapter trainer's time budget and schedule: validations with a deadline, the time kept for the
final validation measured per click (the candidate's own cost once it segments), an incumbent whose
validation cannot fit, a learning rate that does not depend on the machine's speed, and the
bounds of the settings that cost memory or time per case.

Clicks are given the cost of a real model (``slow_clicks``): a trained network (the candidate, a
promoted incumbent) answers a click far slower than the base model that segments nothing, the
asymmetry that made the old reserve (the incumbent's time) too small. Edge snapping is off there:
its solver's time on a loaded machine varies with numpy's threads, not with the trainer."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import pytest
import torch
from learning_fixtures import adapter_settings, labelled_store, one_thread  # noqa: F401  (autouse fixture)

from SegAssistLib.engine.builtin import BuiltinEngine, BuiltinSession
from SegAssistLib.learning import trainer as trainer_module
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.learning.traindata import load_labelled, usable_cases
from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training
from SegAssistLib.learning.validation import validate

GRACE_S = 0.5  # what docs/training.md allows past the budget: a click slower than any before it


@pytest.fixture
def store(tmp_path: Path):
    return labelled_store(tmp_path, n_labelled=8)


@pytest.fixture
def slow_clicks(monkeypatch):
    """Seconds per click by who answers: ``costs["trained"]`` for the candidate or an incumbent
    version, ``costs["base"]`` for the base model."""
    costs = {"trained": 0.0, "base": 0.0}
    answer = BuiltinSession.add_prompt

    def add_prompt(self, prompt):
        version = self.engine.version
        trained = version == "candidate" or version.startswith("incumbent")
        time.sleep(costs["trained"] if trained else costs["base"])
        return answer(self, prompt)

    monkeypatch.setattr(BuiltinSession, "add_prompt", add_prompt)
    monkeypatch.setattr(trainer_module, "BuiltinEngine", functools.partial(BuiltinEngine, edge_snap=None))
    return costs


def settings(**kw) -> AdapterTrainConfig:
    defaults = dict(
        kind="lora", rank=2, lora_rank=2, max_steps=100_000, val_clicks=2, val_fraction=0.5, max_val_cases=4, seed=0
    )
    base = adapter_settings(defaults, kw)
    return AdapterTrainConfig(**base)


def test_the_budget_holds_when_the_candidate_answers_slower_than_the_base_model(store, slow_clicks):
    """The base model validated in 0.1 s; the old reserve (1.25x that + 0.5 s) left the candidate's
    1.8 s validation (3 cases, 2 clicks) to run past the end of the budget."""
    store_root, ckpt = store
    slow_clicks.update(trained=0.3, base=0.01)
    t0 = time.perf_counter()
    result = run_training(store_root, ckpt, settings(time_budget_s=7.0))
    assert result.total_seconds <= 7.0 + GRACE_S and time.perf_counter() - t0 <= 7.0 + GRACE_S + 0.5
    assert result.state == "done" and result.steps > 0
    if result.version is None:  # a loaded machine: the candidate's validation may not fit, and it says so
        assert "did not finish within the time budget" in result.reason and not result.promoted
    else:
        assert result.val_dice is not None


def test_a_candidate_whose_validation_cannot_finish_is_neither_promoted_nor_registered(store, slow_clicks, monkeypatch):
    store_root, ckpt = store
    slow_clicks.update(trained=0.25, base=0.01)
    monkeypatch.setattr(trainer_module, "VALIDATION_MARGIN", 0.0)  # no time kept: training runs to the end
    result = run_training(store_root, ckpt, settings(time_budget_s=3.0))
    assert result.total_seconds <= 3.0 + GRACE_S
    assert result.state == "done" and result.steps > 0 and result.version is None and not result.promoted
    assert result.val_dice is None and "candidate's validation did not finish within the time budget" in result.reason
    assert "not promoted, nothing registered" in result.reason and re.search(r"\(0 of 3 cases scored", result.reason)
    assert AdapterRegistry(store_root).read().versions == []


def test_an_incumbent_whose_validation_cannot_fit_ends_the_run_within_its_budget(store, slow_clicks):
    """The old trainer validated the incumbent before any look at the budget: 3 cases of 2 clicks
    at 0.7 s took 4.2 s of a 3 s budget, then trained nothing."""
    store_root, ckpt = store
    promoted = run_training(
        store_root, ckpt, settings(kind="full", max_steps=3, time_budget_s=60.0, min_improvement=-1.0)
    )  # promoted whatever it scores
    assert promoted.promoted and promoted.current == "v1"
    slow_clicks.update(trained=0.7, base=0.01)
    result = run_training(store_root, ckpt, settings(time_budget_s=3.0))
    assert result.total_seconds <= 3.0 + GRACE_S
    assert result.incumbent == "v1" and result.steps == 0 and result.version is None
    assert "the validation of v1 did not fit in its share of the time budget" in result.reason
    assert [v.id for v in AdapterRegistry(store_root).read().versions] == ["v1"]


def test_a_validation_with_a_deadline_starts_no_click_that_would_end_past_it(store, slow_clicks):
    store_root, ckpt = store
    slow_clicks.update(trained=0.2, base=0.2)
    with Datastore(store_root, create=False) as opened:
        cases = load_labelled(opened, usable_cases(opened)[:3], None)
    engine = BuiltinEngine(trainer_module.load_checkpoint(ckpt), edge_snap=None)
    whole = validate(engine, cases, 2)
    assert whole.finished and whole.clicks == 6 and len(whole.per_case) == 3
    assert whole.seconds_per_click == pytest.approx(whole.seconds / 6)
    deadline = time.perf_counter() + 0.7
    cut = validate(engine, cases, 2, deadline=deadline)
    assert time.perf_counter() <= deadline + 0.1
    assert not cut.finished and 1 <= cut.clicks <= 3 and len(cut.per_case) <= 1 and cut.cases == 3
    assert validate(engine, cases, 2, deadline=time.perf_counter() - 1).clicks == 0
    # an estimate of the first click's cost is heeded before any click is measured
    assert validate(engine, cases, 2, deadline=time.perf_counter() + 0.5, click_estimate=1.0).clicks == 0


def test_the_same_seed_gives_the_same_adapter_on_a_machine_of_another_speed(store, slow_clicks, monkeypatch):
    """The old learning rate followed max(step share, time share): a slow first step (a loaded
    machine, a cold cache) set the rate of the next steps by the clock."""
    store_root, ckpt = store
    trained = []
    monkeypatch.setattr(
        trainer_module,
        "_non_finite_parameters",
        lambda candidate: trained.append([p.detach().clone() for p in candidate.parameters]) or 0,
    )
    step = trainer_module.train_step

    def slow_first(first_step_s: float):
        calls = []

        def train_step(*args, **kwargs):
            if not calls:
                time.sleep(first_step_s)
            calls.append(1)
            return step(*args, **kwargs)

        return train_step

    for first_step_s in (0.0, 1.2):
        monkeypatch.setattr(trainer_module, "train_step", slow_first(first_step_s))
        result = run_training(
            store_root, ckpt, settings(max_steps=12, time_budget_s=10.0, val_clicks=1, warm_start=False)
        )
        assert result.steps == 12
    fast, slow = trained
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_the_schedule_follows_the_steps_until_the_time_is_projected_to_run_out():
    from SegAssistLib.training.schedule import CosineSchedule

    on_course = CosineSchedule(1.0, max_steps=10, floor=0.05)
    for _ in range(5):
        on_course.done(1.0)
    assert on_course.progress(spent=5.0, available=100.0) == 0.5 and not on_course.time_limited
    short = CosineSchedule(1.0, max_steps=10, floor=0.05)
    for seconds in (9.0, 1.0, 1.0):  # a slow first step alone is not a pace
        assert short.progress(spent=0.0, available=100.0) == short.step / 10
        short.done(seconds)
    assert short.progress(spent=11.0, available=12.0) == pytest.approx(11 / 12) and short.time_limited
    assert short.rate(spent=12.0, available=12.0) == pytest.approx(0.05)  # it still ends low
    for _ in range(3):  # never taken back, or the rate would jump up again
        short.done(0.001)
    assert short.time_limited


def test_batch_size_and_val_clicks_have_the_http_apis_bounds():
    from SegAssistLib.api_learning import MAX_TRAIN_BATCH_SIZE, MAX_VAL_CLICKS

    assert (MAX_TRAIN_BATCH_SIZE, MAX_VAL_CLICKS) == (64, 20)
    AdapterTrainConfig(batch_size=64, val_clicks=20).check()
    with pytest.raises(TrainingError, match="batch_size must be an integer from 1 to 64, got 65"):
        AdapterTrainConfig(batch_size=65).check()
    with pytest.raises(TrainingError, match="val_clicks must be an integer from 1 to 20, got 21"):
        AdapterTrainConfig(val_clicks=21).check()
    with pytest.raises(TrainingError, match="val_clicks must be a positive integer"):
        AdapterTrainConfig.from_dict({"val_clicks": 0})
