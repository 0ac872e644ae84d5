"""The shipped model on real data it never saw in training (the evaluation split)."""

import numpy as np
import pytest

from SegAssistLib.datasets import list_cases, split_cases
from SegAssistLib.engine.builtin import load_default_engine
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.simulator import first_click, next_click
from SegAssistLib.io import load_mask, load_volume


@pytest.fixture(scope="module")
def shipped_engine(shipped_checkpoint):
    return load_default_engine(shipped_checkpoint)


def test_shipped_checkpoint_describes_itself(shipped_engine):
    caps = shipped_engine.capabilities()
    assert caps.licence == "Apache-2.0"
    assert caps.patch_size == (64, 64, 64)
    assert shipped_engine.model.meta.get("steps", 0) > 0


def test_hippocampus_case_reaches_dice_08_within_five_clicks(shipped_engine, hippocampus_dir):
    case = split_cases(list_cases(hippocampus_dir), "evaluation")[0]
    volume = load_volume(case.image)
    target = np.isin(load_mask(case.label), (1, 2))
    session = shipped_engine.open_session(volume)
    click = first_click(target, volume.spacing)
    scores = []
    for _ in range(5):
        session.add_prompt(click)
        scores.append(dice(session.result(), target))
        if scores[-1] >= 0.8:
            break
        click = next_click(target, session.result(), volume.spacing)
    assert max(scores) >= 0.8, f"Dice per click {np.round(scores, 3).tolist()} on {case.name}"
