"""Review C fixes of the engine and its prompts: a lasso reaching far past the image is drawn in time
bounded by the image; a negative lasso or scribble erases what it covers; a slab prompt pins no
voxel list for a session's life; a scribble reaching past the image's edge is refused in-process and
through the remote client alike."""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np
import pytest

from SegAssistLib import rasterize
from SegAssistLib.client.session import wire_prompt
from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.engine.builtin import BuiltinEngine, load_default_engine
from SegAssistLib.errors import PromptError
from SegAssistLib.image import Volume
from SegAssistLib.prompts import (
    LassoPrompt,
    MaskPrompt,
    PointPrompt,
    ScribblePrompt,
    Slab,
    check_prompt_inside,
    lasso_in_image,
    to_slab,
)
from SegAssistLib.stroke_voxels import VOXEL_CACHE_BYTES, ByteBudgetCache

pytest_plugins = ["test_server_fixtures"]

SHAPE = (12, 30, 30)  # k, j, i


def _blob(shape=(20, 48, 48), seed: int = 1):
    """A bright ellipsoid on noise (array, mask)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.asarray(shape) / 2
    inside = ((k - c[0]) / 6) ** 2 + ((j - c[1]) / 12) ** 2 + ((i - c[2]) / 12) ** 2 <= 1
    return Volume((inside * 100 + rng.normal(0, 5, shape)).astype(np.float32)), inside


def _voxels(prompt, shape) -> np.ndarray:
    """The voxels a stroke covers in an image of ``shape`` (its slab's), as a full boolean array."""
    out = np.zeros(shape, bool)
    out[tuple(to_slab(prompt, shape).slab.voxels_kji().T)] = True
    return out


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    return BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)


@pytest.fixture(scope="module")
def shipped_engine(shipped_checkpoint):
    return load_default_engine(shipped_checkpoint, threads=1)


# ---- 1. a lasso reaching far past the image ---------------------------------------------------------------
def _square(reach: float, k: float = 6.0, positive: bool = True) -> LassoPrompt:
    return LassoPrompt(points=[(-reach, -reach, k), (reach, -reach, k), (reach, reach, k), (-reach, reach, k)],
                       positive=positive)  # fmt: skip


@pytest.mark.parametrize("reach", [1e7, 1e19, 1e300])
def test_a_lasso_enclosing_the_image_from_far_away_is_its_whole_slice_at_once(reach):
    """Its outline was drawn every half voxel along its whole length: 1e7 voxels out took 22 s in
    the client (wire_prompt) and as long again in the engine; past int64 (1e19) the box wrapped and
    the lasso was refused as "outside the image"."""
    lasso = _square(reach)
    check_prompt_inside(lasso, SHAPE)
    started = time.perf_counter()
    sent = wire_prompt(lasso, SHAPE)
    drawn = lasso_in_image(lasso, SHAPE)
    assert time.perf_counter() - started < 5.0
    assert sent == drawn and drawn.slab is not None
    assert drawn.slab.offset == (6, 0, 0) and drawn.slab.shape == (1, 30, 30) and drawn.slab.to_box().all()


def test_a_far_lasso_in_the_engine_answers_at_once_as_its_slab(tiny_engine):
    volume, _ = _blob(SHAPE)
    far = tiny_engine.open_session(volume)
    started = time.perf_counter()
    far.add_prompt(_square(1e7))
    assert time.perf_counter() - started < 5.0
    as_slab = tiny_engine.open_session(volume)
    as_slab.add_prompt(to_slab(_square(1e7), SHAPE))
    assert np.array_equal(far.result(), as_slab.result())
    assert far.prompt_log().prompts == [_square(1e7)]  # kept as given


@pytest.mark.parametrize("plane", ["axial", "oblique", "steep"])
def test_clipping_a_far_lasso_keeps_the_voxels_of_its_part_in_the_image(plane):
    """A rectangle whose far side moves out: its part in the image is the same whatever the reach,
    drawn as an unclipped one (within POLYGON_CLIP_MARGIN) draws it."""
    slopes = {"axial": (0.0, 0.0), "oblique": (0.3, 0.2), "steep": (1.7, -0.4)}[plane]
    shape = (40, 30, 30)

    def rectangle(reach):
        corners = [(5.3, 5.2), (reach, 5.2), (reach, 20.7), (5.3, 20.7)]
        return LassoPrompt(points=[(i, j, 20 + slopes[0] * (i - 15) + slopes[1] * (j - 15)) for i, j in corners])

    near = _voxels(rectangle(3000.0), shape)  # within the margin: not clipped
    assert near.any()
    for reach in (5000.0, 1e5, 1e6):
        assert np.array_equal(_voxels(rectangle(reach), shape), near), reach


def test_clipping_keeps_the_winding_of_a_self_overlapping_far_outline():
    """A loop drawn round twice (winding 2) through far vertices fills as drawn once, clipped or not."""
    angles = np.linspace(0, 4 * np.pi, 17)[:-1]
    for radius in (30.0, 1e6):  # within the margin, and clipped
        polygon = np.stack([np.full(16, 5.0), 15 + radius * np.sin(angles), 15 + radius * np.cos(angles)], 1)
        clipped = rasterize.clip_polygon_to_box(polygon, (-2, -2, -2), (12, 32, 32))
        assert np.all(clipped >= -2) and np.all(clipped[:, 1:] <= 32)
        out = np.zeros(SHAPE, bool)
        rasterize.fill_planar_polygon(out, polygon)
        assert out[5].all() and not out[:5].any() and not out[6:].any()


# ---- 3. a negative lasso or scribble erases what it covers --------------------------------------------------
def _updates_reassemble(before: np.ndarray, update: MaskUpdate, after: np.ndarray) -> bool:
    mask = before.copy()
    update.apply_to(mask)
    return np.array_equal(mask, after)


def test_a_negative_lasso_clears_everything_inside_it_and_undo_redo_and_replay_agree(shipped_engine):
    """On hippocampus a negative lasso around the whole cross-section left 23 of 163 voxels inside."""
    volume, truth = _blob()
    session = shipped_engine.open_session(volume)
    session.add_prompt(PointPrompt(position=(24.0, 24.0, 10.0)))
    before = session.result()
    assert before[10].sum() > 50
    _, ii = np.nonzero(before[10])
    left, middle = ii.min() - 2, (ii.min() + ii.max()) / 2  # over the left half of the cross-section
    lasso = LassoPrompt(points=[(left, 10, 10), (middle, 10, 10), (middle, 38, 10), (left, 38, 10)], positive=False)
    inside = _voxels(lasso, volume.array.shape)
    assert (before & inside).sum() > 20
    update = session.add_prompt(lasso)
    after = session.result()
    assert not (after.astype(bool) & inside).any()
    assert after.any()  # the rest of the object stays
    assert _updates_reassemble(before, update, after)
    assert _updates_reassemble(after, session.undo(), before) and np.array_equal(session.result(), before)
    assert _updates_reassemble(before, session.redo(), after) and np.array_equal(session.result(), after)
    replayed = shipped_engine.open_session(volume, session.prompt_log().prompts)
    assert np.array_equal(replayed.result(), after)


def test_a_negative_scribble_clears_its_stroke(shipped_engine):
    volume, _ = _blob()
    session = shipped_engine.open_session(volume)
    session.add_prompt(PointPrompt(position=(24.0, 24.0, 10.0)))
    before = session.result()
    row = np.flatnonzero(before[10, 24])
    stroke = ScribblePrompt(points=[(float(row.min()), 24, 10), (float(row.max()), 24, 10)], positive=False)
    covered = _voxels(stroke, volume.array.shape)
    update = session.add_prompt(stroke)
    after = session.result()
    assert covered.sum() >= 10 and not (after.astype(bool) & covered).any()
    assert _updates_reassemble(before, update, after)


def test_a_negative_stroke_through_a_server_erases_as_in_process(alice, blob_volume, server_checkpoint):
    local = BuiltinEngine.from_checkpoint(server_checkpoint, threads=1)
    start = MaskPrompt.from_array(np.pad(np.ones((6, 20, 20), np.uint8), ((9, 9), (10, 10), (14, 14))))
    strokes = [
        LassoPrompt(points=[(10, 8, 12), (30, 8, 12), (30, 30, 12), (10, 30, 12)], positive=False),
        LassoPrompt(points=[(-9, 8, 11), (30, 8, 11), (30, 30, 11), (-9, 30, 11)], positive=False),  # past i = 0
        ScribblePrompt(points=[(12, 20, 10), (35, 20, 10)], positive=False),
        ScribblePrompt(points=[(12, 22, 13), (36, 22, 13)], width=3, positive=False),
    ]
    for stroke in strokes:
        with alice.open_session(blob_volume) as remote:
            remote.add_prompt(start)
            remote.add_prompt(stroke)
            answer = remote.fetch_result()
            settings = remote.prompt_log().engine
        in_process = local.open_session(blob_volume, [start, stroke], settings=settings)
        assert np.array_equal(in_process.result(), answer), stroke
        assert not (answer.astype(bool) & _voxels(stroke, blob_volume.array.shape)).any()


def test_a_negative_oblique_lasso_larger_than_a_slab_erases_all_inside_it(tiny_engine):
    """Across a whole image an oblique lasso covers a box larger than a slab may hold (64 x 520 x
    520 voxels): it is erased all the same (it is drawn as a polygon, as the network sees it)."""
    shape = (64, 520, 520)
    lasso = LassoPrompt(points=[(0, 0, 0), (519, 0, 63), (519, 519, 63), (0, 519, 0)], positive=False)
    with pytest.raises(PromptError, match="cannot be made a slab"):
        to_slab(lasso, shape)
    volume = Volume(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    session = tiny_engine.open_session(volume, [MaskPrompt.from_array(np.ones(shape, np.uint8))])
    session.add_prompt(lasso)
    inside = np.zeros(shape, bool)
    rasterize.fill_planar_polygon(inside, np.asarray(lasso.points, float)[:, ::-1])
    result = session.result()
    assert inside.sum() > 250_000 and not result[inside].any()


# ---- 5. slab prompts pin no voxel list ------------------------------------------------------------------------
def test_slab_prompts_kept_by_a_session_hold_their_bits_not_a_voxel_list():
    """Each slab cached its voxel list (24 bytes a voxel) on itself: 20 slabs of a 512 x 512 slice,
    kept as a session keeps its prompts, held 126 MB."""
    box = np.ones((1, 512, 512), bool)
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        kept = []
        for n in range(20):
            prompt = ScribblePrompt(slab=Slab.from_mask(box, (n, 0, 0)), positive=False)
            voxels = prompt.slab.voxels_kji()
            assert len(voxels) == 512 * 512 and voxels[0].tolist() == [n, 0, 0]
            kept.append(prompt)
            del voxels
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert held <= VOXEL_CACHE_BYTES + (8 << 20), f"{held / 2**20:.0f} MB held by 20 slab prompts"


def test_a_slab_voxel_list_is_decoded_once_while_it_fits_the_cache():
    slab = Slab.from_mask(np.ones((1, 40, 40), bool), (3, 0, 0))
    first, again = slab.voxels_kji(), Slab.model_validate(slab.model_dump()).voxels_kji()
    assert np.shares_memory(first, again) and not first.flags.writeable  # the same kept list, read-only
    assert slab == Slab.model_validate(slab.model_dump())  # equality and copies as before


def test_the_byte_budget_cache_keeps_the_newest_values_within_its_budget():
    cache = ByteBudgetCache(1000)
    made = []

    def make(n):
        made.append(n)
        return bytes(n)

    for key in range(10):
        cache.get(key, lambda: make(200))
    assert cache.held_bytes <= 1000
    cache.get(9, lambda: make(200))
    assert made.count(200) == 10  # 9 was kept
    cache.get(0, lambda: make(200))
    assert len(made) == 11  # 0 was forgotten
    for _ in range(2):
        cache.get("big", lambda: make(600))  # above a quarter of the budget: never kept
    assert made.count(600) == 2 and cache.held_bytes <= 1000


# ---- 6. a scribble reaching past the image's edge ---------------------------------------------------------------
PAST_THE_EDGE = {
    "thin": ScribblePrompt(points=[(20, 20, 12), (60, 20, 12)]),  # i up to 60 of 48
    "wide": ScribblePrompt(points=[(20, 20, 12), (60, 20, 12)], width=3),
}


@pytest.mark.parametrize("name", sorted(PAST_THE_EDGE))
def test_a_scribble_past_the_edge_is_refused_in_process_and_through_the_client_alike(
    alice, blob_volume, server_checkpoint, name
):
    """In-process it was refused ("scribble vertex ... lies outside the image") while the remote
    client sent it as its cropped slab and the server answered it: now both refuse it, by name."""
    stroke = PAST_THE_EDGE[name]
    shape = blob_volume.array.shape
    assert wire_prompt(stroke, shape) is stroke  # as drawn: the server judges it by the engine's rule
    session = BuiltinEngine.from_checkpoint(server_checkpoint, threads=1).open_session(blob_volume)
    with pytest.raises(PromptError) as local:
        session.add_prompt(stroke)
    assert "scribble vertex [60.0, 20.0, 12.0] (1 of 2 vertices) lies outside the image" in str(local.value)
    assert session.prompts == [] and not session.can_undo
    with alice.open_session(blob_volume) as remote:
        remote.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        before = remote.fetch_result()
        with pytest.raises(PromptError) as remote_error:
            remote.add_prompt(stroke)
        assert str(local.value) in str(remote_error.value)
        assert remote.prompt_log().prompts == [PointPrompt(position=(24.0, 20.0, 12.0))]
        assert np.array_equal(remote.fetch_result(), before)


def test_a_scribble_inside_the_image_still_travels_as_before():
    inside = ScribblePrompt(points=[(2, 2, 6), (27, 20, 6)])
    assert wire_prompt(inside, SHAPE) is inside
    wide = ScribblePrompt(points=[(0, 2, 6), (27, 20, 6)], width=3)  # its width reaches past i = 0: cropped
    sent = wire_prompt(wide, SHAPE)
    assert sent.slab is not None and sent.slab.bounds()[0][2] == 0
    check_prompt_inside(wide, SHAPE)


def test_an_erase_reaching_past_the_answers_box_grows_the_box_to_hold_it(tiny_engine):
    """The window holds the newest prompt, so its box holds the stroke; were it smaller, the update
    must still cover every voxel cleared (and nothing outside the erased stroke changes)."""
    volume, _ = _blob(SHAPE)
    session = tiny_engine.open_session(volume, [MaskPrompt.from_array(np.ones(SHAPE, np.uint8))])
    lasso = LassoPrompt(points=[(2, 2, 6), (27, 2, 6), (27, 27, 6), (2, 27, 6)], positive=False)
    small = (slice(4, 8), slice(10, 20), slice(10, 20))
    box, new = session._erase(lasso, small, np.ones((4, 10, 10), np.uint8))
    assert box == (slice(4, 8), slice(2, 28), slice(2, 28))
    cleared = _voxels(lasso, SHAPE)[box]
    assert not new[cleared].any() and new[~cleared].all()
