"""MRML <-> numpy, geometry and prompt capture for 3D Slicer. Qt-free and torch-free.

Everything here takes the scene or the nodes explicitly, so it runs the same inside Slicer (its
module and segment editor effect call it on the main thread), in ``PythonSlicer`` batch scripts, and
under pytest on PyPI's ``slicer-core`` (Slicer's C++ core without Qt).

Modules:

- :mod:`.scene`: a headless scene with its application logic and module logics; slice nodes.
- :mod:`.volumes`: volume node <-> :class:`SegAssistLib.image.Volume` (LPS geometry), transforms.
- :mod:`.segments`: segment <-> ``[k, j, i]`` mask on a volume's grid, region writes with undo,
  ``.seg.nrrd`` IO.
- :mod:`.coordinates`: slice-view XY -> RAS -> IJK; clicks, boxes, scribbles, lassos as prompts.
- :mod:`.markups`: point lists and ROIs as prompts.
- :mod:`.backend`: backend settings (kept in ``qt.QSettings`` by the module), local/remote backend.
- :mod:`.logic`: batch segmentation, nodes in and nodes out (the module's logic without Qt).
- :mod:`.shortcuts`, :mod:`.interaction`, :mod:`.session_state`, :mod:`.worker`,
  :mod:`.object_writes`, :mod:`.segment_watch`: the segment editor effect without Qt (keys,
  gestures, prompt bookkeeping, the worker thread, writes that give back what they took from other
  segments, edits made outside the effect).
- :mod:`.tokens`: the remote backend's token in a private file, not in Slicer's settings.
- :mod:`.dependencies`: the packages the module installs, found (and imported again) without a restart.

Conventions: RAS is Slicer's world frame; IJK is continuous voxel index ``(i, j, k)`` of the
reference volume (voxel centres at integers), the frame of every SegAssist prompt. Parent
transforms are always accounted for: points go through the full (even non-linear) transform chain,
grids need linear transforms (harden a non-linear one first).
"""

from __future__ import annotations

try:
    import slicer  # noqa: F401  (slicer-core or Slicer's own Python)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "SegAssistLib.slicer needs 3D Slicer's Python (PythonSlicer) or the 'slicer-core' package"
    ) from exc

__all__ = [
    "backend",
    "coordinates",
    "dependencies",
    "interaction",
    "logic",
    "markups",
    "object_writes",
    "scene",
    "segment_watch",
    "segments",
    "session_state",
    "shortcuts",
    "tokens",
    "volumes",
    "worker",
]
