"""Overlap, click-count and surface-distance metrics of the evaluation.

Conventions (also written into every evaluation JSON, see :data:`CONVENTIONS`):

- Dice of two empty masks is 1.0 (nothing to find, nothing found); of one empty mask, 0.0.
- NoC@t (number of clicks to reach Dice ``t``) is the 1-based index of the first interaction whose
  Dice is at least ``t``; a box or scribble is an interaction, the first. When ``t`` is never
  reached, NoC is the number of interactions allowed (the usual convention of the interactive
  segmentation literature, which caps NoC instead of inventing a penalty): ``max_clicks`` with the
  clicks-only protocol, ``max_clicks + 1`` with ``box+clicks`` and ``scribble+clicks``; a separate
  ``reached`` flag is False. Mean NoC therefore under-states the effort on hard cases: read it
  with the fraction reached.
- HD95 is the 95th percentile of the pooled distances, in mm, from each surface voxel of one mask
  to the nearest surface voxel of the other, both directions together. Surface voxels are the
  mask's voxels with a face neighbour outside the mask (the image border counts as outside).
  Both masks empty: 0.0; exactly one empty: ``inf``.
- The first click follows the same rule with an empty prediction: the whole object is the error,
  and the click goes to the most interior voxel of its largest 6-connected piece (not the global
  maximum of the distance transform, which for an object in several pieces may lie in a smaller one).
- Dice AUC (the CVPR 2025 interactive 3D segmentation challenge's DSC_AUC): the trapezoidal area
  under Dice against the interaction index with unit steps, over the click steps only (after the
  box or scribble, which the challenge treats as optional). With 5 clicks it lies in [0, 4]. The
  normalised AUC divides by (number of clicks - 1), giving a mean-Dice-like number in [0, 1] that is
  comparable between protocols with different numbers of clicks.
- Voxels of nnU-Net's ignore label (``"ignore": N`` in ``dataset.json``: left unannotated) are
  neither target nor background: Dice and HD95 are computed over the other voxels only (the
  prediction inside them is dropped, as nnU-Net's evaluation does) and the simulated user never
  clicks in them.
- A user stops when no error is left (Dice 1.0): the session's record holds only the interactions
  made (``stopped`` says why), and means per interaction, NoC and the Dice AUC carry its last value
  forward to the number of interactions allowed (:func:`carried_forward`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

CONVENTIONS = {
    "dice": "2|A&B|/(|A|+|B|); both empty = 1.0",
    "noc": (
        "1-based index of the first interaction (a box or scribble included) with Dice >= threshold; when "
        "never reached, noc = number of interactions allowed (max_clicks with clicks only, max_clicks + 1 after "
        "a box or scribble) and reached = false"
    ),
    "hd95_mm": (
        "95th percentile of pooled surface-to-surface distances in mm (both directions, as medpy; MONAI's "
        "compute_hausdorff_distance takes the larger one-way 95th percentile, a value at least as large); "
        "both empty = 0, one empty = inf (written as null in JSON)"
    ),
    "clicks": (
        "at the most interior voxel (largest distance in mm to the region's edge; the image border counts "
        "as edge) of the largest 6-connected region of missed voxels (positive click) or spilled voxels "
        "(negative click), a missed region winning a size tie; distance ties go to the voxel nearest the "
        "region's centre of mass, then the first in array order. The CVPR 2025 challenge's own rule differs: "
        "one error mask, 26-connectivity, voxel-unit distances, a random tie-break"
    ),
    "first_click": (
        "the same rule applied to an empty prediction: the whole object is the error, so the first click goes "
        "to the most interior voxel of the object's largest 6-connected piece, not to the global maximum of "
        "the object's distance transform. The two differ only for an object in several pieces (a union such "
        "as 1+2+3+4, a structure on both sides such as caudates or ventricles) whose deepest voxel lies in a "
        "smaller piece"
    ),
    "dice_auc": (
        "trapezoidal area under Dice vs interaction index (unit steps) over the click steps after "
        "the box or scribble (CVPR 2025 challenge DSC_AUC); dice_auc_norm = dice_auc / (clicks - 1)"
    ),
    "ignore": (
        "voxels of nnU-Net's ignore label (dataset.json \"ignore\": N, unannotated) are left out of Dice and "
        "HD95 (the prediction there is dropped, as nnU-Net's evaluation does) and of the simulated user's "
        "error regions"
    ),
    "stopped": (
        "the user stops when no error is left: the record holds only the interactions made (dice, hd95_mm, "
        "latency_s, interactions, prompts of one length) and stopped = \"dice 1.0\" (null: every interaction "
        "allowed was made); means per interaction, NoC and dice_auc carry the last value forward to "
        "interactions_allowed"
    ),
}

_FACE = ndimage.generate_binary_structure(3, 1)


def outside(mask: np.ndarray, ignore: Optional[np.ndarray]) -> np.ndarray:
    """``mask`` as booleans, without the voxels of ``ignore`` (None: nothing ignored)."""
    mask = np.asarray(mask) > 0
    if ignore is None:
        return mask
    ignore = np.asarray(ignore, bool)
    if ignore.shape != mask.shape:
        raise ValueError(f"ignore mask shape {ignore.shape} differs from mask shape {mask.shape}")
    return mask & ~ignore


def carried_forward(values: Sequence, length: int) -> List:
    """``values`` with the last one repeated up to ``length`` (a user who stopped early keeps the mask
    it stopped on); as given where already that long. Empty stays empty."""
    values = list(values)
    return values + values[-1:] * (int(length) - len(values))


def dice(a: np.ndarray, b: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    """Dice of two masks; ``ignore``: voxels left out of both (nnU-Net's ignore label)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ, {a.shape} and {b.shape}")
    a, b = outside(a, ignore), outside(b, ignore)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def number_of_clicks(
    dice_per_interaction: Sequence[float], threshold: float, max_clicks: Optional[int] = None
) -> Tuple[int, bool]:
    """``(noc, reached)`` for one threshold. ``max_clicks``: the number of interactions allowed, the
    NoC when ``threshold`` is never reached (the harness passes every interaction of the session: a
    box or scribble and ``max_clicks`` clicks make ``max_clicks + 1``); defaults to the number of
    interactions given."""
    values = list(dice_per_interaction)
    limit = len(values) if max_clicks is None else int(max_clicks)
    for n, value in enumerate(values[:limit], start=1):
        if value >= threshold:
            return n, True
    return limit, False


def dice_auc(dice_per_click: Sequence[float]) -> float:
    """Trapezoidal area under the Dice curve with unit steps; 0.0 for fewer than two values."""
    values = np.asarray(list(dice_per_click), float)
    if values.size < 2:
        return 0.0
    return float(np.sum((values[1:] + values[:-1]) / 2.0))


def normalised_dice_auc(dice_per_click: Sequence[float]) -> float:
    """:func:`dice_auc` divided by its maximum (number of values - 1); the single value if only one."""
    values = list(dice_per_click)
    if not values:
        raise ValueError("normalised_dice_auc: no Dice values")
    if len(values) == 1:
        return float(values[0])
    return dice_auc(values) / (len(values) - 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the image counts as outside)."""
    mask = np.asarray(mask) > 0
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE, border_value=0)


def hd95(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), ignore: Optional[np.ndarray] = None
) -> float:
    """95th-percentile symmetric Hausdorff distance in mm; ``spacing`` is ``(i, j, k)``; ``ignore``:
    voxels left out of both masks first (nnU-Net's ignore label)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"hd95: shapes differ, {a.shape} and {b.shape}")
    a, b = outside(a, ignore), outside(b, ignore)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    # Crop to both masks (plus one voxel where the image allows) so big volumes stay cheap; the
    # image border stays a border, so surfaces do not change.
    nz = np.argwhere(a | b)
    lo = np.maximum(nz.min(0) - 1, 0)
    hi = np.minimum(nz.max(0) + 2, a.shape)
    box = tuple(slice(x, y) for x, y in zip(lo, hi))
    sa, sb = surface(a[box]), surface(b[box])
    sampling = (float(spacing[2]), float(spacing[1]), float(spacing[0]))
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)[sb]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))
