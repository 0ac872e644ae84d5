"""The quick-start demo runs end to end on the bundled model and sample."""

import json
import re

import numpy as np
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.demo import SAMPLE_IMAGE
from SegAssistLib.image import Volume
from SegAssistLib.io import save_mask_nifti
from SegAssistLib.prompts import PromptLog


def test_demo_writes_every_output(tmp_path, shipped_checkpoint):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    kinds = [row["prompt"] for row in summary["interactions"]]
    assert kinds[0] == "point+" and "box+" in kinds and "scribble+" in kinds
    assert all(row["latency_s"] > 0 for row in summary["interactions"])
    seg = sitk.ReadImage(str(out / "segmentation.seg.nrrd"))
    nii = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    assert seg.GetSize() == image.GetSize() == nii.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(nii))
    assert seg.GetMetaData("Segment0_Name") == "hippocampus"
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert PromptLog.load(out / "prompts.json").prompts
    assert summary["final_dice"] > 0.5
    assert sorted(p.name for p in out.iterdir()) == [  # every file whole, no temporary left
        "overlay.png", "prompts.json", "segmentation.nii.gz", "segmentation.seg.nrrd", "summary.json"]


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.nii.gz")
    assert main(["demo", "--out", str(tmp_path), "--image", missing, "--label", missing]) == 2
    assert "image file not found" in capsys.readouterr().err
    # an image of one's own without its label once ran against the bundled sample's label
    assert main(["demo", "--out", str(tmp_path), "--image", missing]) == 2
    assert "--image needs --label" in capsys.readouterr().err


def test_demo_checks_its_inputs_and_output_before_the_model_runs(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    other_grid = tmp_path / "small.nii.gz"
    save_mask_nifti(np.ones((3, 4, 5), np.uint8), Volume(np.zeros((3, 4, 5), np.float32)), other_grid)
    cases = [
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--labels", "abc"], "give label values separated by commas"),
        (["--labels", "0"], "label values are 1 or more"),
        (["--labels", "7"], "holds none of the values 7"),
        (["--label", str(other_grid)], "--label needs --image"),
        (["--image", str(SAMPLE_IMAGE), "--label", str(other_grid)], r"has shape \(3, 4, 5\)"),
    ]
    for argv, message in cases:
        out = [] if argv[0] == "--out" else ["--out", str(tmp_path / "o")]
        assert main(["demo", *out, *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_a_subcommand_whose_module_breaks_shows_the_error_instead_of_vanishing(monkeypatch):
    import sys

    import pytest

    from SegAssistLib.cli import build_parser

    monkeypatch.delitem(sys.modules, "SegAssistLib.learning.cli", raising=False)
    monkeypatch.setitem(sys.modules, "SegAssistLib.learning.registry", None)  # as if it failed to import
    with pytest.raises(ImportError, match="SegAssistLib.learning.registry"):
        build_parser()
