"""Windows of the image the network looks at: where, how big, resampling in and out.

A :class:`Window` is a box of the image (array order ``[k, j, i]``, integer voxel range, possibly
reaching past the image, which is then padded) that is resampled to the network's cubic patch.
Zoom level ``L`` covers ``patch * base_spacing * 2**L`` millimetres on every axis, so the network
always sees roughly isotropic voxels: anisotropic images (5 mm slices) are upsampled along their
coarse axis. Training and inference use these same functions, so what the network sees at run time
is what it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

MIN_BASE_SPACING_MM = 0.6  # finer images are looked at in 0.6 mm steps at zoom level 0
CT_CLIP = (-1024.0, 3071.0)
#: |value| beyond which (all on one side of zero) :func:`crop_window` shifts a window's values before
#: the float32 cast: there float32's step is 1/8 and grows with the value (8 at 1e8, 256 at 2e9); HU
#: and MR values stay below
FAR_FROM_ZERO = 2.0**20


@dataclass(frozen=True)
class Window:
    start: Tuple[int, int, int]
    size: Tuple[int, int, int]
    patch: int
    level: int = 0

    @property
    def scale(self) -> np.ndarray:
        """Patch voxels per image voxel, per axis."""
        return self.patch / np.asarray(self.size, float)

    def to_patch(self, coords: np.ndarray) -> np.ndarray:
        """Image array coordinates ``[k, j, i]`` -> patch coordinates (voxel centres at integers)."""
        coords = np.asarray(coords, float)
        return (coords - np.asarray(self.start) + 0.5) * self.scale - 0.5

    def image_slices(self, image_shape: Sequence[int]) -> Tuple[Tuple[slice, ...], Tuple[slice, ...]]:
        """(slices into the image, slices into the window) of their overlap."""
        img, win = [], []
        for s, n, dim in zip(self.start, self.size, image_shape):
            a, b = max(s, 0), min(s + n, dim)
            img.append(slice(a, max(a, b)))
            win.append(slice(a - s, max(a, b) - s))
        return tuple(img), tuple(win)

    def touches_image_border(self, image_shape: Sequence[int]) -> np.ndarray:
        """Per axis and side (shape 2x3): does the window edge lie at or beyond the image edge?"""
        start = np.asarray(self.start)
        end = start + np.asarray(self.size)
        return np.stack([start <= 0, end >= np.asarray(image_shape)])


def base_spacing(spacing_kji: Sequence[float]) -> float:
    return max(float(min(spacing_kji)), MIN_BASE_SPACING_MM)


def window_size(spacing_kji: Sequence[float], patch: int, level: int) -> Tuple[int, int, int]:
    extent_mm = patch * base_spacing(spacing_kji) * (2.0**level)
    return tuple(max(1, int(round(extent_mm / s))) for s in spacing_kji)  # type: ignore[return-value]


def window_around(centre_kji: Sequence[float], spacing_kji: Sequence[float], patch: int, level: int) -> Window:
    size = window_size(spacing_kji, patch, level)
    start = tuple(int(np.floor(c + 0.5 - n / 2.0)) for c, n in zip(centre_kji, size))
    return Window(start, size, patch, level)


def covering(window: Window, image_shape: Sequence[int]) -> Window:
    """The window shifted, on each axis where it is at least as long as the image, so that it holds
    the whole image (centred on a prompt near an image edge, it would hang out over that edge and
    stop short of the other one); other axes stay as they are."""
    start = tuple(
        int(min(max(s, dim - n), 0)) if n >= dim else int(s)
        for s, n, dim in zip(window.start, window.size, image_shape)
    )
    return Window(start, window.size, window.patch, window.level)


def max_level(image_shape: Sequence[int], spacing_kji: Sequence[float], patch: int, cap: int = 6) -> int:
    """The smallest level whose window covers the whole image on every axis (at most ``cap``)."""
    for level in range(cap + 1):
        if all(n >= d for n, d in zip(window_size(spacing_kji, patch, level), image_shape)):
            return level
    return cap


def sampling_strides(window: Window) -> Tuple[int, int, int]:
    """Every how many voxels a large window is read: keeps at least 2 samples per patch voxel, so the
    box average that follows still anti-aliases, while a whole-CT window reads a small share of it."""
    return tuple(max(1, n // (2 * window.patch)) for n in window.size)  # type: ignore[return-value]


def _strided_overlap(window: Window, image_shape: Sequence[int]):
    """(slices into the image, slices into the strided window) of the sampled voxels inside the image."""
    img, out = [], []
    for s, n, step, dim in zip(window.start, window.size, sampling_strides(window), image_shape):
        first = s + step // 2  # sample the middle voxel of each group of ``step``
        count = -(-n // step)
        t0 = max(0, -(-(0 - first) // step))
        t1 = min(count, (dim - 1 - first) // step + 1)
        t1 = max(t1, t0)
        img.append(slice(first + t0 * step, first + t0 * step + (t1 - t0) * step, step) if t1 > t0 else slice(0, 0))
        out.append(slice(t0, t1))
    return tuple(img), tuple(out)


def _far_from_zero_reference(region: np.ndarray) -> float:
    """What :func:`crop_window` subtracts from ``region`` before its float32 cast: the region's
    smallest value when all its values lie beyond :data:`FAR_FROM_ZERO` on one side of zero, 0
    (nothing) otherwise. Values of both signs gain nothing from a shift (their spread is at least
    their magnitude), and near float32's limit it would overflow; 8 and 16 bit integers (masks among
    them) never reach it."""
    if region.size == 0 or region.dtype.kind not in "iuf" or (region.dtype.kind in "iu" and region.dtype.itemsize <= 2):
        return 0.0
    lo, hi = float(region.min()), float(region.max())
    return lo if lo > FAR_FROM_ZERO or hi < -FAR_FROM_ZERO else 0.0


def crop_window(array: np.ndarray, window: Window, pad_value=None) -> np.ndarray:
    """The (strided) window as a new float32 array (never a view of ``array``: callers clip it in
    place, and ``array`` may be the user's image or read-only), padded outside the image with
    ``pad_value`` (default: the smallest value inside).

    Values all beyond :data:`FAR_FROM_ZERO` (an int32 image of 2e9 + 0..100, a float64 one of
    1e8 + 0..5) are first shifted, in float64, by the window's smallest value (``pad_value`` too):
    cast as they are, float32 kept 2 of their 100 levels. Every later step (resampling, the
    per-patch z-score of :func:`normalise_patch`) is blind to a shift; ordinary images (CT in
    Hounsfield units, MR) are not shifted and come out bit for bit as before.
    """
    img_sl, out_sl = _strided_overlap(window, array.shape)
    region = array[img_sl]
    reference = _far_from_zero_reference(region)
    if reference:
        region = region.astype(np.float64) - reference
        pad_value = None if pad_value is None else float(pad_value) - reference
    if pad_value is None:
        pad_value = float(region.min()) if region.size else 0.0
    shape = tuple(-(-n // st) for n, st in zip(window.size, sampling_strides(window)))
    if region.shape == shape:
        return np.array(region, np.float32)  # a copy, even of a float32 region
    out = np.full(shape, pad_value, np.float32)
    out[out_sl] = region
    return out


def resample_to_patch(region: torch.Tensor, patch: int) -> torch.Tensor:
    """(D, H, W) -> (patch, patch, patch): box-average where shrinking, trilinear where growing."""
    x = region[None, None].float()
    shape = tuple(x.shape[2:])
    shrunk = tuple(min(n, patch) for n in shape)
    if shrunk != shape:
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != (patch,) * 3:
        x = F.interpolate(x, size=(patch,) * 3, mode="trilinear", align_corners=False)
    return x[0, 0]


def _inked_range(v: np.ndarray, start: int, size: int, patch: int, flat: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Along one axis: the patch voxels ``first..stop-1`` that image voxels ``v`` ink.

    Voxels are intervals, as in :meth:`Window.to_patch`: image voxel ``v`` spans window coordinates
    ``[x, x + 1)`` with ``x = v - start``, and patch voxel ``o`` spans ``[o, o + 1) * size / patch``.
    Where the window is shrunk to the patch, an image voxel inks every patch voxel it overlaps (the
    support of :func:`resample_to_patch`'s box average); where it is grown (the 5 mm axis of an
    anisotropic image), the patch voxels whose centre it holds (nearest neighbour). Either way a run
    of image voxels inks a run of patch voxels without gaps, and a 5 mm voxel inks its 5 mm, no more.
    ``flat``: the axis is the normal of an axis-aligned slab; the slice inks the one patch voxel
    nearest its centre, as a polyline drawn on it does. Integer arithmetic: no rounding at the edges.
    """
    x = np.asarray(v, np.int64) - start
    if flat:
        nearest = np.rint((x + 0.5) * (patch / float(size)) - 0.5).astype(np.int64)  # Window.to_patch
        return nearest, nearest + 1
    if size < patch:  # grown: centre (o + 1/2) * size / patch in [x, x + 1)
        first = -((size - 2 * x * patch) // (2 * size))
        stop = -((size - 2 * (x + 1) * patch) // (2 * size))
    else:  # shrunk: overlap of [o, o + 1) * size / patch with [x, x + 1) longer than zero
        first = (x * patch) // size
        stop = -((-(x + 1) * patch) // size)
    return first, stop


def slab_patch_voxels(window: Window, voxels_kji: np.ndarray, pad: int = 0, flat: Sequence[bool] = (False,) * 3):
    """Patch voxels ``[z, y, x]`` (int, ``(N, 3)``, unique) that image voxels ``voxels_kji`` (a drawn
    slab's) ink when the window is resampled to the patch.

    The voxels are resampled, not their centres scattered (see :func:`_inked_range`, axis by axis),
    so a stroke drawn across 5 mm slices stays connected in the patch. ``flat``: per axis, whether
    it is the normal of a slab one voxel thick along it. ``pad`` patch voxels beyond each side are
    kept (for drawing that reaches into the patch from just outside). The cost follows the number
    of voxels drawn, never the window or the image.
    """
    voxels = np.asarray(voxels_kji, np.int64).reshape(-1, 3)
    firsts, lengths = [], []
    for axis in range(3):
        first, stop = _inked_range(voxels[:, axis], window.start[axis], window.size[axis], window.patch, flat[axis])
        first, stop = np.maximum(first, -pad), np.minimum(stop, window.patch + pad)
        firsts.append(first)
        lengths.append(stop - first)
    keep = np.all(np.stack(lengths) > 0, axis=0)
    if not keep.any():
        return np.zeros((0, 3), np.int64)
    lengths = [n[keep] for n in lengths]
    corner = np.array([f[keep].min() for f in firsts])
    firsts = [f[keep] - c for f, c in zip(firsts, corner)]
    inked = np.zeros([int((f + n).max()) for f, n in zip(firsts, lengths)], bool)  # the inked box only
    for dk in range(int(lengths[0].max())):
        for dj in range(int(lengths[1].max())):
            for di in range(int(lengths[2].max())):
                ok = (dk < lengths[0]) & (dj < lengths[1]) & (di < lengths[2])
                inked[firsts[0][ok] + dk, firsts[1][ok] + dj, firsts[2][ok] + di] = True
    return np.argwhere(inked) + corner


def _fitted_plane(voxels_kji: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(a point, the unit normal) of the least-squares plane through voxel centres (array order), or
    None when they do not define one (a line of voxels)."""
    pts = np.asarray(voxels_kji, np.float64).reshape(-1, 3)
    centre = pts.mean(0)
    centred = pts - centre
    values, vectors = np.linalg.eigh(centred.T @ centred)
    if values[1] <= 1e-9 * max(float(values[2]), 1.0):
        return None
    return centre, vectors[:, 0]


def _nearest_plane_layer(inked: np.ndarray, centre: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Which of the ``inked`` patch voxels (int ``(N, 3)``) form the thin layer of the plane through
    ``centre`` with ``normal`` (patch coordinates) that they hold.

    Along the axis nearest the normal, each column of the patch keeps its inked voxels whose centre
    lies within ``|normal|_1 / 2`` of the plane (the standard digital plane that
    :func:`~SegAssistLib.rasterize.fill_planar_polygon` draws a lasso with); a column whose inked
    voxels the plane misses keeps the one nearest it, so no inked column is left empty.
    """
    axis = int(np.argmax(np.abs(normal)))
    others = [a for a in range(3) if a != axis]
    rel = inked - centre
    crossing = -(rel[:, others] @ normal[others]) / normal[axis]  # the plane's height in each column
    distance = np.abs(rel[:, axis] - crossing)
    half = 0.5 * float(np.abs(normal).sum()) / abs(float(normal[axis])) + 1e-9
    _, column = np.unique(inked[:, others], axis=0, return_inverse=True)
    nearest = np.full(int(column.max()) + 1, np.inf)
    np.minimum.at(nearest, column.ravel(), distance)
    return distance <= np.maximum(half, nearest[column.ravel()] + 1e-9)


def slab_plane_patch_voxels(window: Window, voxels_kji: np.ndarray) -> np.ndarray:
    """Patch voxels ``[z, y, x]`` (int ``(N, 3)``) a lasso's slab on an oblique slice inks: one plane
    thick where the window magnifies an axis, as the polygon it was drawn from is filled in the patch.

    :func:`slab_patch_voxels` gives each image voxel its whole footprint: across 10 mm slices seen
    at 1.4 mm, about 7 patch voxels along the slice axis, so a digital plane tilted off the axial
    plane became a block several patch voxels thick, where a polygon (and every lasso of training)
    is one voxel thick. Here the block is thinned to the layer of the slab's least-squares plane
    (mapped into the patch) that it holds (:func:`_nearest_plane_layer`): the outline stays the
    slab's, the thickness becomes the polygon's. A window that magnifies no axis (a slab seen at its
    own resolution or coarser), or a slab whose voxels lie on a line, keeps the footprints as they are.
    """
    inked = slab_patch_voxels(window, voxels_kji)
    if len(inked) == 0 or not np.any(np.asarray(window.size) < window.patch):
        return inked
    plane = _fitted_plane(voxels_kji)
    if plane is None:
        return inked
    centre, normal = plane
    # n . x = c in image voxels is (n / scale) . p = c' in patch voxels (p = (x - start + 0.5) * scale - 0.5)
    normal_p = normal / window.scale
    normal_p /= np.linalg.norm(normal_p)
    return inked[_nearest_plane_layer(inked, window.to_patch(centre[None])[0], normal_p)]


def normalise_patch(patch: torch.Tensor) -> torch.Tensor:
    """Robust per-patch z-score: clip to the 0.5-99.5 percentiles, then zero mean, unit variance.

    Per-patch statistics make one network serve CT and every MRI contrast, at every zoom level.
    """
    flat = patch.reshape(-1).numpy()
    if flat.size > 32768:
        flat = flat[:: flat.size // 32768]
    lo, hi = (float(x) for x in np.percentile(flat, [0.5, 99.5]))
    clipped = patch.clamp(lo, hi)
    sample = np.clip(flat.astype(np.float64), lo, hi)  # float64: values near float32's limit overflow its sums
    mean, std = float(sample.mean()), float(sample.std())
    # constant: a spread lost in float rounding; relative, so images in tiny units (an ADC map in
    # m^2/s, values near 1e-9) are scaled like any other, not passed on as nearly blank
    constant = std <= 1e-6 * max(abs(lo), abs(hi)) or std == 0.0
    # in float64 too: a patch spanning both signs near float32's limit made x - mean infinite (NaN logits)
    return ((clipped.double() - mean) / (1.0 if constant else std)).float()


def extract_image_patch(array: np.ndarray, window: Window, modality: str = "MR") -> torch.Tensor:
    """The image under ``window``, resampled to the patch and normalised."""
    crop = crop_window(array, window)
    if modality == "CT":
        np.clip(crop, *CT_CLIP, out=crop)
    return normalise_patch(resample_to_patch(torch.from_numpy(crop), window.patch))


def extract_mask_patch(mask: np.ndarray, window: Window) -> torch.Tensor:
    """A binary mask under ``window`` as a soft [0, 1] patch."""
    crop = crop_window(mask, window, 0.0)
    return resample_to_patch(torch.from_numpy(crop), window.patch)


def logits_to_window(logits: torch.Tensor, window: Window) -> torch.Tensor:
    """Patch logits (patch^3) resampled back onto the window's whole voxel grid."""
    return F.interpolate(logits[None, None], size=tuple(window.size), mode="trilinear", align_corners=False)[0, 0]


def _linear_weights(n_out: int, n_in: int, lo: int, hi: int):
    """Indices and weights of 1D linear interpolation (align_corners=False) for outputs lo..hi-1."""
    x = torch.arange(lo, hi, dtype=torch.float64)
    u = ((x + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    i0 = u.floor().long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = (u - i0).float()
    return i0, i1, w


def logits_in_box(logits: torch.Tensor, window: Window, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """The window-grid logits only inside window voxels ``lo..hi`` (exclusive), the same values
    ``logits_to_window`` gives there, computed one axis at a time so the cost follows the box."""
    out = logits
    for axis in range(3):
        i0, i1, w = _linear_weights(window.size[axis], logits.shape[axis], int(lo[axis]), int(hi[axis]))
        shape = [1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape)
        out = out.index_select(axis, i0) * (1 - w) + out.index_select(axis, i1) * w
    return out


def positive_box(logits: torch.Tensor, window: Window, margin: int = 2):
    """Window-voxel box (lo, hi) holding every voxel whose logit may be positive, or None."""
    pos = logits > 0
    if not bool(pos.any()):
        return None
    idx = [torch.nonzero(pos.any(dim=tuple(a for a in range(3) if a != axis))).flatten() for axis in range(3)]
    scale = np.asarray(window.size, float) / window.patch
    lo = [max(0, int(np.floor((int(i[0]) - margin + 0.5) * sc - 0.5))) for i, sc in zip(idx, scale)]
    hi = [min(n, int(np.ceil((int(i[-1]) + margin + 1.5) * sc + 0.5))) for i, sc, n in zip(idx, scale, window.size)]
    return lo, hi
