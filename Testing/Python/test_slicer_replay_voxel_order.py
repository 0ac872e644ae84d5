"""In a scene, a prompt log recorded on a left-handed file (``segassist segment --log``, SimpleITK's
voxel order) replays to the recorded mask, bit for bit.

Slicer stores a left-handed image with its slices reversed: the log's prompts were moved to the
node's voxels, but the engine then ran on the reversed voxels, and the network is not flip-symmetric
(the bundled sample written left-handed: 88 voxels of 1109 differed, with no warning). Given the
prompt file itself, ``segment_volume`` now runs on the voxels in the log's order and writes the
segment back in the node's. Real MRML scenes (slicer-core), real NIfTI files written by SimpleITK and
read by Slicer's storage node, the shipped model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main as cli
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.prompts import PointPrompt

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch", reason="the shipped model needs torch")
from SegAssistLib.engine.builtin import load_default_engine  # noqa: E402
from SegAssistLib.slicer import segments, volumes  # noqa: E402
from SegAssistLib.slicer.coordinates import ijk_to_ras  # noqa: E402
from SegAssistLib.slicer.logic import load_prompts, segment_volume  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = ROOT / "Resources" / "Examples" / "hippocampus_001_prompts.json"
#: left-handed (det -1): i and j swapped and turned, an origin away from 0
DIRECTION = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0]) * -1.0


@pytest.fixture(scope="module")
def left_handed(shipped_checkpoint, tmp_path_factory):
    """The sample written left-handed, and a log recorded on it as ``segassist segment --log`` writes it:
    (image, log, recorded mask in SimpleITK's order)."""
    folder = tmp_path_factory.mktemp("left")
    base = load_volume(SAMPLE)
    assert np.linalg.det(DIRECTION) < 0
    image = folder / "left.nii.gz"
    sitk.WriteImage(volume_to_sitk(Volume(base.array, (0.8, 1.1, 1.5), (12.0, -30.0, 5.0), DIRECTION)), str(image))
    assert cli(["segment", str(image), "--prompts", str(SAMPLE_PROMPTS), "--out", str(folder / "rec.nii.gz"),
                "--log", str(folder / "rec.json"), "--threads", "1"]) == 0  # fmt: skip
    mask = load_mask(folder / "rec.nii.gz")
    assert mask.sum() > 500
    return image, folder / "rec.json", mask


@pytest.fixture(scope="module")
def engine(shipped_checkpoint):
    return load_default_engine(threads=1)


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def test_a_log_of_a_left_handed_file_replays_to_its_mask_in_a_scene(ctx, left_handed, engine):
    image, log, mask = left_handed
    node = volumes.load_volume_file(ctx.scene, image)
    assert np.array_equal(slicer.util.arrayFromVolume(node), load_volume(image).array[::-1])  # k reversed
    file = load_prompts(log, node)
    assert file.notes == [] and file.settings is not None

    result = segment_volume(engine, node, [file], settings=file.settings, segment_name="replay")
    assert np.array_equal(result.mask, mask[::-1]) and result.notes == []  # the node's order, bit for bit
    written = segments.segment_to_array(result.segmentation_node, result.segment_id, node)
    assert np.array_equal(written, mask[::-1])
    assert result.prompt_log.prompts == file.recorded_prompts  # the log's order, as the engine saw it


def test_markups_beside_the_log_are_moved_to_the_logs_order(ctx, left_handed, engine):
    """A point placed in the scene names the node's voxels: it is moved to the log's order with the
    rest, so the run is the one on the file as recorded with that point in the file's order."""
    image, log, _ = left_handed
    node = volumes.load_volume_file(ctx.scene, image)
    last_k = node.GetImageData().GetDimensions()[2] - 1
    points = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "extra")
    points.AddControlPoint(*np.asarray(ijk_to_ras([18.0, 25.0, last_k - 16.0], node), float).ravel()[:3])
    file = load_prompts(log, node)

    result = segment_volume(engine, node, [file, points], settings=file.settings, segment_name="mixed")
    recorded = load_volume(image)
    extra = PointPrompt(position=(18.0, 25.0, 16.0))  # the same voxel, in the file's order
    expected = engine.open_session(recorded, [*file.recorded_prompts, extra], settings=file.settings).result()
    assert np.array_equal(result.mask, expected[::-1])
    assert expected.sum() > 500


def test_the_batch_example_replays_a_left_handed_files_log_in_process_to_its_mask(left_handed, tmp_path, capsys):
    image, log, mask = left_handed
    path = ROOT / "Resources" / "Examples" / "batch_segment.py"
    spec = importlib.util.spec_from_file_location("segassist_batch_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "replay.seg.nrrd"
    assert example.main(["--image", str(image), "--prompts", str(log), "--out", str(out), "--segment-name", "s",
                         "--threads", "1", "--in-process"]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err
    with create_headless_scene() as ctx:
        node = volumes.load_volume_file(ctx.scene, image)
        seg = segments.load_segmentation(ctx.scene, out)
        written = segments.segment_to_array(seg, seg.GetSegmentation().GetSegmentIdBySegmentName("s"), node)
    assert np.array_equal(written, mask[::-1])
