"""Static checks of the Slicer extension: files read and parsed, never imported (they need Qt).

- every ``self.ui.<name>`` of the module exists in its ``.ui`` file, and the parameter-node
  widgets match the parameter node's fields;
- every script and resource on disk under ``SegAssist/`` is listed in CMake, and every listed
  file exists; the extension's metadata and install rule are there;
- the effect's keys avoid the Segment Editor's and the slice views' keys, and key presses go
  through the shortcut table only;
- module, widget, logic, test and effect classes follow Slicer's templates.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set

import pytest

from SegAssistLib.slicer.shortcuts import SHORTCUTS, Action, help_rows, normalize_key

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "SegAssist"
MODULE_FILE = MODULE_DIR / "SegAssist.py"
EFFECT_FILE = MODULE_DIR / "SegAssistEffect" / "SegmentEditorEffect.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegAssist.ui"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def _bases(cls: ast.ClassDef) -> List[str]:
    return [ast.unparse(b) for b in cls.bases]


def _methods(cls: ast.ClassDef) -> Set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


# ---- the .ui file and the widget ----------------------------------------------------------------
def _ui_widgets() -> Dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _used_ui_names(tree: ast.AST) -> Set[str]:
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def test_every_ui_name_the_module_uses_exists_in_the_ui_file():
    used = _used_ui_names(_tree(MODULE_FILE))
    widgets = _ui_widgets()
    assert len(used) > 20, "the static check found suspiciously few self.ui names"
    missing = sorted(used - set(widgets))
    assert not missing, f"SegAssist.py uses self.ui names that {UI_FILE.name} lacks: {missing}"


def test_ui_file_is_a_qmrmlwidget_and_its_node_selectors_match_the_parameter_node():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "SegAssist"
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    node_class = _class(_tree(MODULE_FILE), "SegAssistParameterNode")
    fields = {n.target.id: ast.unparse(n.annotation) for n in node_class.body if isinstance(n, ast.AnnAssign)}
    assert set(bound) == set(fields), (bound, fields)
    for name, annotation in fields.items():
        expected = "qMRMLNodeComboBox" if annotation.startswith("vtkMRML") else "QLineEdit"
        assert bound[name] == expected, f"{name}: {annotation} bound to a {bound[name]}"
    # every node combo box gets the scene from the top widget
    combos = {n for n, w in _ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    scene_slot = "setMRMLScene(vtkMRMLScene*)"
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == scene_slot}
    assert combos <= receivers, f"node selectors without a scene: {sorted(combos - receivers)}"


# ---- CMake lists against the files on disk ------------------------------------------------------
def _cmake_sets(path: Path) -> Dict[str, List[str]]:
    text = re.sub(r"#[^\n]*", "", path.read_text())
    sets: Dict[str, List[str]] = {}
    for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text):
        sets[name] = body.split()

    def expand(item: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(sets.get(m.group(1), [m.group(0)])), item)

    return {name: [expand(v) for v in values] for name, values in sets.items()}


def _files_under(folder: Path) -> Set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_every_script_and_resource_is_listed_in_cmake_and_every_listed_file_exists():
    sets = _cmake_sets(MODULE_DIR / "CMakeLists.txt")
    assert sets["MODULE_NAME"] == ["SegAssist"]
    scripts, resources = set(sets["MODULE_PYTHON_SCRIPTS"]), set(sets["MODULE_PYTHON_RESOURCES"])
    on_disk = _files_under(MODULE_DIR)
    disk_scripts = {f for f in on_disk if f.endswith(".py")}
    assert scripts == disk_scripts, (
        f"scripts not listed: {sorted(disk_scripts - scripts)}; listed but missing: {sorted(scripts - disk_scripts)}"
    )
    disk_resources = on_disk - disk_scripts
    assert resources == disk_resources, (
        f"resources not listed: {sorted(disk_resources - resources)}; "
        f"listed but missing: {sorted(resources - disk_resources)}"
    )


def test_only_the_module_file_sits_directly_in_the_module_folder():
    # Slicer loads every .py directly in a module folder as a module: helpers belong in a package
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["SegAssist.py"]
    for package in (p for p in MODULE_DIR.iterdir() if p.is_dir() and any(p.glob("*.py"))):
        assert (package / "__init__.py").is_file(), f"{package.name} holds scripts but is not a package"


def test_module_cmake_builds_a_scripted_module_with_generic_tests_and_self_tests():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    testing = (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    for ref in re.findall(r"\$\{SegAssist_SOURCE_DIR\}/([^\s)]+)", testing):
        assert (ROOT / ref).is_file(), f"SegAssist/Testing/CMakeLists.txt refers to a missing file: {ref}"


def test_extension_cmake_has_the_catalog_metadata_and_installs_segassistlib():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(SegAssist\)", text, re.M)
    sets = _cmake_sets(ROOT / "CMakeLists.txt")
    assert " ".join(sets["EXTENSION_CATEGORY"]) == '"Segmentation"'
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert sets.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is not set"
    for key in ("ICONURL", "SCREENSHOTURLS"):  # the catalog shows them: they name files of this repository
        for url in " ".join(sets[f"EXTENSION_{key}"]).strip('"').split():
            path = url.split("/main/", 1)[1]
            assert (ROOT / path).is_file(), f"EXTENSION_{key} points at {path}, which is not in the repository"
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(SegAssist)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    # SegAssistLib goes into qt-scripted-modules (build and install trees), with its data
    assert "SegAssistLib/*.py" in text and "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text
    for resource in sets["SEGASSISTLIB_RESOURCES"]:
        assert (ROOT / resource).is_file(), f"listed for install but missing: {resource}"
    assert "Resources/Models/segassist_unet.pt" in text
    # what the installed package reads (the split: eval/bench), documents (the card) or runs (examples)
    listed = set(sets["SEGASSISTLIB_RESOURCES"])
    assert {"Resources/splits.json", "Resources/Models/MODEL_CARD.md"} <= listed
    examples = {f"Resources/Examples/{p.name}" for p in (ROOT / "Resources" / "Examples").iterdir() if p.is_file()}
    assert examples <= listed, f"examples not installed: {sorted(examples - listed)}"
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and len(licence) > 10000


def test_requirements_files_are_valid():
    packaging = pytest.importorskip("packaging.requirements")
    for name in ("requirements.txt", "requirements-backend.txt"):
        lines = (MODULE_DIR / "Resources" / name).read_text().splitlines()
        reqs = [packaging.Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
        assert reqs, name
    client = {r.name for r in (packaging.Requirement(ln) for ln in _req_lines("requirements.txt"))}
    assert {"pydantic", "requests"} <= client and "torch" not in client  # the client stays torch-free


def _req_lines(name: str) -> List[str]:
    lines = (MODULE_DIR / "Resources" / name).read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith("#")]


# ---- shortcuts -----------------------------------------------------------------------------------
#: SLICER.md: "Keys the Segment Editor already uses: 0-9 and Shift+0-9, Esc, Space, Z/Ctrl+Z,
#: Y/Ctrl+Y, Q/W, / and *, comma and period, < and >, I" - as VTK keysyms, written out here
#: independently of the module's own table.
SEGMENT_EDITOR_KEYSYMS = (
    {str(d) for d in range(10)}
    | {"exclam", "at", "numbersign", "dollar", "percent", "asciicircum", "ampersand", "parenleft", "parenright"}
    | {"Escape", "space", "z", "y", "q", "w", "slash", "asterisk", "comma", "period", "less", "greater", "i"}
)
#: Slicer's slice views (vtkMRMLSliceIntersectionWidget): f/b and arrows browse, r resets the view,
#: g/t toggle label/foreground opacity, v toggles slice visibility, [ ] { } switch volumes.
SLICE_VIEW_KEYSYMS = {"f", "b", "r", "g", "t", "v", "Left", "Right", "Up", "Down"} | {
    "bracketleft",
    "bracketright",
    "braceleft",
    "braceright",
}


def test_effect_shortcuts_avoid_the_segment_editor_and_slice_view_keys():
    for shortcut in SHORTCUTS:
        key = normalize_key(shortcut.key)
        assert key not in SEGMENT_EDITOR_KEYSYMS, f"{shortcut.label} is a Segment Editor key"
        assert key not in SLICE_VIEW_KEYSYMS, f"{shortcut.label} is a slice view key"
    docs = ROOT.parent / "shared" / "docs" / "SLICER.md"
    if docs.is_file():
        line = next(ln for ln in docs.read_text().splitlines() if "Keys the Segment Editor already uses" in ln)
        assert "0-9" in line and "Esc" in line  # the list above still matches the conventions file


def test_effect_reads_keys_only_through_the_shortcut_table():
    tree = _tree(EFFECT_FILE)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("GetKeySym")]
    assert calls, "the effect does not read keys at all"
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for call in calls:
        outer = parents[call]
        while isinstance(outer, ast.BoolOp):  # GetKeySym() or ""
            outer = parents[outer]
        assert isinstance(outer, ast.Call) and ast.unparse(outer.func) == "resolve_key", (
            f"line {call.lineno}: a key is read outside resolve_key(): {ast.unparse(outer)}"
        )
    for node in ast.walk(tree):  # no key literal compared by hand
        if isinstance(node, ast.Compare) and "GetKeySym" in ast.unparse(node):
            raise AssertionError(f"line {node.lineno}: key compared by hand: {ast.unparse(node)}")


def test_every_shortcut_is_shown_in_help_and_tooltips():
    text = " ".join(keys for keys, _ in help_rows())
    assert all(s.label in text for s in SHORTCUTS)
    for path in (MODULE_FILE, EFFECT_FILE):
        assert "help_rows()" in path.read_text(), f"{path.name} does not build its help from the shortcut table"
    effect = EFFECT_FILE.read_text()
    for action in (Action.UNDO, Action.REDO, Action.RESET, Action.ACCEPT, Action.POSITIVE, Action.NEGATIVE):
        assert f"Action.{action.name}" in effect


# ---- Slicer's templates -------------------------------------------------------------------------
def test_module_follows_the_scripted_module_template():
    tree = _tree(MODULE_FILE)
    assert _bases(_class(tree, "SegAssist")) == ["ScriptedLoadableModule"]
    assert _bases(_class(tree, "SegAssistWidget")) == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert _bases(_class(tree, "SegAssistLogic")) == ["ScriptedLoadableModuleLogic"]
    assert _bases(_class(tree, "SegAssistTest")) == ["ScriptedLoadableModuleTest"]
    assert {"setup", "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose"} <= _methods(
        _class(tree, "SegAssistWidget")
    )
    test = _class(tree, "SegAssistTest")
    run = next(n for n in test.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    called = {ast.unparse(n.func).split(".")[-1] for n in ast.walk(run) if isinstance(n, ast.Call)}
    tests = {m for m in _methods(test) if m.startswith("test_")}
    assert tests and tests <= called, f"self-tests not run by runTest: {sorted(tests - called)}"
    # metadata only at load: the library is imported inside functions, never at module level
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert not (module or "").startswith(("SegAssistLib", "torch", "monai")), ast.unparse(node)
    module_init = next(n for n in _class(tree, "SegAssist").body if isinstance(n, ast.FunctionDef))
    text = ast.unparse(module_init)
    for attr in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attr}" in text


def test_effect_follows_the_segment_editor_effect_template():
    tree = _tree(EFFECT_FILE)
    effect = _class(tree, "SegmentEditorEffect")
    assert _bases(effect) == ["AbstractScriptedSegmentEditorEffect"]
    required = {
        "clone",
        "icon",
        "helpText",
        "setupOptionsFrame",
        "activate",
        "deactivate",
        "processInteractionEvents",
        "processViewNodeEvents",
        "updateGUIFromMRML",
        "updateMRMLFromGUI",
        "setMRMLDefaults",
        "createCursor",
        "cleanup",
    }
    assert required <= _methods(effect), sorted(required - _methods(effect))
    source = EFFECT_FILE.read_text()
    assert 'scriptedEffect.name = "SegAssist"' in source
    assert "saveStateForUndo()" in source and "modifySegmentByLabelmap(" in source
    # answers go to the object's own segment: after Accept the user may have selected the next one already
    assert "modifySelectedSegmentByLabelmap(" not in source
    assert "ThreadPoolExecutor" not in source  # the one worker thread is BackgroundWorker's
    assert (MODULE_DIR / "Resources" / "Icons" / "SegAssistEffect.png").is_file()
    registration = ast.unparse(
        next(n for n in _tree(MODULE_FILE).body if getattr(n, "name", "") == "registerEditorEffect")
    )
    assert "SegAssistEffect" in registration and "SegmentEditorEffect.py" in registration


def test_the_user_documentation_lists_every_shortcut():
    docs = (ROOT / "docs" / "slicer.md").read_text()
    table = {
        m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \|$", docs, re.M) if m.group(1) != "Key"
    }
    for shortcut in SHORTCUTS:
        if shortcut.key == "KP_Enter":
            continue  # documented with Enter
        assert shortcut.label in table, f"docs/slicer.md lacks the shortcut {shortcut.label}"
