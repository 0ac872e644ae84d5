"""Prompt schema: validation with clear errors, JSON round trip, versioning."""

import json

import numpy as np
import pytest

from SegAssistLib.errors import PromptError
from SegAssistLib.prompt_log import SCHEMA_VERSION, PromptLog, prompt_log_json_schema
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, ScribblePrompt, parse_prompt


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
    text = '{"schema_version": "1.5", "prompts": [{"kind": "point"}, {"kind": "box"}, {"kind": "box"}]}'
    with pytest.raises(PromptError) as refused:
        PromptLog.from_json(text)
    message = str(refused.value)
    assert "\n" not in message and "https://" not in message
    # a prompt counted from 1, as in a list of prompts ("prompt 2 of 3"), not "prompts.0"
    assert message.startswith("invalid prompt log: prompt 1 of 3: point.position: Field required; "
                              "prompt 2 of 3: box.min_corner: Field required;")  # fmt: skip
    assert message.endswith("(and 2 more)")


def test_mask_prompt_outside_image_is_refused():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[3, 3, 3] = 1
    with pytest.raises(PromptError, match="outside image"):
        MaskPrompt.from_array(mask).to_array((2, 2, 2))


def test_a_mask_names_its_maker_only_when_one_made_it():
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    drawn = json.loads(MaskPrompt.from_array(mask).model_dump_json())
    assert "made_by" not in drawn  # written as 1.4 wrote it: a 1.4 reader reads it
    proposed = MaskPrompt.from_array(mask, made_by="0.3.0+v4")
    assert parse_prompt(proposed.model_dump_json()) == proposed
    for bad in ("", " 0.3.0", "0.3.0\n", "x" * 201):
        with pytest.raises(ValueError, match="made_by"):
            MaskPrompt(**{**drawn, "made_by": bad})


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


def test_a_box_thinner_than_a_voxel_on_a_second_axis_is_accepted_and_holds_a_voxel_along_it():
    """Dragged on a coronal view (j flat) of 5 mm slices around a 4 mm lesion: 0.8 slice tall."""
    from SegAssistLib.rasterize import fill_box

    box = parse_prompt({"kind": "box", "min_corner": [100, 80, 12.1], "max_corner": [112, 80, 12.9]})
    assert box.is_2d  # flat along j: the coronal slice it was drawn on
    drawn = np.zeros((20, 100, 120), bool)
    fill_box(drawn, np.asarray(box.min_corner)[::-1], np.asarray(box.max_corner)[::-1])
    assert np.array_equal(np.argwhere(drawn), [[k, 80, i] for k in (12, 13) for i in range(100, 113)])  # 12.9: in 13
    thin = BoxPrompt(min_corner=(3, 4, 5.2), max_corner=(9, 4.6, 5.7))  # thin on two axes, flat on none
    assert not thin.is_2d
    for corners in (((0, 0, 3), (5, 0, 3)), ((0, 0, 3), (0, 0, 3)), ((2, 7, 3), (2, 7.5, 3))):  # flat on 2 or 3 axes
        with pytest.raises(PromptError, match="degenerate box .* flat along more than one axis"):
            parse_prompt({"kind": "box", "min_corner": corners[0], "max_corner": corners[1]})


@pytest.mark.parametrize("normal", [(0, 0, 1e200), (0, 0, -1e308), (0, 0, 1e-300), (1e308, 1e308, 0)])
def test_a_scribble_normal_of_any_finite_length_is_kept_as_its_direction(normal):
    """1e200 squared overflowed to inf: the normal passed validation and the stroke drew nothing."""
    from SegAssistLib.prompts import to_slab
    from SegAssistLib.stroke_voxels import scribble_voxels

    points = [[5, 5, 5], [9, 5, 5]] if normal[0] == 0 else [[5, 5, 5], [5, 5, 9]]
    prompt = parse_prompt(json.dumps({"kind": "scribble", "points": points, "width": 3, "normal": normal}))
    expected = np.asarray(normal, float) / np.max(np.abs(normal))
    assert np.array_equal(prompt.normal, expected) and np.all(np.isfinite(prompt.normal))
    assert ScribblePrompt.model_validate_json(prompt.model_dump_json()) == prompt  # the same once read back
    unit = ScribblePrompt(points=points, width=3, normal=tuple(expected / np.linalg.norm(expected)))
    assert len(scribble_voxels(prompt)) > 15 and np.array_equal(scribble_voxels(prompt), scribble_voxels(unit))
    assert to_slab(prompt, (12, 12, 12)).slab == to_slab(unit, (12, 12, 12)).slab


@pytest.mark.parametrize("version", ["1.6", "1.10"])
def test_a_log_of_a_newer_minor_schema_reads_or_says_this_reader_needs_upgrading(version):
    plain = {"schema_version": version, "prompts": [{"kind": "point", "position": [1, 2, 3]}]}
    assert PromptLog.from_json(json.dumps(plain)).prompts == [PointPrompt(position=(1, 2, 3))]  # nothing new in it
    text = json.dumps({**plain, "prompts": [{"kind": "point", "position": [1, 2, 3], "confidence": 0.9}]})
    with pytest.raises(PromptError, match=rf"written by a newer SegAssist \(prompt log schema {version}; this reader "
                                          rf"reads 1\.0 to {SCHEMA_VERSION}\).*upgrade SegAssist"):  # fmt: skip
        PromptLog.from_json(text)
    # this reader's own version (and older ones) still refuse an unknown field, without talk of upgrading
    with pytest.raises(PromptError, match="Extra inputs are not permitted") as refused:
        PromptLog.from_json(text.replace(version, SCHEMA_VERSION, 1))
    assert "newer" not in str(refused.value)


@pytest.mark.parametrize("version", ["1", "1.", "1.x", "v1.2", " 1.2", "1.2.0", ""])
def test_a_schema_version_must_be_major_dot_minor(version):
    with pytest.raises(PromptError, match="must be 'major.minor'"):
        PromptLog.from_json(json.dumps({"schema_version": version, "prompts": []}))


def test_a_log_records_its_images_origin_and_direction_and_older_logs_read_without_them():
    from SegAssistLib.image import Volume
    from SegAssistLib.prompt_log import ImageInfo

    direction = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    volume = Volume(np.zeros((4, 5, 6), np.float32), (0.5, 0.7, 2.0), (-10.0, 20.5, 3.0), direction)
    log = PromptLog(image=ImageInfo.from_volume(volume), prompts=[PointPrompt(position=(1, 2, 3))])
    again = PromptLog.from_json(log.to_json())
    assert again == log and again.image.shape_ijk == (6, 5, 4) and again.image.origin == (-10.0, 20.5, 3.0)
    assert np.array_equal(again.image.direction, direction)  # rows, as ITK's matrix: columns are the i, j, k axes
    old = {"schema_version": "1.2", "image": {"shape_ijk": [6, 5, 4], "spacing": [1, 1, 1], "sha256": None},
           "prompts": []}  # fmt: skip
    assert PromptLog.from_json(json.dumps(old)).image.origin is None
    for bad in ({"origin": [0, float("nan"), 0]}, {"direction": [[1, 0, 0], [0, 1, 0]]}):
        with pytest.raises(ValueError, match="image (origin|direction)"):
            PromptLog.model_validate({"image": {**old["image"], **bad}})


_SETTINGS = {
    "refine_depth": 1,
    "max_refine_tiles": 8,
    "min_view_mm": 64.0,
    "correction_zoom_share": 0.025,
    "edge_band": 0.0,
    "edge_beta": 500.0,
    "edge_max_voxels": 200000,
}


def test_a_log_records_engine_settings_and_a_log_without_them_is_written_as_before():
    log = PromptLog(engine=_SETTINGS, prompts=[PointPrompt(position=(1, 2, 3))])
    again = PromptLog.from_json(log.to_json())
    assert again == log and again.engine.edge_band == 0.0 and json.loads(log.to_json())["engine"] == _SETTINGS
    plain = PromptLog(prompts=[PointPrompt(position=(1, 2, 3))])
    assert "engine" not in json.loads(plain.to_json())  # a 1.3 reader reads it (nothing new in it)
    old = {"schema_version": "1.3", "model": "segassist-unet@0.3.0", "prompts": []}
    assert PromptLog.from_json(json.dumps(old)).engine is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"refine_depth": True}, "engine.refine_depth: Input should be a valid integer"),
        ({"refine_depth": 0}, "engine.refine_depth: Input should be greater than or equal to 1"),
        ({"min_view_mm": "64"}, "engine.min_view_mm: Input should be a valid number"),
        ({"edge_band": 0.5}, "engine.edge_band: edge_band must be 0 \\(no snap\\) or at least 1 voxel"),
        ({"correction_zoom_share": 1.0}, "engine.correction_zoom_share: Input should be less than 1"),
        ({"edge_max_voxels": 10**400}, "engine.edge_max_voxels"),
        ({"min_view_mm": float("nan")}, "engine.min_view_mm: Input should be a finite number"),
        ({"dropout": 0.1}, "engine.dropout: Extra inputs are not permitted"),
    ],
)
def test_engine_settings_a_log_cannot_apply_are_refused_in_one_line(change, message):
    text = json.dumps({"schema_version": "1.4", "engine": {**_SETTINGS, **change}, "prompts": []})
    with pytest.raises(PromptError, match=message) as refused:
        PromptLog.from_json(text)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (1, "invalid prompt: expected an object with a kind \\(point, box, scribble, lasso, mask\\), got int 1$"),
        ([1, 2], "got list \\[1, 2\\]$"),
        (
            {"kind": "point", "position": [float("nan"), 1, 1]},
            "^invalid prompt: point.position: point position has a non-finite coordinate: \\[nan, 1.0, 1.0\\]$",
        ),
        ({"kind": "point"}, "^invalid prompt: point.position: Field required$"),
    ],
)
def test_a_bad_prompt_is_one_line_saying_where_and_what(data, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(data)
