"""A session whose prompts were answered by more than one model version (a version promoted while it was
open: the server swaps weights between requests) records every version in its log (``models``), and a
replay, which runs one model, says that the mask may differ. The log named only the last version, and
its replay with exactly that version gave another mask without a word."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.headless import read_prompts
from SegAssistLib.image import Volume
from SegAssistLib.io import volume_to_sitk
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import PointPrompt

ROOT = Path(__file__).resolve().parents[2]
FIRST, SECOND = PointPrompt(position=(16.0, 16.0, 12.0)), PointPrompt(position=(10.0, 12.0, 12.0))
WARNING = "the prompt log's answers came from more than one model version"


@pytest.fixture
def engine(tiny_checkpoint):
    return BuiltinEngine.from_checkpoint(tiny_checkpoint, edge_snap=None)


@pytest.fixture
def volume():
    return Volume(np.random.default_rng(0).normal(0, 1, (24, 32, 32)).astype(np.float32))


def _swapped_session(engine, volume):
    """Two prompts, the second answered by a version promoted after the first."""
    base = engine.version
    session = engine.open_session(volume)
    session.add_prompt(FIRST)
    engine.swap_network(engine.network, base + "+v1")
    session.add_prompt(SECOND)
    name = engine.capabilities().name
    return session, [f"{name}@{base}", f"{name}@{base}+v1"]


def test_the_log_names_every_version_that_answered_through_undo_redo_and_reset(engine, volume):
    session, both = _swapped_session(engine, volume)
    log = session.prompt_log()
    assert log.models == both and log.model == both[1]
    assert PromptLog.from_json(log.to_json()).models == both  # written, and read back
    session.undo()  # the first prompt alone: one version answered it
    assert session.prompt_log().models is None and "models" not in json.loads(session.prompt_log().to_json())
    session.redo()
    assert session.prompt_log().models == both
    session.reset()
    assert session.prompt_log().models is None
    session.undo()
    assert session.prompt_log().models == both
    # one version answering every prompt (a replay, or no promotion): nothing recorded
    replay = engine.open_session(volume, list(log.prompts))
    assert replay.prompt_log().models is None


def test_segment_warns_when_it_replays_a_log_of_several_versions(engine, volume, tiny_checkpoint, tmp_path, capsys):
    session, both = _swapped_session(engine, volume)
    log = tmp_path / "log.json"
    session.prompt_log().save(log)
    assert read_prompts(log).models == both
    image = tmp_path / "image.nii.gz"
    sitk.WriteImage(volume_to_sitk(volume), str(image))
    assert main(["segment", str(image), "--prompts", str(log), "--out", str(tmp_path / "out.nii.gz"),
                 "--model", str(tiny_checkpoint), "--threads", "1"]) == 0  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {log}: ") and ", ".join(both) in lines[0], lines


def test_the_batch_script_warns_too(engine, volume, tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("slicer")
    session, both = _swapped_session(engine, volume)
    log = tmp_path / "log.json"
    session.prompt_log().save(log)
    image = tmp_path / "image.nii.gz"
    sitk.WriteImage(volume_to_sitk(volume), str(image))
    script = ROOT / "Resources" / "Examples" / "batch_segment.py"
    spec = importlib.util.spec_from_file_location("batch_versions", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--image", str(image), "--prompts", str(log), "--out", str(tmp_path / "out.seg.nrrd"),
                        "--in-process", "--model", str(tiny_checkpoint), "--threads", "1"]) == 0  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(lines) == 1 and ", ".join(both) in lines[0], lines
