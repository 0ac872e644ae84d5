"""A headless MRML scene with the module logics SegAssist uses, slice nodes without views, and
nodes read from and written to files through their storage nodes.

Inside the Slicer application use ``slicer.mrmlScene`` instead of :func:`create_headless_scene`;
the functions of this package take the scene or nodes explicitly and work on either.
"""

from __future__ import annotations

import getpass
import os
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import numpy as np
import slicer

from SegAssistLib.errors import SegAssistError

_STANDARD_ORIENTATIONS = ("Axial", "Sagittal", "Coronal")


def _empty_home_directory() -> str:
    """An empty Slicer "home" with a ``share/ColorFiles`` folder.

    slicer-core ships no colour files; pointing the application logic at an empty folder lets the
    Colors logic start quietly instead of logging an error for each scene.
    """
    home = os.path.join(tempfile.gettempdir(), f"segassist-slicer-home-{_user_tag()}")
    os.makedirs(os.path.join(home, "share", "ColorFiles"), exist_ok=True)
    return home


def _user_tag() -> str:
    """Who runs this, for a per-user folder name: the uid; on Windows (no ``os.getuid``) the user's
    name, reduced to characters a folder name takes everywhere."""
    getuid = getattr(os, "getuid", None)
    if getuid is not None:
        return str(getuid())
    try:
        name = getpass.getuser()
    except Exception:  # no user name in the environment and no password database: one shared folder
        name = ""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "user"


@dataclass
class SlicerContext:
    """A scene, its application logic and the module logics registered on it."""

    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkSlicerApplicationLogic
    logics: Dict[str, object] = field(default_factory=dict)

    @property
    def volumes_logic(self) -> slicer.vtkSlicerVolumesLogic:
        return self.logics["Volumes"]

    @property
    def segmentations_logic(self) -> slicer.vtkSlicerSegmentationsModuleLogic:
        return self.logics["Segmentations"]

    @property
    def markups_logic(self) -> slicer.vtkSlicerMarkupsLogic:
        return self.logics["Markups"]

    @property
    def subject_hierarchy_logic(self) -> slicer.vtkSlicerSubjectHierarchyModuleLogic:
        return self.logics["SubjectHierarchy"]

    def close(self) -> None:
        """Clear the scene (nodes, observers) and drop the logics.

        The logics are not detached one by one: the SubjectHierarchy logic warns when its scene
        becomes None, and a cleared scene gives them nothing more to do.
        """
        self.scene.Clear(True)
        self.logics.clear()

    def __enter__(self) -> SlicerContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_headless_scene(home_directory: Optional[str] = None) -> SlicerContext:
    """A new scene with application logic and Colors, Volumes, Segmentations, SubjectHierarchy, Markups.

    The Terminologies logic is not registered: slicer-core ships no terminology files.
    Segments can be created only once the Segmentations logic has the scene, which this ensures.
    """
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    home = home_directory or _empty_home_directory()
    app_logic.SetHomeDirectory(home)
    app_logic.SetShareDirectory("share")

    colors = slicer.vtkSlicerColorLogic()
    app_logic.SetColorLogic(colors)
    logics: Dict[str, object] = {"Colors": colors}
    logics["Volumes"] = slicer.vtkSlicerVolumesLogic()
    logics["Segmentations"] = slicer.vtkSlicerSegmentationsModuleLogic()
    logics["SubjectHierarchy"] = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    logics["Markups"] = slicer.vtkSlicerMarkupsLogic()
    for name, logic in logics.items():
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
    return SlicerContext(scene=scene, app_logic=app_logic, logics=logics)


def install_util_globals(context: SlicerContext) -> None:
    """Set ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` for ``slicer.util`` helpers.

    Only outside the Slicer application (slicer-core, batch scripts): inside Slicer these globals
    belong to the application and are left alone.
    """
    if hasattr(slicer, "app"):
        raise SegAssistError("install_util_globals is for headless use: the Slicer application owns its globals")

    def module(logic: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(logic=lambda: logic)

    slicer.mrmlScene = context.scene
    slicer.modules = types.SimpleNamespace(**{name.lower(): module(logic) for name, logic in context.logics.items()})


def add_slice_node(
    scene: slicer.vtkMRMLScene,
    orientation: Union[str, Sequence[float]] = "Axial",
    dimensions: Tuple[int, int] = (256, 256),
    field_of_view: Tuple[float, float] = (256.0, 256.0),
    center_ras: Optional[Sequence[float]] = None,
    layout_name: str = "Red",
) -> slicer.vtkMRMLSliceNode:
    """A slice node as a slice view would hold it: ``dimensions`` pixels showing ``field_of_view`` mm.

    ``orientation`` is "Axial", "Sagittal", "Coronal", or a slice normal in RAS for an oblique
    (reformatted) slice. ``center_ras`` is put at the centre of the view.
    """
    if scene.GetDefaultNodeByClass("vtkMRMLSliceNode") is None:
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # copies the scene's default (orientation presets)
    node.UnRegister(None)  # CreateNodeByClass hands over a reference Python already holds
    node.SetLayoutName(layout_name)
    node.SetName(layout_name)
    node.SetSingletonTag(f"SegAssist{layout_name}")
    node = scene.AddNode(node)  # a node with the same layout name is reused (singleton tag)
    node.SetDimensions(int(dimensions[0]), int(dimensions[1]), 1)
    node.SetFieldOfView(float(field_of_view[0]), float(field_of_view[1]), 1.0)
    orient_slice(node, orientation)
    if center_ras is not None:
        c = np.asarray(center_ras, float)
        node.JumpSliceByCentering(float(c[0]), float(c[1]), float(c[2]))
    node.UpdateMatrices()
    return node


def orient_slice(node: slicer.vtkMRMLSliceNode, orientation: Union[str, Sequence[float]]) -> None:
    """Set a standard orientation by name, or an oblique one by its normal (RAS), keeping the centre."""
    if isinstance(orientation, str):
        if orientation not in _STANDARD_ORIENTATIONS:
            raise SegAssistError(f"unknown slice orientation {orientation!r}: use one of {_STANDARD_ORIENTATIONS}")
        if not node.SetOrientation(orientation):
            raise SegAssistError(f"slice node {node.GetName()!r} has no {orientation!r} orientation preset")
        return
    normal = np.asarray(orientation, float)
    if normal.shape != (3,) or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) == 0:
        raise SegAssistError(f"an oblique slice orientation is a non-zero RAS normal, got {orientation!r}")
    normal = normal / np.linalg.norm(normal)
    # The transverse (in-plane x) axis: patient left, as in axial views, unless the normal is along R-L.
    transverse = np.array([-1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    center = np.asarray(node.GetSliceToRAS().MultiplyPoint((0.0, 0.0, 0.0, 1.0))[:3])
    node.SetSliceToRASByNTP(*normal, *transverse, *center, 0)
    node.UpdateMatrices()


def read_node_file(
    scene: slicer.vtkMRMLScene,
    path: Path,
    node_class: str,
    storage: slicer.vtkMRMLStorageNode,
    name: Optional[str],
    what: str,
    error: Type[SegAssistError] = SegAssistError,
) -> slicer.vtkMRMLStorableNode:
    """A new ``node_class`` node read from ``path`` through ``storage`` (added to the scene with it).

    The node is named ``name``, or the file name up to its first dot. When the storage node cannot
    read the file both nodes leave the scene again and ``error("could not read {what} from {path}")``
    is raised.
    """
    node = scene.AddNewNodeByClass(node_class, name or path.name.split(".")[0])
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise error(f"could not read {what} from {path}")
    node.CreateDefaultDisplayNodes()
    return node


def write_node_file(
    node: slicer.vtkMRMLStorableNode,
    path: Union[str, Path],
    storage_class: type,
    compress: bool,
    what: str,
    error: Type[SegAssistError] = SegAssistError,
) -> Path:
    """Write ``node`` to ``path`` through its storage node (a new ``storage_class`` one when it has none).

    Raises ``error("could not write {what} to {path}")`` when the storage node fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = node.GetStorageNode()
    if storage is None:
        storage = storage_class()
        node.GetScene().AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    writable = storage.GetSupportedWriteFileTypes()
    kinds = [writable.GetValue(i) for i in range(writable.GetNumberOfValues())]
    if kinds and not storage.GetSupportedFileExtension(str(path), False, True):  # writable, not just readable
        # the storage node would write its own format under this name (NRRD bytes in a .nii.gz)
        suffixes = ", ".join(k[k.find("(") + 1 : k.rfind(")")] for k in kinds)
        raise error(f"cannot write {what} as {path.name}: choose a name ending in one of {suffixes}")
    storage.SetFileName(str(path))
    storage.SetUseCompression(bool(compress))
    if not storage.WriteData(node):
        raise error(f"could not write {what} to {path}")
    return path
