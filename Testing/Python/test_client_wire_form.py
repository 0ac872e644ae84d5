"""The form a stroke travels in (``wire_prompt``) gives the server's network the input a local
engine's gets for the same stroke."""

import numpy as np
import pytest

from SegAssistLib.client.session import wire_prompt
from SegAssistLib.engine import patching
from SegAssistLib.engine.encoding import draw_prompts, prompts_in_window
from SegAssistLib.prompts import LassoPrompt, PointPrompt, ScribblePrompt, parse_prompt

SHAPE = (12, 40, 40)  # k, j, i: 5 mm slices of 1 mm voxels
SPACING_KJI = (5.0, 1.0, 1.0)

STROKES = {
    "sagittal": ScribblePrompt(points=[(20, 12, 2), (20, 25, 9)], normal=(1, 0, 0)),
    "sagittal negative": ScribblePrompt(points=[(20, 12, 2), (20, 25, 9)], normal=(1, 0, 0), positive=False),
    "coronal along k": ScribblePrompt(points=[(15, 20, 1), (15, 20, 10)], normal=(0, 1, 0)),
    "coronal freehand": ScribblePrompt(points=[(8, 20, 1), (12, 20, 4.5), (19, 20, 6), (27, 20, 10.5)]),
    "axial": ScribblePrompt(points=[(5, 5, 6), (30, 28, 6), (34, 10, 6)]),
    "sagittal width 1.5": ScribblePrompt(points=[(20, 12, 2), (20, 25, 9)], normal=(1, 0, 0), width=1.5),
    "sagittal width 3": ScribblePrompt(points=[(20, 12, 2), (20, 25, 9)], normal=(1, 0, 0), width=3),
    "at the image's edges": ScribblePrompt(points=[(-0.5, 0, 0), (39.5, 39, 11.5)], normal=None),
    # a lasso drawn in a view oblique to the slices: its slab spans several 5 mm slices
    "oblique lasso": LassoPrompt(points=[(8, 10, 4), (30, 12, 6.5), (28, 30, 7.5), (10, 28, 5)]),
    "coronal lasso": LassoPrompt(points=[(10, 20, 2), (30, 20, 2), (30, 20, 9), (10, 20, 9)], positive=False),
}


def _channels(prompt, window) -> np.ndarray:
    return draw_prompts(prompts_in_window([prompt], window, SHAPE), window.patch)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("name", sorted(STROKES))
def test_a_scribble_sent_to_the_server_is_the_network_input_of_a_local_engine(name, level):
    """A width-1 scribble travelled as its slab: across 5 mm slices the slab inked whole thick
    voxels (368 patch voxels for the sagittal stroke) where the local engine, given the points,
    inked 192, and the two answered differently."""
    stroke = STROKES[name]
    window = patching.window_around((6, 20, 20), SPACING_KJI, 64, level)
    wired = parse_prompt(wire_prompt(stroke, SHAPE).model_dump(mode="json"))  # as the server reads it
    local, remote = _channels(stroke, window), _channels(wired, window)
    assert local.any()
    assert np.array_equal(remote, local), f"{int(local.sum())} voxels inked locally, {int(remote.sum())} remotely"


def test_thin_scribbles_and_lassos_travel_as_drawn_and_the_rest_as_before():
    thin = STROKES["sagittal"]
    assert wire_prompt(thin, SHAPE) is thin
    assert wire_prompt(STROKES["sagittal width 1.5"], SHAPE).slab is None
    assert wire_prompt(STROKES["sagittal width 3"], SHAPE).slab is not None  # drawn in image voxels either way
    lasso = LassoPrompt(points=[(10, 20, 2), (30, 20, 2), (30, 20, 9), (10, 20, 9)])
    assert wire_prompt(lasso, SHAPE) is lasso and wire_prompt(STROKES["oblique lasso"], SHAPE).slab is None
    # a lasso vertex past the image: sent as the slab, cropped to the image (what any server version takes);
    # a scribble's is sent as drawn, for the server to refuse as the in-process engine does
    leaving = ScribblePrompt(points=[(20, 12, 2), (20, 45, 2)])
    assert wire_prompt(leaving, SHAPE) is leaving
    sent = wire_prompt(LassoPrompt(points=[(20, 12, 2), (20, 45, 2), (30, 45, 2)]), SHAPE)
    assert sent.slab is not None and sent.slab.bounds()[1][1] <= SHAPE[1]
    slab = sent
    assert wire_prompt(slab, SHAPE) is slab  # already a slab
    point = PointPrompt(position=(3, 4, 5))
    assert wire_prompt(point, SHAPE) is point
