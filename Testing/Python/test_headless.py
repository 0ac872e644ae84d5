"""The Slicer-free half of batch segmentation: run_prompts on a real engine (the tiny network)."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.errors import PromptError
from SegAssistLib.headless import Cancelled, run_prompts
from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)


def _volume() -> Volume:
    k, j, i = np.mgrid[:20, :24, :24]
    blob = ((k - 10) ** 2 + (j - 12) ** 2 + (i - 12) ** 2) < 36
    return Volume((blob * 100.0 + 10.0).astype(np.float32), spacing=(1.0, 1.0, 1.0))


PROMPTS = [PointPrompt(position=(12, 12, 10)), PointPrompt(position=(3, 3, 3), positive=False)]


def test_run_prompts_reports_each_prompt_and_returns_the_sessions_mask_and_log(engine):
    seen: List[str] = []
    run = run_prompts(engine, _volume(), PROMPTS, lambda fraction, message: seen.append(message))
    assert run.prompt_log.prompts == PROMPTS and len(run.latencies_s) == 2
    assert np.array_equal(run.mask, engine.open_session(_volume(), PROMPTS).result())
    assert seen[1:] == ["Prompt 1 of 2: point", "Prompt 2 of 2: point", "Reading the result"]


def test_a_cancel_pressed_during_the_last_prompt_stops_before_the_result(engine):
    """The progress callback is where a cancel takes effect; it was asked only before each prompt,
    so a cancel pressed while the last (often the slowest) prompt ran still delivered a result."""
    seen: List[str] = []

    def progress(fraction: float, message: str) -> None:
        if "Prompt 2 of 2: point" in seen:  # the user pressed Cancel while the last prompt ran
            raise Cancelled("cancelled by the user")
        seen.append(message)

    with pytest.raises(Cancelled):
        run_prompts(engine, _volume(), PROMPTS, progress)


def test_no_prompts_is_refused(engine):
    with pytest.raises(PromptError, match="no prompts"):
        run_prompts(engine, _volume(), [])
