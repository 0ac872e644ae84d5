"""The adapter trains on the prompts the team uses: the mix read from the labels' prompt logs, the
simulator drawing with it, and a real (tiny) training run that records the mix it used."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from learning_fixtures import one_thread, synthetic_case, tiny_checkpoint  # noqa: F401  (autouse fixture)

from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.prompt_mix import DEFAULT_MIX, DEFAULT_SHARE, mix_from_logs, simulated_kind
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, ScribblePrompt
from SegAssistLib.training import simulation


def clicks(n: int) -> PromptLog:
    return PromptLog(prompts=[PointPrompt(position=(10 + i, 12, 8), positive=i % 2 == 0) for i in range(n)])


def test_each_prompt_kind_gets_the_simulators_name():
    assert simulated_kind(PointPrompt(position=(1, 2, 3))) == "point"
    assert simulated_kind(BoxPrompt(min_corner=(1, 2, 3), max_corner=(5, 6, 7))) == "box3d"
    assert simulated_kind(BoxPrompt(min_corner=(1, 2, 3), max_corner=(5, 6, 3))) == "box2d"  # flat on k
    assert simulated_kind(BoxPrompt(min_corner=(1, 2, 3), max_corner=(5, 6, 3 + 1e-9))) == "box2d"  # as validated
    assert simulated_kind(ScribblePrompt(points=[(1, 2, 3), (4, 5, 3)])) == "scribble"
    assert simulated_kind(LassoPrompt(points=[(1, 2, 3), (6, 2, 3), (4, 7, 3)])) == "lasso"
    assert simulated_kind(MaskPrompt.from_array(np.ones((2, 2, 2), bool))) is None  # not simulated


def test_the_mix_follows_the_logs_and_keeps_a_share_of_every_kind():
    box_then_clicks = PromptLog(prompts=[BoxPrompt(min_corner=(1, 2, 3), max_corner=(9, 9, 9))] + clicks(3).prompts)
    fix = ScribblePrompt(points=[(1, 2, 3), (4, 5, 3)], positive=False)
    scribble_fix = PromptLog(prompts=[*clicks(1).prompts, fix])
    mix = mix_from_logs([clicks(4), box_then_clicks, scribble_fix, None, PromptLog(prompts=[])])
    assert mix.sessions == 3  # the label without a log and the empty log count for nothing
    keep = 1 - DEFAULT_SHARE
    default = DEFAULT_MIX.first_kind_weights
    assert mix.first_kind_weights["point"] == pytest.approx(keep * 2 / 3 + DEFAULT_SHARE * default["point"])
    assert mix.first_kind_weights["box3d"] == pytest.approx(keep / 3 + DEFAULT_SHARE * default["box3d"])
    assert mix.first_kind_weights["lasso"] == pytest.approx(DEFAULT_SHARE * default["lasso"])
    assert min(mix.first_kind_weights.values()) > 0
    assert sum(mix.first_kind_weights.values()) == pytest.approx(1.0)
    # corrections: 3 + 3 clicks after the first prompts, 1 scribble
    observed = 1 / 7
    assert mix.correction_scribble_share == pytest.approx(keep * observed + DEFAULT_SHARE * 0.15)
    assert mix_from_logs([None, None]) == DEFAULT_MIX
    with pytest.raises(ValueError, match="default_share"):
        mix_from_logs([clicks(2)], default_share=1.5)


def test_the_simulator_draws_first_prompts_with_the_given_weights():
    _, label = synthetic_case(3)
    target = label.astype(bool)
    rng = np.random.default_rng(0)
    only_clicks = {"point": 1.0}
    assert {simulation.first_prompt(target, rng, weights=only_clicks).kind for _ in range(30)} == {"point"}
    drawn = Counter(
        simulation.first_prompt(target, rng, weights={"point": 0.5, "box3d": 0.5}).kind for _ in range(200)
    )
    assert set(drawn) == {"point", "box"} and 70 < drawn["point"] < 130
    # scribbled corrections only when asked for
    empty = np.zeros_like(target)
    kinds = {simulation.correction_prompt(target, empty, rng, scribble_share=1.0).kind for _ in range(20)}
    assert kinds == {"scribble"}
    kinds = {simulation.correction_prompt(target, empty, rng, scribble_share=0.0).kind for _ in range(20)}
    assert kinds == {"point"}


def test_a_training_run_on_clicked_labels_trains_on_clicks_and_records_it(tmp_path: Path):
    with Datastore(tmp_path / "store") as store:
        for i in range(5):
            volume, mask = synthetic_case(100 + i)
            case = store.import_volume(volume, name=f"case_{i}", user="admin")
            store.save_label(case.id, mask, user="alice", prompt_log=clicks(3))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    seen = []
    cfg = AdapterTrainConfig(kind="lora", rank=2, max_steps=4, time_budget_s=60.0, val_clicks=1, seed=5,
                             status_every_s=0.0)
    result = run_training(tmp_path / "store", ckpt, cfg, on_progress=seen.append)
    mix = result.version.prompt_mix
    assert mix["sessions"] == len(result.version.train_cases)
    assert mix["first_kind_weights"]["point"] == pytest.approx(1 - DEFAULT_SHARE + DEFAULT_SHARE * 0.45)
    assert mix["correction_scribble_share"] == pytest.approx(DEFAULT_SHARE * 0.15)
    assert any(s.get("prompt_mix") == mix for s in seen)  # the status shows it while training
    assert AdapterRegistry(tmp_path / "store").read().versions[0].prompt_mix == mix  # and the registry keeps it
