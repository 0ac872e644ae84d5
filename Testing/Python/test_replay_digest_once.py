"""One replay computes the image's voxel digest at most once, however many prompt logs it reads, and
``--log`` records that same digest: it was computed again for every log and once more for ``--log``
(0.13 to 0.2 s each on a 512x512x300 int16 CT, seconds on a float64 one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import SimpleITK as sitk

import SegAssistLib.headless as headless
import SegAssistLib.image as image_module
import SegAssistLib.prompt_log as prompt_log_module
from SegAssistLib.cli import main
from SegAssistLib.io import load_volume
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"


@pytest.fixture
def digests(monkeypatch):
    """Every voxel digest computed from now on, by shape (wherever the function is called from)."""
    calls = []
    original = image_module.voxel_digest

    def counting(array, *args, **kwargs):
        calls.append(array.shape)
        return original(array, *args, **kwargs)

    for module in (image_module, headless, prompt_log_module):  # each module that calls it
        monkeypatch.setattr(module, "voxel_digest", counting)
    return calls


def _three_logs(folder: Path, image: Path) -> list:
    info = ImageInfo.from_volume(load_volume(image))
    paths = []
    for n in range(3):
        PromptLog(image=info, prompts=[PointPrompt(position=(16.0, 27.0 - n, 15.0))]).save(folder / f"log{n}.json")
        paths.append(folder / f"log{n}.json")
    return paths


@pytest.mark.parametrize("reordered", [False, True], ids=["same-order", "copy-stored-the-other-way"])
def test_a_replay_of_three_logs_with_log_hashes_the_voxels_once(tmp_path, shipped_checkpoint, digests, reordered):
    logs = _three_logs(tmp_path, SAMPLE)
    image = SAMPLE
    if reordered:  # the digest is then that of the voxels in the logs' order, for the notes and for --log
        image = tmp_path / "reordered.nrrd"
        sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(SAMPLE)), [False, True, False]), str(image))
    digests.clear()
    argv = ["segment", str(image), *sum((["--prompts", str(p)] for p in logs), []), "--out",
            str(tmp_path / "out.nii.gz"), "--log", str(tmp_path / "replay.json"), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert len(digests) == 1
    assert PromptLog.load(tmp_path / "replay.json").image.sha256 == PromptLog.load(logs[0]).image.sha256


def test_a_replay_of_logs_without_a_digest_hashes_once_for_log_and_not_at_all_without_it(
    tmp_path, shipped_checkpoint, digests
):
    info = ImageInfo.from_volume(load_volume(SAMPLE)).model_copy(update={"sha256": None})
    PromptLog(image=info, prompts=[PointPrompt(position=(16.0, 27.0, 15.0))]).save(tmp_path / "old.json")
    digests.clear()
    base = ["segment", str(SAMPLE), "--prompts", str(tmp_path / "old.json"), "--prompts", str(tmp_path / "old.json"),
            "--threads", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a.nii.gz")]) == 0
    assert digests == []
    assert main([*base, "--out", str(tmp_path / "b.nii.gz"), "--log", str(tmp_path / "b.json")]) == 0
    assert len(digests) == 1


def test_slicer_reads_several_logs_hashing_once(tmp_path, digests):
    pytest.importorskip("slicer")
    from SegAssistLib.slicer import volumes
    from SegAssistLib.slicer.logic import load_prompt_files
    from SegAssistLib.slicer.scene import create_headless_scene

    logs = _three_logs(tmp_path, SAMPLE)
    with create_headless_scene() as ctx:
        node = volumes.load_volume_file(ctx.scene, SAMPLE)
        digests.clear()
        files = load_prompt_files(logs, node)
        assert len(files) == 3 and all(f.notes == [] for f in files)
        assert len(digests) == 1


def test_the_batch_example_replays_several_logs_hashing_once(tmp_path, shipped_checkpoint, digests):
    pytest.importorskip("slicer")
    logs = _three_logs(tmp_path, SAMPLE)
    spec = importlib.util.spec_from_file_location("digest_batch_example", ROOT / "Resources/Examples/batch_segment.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    digests.clear()
    assert example.main(["--image", str(SAMPLE), *sum((["--prompts", str(p)] for p in logs), []), "--out",
                         str(tmp_path / "out.seg.nrrd"), "--threads", "1", "--in-process"]) == 0  # fmt: skip
    assert len(digests) == 1
