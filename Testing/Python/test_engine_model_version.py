"""A session credits the model version that made its current mask, through undo, redo and reset."""

from __future__ import annotations

import numpy as np

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.image import Volume
from SegAssistLib.prompts import PointPrompt


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
