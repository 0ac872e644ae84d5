"""The Slicer-free half of batch segmentation: run_prompts on a real engine (the tiny network)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.errors import PromptError
from SegAssistLib.headless import Cancelled, image_of, read_prompt_file, run_prompts
from SegAssistLib.image import Volume
from SegAssistLib.io import load_volume
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


SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = SAMPLE.parents[1] / "Examples" / "hippocampus_001_prompts.json"


def test_a_log_replays_to_its_mask_with_the_engine_settings_it_records(shipped_checkpoint, tmp_path):
    """A session of the shipped model with no edge snap (segassist serve --edge-band 0) gives another
    mask than the default engine: replayed with the settings its log records, the same mask."""
    from SegAssistLib.headless import PromptFile, read_prompts, recorded_settings

    volume = load_volume(SAMPLE)
    prompts = read_prompt_file(SAMPLE_PROMPTS)
    recorder = BuiltinEngine.from_checkpoint(shipped_checkpoint, threads=1, edge_snap=None)
    session = recorder.open_session(volume, prompts)
    recorded, log = session.result(), session.prompt_log()
    assert log.engine == recorder.settings and log.engine.edge_band == 0 and log.engine.refine_depth == 1
    path = tmp_path / "log.json"
    log.save(path)

    replayer = BuiltinEngine.from_checkpoint(shipped_checkpoint, threads=1)  # the default settings
    assert not np.array_equal(run_prompts(replayer, volume, prompts).mask, recorded)  # the settings matter
    file = read_prompts(path, image_of(volume, "the sample"))
    assert file.prompts == prompts and file.settings == log.engine and file.model == log.model
    settings = recorded_settings([file, PromptFile(SAMPLE_PROMPTS, prompts)])  # a bare list records none
    run = run_prompts(replayer, volume, file.prompts, settings=settings)
    assert np.array_equal(run.mask, recorded) and recorded.any()
    assert run.prompt_log.engine == log.engine and run.notes == []
    assert replayer.settings.edge_band == 2.0  # the engine keeps its own for other sessions


def test_logs_of_other_settings_are_refused_together_and_an_engine_that_cannot_apply_them_is_noted(engine):
    from SegAssistLib.evaluation.baselines import GrowCutEngine
    from SegAssistLib.headless import PromptFile, recorded_settings

    snapless = engine.settings.model_copy(update={"edge_band": 0.0})
    files = [PromptFile(Path("a.json"), PROMPTS, engine.settings), PromptFile(Path("b.json"), PROMPTS, snapless)]
    with pytest.raises(PromptError, match=r"a\.json and b\.json were recorded with different engine settings "
                                          r"\(edge_band 2\.0 vs 0\.0\): replay them separately"):  # fmt: skip
        recorded_settings(files)
    run = run_prompts(GrowCutEngine(), _volume(), PROMPTS, settings=snapless)  # records no settings
    assert len(run.notes) == 1 and "recorded with engine settings that growcut" in run.notes[0]
    assert "does not report" in run.notes[0] and "the mask may differ" in run.notes[0]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[1]",
            "prompt 1 of 1: invalid prompt: expected an object with a kind (point, box, scribble, lasso, "
            "mask), got int 1",
        ),
        (
            '[{"kind": "point", "position": [NaN, 1, 1]}]',
            "prompt 1 of 1: invalid prompt: point.position: "
            "point position has a non-finite coordinate: [nan, 1.0, 1.0]",
        ),
        (
            '[{"kind": "point", "position": [1e400, 1, 1]}]',
            "prompt 1 of 1: invalid prompt: point.position: "
            "point position has a non-finite coordinate: [inf, 1.0, 1.0]",
        ),
        ("[" * 100_000 + "]" * 100_000, "cannot read prompts from {path}: its JSON is nested too deeply to be prompts"),
    ],
)
def test_a_bad_prompt_file_is_one_line_naming_the_prompt_and_the_problem(tmp_path, text, message):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(PromptError) as refused:
        read_prompt_file(path)
    said = str(refused.value)
    assert "\n" not in said and "validation error" not in said and "pydantic" not in said, said
    assert said.endswith(message.format(path=path)), said


# ---- replays in the log's voxel order -----------------------------------------------------------
def test_run_prompts_with_flips_opens_the_session_on_the_reversed_image_and_turns_the_mask_back(
    engine, monkeypatch
):
    """Any engine (a server's client as much as the built-in one) is given the image in the log's order."""
    from SegAssistLib.prompt_mirror import reversed_volume

    volume = _volume()
    flips = (True, False, True)
    seen = []
    open_session = engine.open_session

    def recording(volume, *args, **kwargs):
        seen.append(volume)
        return open_session(volume, *args, **kwargs)

    monkeypatch.setattr(engine, "open_session", recording)
    run = run_prompts(engine, volume, PROMPTS, flips=flips)
    monkeypatch.undo()
    there = reversed_volume(volume, flips)
    assert np.array_equal(seen[0].array, there.array) and np.allclose(seen[0].origin, there.origin)
    expected = engine.open_session(there, PROMPTS).result()
    assert np.array_equal(run.mask, np.flip(expected, axis=(0, 2))) and run.flips == flips
    assert run.prompt_log.prompts == PROMPTS  # in the order the engine saw
    assert run_prompts(engine, volume, PROMPTS, flips=(False, False, False)).flips is None


def test_replay_prompts_puts_every_file_in_the_logs_order_and_refuses_two_orders():
    from SegAssistLib.headless import PromptFile, replay_order, replay_prompts
    from SegAssistLib.prompt_mirror import mirror_prompt

    shape = (20, 24, 24)
    recorded = [PointPrompt(position=(1.3, 2.7, 3.1))]  # fractions: the log's own, not mirrored twice
    flips = (True, False, False)
    log = PromptFile(Path("log.json"), [mirror_prompt(p, flips, shape) for p in recorded], flips=flips,
                     recorded_prompts=recorded)  # fmt: skip
    here = PromptFile(Path("list.json"), [PointPrompt(position=(5.0, 6.0, 7.0))])  # no order: the caller's
    same = PromptFile(Path("same.json"), [PointPrompt(position=(8.0, 9.0, 10.0))], flips=(False, False, False))
    prompts, order = replay_prompts([here, log], shape)
    assert order == flips and prompts == [PointPrompt(position=(5.0, 6.0, 12.0)), *recorded]
    assert replay_prompts([here, same], shape) == ([*here.prompts, *same.prompts], None)
    assert replay_order([here]) is None
    with pytest.raises(PromptError, match=r"log\.json and same\.json were recorded on this image with its voxels in "
                                          r"different orders \(this image reversed along k vs in its own order\)"):
        replay_prompts([log, here, same], shape)


def test_recorded_settings_compares_only_what_the_caller_does_not_replace(engine):
    from SegAssistLib.headless import PromptFile, recorded_settings, settings_notes

    a = PromptFile(Path("a.json"), PROMPTS, engine.settings.model_copy(update={"edge_band": 0.0}))
    b = PromptFile(Path("b.json"), PROMPTS, engine.settings)
    assert recorded_settings([a, b], ("edge_band", "edge_beta", "edge_max_voxels")) == a.settings
    with pytest.raises(PromptError, match="replay them separately"):
        recorded_settings([a, b], ("refine_depth", "max_refine_tiles"))
    notes = settings_notes([a, b], engine.settings, "server")
    assert notes == ["a.json: the prompts were recorded with engine settings other than those server answered "
                     "with (edge_band 0.0 vs 2.0; recorded vs used): the mask may differ from the recorded one"]


def test_voxels_hash_once_per_order(monkeypatch):
    import SegAssistLib.headless as headless
    from SegAssistLib.image import voxel_digest

    calls = []
    monkeypatch.setattr(headless, "voxel_digest", lambda a: calls.append(a.shape) or voxel_digest(a))
    array = _volume().array
    voxels = headless.Voxels(array)
    assert voxels.digest() == voxels.digest((False, False, False)) == voxel_digest(array)
    assert voxels.digest((True, False, False)) == voxel_digest(array[::-1]) != voxel_digest(array)
    voxels.digest((True, False, False))
    assert len(calls) == 2


def test_the_model_note_names_the_recorded_and_the_answering_model_only_when_they_differ(tmp_path):
    """One wording for ``segassist segment``, the Slicer batch example and ``segmentFromFile`` (it was
    written in two of them, and missing in the third)."""
    from SegAssistLib.headless import PromptFile, model_note

    log = PromptFile(tmp_path / "a.json", [], model="segassist-unet 0.3.0")
    bare = PromptFile(tmp_path / "b.json", [])  # a bare list or markups: no model recorded
    assert model_note([log, bare], "segassist-unet 0.3.0") is None
    assert model_note([bare], "tiny-test 1") is None and model_note([log], None) is None
    note = model_note([log, bare], "tiny-test 1")
    assert note == ("the prompt log was recorded with model segassist-unet 0.3.0, replayed with tiny-test 1: "
                    "the mask may differ from the recorded one")  # fmt: skip
    other = PromptFile(tmp_path / "c.json", [], model="segassist-unet 0.2.0")
    assert model_note([log, other], "tiny-test 1") is None  # two recorded models: no one to name
