"""The Slicer batch script (``Resources/Examples/batch_segment.py``) writes --out as ``segassist segment``
does: an existing file only with --overwrite, and never the image itself. It replaced both without a
word: ``--image scan.nrrd --out scan.nrrd`` left the uint8 mask where the scan was, and exit 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = ROOT / "Resources" / "Examples" / "hippocampus_001_prompts.json"


def _example_module():
    path = ROOT / "Resources" / "Examples" / "batch_segment.py"
    spec = importlib.util.spec_from_file_location("segassist_batch_example_outputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(image: Path, out: Path, *extra: str) -> int:
    return _example_module().main(["--image", str(image), "--prompts", str(SAMPLE_PROMPTS), "--out", str(out),
                                   "--in-process", "--threads", "1", *extra])  # fmt: skip


def test_the_scan_given_as_out_is_never_replaced(tmp_path, capsys):
    import SimpleITK as sitk

    scan = tmp_path / "scan.nrrd"  # the usual Slicer format, which the script accepts as --out
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE)), str(scan))
    before = scan.read_bytes()
    (tmp_path / "sub").mkdir()
    for out, extra, message in [
        (scan, (), f"--out is the image itself: {scan}"),  # said first: --overwrite would not help
        (scan, ("--overwrite",), f"--out is the image itself: {scan}"),
        (tmp_path / "sub" / ".." / "scan.nrrd", ("--overwrite",), "--out is the image itself"),
    ]:
        assert _run(scan, out, *extra) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert scan.read_bytes() == before


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, capsys, shipped_checkpoint):
    out = tmp_path / "bs.seg.nrrd"
    out.write_bytes(b"an earlier segmentation")
    # refused before the image is read: this one does not exist
    assert _run(tmp_path / "no-such-image.nrrd", out) == 1
    err = capsys.readouterr().err
    assert f"--out {out} exists: add --overwrite to replace it" in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"an earlier segmentation"

    assert _run(SAMPLE, out, "--overwrite") == 0, capsys.readouterr().err
    assert out.read_bytes() != b"an earlier segmentation" and f"wrote {out}" in capsys.readouterr().out
