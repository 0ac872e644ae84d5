"""The module's Qt-free decisions: prompts from the markups picked in the panel, batch writes as
Segment Editor undo steps, the status line of a run being cancelled, and packages installed from the
module found without restarting Slicer. Real MRML (slicer-core); the batch writes with the real
built-in engine on a tiny network.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mrml_fixtures import add_volume, affine, editor_modules, random_volume

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import PointPrompt

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import segments  # noqa: E402
from SegAssistLib.slicer.dependencies import import_again, missing_packages, pip_ensure_installer  # noqa: E402
from SegAssistLib.slicer.logic import EngineRun, collect_prompts, segment_volume, write_result  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402
from SegAssistLib.slicer.worker import progress_status  # noqa: E402

SHAPE = (10, 12, 14)
EFFECT_FILE = Path(__file__).resolve().parents[2] / "SegAssist" / "SegAssistEffect" / "SegmentEditorEffect.py"


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _volume(ctx):
    return add_volume(ctx.scene, random_volume(SHAPE), affine(np.eye(3), (0, 0, 0)), "v")


# ---- markups picked in the panel --------------------------------------------------------------------
def test_an_empty_point_list_beside_an_roi_gives_the_roi_box(ctx):
    volume = _volume(ctx)
    points = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")  # the selector's new, empty list
    roi = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenterWorld(6, 5, 4)
    roi.SetSize(4, 4, 4)
    expected = collect_prompts([roi], volume)
    assert [p.kind for p in expected] == ["box"]
    assert collect_prompts([points, roi], volume) == expected
    assert collect_prompts([roi, points], volume) == expected
    curve = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "C")
    assert collect_prompts([points, curve, PointPrompt(position=(3, 3, 3))], volume) == [
        PointPrompt(position=(3, 3, 3))
    ]
    # nothing gives a prompt: refused, naming what is empty
    with pytest.raises(PromptError, match="'F' has no placed control points"):
        collect_prompts([points], volume)
    with pytest.raises(PromptError, match="'F', 'C' have no placed control points"):
        collect_prompts([points, curve], volume)
    points.AddControlPointWorld(2, 3, 4, "inside")
    assert [p.kind for p in collect_prompts([points, roi], volume)] == ["point", "box"]


# ---- batch writes and the Segment Editor's undo -----------------------------------------------------
def test_a_scripted_segmentation_is_one_undo_step_of_the_editor_editing_it(ctx, tiny_checkpoint, monkeypatch):
    """SegAssistLogic.segment and segmentFromFile write through segment_volume: the user's next Ctrl+Z
    in the Segment Editor takes the result away, not also their own stroke before it."""
    from SegAssistLib.engine.builtin import load_default_engine

    volume = _volume(ctx)
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    segments.add_segment(seg, "liver", segment_id="liver")
    editor = segments.SegmentEditor(seg, volume)  # the Segment Editor editing this segmentation
    modules = editor_modules(editor)
    monkeypatch.setattr(slicer, "modules", modules, raising=False)  # where save_editor_undo_state looks
    stroke = np.zeros(SHAPE, np.uint8)
    stroke[1:3, 1:3, 1:3] = 1
    editor.write("liver", MaskUpdate((0, 0, 0), stroke))  # the user's stroke
    engine = load_default_engine(tiny_checkpoint, device="cpu")
    result = segment_volume(engine, volume, [PointPrompt(position=(7, 6, 5))], segmentation_node=seg)
    assert seg.GetSegmentation().GetSegment(result.segment_id) is not None
    editor.undo()  # Ctrl+Z undoes the scripted result
    assert seg.GetSegmentation().GetSegment(result.segment_id) is None
    assert np.array_equal(segments.segment_to_array(seg, "liver", volume), stroke)  # the stroke stays
    editor.redo()
    assert np.array_equal(segments.segment_to_array(seg, result.segment_id, volume), result.mask)
    editor.close()


def test_write_result_saves_the_undo_state_before_it_changes_the_segmentation(ctx):
    volume = _volume(ctx)
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    seen = []

    def save_undo(node):  # the segmentation as it was when the state was saved
        seen.append((node, node.GetSegmentation().GetNumberOfSegments()))

    result = write_result(EngineRun(mask, None, "m", []), volume, segmentation_node=seg, save_undo=save_undo)
    assert seen == [(seg, 0)] and result.segmentation_node is seg
    new = write_result(EngineRun(mask, None, "m", []), volume, save_undo=save_undo)  # a new segmentation
    assert len(seen) == 1 and new.segmentation_node is not seg


# ---- a run being cancelled ------------------------------------------------------------------------
def test_the_progress_of_a_run_being_cancelled_says_so():
    assert progress_status("Segmenting: prompt 1 of 2", False) == "Segmenting: prompt 1 of 2"
    assert progress_status("Segmenting: prompt 1 of 2", True) == "Segmenting: prompt 1 of 2 (cancelling)"
    assert progress_status("", True) == "Cancelling after the current step..."
    assert progress_status("Lädt", True, "Abbruch...", " (bricht ab)") == "Lädt (bricht ab)"


# ---- packages installed from the module -------------------------------------------------------------
def test_a_package_installed_after_a_failed_import_is_imported_without_a_restart(tmp_path, monkeypatch):
    name = "segassist_dependency_probe"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    loaded = {}

    def load():
        loaded["module"] = __import__(name)

    assert missing_packages({name: f"{name}>=1"}) == [f"{name}>=1"]
    error = import_again(load)
    assert isinstance(error, ImportError) and name in str(error) and "module" not in loaded
    (tmp_path / name).mkdir()  # pip installs it (the folder was listed, and found empty, before)
    (tmp_path / name / "__init__.py").write_text("VALUE = 42\n")
    assert missing_packages({name: f"{name}>=1"}) == []
    assert import_again(load) is None and loaded["module"].VALUE == 42


def test_the_effect_imports_again_when_activated():
    """The effect (Qt: not imported here) retries its imports in activate() while they fail."""
    tree = ast.parse(EFFECT_FILE.read_text())
    effect = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    activate = next(n for n in effect.body if isinstance(n, ast.FunctionDef) and n.name == "activate")
    calls = [ast.unparse(n) for n in ast.walk(activate) if isinstance(n, ast.Call)]
    assert "import_again(_loadLibrary)" in calls
    assert any(c.startswith("PromptState(") for c in calls)  # what depends on them is made then


def test_slicer_packaging_pip_ensure_is_used_when_slicer_has_it():
    calls = []

    class Packaging:  # slicer.packaging of Slicer 5.12
        @staticmethod
        def load_requirements(path):
            return [f"req from {path}"]

        @staticmethod
        def pip_ensure(requirements, requester=None):
            calls.append((requirements, requester))

    def import_module(name):
        assert name == "slicer.packaging"  # imported: `import slicer` does not load the submodule
        return Packaging

    install = pip_ensure_installer(import_module)
    assert install is not None
    install("requirements.txt", "SegAssist")
    assert calls == [(["req from requirements.txt"], "SegAssist")]

    def missing(name):
        raise ModuleNotFoundError(name)

    assert pip_ensure_installer(missing) is None  # an older Slicer: slicer.util.pip_install instead
    assert pip_ensure_installer(lambda name: SimpleNamespace()) is None
