"""Training packs: lossless intensity encoding, and sampling from a pack gives exactly the patches the
original cases give."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from training_fixtures import brats_like_folder

from SegAssistLib.training import pack
from SegAssistLib.training.data import load_training_cases, sample_patch


@pytest.mark.parametrize(
    "array, stored",
    [
        (np.arange(-500, 500, dtype=np.float32).reshape(10, 10, 10), "image"),  # integers: int16
        (np.linspace(-1, 5, 200, dtype=np.float32)[np.arange(1000) % 200].reshape(10, 10, 10), "image_index"),
        (np.linspace(-1, 5, 3000, dtype=np.float32)[np.arange(3000)].reshape(10, 15, 20), "image_index"),
        (np.random.default_rng(0).normal(size=(40, 40, 50)).astype(np.float32), "image"),  # many values
        (np.full((4, 4, 4), 70000.0, np.float32), "image_index"),  # integer but past int16
    ],
)
def test_encoding_is_lossless_and_small(array, stored):
    arrays = pack.encode_image(array)
    assert stored in arrays
    decoded = pack.decode_image(arrays)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, array)
    if stored == "image_index":
        assert arrays["image_index"].dtype == (np.uint8 if len(np.unique(array)) <= 256 else np.uint16)


def test_encoding_rejects_nan():
    array = np.zeros((3, 3, 3), np.float32)
    array[1, 1, 1] = np.nan
    with pytest.raises(pack.PackError, match="NaN"):
        pack.encode_image(array)


@pytest.fixture(scope="module")
def small_data_root(shared_data: Path, tmp_path_factory) -> Path:
    """Two training-split datasets, a few cases each: Sunnybrook (the pack crops its volumes) and hippocampus."""
    root = tmp_path_factory.mktemp("data")
    picks = {
        "sunnybrook": ["SCD0000201_phase07", "SCD0000301_phase20"],
        "hippocampus": ["hippocampus_003", "hippocampus_004"],
    }
    for dataset, names in picks.items():
        src, dst = shared_data / dataset, root / dataset
        (dst / "imagesTr").mkdir(parents=True)
        (dst / "labelsTr").mkdir()
        shutil.copy(src / "dataset.json", dst / "dataset.json")
        for name in names:
            for image in sorted((src / "imagesTr").glob(f"{name}*")):
                shutil.copy(image, dst / "imagesTr" / image.name)
            shutil.copy(src / "labelsTr" / f"{name}.nii.gz", dst / "labelsTr" / f"{name}.nii.gz")
    return root


def test_sampling_from_a_pack_gives_the_same_patches(small_data_root: Path, tmp_path: Path):
    summary = pack.write_pack(small_data_root, tmp_path / "pack", progress=lambda _: None)
    assert summary.cases == {"sunnybrook": 2, "hippocampus": 2}
    assert summary.packed_voxels < summary.source_voxels  # the Sunnybrook volumes were cropped
    original = load_training_cases(small_data_root)
    packed = load_training_cases(tmp_path / "pack", patch=64)
    assert sorted(original) == sorted(packed)
    for dataset in original:
        for full, cut in zip(original[dataset], packed[dataset]):
            assert (full.name, full.modality, full.targets) == (cut.name, cut.modality, cut.targets)
            assert full.spacing_kji == cut.spacing_kji
            for target in full.targets:
                for seed in range(4):
                    a = sample_patch(full, target, np.random.default_rng(seed), 64)
                    b = sample_patch(cut, target, np.random.default_rng(seed), 64)
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert np.array_equal(a[0].numpy(), b[0].numpy()), (full.name, target, seed)
                        assert np.array_equal(a[1], b[1])


def test_pack_errors_are_clear(small_data_root: Path, tmp_path: Path):
    out = tmp_path / "pack"
    pack.write_pack(small_data_root, out, datasets=["hippocampus"], progress=lambda _: None)
    with pytest.raises(pack.PackError, match="not empty"):
        pack.write_pack(small_data_root, out, progress=lambda _: None)
    for other in (96, 56):  # a smaller patch too: it can need the next zoom level, past the packed box
        with pytest.raises(pack.PackError, match=f"packed for a network patch of 64 voxels; this network's patch "
                                                 f"is {other}: pack the data again with --patch {other}"):
            load_training_cases(out, patch=other)
    entry = json.loads((out / pack.MANIFEST).read_text())["datasets"]["hippocampus"][0]
    whole = (out / entry["file"]).read_bytes()
    (out / entry["file"]).write_bytes(whole[: len(whole) // 2])  # cut short in transfer: once a BadZipFile traceback
    with pytest.raises(pack.PackError, match="cannot read packed case"):
        load_training_cases(out)
    (out / entry["file"]).write_bytes(b"not an archive")
    with pytest.raises(pack.PackError, match="cannot read packed case"):
        load_training_cases(out)
    (out / pack.MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(pack.PackError, match="not a SegAssist training pack"):
        load_training_cases(out)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    refused = [
        ((tmp_path / "nope", tmp_path / "p1"), {}, "data folder not found"),
        ((small_data_root, a_file), {}, "is a file"),
        ((small_data_root, tmp_path / "p2"), {"patch": 0}, "from 8 to 512 voxels"),
        ((small_data_root, tmp_path / "p2"), {"patch": 100_000}, "from 8 to 512 voxels"),
        ((small_data_root, tmp_path / "p3"), {"datasets": ["hippocampus", "nosuch"]}, "no training cases of nosuch"),
        ((tmp_path / "empty",), {}, "no training cases found"),
    ]
    (tmp_path / "empty").mkdir()
    for paths, options, message in refused:
        target = paths[1] if len(paths) > 1 else tmp_path / "p4"
        with pytest.raises(pack.PackError, match=message):
            pack.write_pack(paths[0], target, progress=lambda _: None, **options)
        assert target == a_file or not target.exists()  # nothing left behind


def test_a_pack_holding_cases_that_are_evaluation_cases_now_is_refused(small_data_root: Path, tmp_path: Path,
                                                                          monkeypatch):
    """A pack made before the split changed (as aorta_crop's did) would go on training on cases
    that are held out now: the pack does not record which split it was cut with."""
    out = tmp_path / "pack"
    pack.write_pack(small_data_root, out, datasets=["hippocampus"], progress=lambda _: None)
    packed = [e["name"] for e in json.loads((out / pack.MANIFEST).read_text())["datasets"]["hippocampus"]]
    from SegAssistLib import datasets

    real = datasets.load_splits()
    monkeypatch.setattr(datasets, "load_splits", lambda: {**real, "hippocampus": real["hippocampus"] + packed[:1]})
    with pytest.raises(pack.PackError, match=f"evaluation split \\({packed[0]}"):
        load_training_cases(out)


def test_a_folder_of_packs_reads_as_one(small_data_root: Path, tmp_path: Path):
    """A pack too large to travel at once is written as several packs into one folder."""
    whole = load_training_cases(pack.write_pack(small_data_root, tmp_path / "whole", progress=lambda _: None).folder)
    for part, dataset in (("a", "hippocampus"), ("b", "sunnybrook")):
        pack.write_pack(small_data_root, tmp_path / "parts" / part, datasets=[dataset], progress=lambda _: None)
    parts = load_training_cases(tmp_path / "parts")
    assert list(parts) == list(whole) == ["hippocampus", "sunnybrook"]
    for dataset in whole:
        for x, y in zip(whole[dataset], parts[dataset]):
            assert x.name == y.name and np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels)
    assert list(load_training_cases(tmp_path / "parts", datasets=["sunnybrook"])) == ["sunnybrook"]
    pack.write_pack(small_data_root, tmp_path / "parts" / "c", datasets=["sunnybrook"], progress=lambda _: None)
    with pytest.raises(pack.PackError, match="sunnybrook is in more than one pack"):
        load_training_cases(tmp_path / "parts")


def test_training_from_a_pack_needs_neither_simpleitk_nor_fastapi(small_data_root: Path, tmp_path: Path):
    """What a GPU machine with only torch, MONAI and pydantic runs: ``python -m SegAssistLib.training``."""
    pack.write_pack(small_data_root, tmp_path / "pack", patch=24, progress=lambda _: None)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "data_root": str(tmp_path / "pack"), "synthetic_share": 0.0,
        "network": {"channels": [4, 8], "strides": [2], "patch_size": 24},
        "batch_size": 2, "minutes": 5, "max_steps": 2, "loader_workers": 1, "max_correction_rounds": 1,
    }))
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('SimpleITK', 'fastapi', 'uvicorn')]; "
    run = subprocess.run(
        [sys.executable, "-c", blocked + "import runpy; runpy.run_module('SegAssistLib.training', run_name='__main__')",
         "train", "--out", str(tmp_path / "run"), "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "'hippocampus': 2, 'sunnybrook': 2" in run.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_root"] == str(tmp_path / "pack")
    assert (tmp_path / "run" / "model.pt").is_file()


def test_training_reads_the_chosen_channel_of_a_4d_image_file(tmp_path, capsys):
    """An MSD-style 4D file (every channel in one file) gave a 4D array that failed the shape check
    against its label: the case was dropped without a word and the run trained on synthetic data."""
    import SimpleITK as sitk

    folder, flair, labels = brats_like_folder(tmp_path)
    channels = [sitk.GetImageFromArray(flair), sitk.GetImageFromArray(flair * 2 + 5)]
    for name, label in (("brats_new_1", labels), ("brats_new_2", labels[:, :, :20])):  # _2: another grid
        sitk.WriteImage(sitk.JoinSeries(channels), str(folder / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / f"{name}.nii.gz"))
    loaded = load_training_cases(tmp_path)
    (case,) = loaded["brats"]
    assert case.name == "brats_new_1" and np.array_equal(case.image, flair)  # channel 0, as evaluation reads it
    assert "skipped training case brats_new_2: label grid" in capsys.readouterr().out


def test_a_pack_serves_only_the_patch_it_was_packed_for(tmp_path: Path, capsys):
    """A smaller network patch can need the next zoom level, whose window runs past the box packed
    for the larger patch: the patches were not those of the original case (docs promised they were)."""
    import SimpleITK as sitk

    from SegAssistLib.cli import main

    folder = tmp_path / "data" / "hippocampus"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 1000, size=(200, 40, 40)).astype(np.int16)  # long along axis 0
    labels = np.zeros(image.shape, np.uint8)
    labels[76:125, 15:26, 15:26] = 1
    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / "hippocampus_003.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labelsTr" / "hippocampus_003.nrrd"))
    pack.write_pack(tmp_path / "data", tmp_path / "pack", patch=64, progress=lambda _: None)
    full = load_training_cases(tmp_path / "data")["hippocampus"][0]
    packed = load_training_cases(tmp_path / "pack", patch=64)["hippocampus"][0]
    for seed in range(20):
        a = sample_patch(full, full.targets[0], np.random.default_rng(seed), 64)
        b = sample_patch(packed, packed.targets[0], np.random.default_rng(seed), 64)
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a[0].numpy(), b[0].numpy()) and np.array_equal(a[1], b[1])
    with pytest.raises(pack.PackError, match="packed for a network patch of 64 voxels; this network's patch is 56"):
        load_training_cases(tmp_path / "pack", patch=56)
    # the training command says so before the run folder is made, not from the loader
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_root": str(tmp_path / "pack"), "max_steps": 1, "loader_workers": 0,
                                  "network": {"channels": [4, 8], "strides": [2], "patch_size": 56}}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "pack the data again with --patch 56" in err and not (tmp_path / "run").exists()


def test_a_pack_of_a_renamed_copy_keeps_its_original_split(hippocampus_dir: Path, tmp_path: Path, monkeypatch):
    """The pack holds training cases only: without a record of the split they were cut with, a
    renamed copy of a dataset counted as evaluation whole and its pack was refused, saying it held
    evaluation cases."""
    from SegAssistLib import datasets

    folder = tmp_path / "data" / "hippo_copy"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    evaluation = datasets.load_splits()["hippocampus"][0]
    for name in ("hippocampus_003", "hippocampus_004", evaluation):  # the evaluation case tells the dataset
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(hippocampus_dir / sub / f"{name}.nii.gz", folder / sub / f"{name}.nii.gz")
    assert [c.name for c in load_training_cases(tmp_path / "data")["hippo_copy"]] == [
        "hippocampus_003", "hippocampus_004"]
    out = pack.write_pack(tmp_path / "data", tmp_path / "pack", patch=24, progress=lambda _: None).folder
    assert [c.name for c in load_training_cases(out, patch=24)["hippo_copy"]] == ["hippocampus_003", "hippocampus_004"]
    manifest = json.loads((out / pack.MANIFEST).read_text())
    assert manifest["split_of"] == {"hippo_copy": "hippocampus"}
    # evaluation cases still never train: the original's split is the one checked
    real = datasets.load_splits()
    with monkeypatch.context() as m:
        m.setattr(datasets, "load_splits", lambda: {**real, "hippocampus": real["hippocampus"] + ["hippocampus_004"]})
        with pytest.raises(pack.PackError, match="evaluation split \\(hippocampus_004"):
            load_training_cases(out)
    # a pack that does not record it (made before packs did) is refused with the true reason
    del manifest["split_of"]
    (out / pack.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(pack.PackError, match="hippo_copy, a dataset Resources/splits.json does not list, and does "
                                             "not record which known dataset's split"):
        load_training_cases(out)
