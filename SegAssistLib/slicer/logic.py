"""Batch segmentation in a scene: a volume node and prompts in, a segment out. Qt-free, blocking.

This is the Slicer module's logic without the GUI: batch scripts (``Slicer --no-main-window
--python-script``), the module's self-tests and CI (slicer-core) all drive it. No dialogs: errors
are exceptions (:class:`~SegAssistLib.errors.SegAssistError` subclasses with a message a user can
act on), progress goes to a callback ``progress(fraction, message)``.

Prompts can be SegAssist prompts (objects or their JSON dicts, voxel coordinates of the volume) or
markups nodes, converted with the volume's geometry and every parent transform:

- point list -> one point prompt per placed control point (polarity: see :mod:`.markups`);
- ROI -> a 3D box (a 2D one when the ROI is thinner than a voxel);
- closed curve -> a lasso through its curve points; open curve or line -> a scribble.

The engine is anything with the engine interface: a :class:`~SegAssistLib.client.SegAssistClient`
(local or remote backend, see :mod:`.backend`) or an in-process engine. A prompt log is replayed with
the engine settings it records (:func:`load_prompts`, ``segment_volume(settings=...)``): an in-process
engine answers with them, giving the recorded mask; a server answers with its own, and the result's
``notes`` say when they differ.

Give ``segment_volume`` the :class:`~SegAssistLib.headless.PromptFile` itself (not only its prompts):
a log recorded on the file as SimpleITK reads it (``segassist segment --log``) names the voxels of a
left-handed image in another order than Slicer's node holds them, and the network is not
flip-symmetric; with the file, the session runs on the voxels in the log's order with the log's own
prompts (any markups given beside it moved to that order), and the segment is written back in the
node's, so that the replay gives the recorded mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import slicer
import slicer.util

from SegAssistLib.engine.base import Engine
from SegAssistLib.errors import ImageError, PromptError, SegAssistError
from SegAssistLib.headless import (  # noqa: F401 - Cancelled, EngineRun, ...: the module's names for them
    Cancelled,
    EngineRun,
    ProgressCallback,
    PromptFile,
    ReplayImage,
    Voxels,
    no_progress,
    read_prompt_file,
    read_prompts,
    recorded_settings,
    replay_order,
    run_prompts,
)
from SegAssistLib.prompt_log import EngineSettings, PromptLog
from SegAssistLib.prompt_mirror import Flips, mirror_prompt
from SegAssistLib.prompts import LassoPrompt, Prompt, ScribblePrompt, parse_prompt
from SegAssistLib.slicer import markups, segments, volumes
from SegAssistLib.slicer.coordinates import build_prompt, ras_to_ijk

#: a prompt, its JSON dict, a markups node, or a file's prompts as :func:`load_prompts` reads them (given
#: whole, a prompt log's are replayed in the voxel order it was recorded in: see ``segment_volume``)
PromptSource = Union[Prompt, Dict[str, Any], slicer.vtkMRMLMarkupsNode, PromptFile]
DEFAULT_SEGMENT_NAME = "SegAssist"


@dataclass
class SegmentationResult:
    """What :func:`segment_volume` made: where the segment is, the mask, and how it was made."""

    segmentation_node: slicer.vtkMRMLSegmentationNode
    segment_id: str
    mask: np.ndarray  # uint8 [k, j, i] on the volume's grid
    prompt_log: PromptLog
    model: str
    latencies_s: List[float] = field(default_factory=list)
    #: what a script should tell its user, one line each (:attr:`EngineRun.notes`): the backend answered
    #: with engine settings other than those the prompts were recorded with, so the mask may differ
    notes: List[str] = field(default_factory=list)
    #: :attr:`EngineRun.flips`: the axes ``[k, j, i]`` along which the engine saw the volume reversed (a
    #: replayed log's voxel order; None: the node's); ``prompt_log`` names voxels of that order
    flips: Optional[Flips] = None

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))


# ---- prompts ------------------------------------------------------------------------------------
def _curve_points_ijk(node: slicer.vtkMRMLMarkupsNode, volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    points = slicer.util.arrayFromMarkupsCurvePoints(node, world=True)
    if points is None or len(points) == 0:
        points = slicer.util.arrayFromMarkupsControlPoints(node, world=True)
    if points is None or len(points) == 0:
        raise PromptError(f"markups {node.GetName()!r} has no points")
    return np.atleast_2d(ras_to_ijk(np.asarray(points, float), volume_node))


def prompts_from_markups(
    node: slicer.vtkMRMLMarkupsNode,
    volume_node: slicer.vtkMRMLVolumeNode,
) -> List[Prompt]:
    """The prompts a markups node stands for, in the volume's voxel coordinates."""
    name = node.GetName()
    if node.IsA("vtkMRMLMarkupsROINode"):
        return [markups.roi_box_prompt(node, volume_node)]
    if node.IsA("vtkMRMLMarkupsPlaneNode") or node.IsA("vtkMRMLMarkupsAngleNode"):
        raise PromptError(f"markups {name!r} ({node.GetClassName()}) cannot be a prompt: use points, ROI or curves")
    if node.IsA("vtkMRMLMarkupsCurveNode") or node.IsA("vtkMRMLMarkupsLineNode"):
        if node.GetNumberOfDefinedControlPoints() == 0:
            raise PromptError(f"markups {name!r} has no placed control points")
        positive = markups.is_positive(node, 0)
        points = _curve_points_ijk(node, volume_node)
        if node.IsA("vtkMRMLMarkupsClosedCurveNode"):
            return [build_prompt(LassoPrompt, f"lasso from {name!r}", points=points, positive=positive)]
        return [build_prompt(ScribblePrompt, f"scribble from {name!r}", points=points, positive=positive)]
    prompts = markups.point_prompts(node, volume_node)
    if not prompts:
        raise PromptError(f"markups {name!r} has no placed control points")
    return list(prompts)


def _places_nothing(node: slicer.vtkMRMLMarkupsNode) -> bool:
    """Whether a point list, curve or line has no placed control point (the point list Slicer's
    selector makes before anything is placed). An ROI is its box, whatever its control points."""
    if any(node.IsA(kind) for kind in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsPlaneNode", "vtkMRMLMarkupsAngleNode")):
        return False
    return node.GetNumberOfDefinedControlPoints() == 0


def collect_prompts(
    sources: Sequence[PromptSource], volume_node: slicer.vtkMRMLVolumeNode, flips: Optional[Flips] = None
) -> List[Prompt]:
    """Prompts from a mix of prompt objects, prompt dicts, markups nodes and prompt files, in the given
    order, in the node's voxel order; reversed along ``flips`` (``[k, j, i]``, :func:`replay_order`), in
    that order: a prompt file's log its own prompts, the others moved.

    A point list, curve or line with no placed control point gives no prompt: it is left out when the
    other sources give some (an empty point list picked beside an ROI: the ROI's box), and refused
    (:class:`PromptError`, naming it) when nothing gives any."""
    shape_kji = slicer.util.arrayFromVolume(volume_node).shape[:3] if flips is not None else ()
    prompts: List[Prompt] = []
    unplaced: List[str] = []
    for source in sources:
        if isinstance(source, PromptFile):
            prompts.extend(source.prompts_in(flips, shape_kji))
            continue
        before = len(prompts)
        if isinstance(source, slicer.vtkMRMLMarkupsNode) and _places_nothing(source):
            unplaced.append(source.GetName())
            continue
        if isinstance(source, slicer.vtkMRMLMarkupsNode):
            prompts.extend(prompts_from_markups(source, volume_node))
        elif isinstance(source, dict):
            prompts.append(parse_prompt(source))
        elif hasattr(source, "kind") and hasattr(source, "model_dump"):
            prompts.append(source)  # type: ignore[arg-type]
        else:
            raise PromptError(f"not a prompt: {type(source).__name__} (give prompts, prompt dicts or markups nodes)")
        if flips is not None and any(flips):  # in the node's order: moved to the replay's
            prompts[before:] = [mirror_prompt(p, flips, shape_kji) for p in prompts[before:]]
    if not prompts and unplaced:
        names = ", ".join(repr(name) for name in unplaced)
        raise PromptError(f"markups {names} {'has' if len(unplaced) == 1 else 'have'} no placed control points")
    return prompts


def load_prompt_file(
    path: Union[str, Path],
    volume_node: slicer.vtkMRMLVolumeNode,
    markups_logic: Optional[slicer.vtkSlicerMarkupsLogic] = None,
) -> List[Prompt]:
    """Prompts from a file: ``.mrk.json`` (markups, read into the scene) or SegAssist JSON.

    SegAssist JSON is a prompt log (``{"schema_version": ..., "prompts": [...]}``), an object with
    a ``prompts`` list, or a bare list of prompts; coordinates are voxel indices of the volume.
    A prompt log recorded on another image (shape, spacing and, schema 1.3, origin and direction:
    a flipped or moved copy of the same scan) is refused, see :func:`~SegAssistLib.headless.check_log_image`.
    :func:`load_prompts` also gives the engine settings a log records, which replay its mask.
    """
    return load_prompts(path, volume_node, markups_logic).prompts


def load_prompt_files(
    paths: Sequence[Union[str, Path]],
    volume_node: slicer.vtkMRMLVolumeNode,
    markups_logic: Optional[slicer.vtkSlicerMarkupsLogic] = None,
) -> List[PromptFile]:
    """:func:`load_prompts` of each file, the node's voxel digest computed at most once for them all."""
    voxels = _node_voxels(volume_node)
    return [load_prompts(path, volume_node, markups_logic, voxels=voxels) for path in paths]


def _node_voxels(volume_node: slicer.vtkMRMLVolumeNode) -> Optional[Voxels]:
    if volume_node.GetImageData() is None:
        return None
    array = slicer.util.arrayFromVolume(volume_node)  # a view: hashed only if a log records a digest
    return Voxels(array) if array.ndim == 3 else None


def load_prompts(
    path: Union[str, Path],
    volume_node: slicer.vtkMRMLVolumeNode,
    markups_logic: Optional[slicer.vtkSlicerMarkupsLogic] = None,
    voxels: Optional[Voxels] = None,
) -> PromptFile:
    """The prompts of a file as :func:`load_prompt_file` reads them, with the engine settings and model
    its prompt log records (schema 1.4; None for markups and bare lists): a replay gives the recorded
    mask only with those settings, and on the voxels in the order the log was recorded in: give the
    file itself to ``segment_volume(engine, node, [file], settings=file.settings)`` (its ``prompts`` are
    in the node's voxel order, for display; a left-handed file's log names them in another).
    ``voxels``: the node's, shared by several calls (:func:`load_prompt_files`): their digest once."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    if path.name.lower().endswith(".mrk.json"):
        if markups_logic is None:
            raise SegAssistError("reading a .mrk.json file needs the Markups module logic")
        nodes = markups.load_all_markups(markups_logic, str(path))
        return PromptFile(path, [prompt for node in nodes for prompt in prompts_from_markups(node, volume_node)])
    image_data = volume_node.GetImageData()
    image = None
    if image_data is not None:
        name = f"volume {volume_node.GetName()!r}"
        image = ReplayImage(image_data.GetDimensions(), volume_node.GetSpacing(), name)
        # The node's own IJK-to-RAS, not its world geometry: the log's voxel indices address the node's
        # own grid, which a parent transform (a registration) places elsewhere in the world without
        # changing which voxel holds what; and a log records its file's geometry (ITK, LPS), which is the
        # node's own once that file is loaded (save_volume_file writes it, transforms not applied).
        try:
            spacing, origin, direction = volumes.geometry_from_ijk_to_ras(
                volumes.ijk_to_ras_matrix(volume_node, world=False)
            )
        except ImageError:  # a degenerate matrix: shape and spacing are all there is to check
            pass
        else:
            # a log recorded on another scan of this grid is noted in the file's notes, not refused
            image = ReplayImage(image_data.GetDimensions(), spacing, name, origin, direction,
                                _node_voxels(volume_node) if voxels is None else voxels)  # fmt: skip
    return read_prompts(path, image)


# ---- segmentation nodes -------------------------------------------------------------------------
def find_or_add_segment(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_name: str,
    segment_id: Optional[str] = None,
    color: Optional[Sequence[float]] = None,
) -> str:
    """The ID of the segment to write: ``segment_id`` if given, else the one named so, else a new one."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_id:
        if segmentation.GetSegment(segment_id) is None:
            return segments.add_segment(segmentation_node, segment_name, color, segment_id=segment_id)
        return segment_id
    existing = segmentation.GetSegmentIdBySegmentName(segment_name)
    if existing:
        return existing
    return segments.add_segment(segmentation_node, segment_name, color)


def free_segment_name(segmentation_node: slicer.vtkMRMLSegmentationNode, name: str) -> str:
    """``name`` if no segment of that name holds voxels (anywhere: also outside the volume being
    segmented), else the first free "name 2", "name 3", ..."""
    segmentation = segmentation_node.GetSegmentation()

    def taken(candidate: str) -> bool:
        existing = segmentation.GetSegmentIdBySegmentName(candidate)
        return bool(existing) and segments.segment_holds_voxels(segmentation_node, existing)

    if not taken(name):
        return name
    number = 2
    while segmentation.GetSegmentIdBySegmentName(f"{name} {number}"):
        number += 1
    return f"{name} {number}"


def write_result(
    run: EngineRun,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    *,
    segmentation_node: Optional[slicer.vtkMRMLSegmentationNode] = None,
    segment_name: str = DEFAULT_SEGMENT_NAME,
    segment_id: Optional[str] = None,
    color: Optional[Sequence[float]] = None,
    keep_existing: bool = False,
    save_undo: Callable[[slicer.vtkMRMLSegmentationNode], object] = segments.save_editor_undo_state,
) -> SegmentationResult:
    """Write an engine run into a segment (main thread): replaced whole, other segments left as they are.

    ``keep_existing`` (the module's button): a segment of that name that already holds voxels (a
    previous run, maybe edited since) is kept, and the result goes to a new segment, "name 2", ...

    Before it changes ``segmentation_node``, ``save_undo(segmentation_node)`` is called: by default
    :func:`~SegAssistLib.slicer.segments.save_editor_undo_state`, so that when the Segment Editor is
    editing that segmentation the write is one step of its undo (else the user's next Ctrl+Z there
    would take the result away together with their own last stroke). Every batch write goes through
    here: the module's *Segment* button, ``SegAssistLogic.segment`` and ``segmentFromFile``.
    """
    scene = volume_node.GetScene()
    for node in (volume_node, segmentation_node):
        if node is not None and (node.GetScene() is None or node.GetScene() is not scene):
            # the scene was closed (or the node deleted) while the engine ran: nothing to write into
            raise SegAssistError(f"{node.GetName()!r} is no longer in the scene (closed or deleted meanwhile): "
                                 "the result was not written")  # fmt: skip
    if segmentation_node is None:  # a new one: no editor edits it yet, nothing to undo there
        segmentation_node = segments.create_segmentation(scene, volume_node, f"{volume_node.GetName()} SegAssist")
    else:
        save_undo(segmentation_node)
    if keep_existing and segment_id is None:
        segment_name = free_segment_name(segmentation_node, segment_name)
    existing = set(segmentation_node.GetSegmentation().GetSegmentIDs())
    target = find_or_add_segment(segmentation_node, segment_name, segment_id, color)
    try:
        segments.array_to_segment(run.mask, segmentation_node, target, volume_node)
    except Exception:
        if target not in existing:  # no empty segment is left behind by a write that failed
            segmentation_node.GetSegmentation().RemoveSegment(target)
        raise
    return SegmentationResult(
        segmentation_node=segmentation_node,
        segment_id=target,
        mask=run.mask,
        prompt_log=run.prompt_log,
        model=run.model,
        latencies_s=run.latencies_s,
        notes=list(run.notes),
        flips=run.flips,
    )


def segment_volume(
    engine: Engine,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    prompts: Sequence[PromptSource],
    *,
    segmentation_node: Optional[slicer.vtkMRMLSegmentationNode] = None,
    segment_name: str = DEFAULT_SEGMENT_NAME,
    segment_id: Optional[str] = None,
    color: Optional[Sequence[float]] = None,
    progress: Optional[ProgressCallback] = None,
    settings: Optional[EngineSettings] = None,
) -> SegmentationResult:
    """Segment one object of ``volume_node`` from ``prompts`` into a segment, and return it.

    The segment (``segment_id``, else the one called ``segment_name``, else a new one) is replaced
    by the result; other segments are left as they are. Without ``segmentation_node`` a new
    segmentation is created on the volume's geometry. Blocks until done.

    ``settings``: the engine settings the prompts were recorded with (:func:`load_prompts`, or
    :func:`recorded_settings` of several files; None: the engine's own). An in-process built-in engine
    answers with them, giving the recorded mask; a backend (a server, local or remote) answers with its
    own, and the result's ``notes`` say so when they differ.

    ``prompts`` may hold :class:`~SegAssistLib.headless.PromptFile` objects (:func:`load_prompts`): a
    log recorded on the node's image stored in another voxel order (the file of a left-handed image
    as SimpleITK reads it) is then replayed as recorded, the engine (in process or a server) seeing the
    voxels in the log's order, the other prompts moved to it, and the segment written in the node's
    order: the recorded mask. Logs recorded in different orders are refused (:func:`replay_order`).
    """
    report = progress or no_progress
    if volume_node.GetScene() is None:
        raise SegAssistError(f"volume {volume_node.GetName()!r} is not in a scene")
    report(0.0, "Reading the volume")
    flips = replay_order([source for source in prompts if isinstance(source, PromptFile)])
    prompt_list = collect_prompts(prompts, volume_node, flips)
    volume = volumes.volume_from_node(volume_node)
    run = run_prompts(engine, volume, prompt_list, report, settings, flips=flips)
    report(0.97, "Writing the segment")
    result = write_result(
        run,
        volume_node,
        segmentation_node=segmentation_node,
        segment_name=segment_name,
        segment_id=segment_id,
        color=color,
    )
    report(1.0, f"Done: {result.voxel_count} voxels in segment {segment_name!r}")
    return result
