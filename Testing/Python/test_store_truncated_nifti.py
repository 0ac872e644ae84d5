"""A NIfTI file cut short is refused, naming the file: ITK's NIfTI reader filled the missing voxels with
zeros and reported nothing, so a truncated scan became a case and a truncated mask a submitted label.
A whole file (one gzip member or several, compressed or not) still reads as before."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.learning.datastore import Datastore

HIPPO = Path("/work/shared/data/hippocampus/imagesTr/hippocampus_001.nii.gz")
SHAPE = (12, 14, 16)


def write(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(volume_to_sitk(Volume(array, spacing=(1.0, 1.0, 1.5))), str(path))
    return path


def cut(source: Path, dest: Path, fraction: float) -> Path:
    data = source.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def image_array(dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(SHAPE) * 1000).astype(dtype)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_truncated_nifti_is_refused_naming_the_file(tmp_path: Path, suffix: str, dtype):
    whole = write(tmp_path / f"whole{suffix}", image_array(dtype))
    short = cut(whole, tmp_path / f"short{suffix}", 0.6)
    with pytest.raises(ImageError) as caught:
        load_volume(short)
    message = str(caught.value)
    assert message.startswith(f"cannot read {short}: the file is truncated") and "\n" not in message, message
    assert np.array_equal(load_volume(whole).array, image_array(dtype))  # a whole file: as before


def test_the_real_hippocampus_scan_cut_short_is_refused(tmp_path: Path):
    if not HIPPO.is_file():
        pytest.skip("shared data not present")
    short = cut(HIPPO, tmp_path / "hippo_trunc.nii.gz", 0.6)
    with pytest.raises(ImageError, match="hippo_trunc.nii.gz: the file is truncated"):
        load_volume(short)
    assert load_volume(HIPPO).array.shape == (35, 51, 35)


def test_a_whole_nifti_of_several_gzip_members_still_reads(tmp_path: Path):
    """gzip allows several members (concatenated files): the trailer then records the last one's length
    only, so the whole stream is counted, and found whole."""
    plain = write(tmp_path / "plain.nii", image_array())
    data = plain.read_bytes()
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(load_volume(members).array, image_array())
    short = cut(members, tmp_path / "members_short.nii.gz", 0.7)
    with pytest.raises(ImageError, match="the file is truncated"):
        load_volume(short)


def random_mask() -> np.ndarray:
    """A mask that compresses little: cut in half, its header is still whole."""
    return (np.random.default_rng(5).random(SHAPE) > 0.5).astype(np.uint8)


def test_a_truncated_mask_is_refused(tmp_path: Path):
    labels = random_mask()
    whole = write(tmp_path / "mask.nii.gz", labels)
    short = cut(whole, tmp_path / "mask_short.nii.gz", 0.5)
    with pytest.raises(ImageError, match="mask_short.nii.gz: the file is truncated"):
        load_mask(short)


def test_import_skips_a_truncated_scan_and_learn_save_refuses_a_truncated_mask(tmp_path: Path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    whole = write(source / "scan.nii.gz", image_array())
    cut(whole, tmp_path / "short.nii.gz", 0.6).replace(source / "scan_short.nii.gz")
    store_root = tmp_path / "store"
    assert main(["learn", "import", str(source), "--store", str(store_root), "--user", "admin", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["added"]] == ["scan"]
    assert [(Path(s["source"]).name, "the file is truncated" in s["reason"]) for s in report["skipped"]] == [
        ("scan_short.nii.gz", True)
    ]

    with Datastore(store_root, create=False) as store:
        case = store.list_cases()[0]
        reference = store.reference_geometry(case.id)
    labels = random_mask()
    mask_file = tmp_path / "mask.nii.gz"
    sitk.WriteImage(volume_to_sitk(reference, labels), str(mask_file))
    short_mask = cut(mask_file, tmp_path / "mask_short.nii.gz", 0.5)
    code = main(["learn", "save", case.id, str(short_mask), "--store", str(store_root), "--user", "alice"])
    err = capsys.readouterr().err
    assert code == 2 and "mask_short.nii.gz: the file is truncated" in err, err
    with Datastore(store_root, create=False) as store:
        assert store.label_versions(case.id) == []
