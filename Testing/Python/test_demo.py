"""The quick-start demo runs end to end on the bundled model and sample."""

import json

import numpy as np
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.demo import SAMPLE_IMAGE
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


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--image", str(tmp_path / "missing.nii.gz")]) == 2
    assert "image file not found" in capsys.readouterr().err
