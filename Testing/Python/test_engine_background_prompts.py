"""A negative prompt before anything says where the structure is changes nothing, also after an empty
initial mask (a cleared result sent back): with the shipped model, such a click drew a blob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from SegAssistLib.engine.builtin import load_default_engine
from SegAssistLib.io import load_volume
from SegAssistLib.prompts import MaskPrompt, PointPrompt

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"


@pytest.fixture(scope="module")
def engine(shipped_checkpoint):
    return load_default_engine(shipped_checkpoint, threads=1)


@pytest.fixture(scope="module")
def volume():
    return load_volume(SAMPLE)  # 35 x 51 x 35 voxels


@pytest.mark.parametrize("position", [(5.0, 5.0, 5.0), (13.0, 1.0, 5.0)])  # background: the old code drew 428, 618
def test_a_negative_click_after_an_empty_initial_mask_draws_nothing(engine, volume, position):
    session = engine.open_session(volume)
    session.add_prompt(MaskPrompt.from_array(np.zeros(volume.array.shape, np.uint8)))
    update = session.add_prompt(PointPrompt(position=position, positive=False))
    assert not session.result().any() and update.info.get("levels") == []  # the network was not asked
    assert [p.kind for p in session.prompt_log().prompts] == ["mask", "point"]  # kept, as without the mask


def test_an_initial_mask_with_voxels_is_a_positive_prompt(engine, volume):
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[14:18, 23:28, 14:19] = 1
    session = engine.open_session(volume)
    session.add_prompt(MaskPrompt.from_array(mask))
    session.add_prompt(PointPrompt(position=(16.0, 25.0, 16.0), positive=False))  # erases where it clicks
    assert session.prompt_log().prompts[0].to_box().any()
    assert session.result()[16, 25, 16] == 0 and session.result().any()
