"""The no-history ablation: each interaction answered alone from the current mask and the newest prompt."""

from __future__ import annotations

import numpy as np
import pytest

from SegAssistLib.errors import SegAssistError, SessionError
from SegAssistLib.evaluation.ablation import NoHistoryEngine
from SegAssistLib.evaluation.baselines import GrowCutEngine
from SegAssistLib.image import Volume
from SegAssistLib.prompts import BoxPrompt, MaskPrompt, PointPrompt


@pytest.fixture(scope="module")
def builtin(tiny_checkpoint):
    from SegAssistLib.engine.builtin import BuiltinEngine

    return BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(1)
    k, j, i = np.mgrid[:20, :40, :40]
    blob = ((k - 10) ** 2 + (j - 20) ** 2 + (i - 18) ** 2 <= 49).astype(np.float32)
    return Volume((200 * blob + rng.normal(0, 10, blob.shape)).astype(np.float32), spacing=(1.0, 1.0, 2.0))


PROMPTS = [
    BoxPrompt(min_corner=(10, 12, 6), max_corner=(26, 28, 14)),
    PointPrompt(position=(18, 20, 10), positive=True),
    PointPrompt(position=(30, 30, 10), positive=False),
]


def test_each_interaction_sees_only_the_current_mask_and_the_newest_prompt(builtin, volume):
    ablation = NoHistoryEngine(builtin).open_session(volume)
    expected = np.zeros(volume.array.shape, np.uint8)
    for prompt in PROMPTS:
        update = ablation.add_prompt(prompt)
        assert update.latency_s > 0
        # by hand: a fresh session of the model, the previous mask as its initial mask, the newest prompt
        fresh = builtin.open_session(volume)
        if expected.any():
            fresh.add_prompt(MaskPrompt.from_array(expected))
        fresh.add_prompt(prompt)
        expected = fresh.result()
        fresh.close()
        assert np.array_equal(ablation.result(), expected)
    assert [p.kind for p in ablation.prompt_log().prompts] == ["box", "point", "point"]


def test_the_first_interaction_is_the_model_itself(builtin, volume):
    ablation = NoHistoryEngine(builtin).open_session(volume)
    full = builtin.open_session(volume)
    ablation.add_prompt(PROMPTS[0])
    full.add_prompt(PROMPTS[0])
    assert np.array_equal(ablation.result(), full.result())


def test_undo_redo_reset_and_close(builtin, volume):
    session = NoHistoryEngine(builtin).open_session(volume)
    with pytest.raises(SessionError):
        session.undo()
    session.add_prompt(PROMPTS[1])
    first = session.result()
    session.add_prompt(PROMPTS[2])
    second = session.result()
    update = session.undo()
    mask = second.copy()
    update.apply_to(mask)
    assert np.array_equal(mask, first) and np.array_equal(session.result(), first)
    session.redo()
    assert np.array_equal(session.result(), second)
    session.reset()
    assert not session.result().any() and session.can_undo
    session.close()
    with pytest.raises(SessionError):
        session.add_prompt(PROMPTS[1])


def test_capabilities_name_the_ablation_and_engines_without_mask_prompts_are_refused(builtin):
    caps = NoHistoryEngine(builtin).capabilities()
    assert caps.name.endswith("-nohistory") and "mask" in caps.prompt_kinds
    with pytest.raises(SegAssistError, match="mask prompts"):
        NoHistoryEngine(GrowCutEngine())
