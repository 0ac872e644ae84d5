"""Prompts as network input channels.

Every prompt kind is drawn into its own channel of the patch, the approach of nnInteractive and
DeepEdit: one network serves every prompt kind and a correction is just more ink in a channel.
The same drawing code serves training (prompts simulated in patch coordinates) and inference
(user prompts mapped into the patch through its :class:`~SegAssistLib.engine.patching.Window`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from SegAssistLib import rasterize
from SegAssistLib.engine import patching
from SegAssistLib.engine.patching import Window
from SegAssistLib.prompts import (
    BOX_FLAT_TOLERANCE,
    WIDE_SCRIBBLE_WIDTH,
    BoxPrompt,
    LassoPrompt,
    PointPrompt,
    Prompt,
    ScribblePrompt,
)
from SegAssistLib.stroke_voxels import scribble_voxels

CHANNELS = ("image", "previous_mask", "point+", "point-", "scribble+", "scribble-", "box_or_lasso+")
POINT_RADIUS = 1.5  # patch voxels
SCRIBBLE_RADIUS = 1.0
LASSO_VERTEX_STEP = 0.25  # patch voxels: closer lasso vertices are thinned out (see thin_polygon)


@dataclass
class PatchPrompt:
    """A prompt in patch coordinates ``[z, y, x]``.

    ``kind``: ``point`` (one coordinate), ``scribble`` (dense samples along the stroke, or the patch
    voxels a scribble slab covers), ``lasso`` (polygon vertices on a plane), ``box`` (two corners),
    ``region`` (the patch voxels a lasso slab inks, :func:`_voxels_in_patch`: marked as they are).
    """

    kind: str
    positive: bool
    coords: np.ndarray


def to_patch_prompt(
    prompt: Prompt, window: Window, image_shape: Optional[Sequence[int]] = None
) -> Optional[PatchPrompt]:
    """Map a user prompt (voxel ``(i, j, k)``) into a window; ``None`` for kinds with no channel.
    ``image_shape`` (array order): a wide stroke is clipped to the image, as its slab form is."""

    def kji(points) -> np.ndarray:
        return window.to_patch(np.asarray(points, float).reshape(-1, 3)[:, ::-1])

    if isinstance(prompt, PointPrompt):
        return PatchPrompt("point", prompt.positive, kji([prompt.position]))
    if isinstance(prompt, BoxPrompt):
        return PatchPrompt("box", True, _box_in_patch(prompt, window))
    if isinstance(prompt, (ScribblePrompt, LassoPrompt)) and prompt.slab is not None:
        scribble = isinstance(prompt, ScribblePrompt)
        return _voxels_in_patch(prompt.slab.voxels_kji(), prompt.slab.shape, scribble, prompt.positive, window)
    if isinstance(prompt, ScribblePrompt) and prompt.width >= WIDE_SCRIBBLE_WIDTH:
        # widened in the image, as its slab form is (the remote client sends that form): the same
        # stroke gives the same input whichever form it came in
        voxels = scribble_voxels(prompt)
        if image_shape is not None:
            voxels = voxels[np.all((voxels >= 0) & (voxels < np.asarray(image_shape)), axis=1)]
        if len(voxels) == 0:
            return None
        extent = voxels.max(0) - voxels.min(0) + 1  # the box of the slab it would make
        return _voxels_in_patch(voxels, tuple(int(n) for n in extent), True, prompt.positive, window)
    if isinstance(prompt, ScribblePrompt):
        # sampled in the patch, as training draws strokes: samples every half image voxel fall
        # several patch voxels apart where the window magnifies an axis (5 mm slices seen at 1 mm),
        # and the stroke broke into beads
        # in chunks, keeping what can ink the patch: a stroke along a magnified axis has several
        # times the samples its budget counted in image voxels
        reach = SCRIBBLE_RADIUS + 1.0
        kept = [c[np.all((c > -reach) & (c < window.patch - 1 + reach), axis=1)]
                for c in rasterize.polyline_sample_chunks(kji(prompt.points), 0.5)]
        samples = np.concatenate(kept) if kept else np.zeros((0, 3))
        return PatchPrompt("scribble", prompt.positive, samples) if len(samples) else None
    if isinstance(prompt, LassoPrompt):
        return PatchPrompt("lasso", prompt.positive, thin_polygon(kji(prompt.points), LASSO_VERTEX_STEP))
    return None


def _box_in_patch(box: BoxPrompt, window: Window) -> np.ndarray:
    """The box's corners in the patch, reaching the outer edges of its end voxels.

    A box holds the voxels its corners fall in and every voxel between (``rasterize.fill_box``'s
    rule: integer corners are inclusive voxel indices, a rectangle dragged in Slicer includes the
    voxels under its corners). Mapping only the corners would lose half of each end voxel where
    the patch magnifies an axis (5 mm slices seen at 1 mm), while training draws boxes around whole
    objects in the patch. An axis the box is flat along (a 2D box on a slice) keeps its one plane,
    as training's 2D boxes do.
    """
    corners = np.asarray([box.min_corner, box.max_corner], float)[:, ::-1]
    solid = corners[1] - corners[0] > BOX_FLAT_TOLERANCE  # thinner than a voxel but not flat: whole voxels too
    first, last = np.floor(corners[0] + 0.5), np.ceil(corners[1] - 0.5)  # the end voxels
    half = 0.5 * window.scale
    lo = np.where(solid, window.to_patch(first[None])[0] - half, window.to_patch(corners[:1])[0])
    hi = np.where(solid, window.to_patch(last[None])[0] + half, window.to_patch(corners[1:])[0])
    return np.stack([lo, hi])


def thin_polygon(vertices: np.ndarray, step: float) -> np.ndarray:
    """The polygon with one vertex kept per ``step`` of its outline's length.

    A lasso drawn on a fine image has many vertices per patch voxel when a coarse window sees it;
    filling costs time per vertex and each later prompt redraws it in every window. The outline
    moves by less than ``step``. Returned as it is when fewer than 3 vertices would be left.
    """
    vertices = np.asarray(vertices, float)
    if len(vertices) <= 3:
        return vertices
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(vertices, axis=0), axis=1))])
    bins = np.floor(along / step)
    keep = np.concatenate([[True], bins[1:] != bins[:-1]])
    return vertices[keep] if keep.sum() >= 3 else vertices


def _voxels_in_patch(
    voxels_kji: np.ndarray, box_shape: Tuple[int, ...], scribble: bool, positive: bool, window: Window
) -> PatchPrompt:
    """Image voxels (a slab's, in a box of ``box_shape``, or a wide stroke's) as the patch voxels
    that cover them.

    A slab one voxel thick along an axis (drawn on an axial, coronal or sagittal slice) inks the
    one patch plane nearest that slice. A lasso's slab on an oblique slice inks the layer of its
    plane (:func:`~SegAssistLib.engine.patching.slab_plane_patch_voxels`), not the whole footprint
    of its voxels, which across thick slices made it a block several patch voxels thick. A
    scribble's slab keeps its voxels' footprints (a wide stroke in points form is drawn so too).
    """
    flat = [n == 1 for n in box_shape] if min(box_shape) == 1 else [False] * 3
    pad = int(np.ceil(SCRIBBLE_RADIUS)) if scribble else 0
    if not scribble and not any(flat):
        covered = patching.slab_plane_patch_voxels(window, voxels_kji)
    else:
        covered = patching.slab_patch_voxels(window, voxels_kji, pad, flat)
    return PatchPrompt("scribble" if scribble else "region", positive, covered.astype(float))


def draw_prompts(prompts: Iterable[PatchPrompt], patch: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The five prompt channels (bool, shape ``(5, patch, patch, patch)``); with ``out``, the prompts
    are added to those channels in place (drawing only adds ink, so a correction is drawn alone)."""
    ch = np.zeros((5,) + (patch,) * 3, bool) if out is None else out
    if ch.shape != (5,) + (patch,) * 3 or ch.dtype != bool:
        raise ValueError(f"prompt channels must be bool of shape {(5,) + (patch,) * 3}, got {ch.dtype} {ch.shape}")
    for p in prompts:
        if p.kind == "point":
            rasterize.draw_balls(ch[0 if p.positive else 1], p.coords, POINT_RADIUS)
        elif p.kind == "scribble":
            rasterize.draw_balls(ch[2 if p.positive else 3], p.coords, SCRIBBLE_RADIUS)
        elif p.kind == "box":
            lo, hi = np.minimum(p.coords[0], p.coords[1]), np.maximum(p.coords[0], p.coords[1])
            rasterize.fill_box(ch[4], lo, hi)
        elif p.kind == "lasso":
            rasterize.fill_planar_polygon(ch[4 if p.positive else 3], p.coords)
        elif p.kind == "region":
            rasterize.draw_balls(ch[4 if p.positive else 3], p.coords, 0.0)
        else:
            raise ValueError(f"unknown patch prompt kind {p.kind!r}")
    return ch


def assemble_input(image: torch.Tensor, previous_mask: torch.Tensor, prompt_channels: np.ndarray) -> torch.Tensor:
    """(7, P, P, P) float input: image, previous mask, prompt channels."""
    return torch.cat([image[None], previous_mask[None], torch.from_numpy(prompt_channels).float()], 0)


def prompts_in_window(
    prompts: List[Prompt], window: Window, image_shape: Optional[Sequence[int]] = None
) -> List[PatchPrompt]:
    """Every prompt of the history that touches the window, in patch coordinates."""
    out = []
    margin = 3.0
    for prompt in prompts:
        pp = to_patch_prompt(prompt, window, image_shape)
        if pp is None or len(pp.coords) == 0:  # no channel, or a slab that misses the window
            continue
        lo, hi = pp.coords.min(0), pp.coords.max(0)
        if np.all(hi >= -margin) and np.all(lo <= window.patch - 1 + margin):
            out.append(pp)
    return out
