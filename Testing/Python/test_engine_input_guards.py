"""What the engine takes and how it holds up: bounded memory for CT-sized masks, implausible
spacing, things that are not prompts, intensities far from zero, and its threading contract."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from SegAssistLib.engine import patching
from SegAssistLib.engine.base import EngineSession, MaskUpdate
from SegAssistLib.engine.builtin import BuiltinEngine, load_default_engine
from SegAssistLib.errors import ImageError, PromptError
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.image import Volume, scaled_to_unit, validate_image
from SegAssistLib.prompts import MaskPrompt, PointPrompt, Slab

CT_LIKE = (200, 256, 256)  # 13 M voxels: listing them as int64 triples took 315 MB


def _peak_mb(run) -> float:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


# ---- memory ------------------------------------------------------------------------------------------------
def test_encoding_a_ct_sized_mask_takes_memory_of_its_box_only():
    full = np.ones(CT_LIKE, np.uint8)
    peak = _peak_mb(lambda: MaskPrompt.from_array(full))
    assert peak < 40, f"{peak:.0f} MB to encode a {full.nbytes / 1e6:.0f} MB mask"


def test_the_change_between_ct_sized_masks_takes_memory_of_its_box_only():
    before, after = np.zeros(CT_LIKE, np.uint8), np.ones(CT_LIKE, np.uint8)
    peak = _peak_mb(lambda: MaskUpdate.between(before, after))
    assert peak < 40, f"{peak:.0f} MB for the change between two {before.nbytes / 1e6:.0f} MB masks"


def test_bounding_boxes_are_those_of_the_set_voxels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((7, 9, 11), np.int16)
        points = rng.integers(0, (7, 9, 11), size=(int(rng.integers(1, 4)), 3))
        mask[tuple(points.T)] = rng.choice([-1, 1, 5], size=len(points))
        positive = np.argwhere(mask > 0)
        encoded = MaskPrompt.from_array(mask)
        if len(positive):
            assert encoded.offset == tuple(positive.min(0)) and encoded.shape == tuple(np.ptp(positive, 0) + 1)
        assert np.array_equal(encoded.to_array(mask.shape), (mask > 0).astype(np.uint8))
        other = mask.copy()
        other[tuple(rng.integers(0, (7, 9, 11)))] += 1
        update = MaskUpdate.between(mask, other)
        changed = np.argwhere(mask != other)
        assert update.offset == tuple(changed.min(0)) and update.voxels.shape == tuple(np.ptp(changed, 0) + 1)
        if len(positive):  # a slab's box: every non-zero voxel, negative ones included (as before)
            nonzero = np.argwhere(mask != 0)
            slab = Slab.from_mask(mask)
            assert slab.offset == tuple(nonzero.min(0)) and slab.shape == tuple(np.ptp(nonzero, 0) + 1)
    empty = MaskPrompt.from_array(np.zeros((3, 4, 5)))
    assert empty.offset == (0, 0, 0) and empty.shape == (1, 1, 1) and not empty.to_box().any()
    assert MaskUpdate.between(np.zeros((3, 4, 5)), np.zeros((3, 4, 5))).voxels.size == 0


# ---- spacing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing, message",
    [
        ((1e-30, 1.0, 1.0), r"implausibly fine.*millimetres.*in metres"),
        ((0.0005, 0.0005, 0.0005), r"implausibly fine.*in metres"),  # 0.5 mm written in metres
        ((1.0, 1.0, 1e5), r"implausibly coarse"),
    ],
)
def test_implausible_spacing_is_refused_with_a_clear_error(tiny_checkpoint, spacing, message):
    volume = Volume(np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32), spacing=spacing)
    with pytest.raises(ImageError, match=message):
        validate_image(volume)
    with pytest.raises(ImageError, match=message):  # an OverflowError from deep inside at 1e-30
        BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1).open_session(volume).add_prompt(
            PointPrompt(position=(4, 4, 4))
        )


def test_fine_but_plausible_spacing_is_taken():
    for spacing in ((0.001, 0.001, 0.001), (0.05, 0.05, 0.3), (1.0, 1.0, 10000.0)):
        validate_image(Volume(np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), spacing=spacing))


# ---- not a prompt ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, named, hint",
    [
        ({"kind": "point", "position": [20, 15, 10]}, "got dict", True),  # a prompt of a JSON log, unparsed
        ('{"kind": "point", "position": [20, 15, 10]}', "got str", True),
        ((20, 15, 10), "got tuple", False),
        (None, "got NoneType", False),
    ],
)
def test_something_that_is_not_a_prompt_is_refused_naming_it(tiny_checkpoint, value, named, hint):
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)
    volume = Volume(np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32))
    session = engine.open_session(volume)
    with pytest.raises(PromptError, match=named) as refused:
        session.add_prompt(value)
    assert ("parse_prompt" in str(refused.value)) == hint
    assert session.prompts == [] and not session.can_undo
    with pytest.raises(PromptError, match=named):
        engine.open_session(volume, prompts=[value])
    with pytest.raises(PromptError, match="must be a list of prompts, got dict"):
        engine.open_session(volume, prompts={"prompts": [value]})


# ---- intensities far from zero -----------------------------------------------------------------------------
def test_a_window_far_from_zero_keeps_its_contrast_and_ordinary_ones_are_as_before():
    window = patching.Window(start=(-2, 0, 0), size=(8, 8, 8), patch=8)
    levels = np.arange(8 * 8 * 6).reshape(6, 8, 8) % 101
    ordinary = [levels.astype(np.int16), (levels - 1024).astype(np.int32), levels.astype(np.float32) * 0.01,
                ((levels - 50) * 3e36).astype(np.float32)]  # both signs, near float32's limit: no shift  # fmt: skip
    for image in ordinary:  # (CT, MR: the cast alone, bit for bit)
        crop = patching.crop_window(image, window)
        expected = np.full((8, 8, 8), float(image.min()), np.float32)
        expected[2:] = image
        assert crop.dtype == np.float32 and np.array_equal(crop, expected)
    for offset, dtype in ((2_000_000_000, np.int32), (2**40, np.int64), (1e8, np.float64)):
        image = levels.astype(dtype) + dtype(offset)
        crop = patching.crop_window(image, window)
        assert len(np.unique(crop)) == 101, dtype  # float32 at 2e9 kept 2 of the 101 levels
        assert np.array_equal(crop[2:], levels.astype(np.float32)) and np.all(crop[:2] == 0)  # shifted by the min
        assert len(np.unique(scaled_to_unit(image))) == 101  # the edge snap's view: was blank at 1e8


@pytest.fixture(scope="module")
def shipped_engine(shipped_checkpoint):
    return load_default_engine(shipped_checkpoint, threads=1)


def test_the_shipped_model_answers_an_image_far_from_zero_as_the_same_image_near_zero(shipped_engine):
    """int32 2e9 + 0..100: Dice 0.94 near zero, 0.47 far from it (float32 kept 2 levels)."""
    k, j, i = np.indices((40, 64, 64))
    ball = (k - 20) ** 2 + (j - 32) ** 2 + (i - 32) ** 2 <= 100
    near = (ball * 100 + np.random.default_rng(0).normal(0, 5, ball.shape)).astype(np.int32)
    masks = []
    for image in (near, near + np.int32(2_000_000_000)):
        session = shipped_engine.open_session(Volume(image))
        session.add_prompt(PointPrompt(position=(32, 32, 20)))
        masks.append(session.result())
    assert dice(masks[0], ball) > 0.9
    assert dice(masks[0], masks[1]) > 0.99


# ---- threads -----------------------------------------------------------------------------------------------
def test_the_session_contract_says_sessions_are_not_thread_safe():
    doc = " ".join(EngineSession.__doc__.split())
    assert "Not thread-safe" in doc and "serialise" in doc
