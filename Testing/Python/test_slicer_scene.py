"""The headless scene helper: module logics, slicer.util globals, slice nodes."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import add_volume, affine, oblique_ijk_to_ras, random_volume

from SegAssistLib.errors import SegAssistError

slicer = pytest.importorskip("slicer")
from SegAssistLib.slicer import segments  # noqa: E402
from SegAssistLib.slicer.scene import add_slice_node, create_headless_scene, install_util_globals  # noqa: E402


def test_context_registers_the_module_logics_and_closes_cleanly():
    with create_headless_scene() as ctx:
        assert set(ctx.logics) == {"Colors", "Volumes", "Segmentations", "SubjectHierarchy", "Markups"}
        for name, logic in ctx.logics.items():
            assert ctx.app_logic.GetModuleLogic(name) is logic
            assert logic.GetMRMLScene() is ctx.scene
        assert ctx.segmentations_logic is ctx.logics["Segmentations"]
        volume = add_volume(ctx.scene, random_volume(), oblique_ijk_to_ras())
        seg = segments.create_segmentation(ctx.scene, volume)
        assert segments.add_segment(seg, "liver")  # needs the Segmentations logic on the scene
        scene = ctx.scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_util_globals_let_slicer_util_helpers_run_headless(monkeypatch):
    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)  # restored after the test
    monkeypatch.setattr(slicer, "modules", None, raising=False)
    with create_headless_scene() as ctx:
        install_util_globals(ctx)
        assert slicer.mrmlScene is ctx.scene
        assert slicer.modules.segmentations.logic() is ctx.segmentations_logic
        volume = add_volume(ctx.scene, random_volume((6, 7, 8)), affine(np.diag([-1.0, -1.0, 2.0]), (3, 4, 5)))
        seg = segments.create_segmentation(ctx.scene, volume)
        sid = segments.add_segment(seg, "a")
        mask = np.zeros((6, 7, 8), np.uint8)
        mask[1:4, 2:6, 3:7] = 1
        segments.array_to_segment(mask, seg, sid, volume)
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume), mask)
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    with pytest.raises(SegAssistError, match="headless"):
        install_util_globals(ctx)


def test_slice_nodes_by_name_or_normal():
    with create_headless_scene() as ctx:
        red = add_slice_node(ctx.scene, "Sagittal", (100, 80), (50.0, 40.0), center_ras=(1, 2, 3))
        assert red.GetOrientation() == "Sagittal"
        assert np.allclose(red.GetXYToRAS().MultiplyPoint((50, 40, 0, 1))[:3], (1, 2, 3))
        same = add_slice_node(ctx.scene, "Axial", layout_name="Red")
        assert same is red and red.GetOrientation() == "Axial"
        green = add_slice_node(ctx.scene, (0.0, 0.6, 0.8), layout_name="Green")
        normal = np.array([green.GetSliceToRAS().GetElement(r, 2) for r in range(3)])
        assert np.allclose(normal, (0.0, 0.6, 0.8))
        with pytest.raises(SegAssistError, match="orientation"):
            add_slice_node(ctx.scene, "Diagonal", layout_name="Yellow")
        with pytest.raises(SegAssistError, match="normal"):
            add_slice_node(ctx.scene, (0.0, 0.0, 0.0), layout_name="Yellow")


def test_a_headless_scene_starts_on_windows_where_os_has_no_getuid(monkeypatch):
    """Resources/Examples/batch_segment.py outside the Slicer application on Windows: the per-user
    Slicer home was named after os.getuid(), which Windows lacks (AttributeError)."""
    import os
    import tempfile
    from pathlib import Path

    monkeypatch.delattr(os, "getuid")
    monkeypatch.setenv("USERNAME", "Dr. Jane/Doe")  # getpass.getuser() reads it on Windows
    for name in ("LOGNAME", "USER", "LNAME"):
        monkeypatch.delenv(name, raising=False)
    with create_headless_scene() as ctx:
        assert ctx.scene is not None
    home = Path(tempfile.gettempdir()) / "segassist-slicer-home-Dr._Jane_Doe"  # a plain folder name
    assert (home / "share" / "ColorFiles").is_dir()
