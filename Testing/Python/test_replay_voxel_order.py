"""A prompt log replayed on the same scan stored with some axes in reverse order gives the recorded mask.

The prompts were always moved to the voxels they named (``SegAssistLib.prompt_mirror``), but the
engine then ran on the reversed array, and the network is not flip-symmetric: another mask, silently
(a copy of the bundled sample re-saved with j reversed: 249 voxels of 1109 differed). A replay now
runs on the voxels put back in the log's order with the log's own prompts, in process and on a
server, and the mask is turned back. Real files written by SimpleITK, the shipped model and a real
server on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.cli import main
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import BoxPrompt, PointPrompt

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = REPO / "Resources" / "Examples" / "hippocampus_001_prompts.json"


def _segment(*args) -> int:
    return main(["segment", *[str(a) for a in args]])


def _reordered(source: Path, target: Path, flips_ijk) -> Path:
    """``source`` re-saved with the axes ``flips_ijk`` (i, j, k) in reverse order, every voxel where it was."""
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(source)), list(flips_ijk)), str(target))
    return target


def _in_original_order(mask: np.ndarray, flips_ijk) -> np.ndarray:
    axes = tuple(2 - a for a in range(3) if flips_ijk[a])  # (i, j, k) -> array axes [k, j, i]
    return np.flip(mask, axis=axes) if axes else mask


@pytest.fixture(scope="module")
def recorded(shipped_checkpoint, tmp_path_factory):
    """``segassist segment --log`` on the sample: (log, mask as SimpleITK reads the file)."""
    folder = tmp_path_factory.mktemp("recorded")
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", folder / "rec.nii.gz", "--log",
                    folder / "rec.json", "--threads", 1) == 0  # fmt: skip
    mask = load_mask(folder / "rec.nii.gz")
    assert mask.sum() > 500
    return folder / "rec.json", mask


@pytest.mark.parametrize("flips_ijk", [(False, True, False), (True, False, True)], ids=["j", "i+k"])
def test_a_log_replayed_on_a_copy_stored_the_other_way_gives_the_recorded_mask(
    recorded, flips_ijk, tmp_path, capsys
):
    log, mask = recorded
    copy = _reordered(SAMPLE, tmp_path / "reordered.nrrd", flips_ijk)
    out, again = tmp_path / "replay.nii.gz", tmp_path / "replay.json"
    assert _segment(copy, "--prompts", log, "--out", out, "--log", again, "--threads", 1) == 0
    assert "warning" not in capsys.readouterr().err
    replay = load_mask(out)
    assert np.array_equal(_in_original_order(replay, flips_ijk), mask)  # bit for bit

    # the replay's log records what the engine saw: the image and the prompts in the recorded log's order
    first, second = PromptLog.load(log), PromptLog.load(again)
    assert second.prompts == first.prompts and second.image.sha256 == first.image.sha256
    assert np.allclose(second.image.origin, first.image.origin, atol=1e-4)
    assert np.allclose(second.image.direction, first.image.direction, atol=1e-6)
    # and replays on the copy to the same mask, and on the original file too
    assert _segment(copy, "--prompts", again, "--out", tmp_path / "third.nii.gz", "--threads", 1) == 0
    assert np.array_equal(load_mask(tmp_path / "third.nii.gz"), replay)
    assert _segment(SAMPLE, "--prompts", again, "--out", tmp_path / "fourth.nii.gz", "--threads", 1) == 0
    assert np.array_equal(load_mask(tmp_path / "fourth.nii.gz"), mask)


def test_a_left_handed_file_and_its_right_handed_twin_replay_the_recorded_mask(shipped_checkpoint, tmp_path):
    """The sample written with a left-handed direction (det -1, as the NIfTI of a DICOM series often is),
    and the same voxels stored with k reversed and k's direction turned: one image, two voxel orders."""
    from SegAssistLib.image import Volume

    base = load_volume(SAMPLE)
    left = Volume(base.array, base.spacing, (3.0, -5.0, 7.0), np.diag([1.0, 1.0, -1.0]))
    assert np.linalg.det(left.direction) < 0
    sitk.WriteImage(volume_to_sitk(left), str(tmp_path / "left.nii.gz"))
    assert _segment(tmp_path / "left.nii.gz", "--prompts", SAMPLE_PROMPTS, "--out", tmp_path / "rec.nii.gz",
                    "--log", tmp_path / "rec.json", "--threads", 1) == 0  # fmt: skip
    twin = _reordered(tmp_path / "left.nii.gz", tmp_path / "twin.nii.gz", (False, False, True))
    assert np.linalg.det(load_volume(twin).direction) > 0
    assert _segment(twin, "--prompts", tmp_path / "rec.json", "--out", tmp_path / "rep.nii.gz", "--threads", 1) == 0
    recorded = load_mask(tmp_path / "rec.nii.gz")
    assert recorded.sum() > 500
    assert np.array_equal(load_mask(tmp_path / "rep.nii.gz")[::-1], recorded)


def test_prompts_in_the_callers_order_beside_a_log_are_moved_to_the_logs_order(recorded, tmp_path):
    """A list of prompts names voxels of the image given; the log's, of the image it was recorded on:
    all are put in the log's order, so the run is the one on the original file with the list's prompts
    moved there."""
    log, _ = recorded
    flips_ijk = (False, True, False)
    copy = _reordered(SAMPLE, tmp_path / "reordered.nii.gz", flips_ijk)
    last_j = load_volume(SAMPLE).shape_ijk[1] - 1
    here = [PointPrompt(position=(20.0, 24.0, 16.0)), BoxPrompt(min_corner=(8, 10, 14), max_corner=(30, 30, 14))]
    there = [PointPrompt(position=(20.0, last_j - 24.0, 16.0)),
             BoxPrompt(min_corner=(8, last_j - 30, 14), max_corner=(30, last_j - 10, 14))]  # fmt: skip
    (tmp_path / "here.json").write_text(json.dumps([p.model_dump(mode="json") for p in here]))
    (tmp_path / "there.json").write_text(json.dumps([p.model_dump(mode="json") for p in there]))
    for extra, image, out in (("here.json", copy, "mixed.nii.gz"), ("there.json", SAMPLE, "expected.nii.gz")):
        assert _segment(image, "--prompts", log, "--prompts", tmp_path / extra, "--out", tmp_path / out,
                        "--threads", 1) == 0  # fmt: skip
    expected = load_mask(tmp_path / "expected.nii.gz")
    assert np.array_equal(_in_original_order(load_mask(tmp_path / "mixed.nii.gz"), flips_ijk), expected)
    assert expected.sum() > 500


def test_logs_recorded_in_different_voxel_orders_of_the_image_are_refused_together(recorded, tmp_path, capsys):
    log, _ = recorded
    copy = _reordered(SAMPLE, tmp_path / "reordered.nii.gz", (False, True, False))
    other = tmp_path / "on_the_copy.json"
    assert _segment(copy, "--prompts", SAMPLE_PROMPTS, "--out", tmp_path / "x.nii.gz", "--log", other,
                    "--threads", 1) == 0  # fmt: skip
    capsys.readouterr()
    assert _segment(copy, "--prompts", log, "--prompts", other, "--out", tmp_path / "y.nii.gz") == 2
    err = capsys.readouterr().err
    assert "were recorded on this image with its voxels in different orders" in err, err
    assert "(this image reversed along j vs in its own order): replay them separately" in err, err
    assert not (tmp_path / "y.nii.gz").exists()


def test_a_server_is_sent_the_image_in_the_logs_order(tmp_path, shared_server, server_checkpoint, monkeypatch):
    """A backend answers for the voxels it is sent: the copy's voxels, put back in the log's order."""
    from SegAssistLib.engine.builtin import BuiltinEngine

    image = tmp_path / "blob.nii.gz"
    sitk.WriteImage(volume_to_sitk(make_volume()), str(image))
    volume = load_volume(image)
    prompts = [PointPrompt(position=(20, 14, 9)), PointPrompt(position=(30, 24, 14), positive=False)]
    session = BuiltinEngine.from_checkpoint(server_checkpoint, threads=1).open_session(volume, prompts)
    mask = session.result()
    log = session.prompt_log().model_copy(update={"image": ImageInfo.from_volume(volume)})
    log.save(tmp_path / "log.json")
    assert mask.any()

    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", TOKENS["alice"])
    for flips_ijk in ((False, True, False), (True, True, True)):
        copy = _reordered(image, tmp_path / "copy.nii.gz", flips_ijk)
        out = tmp_path / "remote.nii.gz"
        assert _segment(copy, "--prompts", tmp_path / "log.json", "--out", out, "--overwrite",
                        "--url", shared_server.url, "--send-images-to-remote") == 0  # fmt: skip
        assert np.array_equal(_in_original_order(load_mask(out), flips_ijk), mask), flips_ijk
