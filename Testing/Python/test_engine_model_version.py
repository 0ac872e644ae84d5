"""A session credits the model version that made its current mask, through undo, redo and reset."""

from __future__ import annotations

import numpy as np

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.image import Volume
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import MaskPrompt, PointPrompt


def test_undo_redo_and_reset_bring_back_the_version_of_the_mask(tiny_checkpoint):
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, edge_snap=None)
    base = engine.version
    rng = np.random.default_rng(0)
    session = engine.open_session(Volume(rng.normal(0, 1, (24, 32, 32)).astype(np.float32)))
    assert session.model_version is None and session.prompt_log().model is None
    session.add_prompt(PointPrompt(position=(16.0, 16.0, 12.0)))
    engine.swap_network(engine.network, base + "+v1")  # a version promoted meanwhile
    assert session.model_version == base and session.prompt_log().model.endswith("@" + base)
    session.add_prompt(PointPrompt(position=(10.0, 12.0, 12.0)))
    assert session.model_version == base + "+v1"
    session.undo()  # no model runs: the mask, and its version, of the first prompt
    assert session.model_version == base and session.prompt_log().model.endswith("@" + base)
    session.redo()
    assert session.model_version == base + "+v1"
    session.reset()
    assert session.model_version is None and session.prompt_log().model is None
    session.undo()
    assert session.model_version == base + "+v1"


def test_an_initial_mask_is_credited_to_the_model_it_names_and_a_replay_keeps_it(tiny_checkpoint):
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, edge_snap=None)
    volume = Volume(np.random.default_rng(1).normal(0, 1, (24, 32, 32)).astype(np.float32))
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[8:14, 10:20, 10:20] = 1
    proposal = MaskPrompt.from_array(mask, made_by="0.3.0+v2")
    session = engine.open_session(volume, [proposal])
    assert session.model_version == "0.3.0+v2" and session.prompt_log().model.endswith("@0.3.0+v2")
    log = PromptLog.from_json(session.prompt_log().to_json())
    assert log.prompts[0].made_by == "0.3.0+v2"
    assert engine.open_session(volume, log.prompts).model_version == "0.3.0+v2"
    session.undo()
    assert session.model_version is None
    hand_drawn = engine.open_session(volume, [MaskPrompt.from_array(mask)])
    assert hand_drawn.model_version is None  # a mask that names no maker: no model's
