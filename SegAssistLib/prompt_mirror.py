"""Prompts carried to the same image stored with some axes in reverse order.

Two readers can store one file's voxels in different orders: Slicer keeps an image whose direction
matrix is left-handed with its slices reversed (its IJK-to-RAS is right-handed), so SimpleITK's
voxel ``(i, j, k)`` of such a file is Slicer's ``(i, j, n_k - 1 - k)``, with the same shape and
spacing and another origin and direction. A prompt log recorded on the file by ``segassist segment
--log`` names voxels in SimpleITK's order; :func:`mirrored_axes` tells that the two grids are one
image, and :func:`mirror_prompt` moves each prompt onto the same anatomy in the other order.

The network is not flip-symmetric: the same prompts on the voxels in another order give another mask.
A replay that must give the recorded mask runs on :func:`reversed_volume` (the caller's image put back
in the log's order) with the log's own prompts, and reverses the mask back (:func:`reverse_axes`):
``headless.run_prompts(..., flips=)``.

No torch: this runs in Slicer's Python.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.image import Volume
from SegAssistLib.prompts import (
    BoxPrompt,
    LassoPrompt,
    MaskPrompt,
    PointPrompt,
    Prompt,
    ScribblePrompt,
    Slab,
)

Flips = Tuple[bool, bool, bool]  # per array axis [k, j, i]: stored in reverse order


def some_flips(flips: Optional[Sequence[bool]]) -> Optional[Flips]:
    """``flips`` as a :data:`Flips` of plain booleans when it reverses some axis; None when it reverses
    none (or is None): the voxel order is then the caller's own, nothing to do."""
    return tuple(bool(f) for f in flips) if flips is not None and any(flips) else None  # type: ignore[return-value]


def mirrored_axes(
    shape_ijk: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[Sequence[float]],
    recorded_spacing: Sequence[float],
    recorded_origin: Sequence[float],
    recorded_direction: Sequence[Sequence[float]],
    tolerance: float = 1e-3,
) -> Optional[Flips]:
    """The array axes ``[k, j, i]`` along which an image (``shape_ijk``, ``spacing``, ``origin``,
    ``direction``; ITK's convention, LPS, direction by rows) holds the voxels of the recorded grid
    in reverse order, every voxel at the same place in space; None when the two grids are not one
    image stored that way (or are the same grid: no axis reversed). The tolerances are those of
    :func:`~SegAssistLib.image.geometry_difference` (float32 storage)."""
    shape = np.asarray(shape_ijk, float)
    here_dir = np.asarray(direction, float).reshape(3, 3)
    there_dir = np.asarray(recorded_direction, float).reshape(3, 3)
    sp, there_sp = np.asarray(spacing, float), np.asarray(recorded_spacing, float)
    if np.any(np.abs(sp - there_sp) > tolerance * np.abs(there_sp)):
        return None
    flipped_ijk = np.zeros(3, bool)
    for axis in range(3):  # columns: the physical direction of the i, j and k axes
        if np.all(np.abs(here_dir[:, axis] + there_dir[:, axis]) <= tolerance):
            flipped_ijk[axis] = True
        elif np.any(np.abs(here_dir[:, axis] - there_dir[:, axis]) > tolerance):
            return None
    if not flipped_ijk.any():
        return None
    # the recorded grid's last voxel along each reversed axis is voxel 0 here
    expected = np.asarray(recorded_origin, float) + there_dir @ (flipped_ijk * (shape - 1) * there_sp)
    if np.any(np.abs(np.asarray(origin, float) - expected) > tolerance * float(there_sp.min())):
        return None
    return tuple(bool(f) for f in flipped_ijk[::-1])  # type: ignore[return-value]


def reverse_axes(array: np.ndarray, flips_kji: Flips) -> np.ndarray:
    """``array`` (``[k, j, i]``) with its voxels in reverse order along the axes ``flips_kji``: a view."""
    return np.flip(array, axis=tuple(a for a in range(3) if flips_kji[a]))


def reversed_volume(volume: Volume, flips_kji: Flips, copy: bool = True) -> Volume:
    """The same image stored with its voxels in reverse order along the array axes ``flips_kji``
    (``[k, j, i]``), every voxel at the same place in space: the grid :func:`mirrored_axes` tells is
    ``volume`` reversed along those axes. Its array is a C-contiguous copy (the engine makes tensors of
    crops of it; ``copy=False``: a view, for the grid alone); the modality is kept. Applied twice with the
    same ``flips_kji``: ``volume`` again."""
    flips_ijk = np.asarray(flips_kji, bool)[::-1]
    spacing = np.asarray(volume.spacing, float)
    direction = np.asarray(volume.direction, float).reshape(3, 3)
    # voxel 0 of the reversed grid is the last voxel along each reversed axis
    last_ijk = (np.asarray(volume.shape_ijk, float) - 1.0) * flips_ijk
    origin = np.asarray(volume.origin, float) + direction @ (last_ijk * spacing)
    array = reverse_axes(volume.array, flips_kji)
    return Volume(
        array=np.ascontiguousarray(array) if copy else array,
        spacing=volume.spacing,
        origin=tuple(float(x) for x in origin),
        direction=direction * np.where(flips_ijk, -1.0, 1.0),  # columns: the i, j and k axes
        modality=volume.modality,
    )


def reversed_back(array: np.ndarray, there, reference) -> Optional[np.ndarray]:
    """``array`` (array order ``[k, j, i]``) on grid ``there`` put on ``reference``'s grid when ``there``
    is that grid with some axes stored in reverse order (:func:`mirrored_axes`; both have ``spacing``,
    ``origin`` and ``direction``, as a :class:`~SegAssistLib.image.Volume` does); None when it is not."""
    flips = mirrored_axes(tuple(array.shape[::-1]), there.spacing, there.origin, there.direction,
                          reference.spacing, reference.origin, reference.direction)  # fmt: skip
    if flips is None:
        return None
    return np.ascontiguousarray(np.flip(array, axis=tuple(a for a in range(3) if flips[a])))


def mirror_prompt(prompt: Prompt, flips_kji: Flips, shape_kji: Sequence[int]) -> Prompt:
    """``prompt`` on the image whose voxels run in reverse order along the axes ``flips_kji``
    (array order ``[k, j, i]``) of an image of shape ``shape_kji``: index ``x`` becomes ``n - 1 - x``.
    A box keeps its corners ordered; a scribble's slice normal turns with its axes; a slab or an
    initial mask has its bits reversed in its box."""
    flips_ijk = np.asarray(flips_kji, bool)[::-1]
    last_ijk = np.asarray(shape_kji, float)[::-1] - 1.0

    def points(values: Sequence[Sequence[float]]) -> list:
        arr = np.asarray(values, float).reshape(-1, 3)
        return [tuple(float(x) for x in row) for row in np.where(flips_ijk, last_ijk - arr, arr)]

    def rebuilt(**update: object) -> Prompt:  # validated again, as a prompt read from a file is
        return type(prompt).model_validate({**prompt.model_dump(), **update})

    if isinstance(prompt, PointPrompt):
        return rebuilt(position=points([prompt.position])[0])
    if isinstance(prompt, BoxPrompt):
        a, b = np.asarray(points([prompt.min_corner, prompt.max_corner]))
        return rebuilt(min_corner=np.minimum(a, b).tolist(), max_corner=np.maximum(a, b).tolist())
    if isinstance(prompt, MaskPrompt):
        offset, box = _mirror_box(prompt.offset, prompt.shape, prompt.to_box(), flips_kji, shape_kji)
        cropped = MaskPrompt.from_array(box)  # its offset is within the box
        start = [int(a) + int(b) for a, b in zip(offset, cropped.offset)]
        return rebuilt(offset=start, shape=list(cropped.shape), data=cropped.data)
    if isinstance(prompt, (ScribblePrompt, LassoPrompt)):
        if prompt.slab is not None:
            slab = prompt.slab
            offset, box = _mirror_box(slab.offset, slab.shape, slab.to_box(), flips_kji, shape_kji)
            return rebuilt(slab=Slab.from_mask(box, offset).model_dump())
        update: dict = {"points": points(prompt.points)}
        if isinstance(prompt, ScribblePrompt) and prompt.normal is not None:
            update["normal"] = (np.where(flips_ijk, -1.0, 1.0) * np.asarray(prompt.normal)).tolist()
        return rebuilt(**update)
    raise TypeError(f"not a prompt: {type(prompt).__name__}")


def _mirror_box(
    offset: Sequence[int], box_shape: Sequence[int], box: np.ndarray, flips_kji: Flips, shape_kji: Sequence[int]
) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """A box of bits at ``offset``, reversed along the flipped axes: its new offset and bits."""
    axes = tuple(a for a in range(3) if flips_kji[a])
    new_offset = tuple(
        int(shape_kji[a]) - int(offset[a]) - int(box_shape[a]) if flips_kji[a] else int(offset[a]) for a in range(3)
    )
    return new_offset, np.flip(box, axis=axes)  # type: ignore[return-value]
