"""The quick-start demo runs end to end on the bundled model and sample."""

import json
import re

import numpy as np
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.demo import SAMPLE_IMAGE, SAMPLE_LABEL
from SegAssistLib.image import Volume
from SegAssistLib.io import save_mask_nifti
from SegAssistLib.prompt_log import PromptLog


def check_prompt_log_names_its_image_and_is_refused_on_another(out, tmp_path, capsys):
    """The demo's prompts.json recorded no image ("image": null): `segassist segment` replayed it on any
    image without a word."""
    log = PromptLog.load(out / "prompts.json")
    image = sitk.ReadImage(str(SAMPLE_IMAGE))
    assert log.image is not None and tuple(log.image.shape_ijk) == image.GetSize()
    assert tuple(log.image.spacing) == image.GetSpacing()
    other = tmp_path / "other.nii.gz"
    save_mask_nifti(np.zeros((20, 30, 40), np.uint8), Volume(np.zeros((20, 30, 40), np.float32)), other)
    capsys.readouterr()
    result = tmp_path / "other_result.nii.gz"
    assert main(["segment", str(other), "--prompts", str(out / "prompts.json"), "--out", str(result)]) == 2
    assert "the prompt log was recorded on an image of [35, 51, 35] voxels" in capsys.readouterr().err
    assert not result.exists()


def test_demo_writes_every_output(tmp_path, shipped_checkpoint, capsys):
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
    check_prompt_log_names_its_image_and_is_refused_on_another(out, tmp_path, capsys)


def test_a_second_run_replaces_the_first_only_with_overwrite(tmp_path, capsys):
    """``demo --out D`` replaced an earlier run's files without a word."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text("an earlier run")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds summary.json of an earlier run: pass --overwrite" in err and err.count("\n") == 1, err
    assert (out / "summary.json").read_text() == "an earlier run"
    # with --overwrite it goes on (to the next check here: no model run needed to show it)
    assert main(["demo", "--out", str(out), "--overwrite", "--labels", "7"]) == 2
    assert "holds none of the values 7" in capsys.readouterr().err




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
        (["--image", str(SAMPLE_IMAGE), "--label", str(other_grid)], r"label grid \(3, 4, 5\) differs"),
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


def test_a_label_of_the_same_shape_elsewhere_is_refused_as_segassist_eval_refuses_it(tmp_path, capsys):
    """The demo compared shapes only and printed Dice against a moved or flipped reference."""
    label = sitk.ReadImage(str(SAMPLE_LABEL))
    moved = tmp_path / "moved.nii.gz"
    label.SetOrigin(tuple(o + 23.0 for o in label.GetOrigin()))
    sitk.WriteImage(label, str(moved))
    flipped = tmp_path / "flipped.nii.gz"
    label = sitk.ReadImage(str(SAMPLE_LABEL))
    label.SetDirection(tuple(-d if n == 0 else d for n, d in enumerate(label.GetDirection())))
    sitk.WriteImage(label, str(flipped))
    for path, what in ((moved, "origin"), (flipped, "direction")):
        argv = ["demo", "--out", str(tmp_path / "o"), "--image", str(SAMPLE_IMAGE), "--label", str(path)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"the label is not on the image's grid: its {what}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_the_segment_is_named_after_the_label_given(tmp_path, shipped_checkpoint):
    """Every run named its segment "hippocampus", whatever structure --image and --label held."""
    label = tmp_path / "liver_seg.nii.gz"
    label.write_bytes(SAMPLE_LABEL.read_bytes())
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--image", str(SAMPLE_IMAGE), "--label", str(label), "--labels", "2"]) == 0
    assert sitk.ReadImage(str(out / "segmentation.seg.nrrd")).GetMetaData("Segment0_Name") == "liver_seg label 2"
    from SegAssistLib.demo import segment_name

    assert segment_name(SAMPLE_LABEL, (1, 2)) == "hippocampus"  # the bundled sample keeps its name
    assert segment_name(tmp_path / "organs.seg.nrrd", (1, 3)) == "organs labels 1+3"


def test_a_label_stored_with_axes_reversed_is_the_reference_itself(tmp_path, capsys, monkeypatch):
    """A label holding the image's grid with i and k stored in reverse order (every voxel at the same place:
    the DICOM CT of ../shared/data and its NIfTI label, j reversed) was refused as "not on the image's grid";
    now it is reversed back: every Dice as with the label as stored by the image. Growcut stands in for the
    model (the label check is the demo's, whatever engine runs)."""
    import SegAssistLib.engine.builtin as builtin
    from SegAssistLib.evaluation.runner import make_engine

    monkeypatch.setattr(builtin, "load_default_engine", lambda model=None: make_engine("growcut", None, "cpu"))
    original = sitk.ReadImage(str(SAMPLE_LABEL))
    size = original.GetSize()
    reversed_ = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(original)[::-1, :, ::-1]))
    reversed_.SetSpacing(original.GetSpacing())
    reversed_.SetOrigin(original.TransformIndexToPhysicalPoint((size[0] - 1, 0, size[2] - 1)))
    direction = np.asarray(original.GetDirection()).reshape(3, 3) * np.array([-1.0, 1.0, -1.0])
    reversed_.SetDirection(direction.ravel().tolist())
    label = tmp_path / "reversed_label.nii.gz"
    sitk.WriteImage(reversed_, str(label))
    summaries = []
    for name, path in (("plain", SAMPLE_LABEL), ("reversed", label)):
        out = tmp_path / name
        argv = ["demo", "--out", str(out), "--image", str(SAMPLE_IMAGE), "--label", str(path)]
        assert main(argv) == 0, capsys.readouterr().err
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert [r["dice"] for r in summaries[0]["interactions"]] == [r["dice"] for r in summaries[1]["interactions"]]
    assert summaries[1]["final_dice"] > 0.5
    reference = sitk.ReadImage(str(tmp_path / "reversed" / "segmentation.nii.gz"))  # on the image's grid
    assert np.allclose(reference.GetOrigin(), sitk.ReadImage(str(SAMPLE_IMAGE)).GetOrigin())
