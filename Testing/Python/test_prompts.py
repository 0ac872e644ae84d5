"""Prompt schema: validation with clear errors, JSON round trip, versioning."""

import json

import numpy as np
import pytest

from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import (
    SCHEMA_VERSION,
    BoxPrompt,
    LassoPrompt,
    MaskPrompt,
    PointPrompt,
    PromptLog,
    ScribblePrompt,
    parse_prompt,
    prompt_log_json_schema,
)


def test_every_kind_round_trips_through_json():
    mask = np.zeros((6, 7, 8), np.uint8)
    mask[2:4, 1:5, 3:7] = 1
    log = PromptLog(
        model="m@1",
        prompts=[
            PointPrompt(position=(1, 2, 3)),
            PointPrompt(position=(4.5, 2, 1), positive=False),
            BoxPrompt(min_corner=(0, 0, 3), max_corner=(5, 5, 3)),
            BoxPrompt(min_corner=(0, 0, 0), max_corner=(5, 5, 5)),
            ScribblePrompt(points=[(1, 1, 1), (2, 2, 1)], positive=False, width=2),
            LassoPrompt(points=[(0, 0, 1), (5, 0, 1), (5, 5, 1), (0, 5, 1)]),
            MaskPrompt.from_array(mask),
        ],
    )
    again = PromptLog.from_json(log.to_json())
    assert again == log
    assert again.schema_version == SCHEMA_VERSION
    assert np.array_equal(again.prompts[-1].to_array(mask.shape), mask)
    assert [p.kind for p in again.prompts] == ["point", "point", "box", "box", "scribble", "lasso", "mask"]


def test_box_dimensionality():
    assert BoxPrompt(min_corner=(0, 0, 3), max_corner=(5, 5, 3)).is_2d
    assert not BoxPrompt(min_corner=(0, 0, 0), max_corner=(5, 5, 5)).is_2d


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "point", "position": [1, 2]}, "3 coordinates"),
        ({"kind": "point", "position": [1, 2, 3, 4]}, "3 coordinates"),
        ({"kind": "point", "position": [1, float("nan"), 3]}, "non-finite"),
        ({"kind": "box", "min_corner": [0, 0, 0], "max_corner": [0, 0, 5]}, "degenerate box"),
        ({"kind": "box", "min_corner": [5, 0, 0], "max_corner": [0, 5, 5]}, "below min_corner"),
        ({"kind": "box", "min_corner": [0, 0, 0], "max_corner": [5, 5, 5], "positive": False}, "negative boxes"),
        ({"kind": "scribble", "points": []}, "empty stroke"),
        ({"kind": "lasso", "points": [[0, 0, 0], [1, 1, 0]]}, "at least 3"),
        ({"kind": "lasso", "points": [[0, 0, 0], [1, 1, 0], [2, 2, 0]]}, "collinear"),
        ({"kind": "lasso", "points": [[0, 0, 0], [9, 0, 0], [9, 9, 9], [0, 9, 0]]}, "not on one plane"),
        ({"kind": "laser", "position": [1, 2, 3]}, "laser"),
        ({"kind": "point", "position": [1, 2, 3], "extra": 1}, "extra"),
    ],
)
def test_bad_prompts_get_a_clear_error(data, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(data)


def test_oblique_lasso_is_accepted():
    u, v = np.array([1.0, 1.0, 0.3]), np.array([-1.0, 1.0, 0.5])
    pts = [tuple(10 + 5 * np.cos(t) * u + 5 * np.sin(t) * v) for t in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
    assert LassoPrompt(points=pts).kind == "lasso"


def test_log_from_a_newer_major_version_is_refused():
    text = json.dumps({"schema_version": "2.0", "prompts": []})
    with pytest.raises(PromptError, match="not readable"):
        PromptLog.from_json(text)


def test_truncated_log_is_refused():
    text = PromptLog(prompts=[PointPrompt(position=(1, 2, 3))]).to_json()
    with pytest.raises(PromptError, match="invalid prompt log"):
        PromptLog.from_json(text[: len(text) // 2])


def test_a_bad_log_is_named_in_one_line_with_where_it_is_wrong():
    """A pydantic report ran over several lines, with a documentation URL, in the command line's error."""
    text = '{"prompts": [{"kind": "point"}, {"kind": "box"}, {"kind": "box"}]}'
    with pytest.raises(PromptError) as refused:
        PromptLog.from_json(text)
    message = str(refused.value)
    assert "\n" not in message and "https://" not in message
    assert message.startswith("invalid prompt log: prompts.0.point.position: Field required;")
    assert message.endswith("(and 2 more)")


def test_mask_prompt_outside_image_is_refused():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[3, 3, 3] = 1
    with pytest.raises(PromptError, match="outside image"):
        MaskPrompt.from_array(mask).to_array((2, 2, 2))


def test_json_schema_is_published():
    schema = prompt_log_json_schema()
    assert "prompts" in schema["properties"]
    kinds = json.dumps(schema)
    for kind in ("point", "box", "scribble", "lasso", "mask"):
        assert f'"{kind}"' in kinds


def test_published_schema_file_is_current():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "export_prompt_schema.py"
    spec = importlib.util.spec_from_file_location("export_prompt_schema", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SCHEMA_FILE.read_text() == module.render(), "run python scripts/export_prompt_schema.py"
    before = module.SCHEMA_FILE.stat().st_mtime_ns
    assert module.main(["--check"]) == 0 and module.SCHEMA_FILE.stat().st_mtime_ns == before  # checks, writes not


_SLAB = {"offset": [0, 0, 0], "shape": [1, 2, 2], "data": "eJz7AAAA8QDx"}  # 4 set bits


@pytest.mark.parametrize(
    "data, message",
    [  # each once raised OverflowError or TypeError inside a validator: a 500 on the server
        ({"kind": "point", "position": [10**400, 1, 1]}, "integer beyond float range"),
        ({"kind": "point", "position": {}}, "list of 3 coordinates"),
        ({"kind": "point", "position": [[1], 1, 1]}, "must be numbers, got list"),
        ({"kind": "box", "min_corner": [0, 0, 0], "max_corner": [{}, 1, 1]}, "must be numbers, got dict"),
        ({"kind": "scribble", "points": [[1, 1, 1], [10**400, 1, 1]]}, "integer beyond float range"),
        ({"kind": "scribble", "points": [[1, 1, 1], [5, 1, 1]], "normal": [0, 0, 10**400]}, "normal"),
        ({"kind": "lasso", "points": [[1, 1, 1], [5, 1, 1], {"a": 1}]}, "list of 3 coordinates"),
        # JSON true and numeric strings are not numbers, as in an array's shape
        ({"kind": "point", "position": [True, 1, 1]}, "got true"),
        ({"kind": "point", "position": ["1", 1, 1]}, "got '1'"),
        ({"kind": "point", "position": "123"}, "list of 3 coordinates"),
        ({"kind": "box", "min_corner": [0, 0, False], "max_corner": [5, 5, 5]}, "got false"),
        ({"kind": "lasso", "points": [[0, 0, 1], [5, 0, 1], [5, "5", 1]]}, "got '5'"),
        ({"kind": "scribble", "slab": {**_SLAB, "offset": [True, 0, 0]}}, "must be an integer, got true"),
        ({"kind": "lasso", "slab": {**_SLAB, "shape": ["1", 2, 2]}}, "must be an integer, got '1'"),
        ({"kind": "mask", "offset": [0, 0, "0"], "shape": [1, 2, 2], "data": "eJz7AAAA8QDx"}, "must be an integer"),
    ],
)
def test_hostile_coordinates_are_a_prompt_error(data, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(data)
    with pytest.raises(PromptError, match=message):  # the same from JSON text
        parse_prompt(json.dumps(data))


def test_numpy_numbers_are_coordinates():
    assert PointPrompt(position=np.array([1, 2, 3], np.int64)).position == (1.0, 2.0, 3.0)
    assert PointPrompt(position=(np.float32(1.5), np.int16(2), np.array(3.0))).position == (1.5, 2.0, 3.0)
    box = BoxPrompt(min_corner=np.zeros(3), max_corner=np.full(3, 4.0))
    assert box.max_corner == (4.0, 4.0, 4.0)
    assert LassoPrompt(points=np.array([[0, 0, 1], [5, 0, 1], [5, 5, 1]])).points[2] == (5.0, 5.0, 1.0)
    assert parse_prompt({"kind": "scribble", "slab": _SLAB}).slab.shape == (1, 2, 2)
