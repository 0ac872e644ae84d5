"""Slicer batch replays of a prompt log use the engine settings the log records (real MRML scenes, slicer-core).

A log of a session answered with other settings (no edge snap: ``segassist serve --edge-band 0``)
gave another mask when replayed in a scene: ``load_prompt_file`` dropped the settings and
``segment_volume`` answered with the engine's own, silently. The bundled sample and the shipped
model: the settings change the mask there (checked, so that the tests can fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SegAssistLib.errors import PromptError
from SegAssistLib.headless import read_prompt_file
from SegAssistLib.io import load_volume
from SegAssistLib.prompt_log import ImageInfo

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch", reason="the shipped model needs torch")
from SegAssistLib.client import LocalBackend  # noqa: E402
from SegAssistLib.engine.builtin import BuiltinEngine  # noqa: E402
from SegAssistLib.slicer import segments, volumes  # noqa: E402
from SegAssistLib.slicer.logic import load_prompt_file, load_prompts, segment_volume  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = ROOT / "Resources" / "Examples" / "hippocampus_001_prompts.json"
SAMPLE_CLICKS = ROOT / "Resources" / "Examples" / "hippocampus_001_clicks.mrk.json"


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


@pytest.fixture(scope="module")
def recorded(shipped_checkpoint, tmp_path_factory):
    """A log as ``segassist segment --log`` writes it, of a session with no edge snap: (path, log, mask)."""
    volume = load_volume(SAMPLE)
    recorder = BuiltinEngine.from_checkpoint(shipped_checkpoint, threads=1, edge_snap=None)
    session = recorder.open_session(volume, read_prompt_file(SAMPLE_PROMPTS))
    mask = np.asarray(session.result(), np.uint8)
    log = session.prompt_log().model_copy(update={"image": ImageInfo.from_volume(volume)})
    assert log.engine is not None and log.engine.edge_band == 0 and mask.any()
    path = tmp_path_factory.mktemp("log") / "snapless_log.json"
    log.save(path)
    return path, log, mask


@pytest.fixture(scope="module")
def default_engine(shipped_checkpoint):
    return BuiltinEngine.from_checkpoint(shipped_checkpoint, threads=1)  # edge band 2: not the log's


def test_a_prompt_log_replayed_in_a_scene_gives_the_mask_it_records(ctx, recorded, default_engine):
    path, log, mask = recorded
    node = volumes.load_volume_file(ctx.scene, SAMPLE)
    assert slicer.util.arrayFromVolume(node).shape == mask.shape
    file = load_prompts(path, node)
    assert file.prompts == list(log.prompts) and file.settings == log.engine and file.model == log.model
    assert load_prompt_file(path, node) == file.prompts  # the prompts alone, as before

    # without the recorded settings the engine answers with its own: another mask (what a replay gave)
    own = segment_volume(default_engine, node, file.prompts, segment_name="own settings")
    assert not np.array_equal(own.mask, mask) and own.notes == []

    replay = segment_volume(
        default_engine,
        node,
        file.prompts,
        segmentation_node=own.segmentation_node,
        segment_name="replay",
        settings=file.settings,
    )
    assert np.array_equal(replay.mask, mask) and replay.notes == []
    assert np.array_equal(segments.segment_to_array(replay.segmentation_node, replay.segment_id, node), mask)
    assert replay.prompt_log.engine == log.engine
    assert default_engine.settings.edge_band == 2.0  # the engine keeps its own for other sessions


def test_markups_record_no_settings_and_an_engine_that_cannot_apply_them_is_noted(ctx, recorded):
    from SegAssistLib.evaluation.baselines import GrowCutEngine

    node = volumes.load_volume_file(ctx.scene, SAMPLE)
    clicks = load_prompts(SAMPLE_CLICKS, node, ctx.markups_logic)
    assert clicks.prompts and clicks.settings is None and clicks.model is None
    assert load_prompts(SAMPLE_PROMPTS, node).settings is None  # an object with a prompts list records none

    snapless = recorded[1].engine
    result = segment_volume(GrowCutEngine(), node, clicks.prompts, settings=snapless)  # records no settings
    assert len(result.notes) == 1 and "recorded with engine settings that growcut" in result.notes[0]
    assert "the mask may differ from the recorded one" in result.notes[0]
    assert segment_volume(GrowCutEngine(), node, clicks.prompts).notes == []  # nothing recorded, nothing to say


# ---- the batch example --------------------------------------------------------------------------
def _example_module():
    import importlib.util

    path = ROOT / "Resources" / "Examples" / "batch_segment.py"
    spec = importlib.util.spec_from_file_location("segassist_batch_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _written(out: Path) -> np.ndarray:
    with create_headless_scene() as ctx:
        image = volumes.load_volume_file(ctx.scene, SAMPLE)
        seg = segments.load_segmentation(ctx.scene, out)
        return segments.segment_to_array(seg, seg.GetSegmentation().GetSegmentIdBySegmentName("hippocampus"), image)


def test_the_batch_example_replays_a_log_in_process_with_its_settings(recorded, tmp_path, capsys):
    path, log, mask = recorded
    example = _example_module()
    out = tmp_path / "replay.seg.nrrd"
    args = ["--image", str(SAMPLE), "--prompts", str(path), "--out", str(out), "--segment-name", "hippocampus",
            "--threads", "1"]  # fmt: skip
    assert example.main([*args, "--in-process"]) == 0
    captured = capsys.readouterr()
    assert "2 prompts" in captured.out and "warning" not in captured.err
    assert np.array_equal(_written(out), mask)

    # a second log recorded with other settings: no one setting replays both, refused before any model loads
    other = tmp_path / "other_log.json"
    log.model_copy(update={"engine": log.engine.model_copy(update={"edge_band": 3.0})}).save(other)
    assert example.main([*args, "--prompts", str(other), "--in-process", "--overwrite"]) == 1  # out: the run above's
    assert "were recorded with different engine settings (edge_band 0.0 vs 3.0)" in capsys.readouterr().err
    assert example.main([*args, "--in-process", "--url", "https://example.org"]) == 2
    assert "not with --url" in capsys.readouterr().err


def test_the_batch_example_warns_when_a_backend_answers_with_other_settings(
    recorded, tiny_checkpoint, tmp_path, capsys
):
    """A backend (a server process, as the script's default local one) answers with its own settings
    (edge band 2) and model: the mask may differ, and the script says so rather than nothing."""
    path, log, mask = recorded
    backend = LocalBackend(model=tiny_checkpoint, state_dir=tmp_path / "state", reuse=False,
                           extra_args=["--threads", "1"]).start()  # fmt: skip
    try:
        example = _example_module()
        out = tmp_path / "served.seg.nrrd"
        args = ["--image", str(SAMPLE), "--prompts", str(path), "--out", str(out), "--segment-name", "hippocampus",
                "--url", backend.url, f"--token={backend.token}", "--send-images-to-remote"]  # fmt: skip
        assert example.main(args) == 0
    finally:
        backend.stop()
    err = capsys.readouterr().err
    assert "warning: the prompts were recorded with engine settings other than those" in err
    assert "edge_band 0.0 vs 2.0; recorded vs used): the mask may differ from the recorded one" in err
    assert f"warning: the prompt log was recorded with model {log.model}, replayed with tiny-test" in err
    assert out.is_file()


def test_a_markups_file_beside_a_log_keeps_the_logs_settings(ctx, recorded):
    """Markups record no settings: they do not stand against a log's (recorded_settings skips them)."""
    from SegAssistLib.slicer.logic import recorded_settings

    path, log, _ = recorded
    node = volumes.load_volume_file(ctx.scene, SAMPLE)
    files = [load_prompts(SAMPLE_CLICKS, node, ctx.markups_logic), load_prompts(path, node)]
    assert recorded_settings(files) == log.engine
    bad = Path(path).with_name("bad.json")
    bad.write_text(json.dumps({"schema_version": "1.4", "engine": {"edge_band": 0.5}, "prompts": []}))
    with pytest.raises(PromptError, match="invalid prompt log"):
        load_prompts(bad, node)


def test_a_log_replayed_on_another_scan_of_the_same_grid_is_noted_in_the_scene_and_by_the_example(
    ctx, recorded, tmp_path, capsys
):
    """The log records its image's voxel digest: a volume of the same grid with other values (a
    follow-up, another patient of the protocol) is read, with a note; the recorded scan gives none."""
    import SimpleITK as sitk

    path, log, mask = recorded
    assert log.image is not None and log.image.recorded_digest()
    image = sitk.ReadImage(str(SAMPLE))
    changed = sitk.GetArrayFromImage(image)
    changed[tuple(n // 2 for n in changed.shape)] += 1  # one voxel: another scan as far as a digest can tell
    follow_up = sitk.GetImageFromArray(changed)
    follow_up.CopyInformation(image)
    other = tmp_path / "follow_up.nrrd"
    sitk.WriteImage(follow_up, str(other))

    assert load_prompts(path, volumes.load_volume_file(ctx.scene, SAMPLE)).notes == []
    file = load_prompts(path, volumes.load_volume_file(ctx.scene, other))
    assert file.prompts == list(log.prompts)  # read all the same: the prompts name voxels of this grid
    assert len(file.notes) == 1 and "recorded on an image with other voxel values" in file.notes[0]

    example = _example_module()
    out = tmp_path / "follow_up.seg.nrrd"
    args = ["--image", str(other), "--prompts", str(path), "--out", str(out), "--segment-name", "hippocampus",
            "--threads", "1", "--in-process"]  # fmt: skip
    assert example.main(args) == 0
    assert "warning: " in (err := capsys.readouterr().err) and "other voxel values" in err
    assert out.is_file()


def test_the_batch_example_sends_logs_of_different_settings_to_a_backend_and_warns_for_each(
    recorded, tiny_checkpoint, tmp_path, capsys
):
    """A backend answers every prompt with its own settings: logs recorded with different ones are not
    refused there (only --in-process applies them), and the script names each log whose settings
    differ from the backend's."""
    path, log, _ = recorded
    other = tmp_path / "other_log.json"
    log.model_copy(update={"engine": log.engine.model_copy(update={"edge_band": 3.0})}).save(other)
    backend = LocalBackend(model=tiny_checkpoint, state_dir=tmp_path / "state", reuse=False,
                           extra_args=["--threads", "1"]).start()  # fmt: skip
    try:
        example = _example_module()
        out = tmp_path / "served.seg.nrrd"
        args = ["--image", str(SAMPLE), "--prompts", str(path), "--prompts", str(other), "--out", str(out),
                "--segment-name", "hippocampus", "--url", backend.url, f"--token={backend.token}",
                "--send-images-to-remote"]  # fmt: skip
        assert example.main(args) == 0
    finally:
        backend.stop()
    err = capsys.readouterr().err
    assert f"warning: {path}: the prompts were recorded with engine settings other than those" in err, err
    assert "(edge_band 0.0 vs 2.0; recorded vs used)" in err, err
    assert f"warning: {other}: the prompts were recorded with engine settings other than those" in err, err
    assert "(edge_band 3.0 vs 2.0; recorded vs used)" in err, err
    assert out.is_file()
