"""``segassist demo`` never replaces its own inputs, says what the install lacks before the model runs,
and runs on a target too thin for a box drawn around its cross-section."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.demo import SAMPLE_IMAGE, SAMPLE_LABEL, axial_box
from SegAssistLib.files import sha256_file

REPO = Path(__file__).resolve().parents[2]


def test_demo_never_replaces_its_own_label_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    label = out / "segmentation.nii.gz"
    shutil.copyfile(SAMPLE_LABEL, label)
    digest = sha256_file(label)
    for extra in ([], ["--overwrite"]):
        assert main(["demo", "--image", str(SAMPLE_IMAGE), "--label", str(label), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "segmentation.nii.gz is the --label file" in err and "never replaces" in err and err.count("\n") == 1
    assert sha256_file(label) == digest and sorted(p.name for p in out.iterdir()) == ["segmentation.nii.gz"]


def test_demo_never_replaces_its_own_image_through_a_link(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    image = tmp_path / "scan.nii.gz"
    shutil.copyfile(SAMPLE_IMAGE, image)
    (out / "segmentation.nii.gz").symlink_to(image)
    assert main(["demo", "--image", str(image), "--label", str(SAMPLE_LABEL), "--out", str(out), "--overwrite"]) == 2
    assert "is the --image file" in capsys.readouterr().err
    assert sha256_file(image) == sha256_file(SAMPLE_IMAGE)


BLOCK_MATPLOTLIB = textwrap.dedent("""
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "matplotlib":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
    from SegAssistLib.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_demo_without_matplotlib_says_so_before_any_session_runs(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, "demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "needs matplotlib" in done.stderr and "segassist[evaluation]" in done.stderr
    assert "Dice" not in done.stdout and "model" not in done.stdout  # no model loaded, no session run
    assert not out.exists()


def test_the_box_around_a_thin_cross_section_is_widened_within_the_image():
    line = np.zeros((6, 7, 8), bool)
    line[1:4, 2, 5] = True  # along k: its axial cross-section is one voxel
    box = axial_box(line)
    assert box.is_2d and box.min_corner == (4.0, 1.0, 1.0) and box.max_corner == (6.0, 3.0, 1.0)
    edge = np.zeros((6, 7, 8), bool)
    edge[2, 0, 0] = True  # at the image's corner: widened inwards only
    box = axial_box(edge)
    assert box.min_corner == (0.0, 0.0, 2.0) and box.max_corner == (1.0, 1.0, 2.0)
    row = np.zeros((6, 7, 8), bool)
    row[3, 4, 1:6] = True  # one row: widened along j alone
    assert axial_box(row).min_corner == (1.0, 3.0, 3.0) and axial_box(row).max_corner == (5.0, 5.0, 3.0)


def test_demo_on_a_thin_target_runs_both_sessions_and_writes_its_outputs(tmp_path, shipped_checkpoint, capsys):
    reference = sitk.ReadImage(str(SAMPLE_LABEL))
    array = np.zeros_like(sitk.GetArrayFromImage(reference))
    array[15:19, 25, 17] = 1  # a 4-voxel line along k
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(reference)
    sitk.WriteImage(label, str(tmp_path / "line.nii.gz"))
    out = tmp_path / "demo"
    argv = ["demo", "--image", str(SAMPLE_IMAGE), "--label", str(tmp_path / "line.nii.gz"), "--labels", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "box+" in printed and "final Dice" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "overlay.png", "prompts.json", "segmentation.nii.gz", "segmentation.seg.nrrd", "summary.json"]
