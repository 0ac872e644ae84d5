"""A prompt log records the digest of its image's voxel values (``image.sha256``, see
:func:`SegAssistLib.image.voxel_digest`): the same for the same values whatever file format or dtype
holds them, another for another scan; a replay on an image of the same grid with other values is
noted (another scan?), never refused, and a log without a digest says nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.headless import image_of, read_prompts
from SegAssistLib.image import Volume, voxel_digest
from SegAssistLib.io import load_volume, volume_to_sitk
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
CLICK = PointPrompt(position=(16.0, 27.0, 15.0))


def _by_definition(array: np.ndarray, name: str, dtype: str) -> str:
    """The digest as its documentation defines it, in one piece: what another tool would compute."""
    header = f"segassist-voxels-v1 {name} {' '.join(str(n) for n in array.shape[::-1])}\n".encode("ascii")
    return hashlib.sha256(header + np.ascontiguousarray(array, dtype).tobytes()).hexdigest()


def _other_scan(volume: Volume) -> Volume:
    """Another image of the same grid: one voxel differs (a follow-up scan would differ everywhere)."""
    array = volume.array.copy()
    array[3, 4, 5] += 1
    return Volume(array, volume.spacing, volume.origin, volume.direction)


def test_the_digest_is_that_of_the_values_in_nifti_and_nrrd_and_in_any_dtype_that_holds_them(tmp_path):
    volume = load_volume(SAMPLE)
    digest = voxel_digest(volume.array)
    assert digest == _by_definition(volume.array, "int16", "<i2")  # integers of CT/MR range: as int16
    for name in ("copy.nii.gz", "copy.nrrd", "copy.mha"):
        sitk.WriteImage(volume_to_sitk(volume), str(tmp_path / name))
        assert voxel_digest(load_volume(tmp_path / name).array) == digest, name
    for dtype in (np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64):  # the same values re-saved
        copy = Volume(volume.array.astype(dtype), volume.spacing, volume.origin, volume.direction)
        sitk.WriteImage(volume_to_sitk(copy), str(tmp_path / "typed.nrrd"))
        assert voxel_digest(load_volume(tmp_path / "typed.nrrd").array) == digest, dtype
        assert ImageInfo.from_volume(copy).sha256 == digest, dtype
    assert voxel_digest(_other_scan(volume).array) != digest  # one voxel changed
    assert voxel_digest(volume.array[:, :, :-1]) != digest  # the shape is part of it
    assert voxel_digest(volume.array.reshape(51, 35, 35)) != digest  # ... not only the voxel count


def test_the_canonical_type_follows_the_values_not_the_dtype():
    ints = np.arange(-5, 19, dtype=np.int32).reshape(2, 3, 4)
    assert voxel_digest(ints) == _by_definition(ints, "int16", "<i2")
    wide = ints * 100_000
    assert voxel_digest(wide) == voxel_digest(wide.astype(np.float64)) == _by_definition(wide, "int32", "<i4")
    huge = np.array([[[0, 2**40]]], np.int64)
    assert voxel_digest(huge) == voxel_digest(huge.astype(np.float64)) == _by_definition(huge, "int64", "<i8")
    top = np.array([[[0, 2**64 - 1]]], np.uint64)
    assert voxel_digest(top) == _by_definition(top, "uint64", "<u8")
    halves = (ints / 2).astype(np.float32)  # fractions float32 holds: float32, whether stored as 32 or 64 bits
    assert voxel_digest(halves) == voxel_digest(halves.astype(np.float64)) == _by_definition(halves, "float32", "<f4")
    thirds = ints / 3  # only float64 holds them
    assert voxel_digest(thirds) == _by_definition(thirds, "float64", "<f8")
    assert voxel_digest(thirds.astype(np.float32)) != voxel_digest(thirds)  # rounded: other values
    assert voxel_digest(np.array([[[-0.0, 0.5]]])) == voxel_digest(np.array([[[0.0, 0.5]]]))
    assert voxel_digest(np.array([[[-0.0, 1.0]]], np.float32)) == voxel_digest(np.array([[[0, 1]]], np.uint8))
    quiet = np.array([[[np.nan, 0.5]]])
    other_nan = quiet.copy()
    other_nan.view(np.uint64)[0, 0, 0] |= 1  # another NaN payload
    assert np.isnan(other_nan[0, 0, 0]) and voxel_digest(quiet) == voxel_digest(other_nan)


def _straight_from_the_definition(array: np.ndarray) -> str:
    """The published definition, one value at a time in Python numbers (no numpy range logic): <type> is
    the first of int16, int32, int64, uint64 that holds every value when all are integers, else float32
    when every value is exactly a float32, else float64; -0.0 as 0.0, every NaN as the quiet NaN."""
    import math
    import struct

    values = [v.item() for v in np.asarray(array).reshape(-1)]  # C order of [k, j, i]: i fastest
    whole = all(isinstance(v, (bool, int)) or (math.isfinite(v) and v == int(v)) for v in values)
    ranges = (("int16", "<h", -(2**15), 2**15 - 1), ("int32", "<i", -(2**31), 2**31 - 1),
              ("int64", "<q", -(2**63), 2**63 - 1), ("uint64", "<Q", 0, 2**64 - 1))  # fmt: skip
    chosen = None
    if whole:
        ints = [int(v) for v in values]
        chosen = next(((name, fmt) for name, fmt, lo, hi in ranges if all(lo <= v <= hi for v in ints)), None)
    if chosen is not None:
        name, fmt = chosen
        body = b"".join(struct.pack(fmt, int(v)) for v in values)
    else:

        def exact32(v: float) -> bool:  # struct rounds to the nearest float32 (and refuses one beyond its range)
            if math.isnan(v):
                return True
            return abs(v) <= 3.4028234663852886e38 and struct.unpack("<f", struct.pack("<f", v))[0] == v

        name, fmt = ("float32", "<f") if all(exact32(float(v)) for v in values) else ("float64", "<d")
        canonical = [float("nan") if math.isnan(float(v)) else float(v) + 0.0 for v in values]
        body = b"".join(struct.pack(fmt, v) for v in canonical)
    header = f"segassist-voxels-v1 {name} {' '.join(str(n) for n in np.shape(array)[::-1])}\n".encode("ascii")
    return hashlib.sha256(header + body).hexdigest()


@pytest.mark.parametrize(
    "values, dtype",
    [
        ([0.0, 2.0**70], np.float32),  # whole numbers beyond uint64, each a float32: float32
        ([0.0, 2.0**70], np.float64),
        ([-1.0, 2.0**63], np.float32),  # neither int64 nor uint64 holds both: float32
        ([-1.0, 2.0**63], np.float64),
        ([0.0, 2.0**64], np.float64),  # 2**64 is a float32
        ([0.0, 2.0**64 + 4096.0], np.float64),  # not a float32: float64
        ([-(2.0**63), 2.0**63 - 1024.0], np.float64),  # int64 holds both
        ([0.0, 2.0**64 - 2048.0], np.float64),  # uint64 holds both
        ([1e30, -1e30], np.float32),
        ([1e300, 0.0], np.float64),
        ([-0.0, 2.0**80, float("nan")], np.float64),
        ([3.0, 2.0**127 * 1.5], np.float32),
    ],
)
def test_the_digest_follows_its_definition_also_for_whole_numbers_beyond_64_bits(values, dtype):
    """Whole numbers no integer type holds were hashed as float64 even where each is a float32, unlike
    the definition another tool implements: another digest, a false "another scan" note on replay."""
    array = np.asarray(values, dtype).reshape(1, 1, -1)
    assert voxel_digest(array) == _straight_from_the_definition(array)
    assert voxel_digest(array, chunk_voxels=1) == _straight_from_the_definition(array)


def test_the_definition_and_the_digest_agree_on_random_images():
    rng = np.random.default_rng(5)
    for trial in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 4, 3))
        kind = trial % 6
        if kind == 0:
            array = rng.integers(-(2**15), 2**15, shape).astype(np.int32)
        elif kind == 1:
            array = rng.integers(0, 2**62, shape).astype(np.uint64) * np.uint64(3)
        elif kind == 2:
            array = (rng.integers(-100, 100, shape) / 4).astype(np.float64)
        elif kind == 3:
            array = rng.normal(0, 1, shape)
        elif kind == 4:
            array = (rng.integers(1, 2**20, shape).astype(np.float64) * 2.0 ** rng.integers(40, 90, shape))
        else:
            array = rng.integers(-(2**40), 2**40, shape).astype(np.float64) * rng.choice([1.0, 2.0**30], shape)
        assert voxel_digest(array) == _straight_from_the_definition(array), (trial, array.ravel()[:4])


@pytest.mark.parametrize("chunk", [1, 7, 35, 51 * 35 - 1, 51 * 35, 3 * 51 * 35 + 2, 10**9])
def test_the_digest_hashed_in_chunks_is_the_digest_in_one_piece(chunk):
    array = load_volume(SAMPLE).array
    assert voxel_digest(array, chunk_voxels=chunk) == _by_definition(array, "int16", "<i2")
    fractional = array / 7.0
    assert voxel_digest(fractional, chunk_voxels=chunk) == _by_definition(fractional, "float64", "<f8")
    view = array[::-1, :, ::2]  # strided: hashed as its C-order copy would be
    assert voxel_digest(view, chunk_voxels=chunk) == _by_definition(view.copy(), "int16", "<i2")


def test_a_log_records_the_digest_and_it_reads_in_every_1x_reader():
    volume = load_volume(SAMPLE)
    info = ImageInfo.from_volume(volume)
    assert info.sha256 == voxel_digest(volume.array) and len(info.sha256) == 64
    log = PromptLog(image=info, prompts=[CLICK])
    data = json.loads(log.to_json())
    assert data["schema_version"] == "1.5" and data["image"]["sha256"] == info.sha256
    assert PromptLog.model_validate(data) == log


def _log(tmp_path: Path, info: ImageInfo, name: str = "log.json") -> Path:
    path = tmp_path / name
    PromptLog(image=info, prompts=[CLICK]).save(path)
    return path


def test_a_replay_on_another_image_of_the_same_grid_is_noted_and_not_on_the_same_image(tmp_path):
    volume = load_volume(SAMPLE)
    log = _log(tmp_path, ImageInfo.from_volume(volume))
    same = read_prompts(log, image_of(load_volume(SAMPLE), "the sample"))
    assert same.prompts == [CLICK] and same.notes == []
    other = read_prompts(log, image_of(_other_scan(volume), "the follow-up"))
    assert other.prompts == [CLICK]  # read: a note, not a refusal
    (note,) = other.notes
    assert "recorded on an image with other voxel values than the follow-up" in note
    assert "another scan" in note and "the mask may differ from the recorded one" in note
    # the Slicer caller gives the geometry only: nothing to compare
    assert read_prompts(log, dataclasses.replace(image_of(_other_scan(volume), "x"), voxels=None)).notes == []


def test_a_log_without_a_digest_or_with_another_tools_sha256_gives_no_note(tmp_path):
    volume = load_volume(SAMPLE)
    other = image_of(_other_scan(volume), "the follow-up")
    old = ImageInfo.from_volume(volume).model_copy(update={"sha256": None})
    assert "sha256" in json.loads(_log(tmp_path, old).read_text())["image"]  # null, as written before
    assert read_prompts(_log(tmp_path, old), other).notes == []
    data = json.loads(_log(tmp_path, old).read_text())
    del data["image"]["sha256"]
    (tmp_path / "bare.json").write_text(json.dumps(data))
    assert read_prompts(tmp_path / "bare.json", other).notes == []
    named = old.model_copy(update={"sha256": "the file's md5"})  # not a voxel digest: not compared, read
    assert read_prompts(_log(tmp_path, named), other).notes == []
    upper = old.model_copy(update={"sha256": voxel_digest(volume.array).upper()})
    assert read_prompts(_log(tmp_path, upper), image_of(volume, "the sample")).notes == []
    assert len(read_prompts(_log(tmp_path, upper), other).notes) == 1


def test_the_same_scan_stored_the_other_way_is_compared_in_the_logs_order(tmp_path):
    """A copy whose j axis runs the other way (every voxel at its place in space) is the same image:
    no note; the same copy of another scan is noted."""
    volume = load_volume(SAMPLE)
    log = _log(tmp_path, ImageInfo.from_volume(volume))
    for source, expected in ((volume, 0), (_other_scan(volume), 1)):
        sitk.WriteImage(sitk.Flip(volume_to_sitk(source), [False, True, False]), str(tmp_path / "reordered.nrrd"))
        reordered = load_volume(tmp_path / "reordered.nrrd")
        assert not np.array_equal(reordered.array, source.array)
        file = read_prompts(log, image_of(reordered, "reordered"))
        assert file.prompts[0].position == (16.0, 51 - 1 - 27.0, 15.0) and len(file.notes) == expected


def test_segassist_segment_warns_on_another_scan_and_records_the_digest(tmp_path, shipped_checkpoint, capsys):
    volume = load_volume(SAMPLE)
    log = _log(tmp_path, ImageInfo.from_volume(volume))
    other = tmp_path / "follow_up.nrrd"
    sitk.WriteImage(volume_to_sitk(_other_scan(volume)), str(other))

    out_log = tmp_path / "replay.json"
    assert main(["segment", str(SAMPLE), "--prompts", str(log), "--out", str(tmp_path / "same.nii.gz"),
                 "--log", str(out_log), "--threads", "1"]) == 0  # fmt: skip
    assert "voxel values" not in capsys.readouterr().err
    assert PromptLog.load(out_log).image.sha256 == voxel_digest(volume.array)  # --log records it

    assert main(["segment", str(other), "--prompts", str(log), "--out", str(tmp_path / "other.nii.gz"),
                 "--threads", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"warning: {log}: the prompt log was recorded on an image with other voxel values than image {other}" in err
    assert (tmp_path / "other.nii.gz").exists()

    old = _log(tmp_path, ImageInfo.from_volume(volume).model_copy(update={"sha256": None}), "old.json")
    assert main(["segment", str(other), "--prompts", str(old), "--out", str(tmp_path / "old.nii.gz"),
                 "--threads", "1"]) == 0  # fmt: skip
    assert "voxel values" not in capsys.readouterr().err


def test_a_baseline_sessions_log_records_the_digest_once():
    from SegAssistLib.evaluation.baselines import GrowCutEngine

    volume = load_volume(SAMPLE)
    session = GrowCutEngine().open_session(volume)
    session.add_prompt(CLICK)
    first, second = session.prompt_log(), session.prompt_log()
    assert first.image.sha256 == voxel_digest(volume.array) == second.image.sha256
    assert first.image is not second.image  # each log its own copy


def test_a_dicom_series_has_the_digest_of_its_nifti_and_nrrd_copies_and_not_of_its_segmentation(shared_data, tmp_path):
    """Real data: the CT series read from DICOM, and written as NIfTI and NRRD, is one image; the dataset's
    segmentation of it (the same grid, stored with j the other way) is another image, which is noted."""
    folder = shared_data / "totalsegmentator_examples"
    if not (folder / "dicom_ct").is_dir():
        pytest.skip(f"no DICOM example at {folder}")
    dicom = load_volume(folder / "dicom_ct")
    digest = voxel_digest(dicom.array)
    for name in ("ct.nii.gz", "ct.nrrd"):
        sitk.WriteImage(volume_to_sitk(dicom), str(tmp_path / name))
        copy = load_volume(tmp_path / name)
        assert voxel_digest(copy.array) == digest, name
        assert read_prompts(_log(tmp_path, ImageInfo.from_volume(copy)), image_of(dicom, "dicom_ct")).notes == []
    on_series = _log(tmp_path, ImageInfo.from_volume(dicom), "on_series.json")
    segmentation = load_volume(folder / "dicom_ct_seg.nii.gz")
    file = read_prompts(on_series, image_of(segmentation, "the segmentation"))
    assert file.prompts[0].position != CLICK.position  # moved to the same place in space, and:
    assert len(file.notes) == 1 and "other voxel values than the segmentation" in file.notes[0]
