"""Prompts: the plain, JSON-serialisable, replayable inputs of an interactive session.

Coordinates are continuous voxel indices ``(i, j, k)`` of the image the session was opened on
(``i`` fastest, as in ITK and Slicer's IJK). Arrays elsewhere in SegAssist are indexed ``[k, j, i]``
(the order of ``SimpleITK.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``).

Kinds:

- ``point``: a positive or negative click.
- ``box``: an axis-aligned box in IJK, inclusive corners. It is a 2D box when one axis has zero
  thickness (drawn on an axial, coronal or sagittal slice) and a 3D box otherwise; an axis thinner
  than a voxel but not flat still holds one voxel. A box drawn on an
  oblique slice is sent as a 4-vertex ``lasso``: both say "the object lies within this outline".
- ``scribble``: a positive or negative stroke drawn on a slice of any orientation.
- ``lasso``: a closed, planar polygon drawn on a slice of any orientation. Positive: the object's
  outline on that slice lies close to it. Negative: everything inside is background.
- ``mask``: an initial mask, stored compressed in the log, which becomes the current result.

A scribble or lasso comes in one of two forms: ``points`` (the polyline or polygon vertices, as
drawn) or ``slab`` (a :class:`Slab`: the voxels it covers on its slice, as a small bit-packed box
one voxel thick plus its offset). :func:`to_slab` turns the first into the second; the remote
client sends lassos and scribbles of width 2 (:data:`WIDE_SCRIBBLE_WIDTH`) or more as slabs (a
thinner scribble as drawn, so that the engine draws it as it does in-process), so what travels is
a 2D stroke, never a volume.

A :class:`PromptLog` is versioned (``schema_version``) so that logs written today stay readable.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from SegAssistLib import rasterize
from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.image import voxel_digest

# 1.1: scribbles and lassos may be given as a slab instead of points
# 1.2: a scribble given as points may carry the normal of the slice it was drawn on
# 1.3: a log's image may record its origin and direction (a log replayed on a flipped copy is refused)
# 1.4: a log may record the built-in engine's settings that shape its answers (``engine``), so that a
#      replay answers as the session did (``segassist segment`` applies them)
SCHEMA_VERSION = "1.4"

BOX_FLAT_TOLERANCE = 1e-4  # voxels: a box axis this thin is flat (float noise of corners on one plane)
MAX_SLAB_AXIS = 4096  # voxels along any axis of a slab's box
MAX_SLAB_VOXELS = 4096 * 4096  # voxels in a slab's box: 2 MiB of bits at most, whatever the client sends
SLAB_PLANE_TOLERANCE = 1.0  # voxels: half the thickness of the layer that must hold a slab's voxel centres
_MAX_SLAB_DATA_CHARS = 4 * ((MAX_SLAB_VOXELS // 8 + 4096) // 3 + 1)  # base64 of the worst zlib output
MAX_SLAB_OFFSET = 2**31  # |offset| of a slab's box on any axis: past any image, and no int64 overflow

# Strokes given as points: whatever a client sends, rasterising one takes bounded memory and time.
# Real strokes are far below these: a Slicer curve or a simulated scribble (one vertex per pixel of a
# skeleton or an outline) has at most a few thousand vertices on the largest images (2048 per axis).
MAX_STROKE_VERTICES = 16384  # vertices of a scribble's polyline or a lasso's polygon
# A scribble is rasterised as its samples every half voxel, each widened by the points of a disc of
# its width (1 point at width 1, about 1,100 at width 20), in chunks of _SCRIBBLE_CHUNK_POINTS.
MAX_SCRIBBLE_SAMPLES = 2**19  # samples: a stroke about 260,000 voxels long (any width)
MAX_SCRIBBLE_POINTS = 2**23  # samples x disc points: at width 20, a stroke about 3,700 voxels long
_SCRIBBLE_CHUNK_POINTS = 2**18  # points rounded at once: ~6 MB per working array

# An initial mask's box: a whole image of the largest size a server takes (600 Mi voxels) fits.
MAX_MASK_VOXELS = 2**31  # voxels in a mask prompt's box
MAX_MASK_EXTENT = 2**31  # offset + shape on any axis: no int64 overflow anywhere

#: voxels: a scribble this wide or wider is a tube, its samples widened by a disc of its width in the
#: slice it was drawn on (:func:`scribble_voxels`, as its slab form holds it); a thinner one is its
#: samples along the polyline alone, which the engine draws in its patch (the remote client sends
#: it as drawn, so that the server draws it the same way)
WIDE_SCRIBBLE_WIDTH = 2.0

Vec3 = Tuple[float, float, float]


def inside_image(points_kji: npt.ArrayLike, shape_kji: Sequence[int]) -> np.ndarray:
    """Which points lie inside an image of array shape ``shape_kji``: a boolean array, one per point.

    Points and shape are both in array order ``[k, j, i]`` (as :func:`prompt_vertices_kji` gives
    them): reverse points held as ``(i, j, k)`` first (``points_ijk[:, ::-1]``). Voxel centres lie
    at integer indices and an image reaches half a voxel beyond its outer ones, so a point is inside
    when every coordinate ``x`` on an axis of ``n`` voxels has ``-0.5 <= x <= n - 0.5``, both ends
    included. A non-finite coordinate is outside. ``points_kji``: one point ``(3,)`` or ``(N, 3)``.
    """
    pts = np.asarray(points_kji, float).reshape(-1, 3)
    upper = np.asarray(tuple(shape_kji), float) - 0.5
    if upper.shape != (3,):
        raise ValueError(f"inside_image needs a 3D image shape (k, j, i), got {list(shape_kji)}")
    return np.all((pts >= -0.5) & (pts <= upper), axis=1)


def _real_number(x: object) -> Optional[float]:
    """``x`` as a float when it is a real number (a Python or numpy int or float, not a bool) within
    float range; None otherwise (a string, a bool, a list, an object, an int beyond float range)."""
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x[()]
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    try:
        return float(x)
    except OverflowError:  # a JSON integer such as 10**400
        return None


def _describe(x: object) -> str:
    """A short account of a value that is not a coordinate (never the whole of a huge one)."""
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return "an integer beyond float range"
    text = repr(x) if isinstance(x, (str, float, np.floating)) else type(x).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _finite_vec3(value: object, what: str) -> Vec3:
    """Three finite real numbers (i, j, k); anything else, whatever a client sends, is a ValueError
    (a 422 on the server): strings and booleans are not numbers here, as in an array's shape."""
    items = None
    if not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__"):
        try:
            items = list(value)
        except (TypeError, ValueError):  # a 0-d array, an object that is not a sequence after all
            items = None
    if items is None:
        raise ValueError(f"{what} must be a list of 3 coordinates (i, j, k), got {_describe(value)}")
    if len(items) != 3:
        shown = [_real_number(x) if _real_number(x) is not None else _describe(x) for x in items[:8]]
        raise ValueError(f"{what} must have 3 coordinates (i, j, k), got {len(items)}: {shown}")
    out = []
    for x in items:
        f = _real_number(x)
        if f is None:
            raise ValueError(f"{what} coordinates must be numbers, got {_describe(x)}")
        if not np.isfinite(f):
            raise ValueError(f"{what} has a non-finite coordinate: {[_real_number(y) for y in items]}")
        out.append(f)
    return (out[0], out[1], out[2])


def _integer_not_bool_or_text(x: object) -> object:
    if isinstance(x, (bool, np.bool_, str, bytes)):
        raise ValueError(f"must be an integer, got {_describe(x)}")
    return x


#: an array index or size a client sends: an integer (JSON true/false or "3" are refused, as in a frame's shape)
Index = Annotated[int, BeforeValidator(_integer_not_bool_or_text)]


def _pack_bits(box: np.ndarray) -> str:
    """base64 of zlib-compressed ``np.packbits`` of a boolean array, C order."""
    return base64.b64encode(zlib.compress(np.packbits(np.asarray(box, bool).ravel()).tobytes(), 6)).decode("ascii")


def _unpack_bits(data: str, shape: Sequence[int], what: str) -> np.ndarray:
    """The boolean array of ``shape`` that :func:`_pack_bits` encoded; a clear PromptError otherwise.

    Decompression stops one byte past the size the shape needs, so a small body cannot expand into
    gigabytes (a zlib bomb) before it is refused.
    """
    shape = tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    need = (n + 7) // 8
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PromptError(f"{what} data is not base64: {exc}") from exc
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(raw, need + 1)
    except zlib.error as exc:
        raise PromptError(f"{what} data is not zlib-compressed bits: {exc}") from exc
    if len(packed) > need or inflater.unconsumed_tail:
        raise PromptError(f"{what} data holds more than the {n} bits of its shape {list(shape)}")
    if len(packed) < need or not inflater.eof:
        raise PromptError(
            f"{what} data is truncated: {len(packed) * 8} bits for the {n} voxels of its shape {list(shape)}"
        )
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=n).reshape(shape).astype(bool)


class _Prompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PointPrompt(_Prompt):
    kind: Literal["point"] = "point"
    position: Vec3
    positive: bool = True

    @field_validator("position", mode="before")
    @classmethod
    def _check_position(cls, v):
        return _finite_vec3(v, "point position")


class BoxPrompt(_Prompt):
    kind: Literal["box"] = "box"
    min_corner: Vec3
    max_corner: Vec3
    positive: bool = True

    @field_validator("min_corner", "max_corner", mode="before")
    @classmethod
    def _check_corner(cls, v):
        return _finite_vec3(v, "box corner")

    @model_validator(mode="after")
    def _check_extent(self):
        lo, hi = np.asarray(self.min_corner), np.asarray(self.max_corner)
        if np.any(hi < lo):
            raise ValueError(f"box max_corner {self.max_corner} is below min_corner {self.min_corner}")
        flat = int(np.sum(hi - lo <= BOX_FLAT_TOLERANCE))
        if flat > 1:
            raise ValueError(
                f"degenerate box {self.min_corner}..{self.max_corner}: it is flat along more than one axis "
                "(a 2D box is flat along one axis only, the normal of the slice it was drawn on)"
            )
        if not self.positive:
            raise ValueError("negative boxes are not supported: use a negative lasso or scribble")
        return self

    @property
    def is_2d(self) -> bool:
        """Flat along one axis (drawn on a slice). An axis thinner than a voxel but not flat (a box
        dragged on a coronal view of thick slices, 0.8 slice tall) is no slice normal: the box still
        holds at least one voxel along it (``rasterize.fill_box``)."""
        return bool(np.any(np.asarray(self.max_corner) - np.asarray(self.min_corner) <= BOX_FLAT_TOLERANCE))


def _slab_too_large(shape: Sequence[int]) -> str:
    return (
        f"slab of shape {[int(n) for n in shape]} is too large: at most {MAX_SLAB_AXIS} voxels along an axis "
        f"and {MAX_SLAB_VOXELS} in its box"
    )


class Slab(BaseModel):
    """The voxels a stroke or lasso covers on the slice it was drawn on: a box of the image (array
    order ``[k, j, i]``) one voxel thick along the slice normal, and its bits.

    The box is 1 voxel thick along one axis for a stroke on an axial, coronal or sagittal slice; on
    an oblique slice it is a 3D box whose set voxels lie on one plane (a digital plane).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    offset: Tuple[Index, Index, Index] = Field(description="array index [k, j, i] of the box's first voxel")
    shape: Tuple[Index, Index, Index] = Field(description="box size [nk, nj, ni]")
    data: str = Field(
        max_length=_MAX_SLAB_DATA_CHARS,
        description="base64 of zlib-compressed np.packbits of the boolean box, C order",
    )

    @model_validator(mode="after")
    def _check_slab(self) -> Slab:
        shape = [int(n) for n in self.shape]  # Python ints: a huge entry is refused, not an int64 overflow
        if any(n < 1 for n in shape):
            raise ValueError(f"slab shape {shape} must be at least 1 voxel on every axis")
        if any(n > MAX_SLAB_AXIS for n in shape) or shape[0] * shape[1] * shape[2] > MAX_SLAB_VOXELS:
            raise ValueError(_slab_too_large(shape))
        if any(abs(int(x)) > MAX_SLAB_OFFSET for x in self.offset):
            raise ValueError(f"slab offset {list(self.offset)} is out of range: at most {MAX_SLAB_OFFSET} in magnitude")
        if not self.to_box().any():
            raise ValueError("empty slab: no voxel is set (an empty stroke is not a prompt)")
        return self

    @classmethod
    def from_mask(cls, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> Slab:
        """The slab of a boolean array (a whole image, or a box of it starting at ``offset``),
        cropped to the bounding box of its set voxels."""
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise PromptError(f"a slab is made from a 3D array, got shape {mask.shape}")
        nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        if any(len(x) == 0 for x in nz):
            raise PromptError("empty slab: no voxel is set (an empty stroke is not a prompt)")
        lo = np.array([x[0] for x in nz])
        hi = np.array([x[-1] + 1 for x in nz])
        box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
        start = np.asarray(offset, np.int64) + lo
        return cls(offset=tuple(int(x) for x in start), shape=tuple(int(x) for x in box.shape), data=_pack_bits(box))

    def to_box(self) -> np.ndarray:
        """The boolean box, shape :attr:`shape`."""
        return _unpack_bits(self.data, self.shape, "slab")

    def voxels_kji(self) -> np.ndarray:
        """``(N, 3)`` int array of the set voxels, image array indices ``[k, j, i]`` (read-only)."""
        return np.frombuffer(self._voxel_bytes, np.int64).reshape(-1, 3)

    @cached_property
    def _voxel_bytes(self) -> bytes:
        # decoded once per slab (the engine asks in every window); bytes, so that equality of two
        # slabs, which compares their __dict__ first, works whether or not either has decoded
        return (np.argwhere(self.to_box()) + np.asarray(self.offset, np.int64)).astype(np.int64).tobytes()

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """(first, one past the last) voxel of the box, array order ``[k, j, i]``."""
        lo = np.asarray(self.offset, np.int64)
        return lo, lo + np.asarray(self.shape, np.int64)

    def off_plane(self) -> float:
        """Half the thickness (voxels) of the thinnest plane-parallel layer holding every set voxel
        centre: 0 for a box one voxel thick along an axis, at most ``sqrt(3) / 2`` for a digital
        plane of any orientation, 1 or more for a blob three voxels thick.

        Only the two ends of each row of the box along its longest axis matter (a layer holding
        them holds the row), which keeps the cost to the box's two smaller sides. Past
        :data:`SLAB_PLANE_TOLERANCE` the value may be an over-estimate (a blob is not measured
        precisely, only found too thick).
        """
        if min(self.shape) == 1:
            return 0.0
        box = self.to_box()
        axis = int(np.argmax(self.shape))
        rows = box.any(axis=axis)
        first = np.argmax(box, axis=axis)[rows]
        last = (self.shape[axis] - 1 - np.argmax(np.flip(box, axis=axis), axis=axis))[rows]
        others = np.argwhere(rows)
        ends = []
        for along in (first, last):
            pts = np.empty((len(along), 3))
            pts[:, axis] = along
            pts[:, [a for a in range(3) if a != axis]] = others
            ends.append(pts)
        pts = np.concatenate(ends)
        centred = pts - pts.mean(0)
        normal = np.linalg.eigh(centred.T @ centred)[1][:, 0]  # least-squares plane

        def half_width(n: np.ndarray) -> float:
            d = centred @ n
            return float(d.max() - d.min()) / 2.0

        best = half_width(normal)
        # A layer thinner than 2 * tolerance holds at most this many voxels per column along the axis
        # nearest its normal: more voxels than that in the box, and no refinement can find one.
        per_column = int(np.floor(2 * SLAB_PLANE_TOLERANCE * np.sqrt(3))) + 1
        crowded = np.count_nonzero(box) > per_column * box.size // min(self.shape)
        step = 0.0 if crowded else 0.25
        while best >= SLAB_PLANE_TOLERANCE and step > 1e-3:  # refine the normal: a thinner layer?
            t1 = np.cross(normal, np.eye(3)[int(np.argmin(np.abs(normal)))])
            t1 /= np.linalg.norm(t1)
            t2 = np.cross(normal, t1)
            trials = [normal + step * sign * t for t in (t1, t2) for sign in (1.0, -1.0)]
            widths = [half_width(n / np.linalg.norm(n)) for n in trials]
            i = int(np.argmin(widths))
            if widths[i] < best:
                best, normal = widths[i], trials[i] / np.linalg.norm(trials[i])
            else:
                step /= 2.0
        return best


class _PolyPrompt(_Prompt):
    """A scribble or lasso: exactly one of ``points`` (as drawn) or ``slab`` (the voxels drawn)."""

    points: Optional[List[Vec3]] = None
    slab: Optional[Slab] = None
    positive: bool = True

    @field_validator("points", mode="before")
    @classmethod
    def _check_points(cls, v):
        if v is None:
            return None
        if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
            raise ValueError("points must be a list of vertices (i, j, k)")
        if len(v) == 0:
            raise ValueError("no points: an empty stroke is not a prompt")
        if len(v) > MAX_STROKE_VERTICES:
            raise ValueError(
                f"too many points: {len(v)} vertices, above the limit of MAX_STROKE_VERTICES = {MAX_STROKE_VERTICES} "
                "(send fewer vertices, or the stroke as a slab)"
            )
        return [_finite_vec3(p, "vertex") for p in v]

    @model_validator(mode="after")
    def _check_form(self):
        if (self.points is None) == (self.slab is None):
            both = "both" if self.points is not None else "neither"
            raise ValueError(
                f"a {self.kind} takes exactly one of 'points' (the vertices drawn) or 'slab' (the voxels drawn), "
                f"got {both}"
            )
        if self.slab is not None:
            off = self.slab.off_plane()
            if off >= SLAB_PLANE_TOLERANCE:
                raise ValueError(
                    f"{self.kind} slab is not 2D: it is {2 * off:.1f} voxels thick across its best-fitting plane "
                    f"(a slice is under {2 * SLAB_PLANE_TOLERANCE:g}); draw the {self.kind} on a single slice"
                )
        return self

    @model_serializer(mode="wrap")
    def _drop_unused_form(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        out = handler(self)
        for name in ("points", "slab", "normal"):
            if out.get(name, 0) is None:
                del out[name]
        return out


class ScribblePrompt(_PolyPrompt):
    kind: Literal["scribble"] = "scribble"
    width: float = Field(1.0, gt=0, le=20, description="stroke width in voxels")
    normal: Optional[Vec3] = Field(
        None,
        description="points form only: the normal (i, j, k, in voxel index space) of the slice the stroke was "
        "drawn on, which a straight stroke along an image axis or a single dot does not tell; without it such "
        "a stroke is taken to lie on an axial slice (k constant), then coronal, then sagittal",
    )

    @field_validator("normal", mode="before")
    @classmethod
    def _check_normal(cls, v):
        if v is None:
            return None
        n = np.asarray(_finite_vec3(v, "normal"))
        largest = float(np.max(np.abs(n)))
        if not largest > 0:
            raise ValueError("normal must not be the zero vector")
        # kept scaled so that its largest coordinate is +-1: its norm (1 to sqrt(3)) can neither overflow
        # (1e200 squared was inf: the stroke drew nothing) nor vanish, and a second scaling changes nothing
        return tuple(float(x) for x in n / largest)

    @model_validator(mode="after")
    def _check_budget(self):
        if self.normal is not None:
            if self.points is None:
                raise ValueError("a normal goes with a scribble given as points, not as a slab")
            pts = np.asarray(self.points, float)
            n = np.asarray(self.normal) / np.linalg.norm(self.normal)
            off = float(np.abs((pts - pts[0]) @ n).max())
            if off > SLAB_PLANE_TOLERANCE:
                raise ValueError(f"the stroke's vertices leave the slice of its normal by up to {off:.2f} voxels")
        if self.points is not None:  # refused here (a 422 on the server) rather than when rasterised
            problem = _scribble_budget_error(np.asarray(self.points, float)[:, ::-1], self.width)  # as to_slab
            if problem:
                raise ValueError(problem)
        return self

    def normal_kji(self) -> Optional[np.ndarray]:
        """The slice normal in array order ``[k, j, i]``, when given."""
        return None if self.normal is None else np.asarray(self.normal, float)[::-1]


class LassoPrompt(_PolyPrompt):
    kind: Literal["lasso"] = "lasso"

    @model_validator(mode="after")
    def _check_polygon(self):
        if self.points is None:
            return self
        pts = np.asarray(self.points)
        if len(pts) < 3:
            raise ValueError(f"a lasso needs at least 3 vertices, got {len(pts)}")
        centred = pts - pts.mean(axis=0)
        sv = np.linalg.svd(centred, compute_uv=False)
        if sv[1] < 1e-6 * max(sv[0], 1.0) or sv[0] == 0:
            raise ValueError("degenerate lasso: its vertices are collinear")
        if sv[2] > 0.5 * np.sqrt(len(pts)):
            raise ValueError("lasso vertices are not on one plane: draw the lasso on a single slice")
        return self


class MaskPrompt(_Prompt):
    """An initial mask: a box of the image given by its array offset ``[k, j, i]`` and its bits."""

    kind: Literal["mask"] = "mask"
    offset: Tuple[Index, Index, Index]
    shape: Tuple[Index, Index, Index]
    data: str = Field(description="base64 of zlib-compressed np.packbits of the boolean box, C order")

    @model_validator(mode="after")
    def _check_box(self) -> MaskPrompt:
        shape, offset = [int(n) for n in self.shape], [int(n) for n in self.offset]
        if any(n < 1 for n in shape):
            raise ValueError(f"mask shape {shape} must be at least 1 voxel on every axis")
        if any(n < 0 for n in offset):
            raise ValueError(f"mask offset {offset} must not be negative (array index k, j, i of the box's start)")
        if any(o + n > MAX_MASK_EXTENT for o, n in zip(offset, shape)):
            raise ValueError(f"mask offset {offset} + shape {shape} is beyond {MAX_MASK_EXTENT} on an axis")
        voxels = shape[0] * shape[1] * shape[2]
        if voxels > MAX_MASK_VOXELS:
            raise ValueError(f"mask shape {shape} is too large: {voxels} voxels, above the limit of {MAX_MASK_VOXELS}")
        return self

    @classmethod
    def from_array(cls, mask: np.ndarray) -> MaskPrompt:
        """Encode a full-image mask (array order ``[k, j, i]``), keeping only its bounding box."""
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise PromptError(f"an initial mask must be 3D, got shape {mask.shape}")
        nz = np.argwhere(mask > 0)
        if len(nz) == 0:
            lo, hi = np.zeros(3, int), np.zeros(3, int)
            box = np.zeros((1, 1, 1), bool)
        else:
            lo, hi = nz.min(0), nz.max(0) + 1
            box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
        return cls(offset=tuple(int(x) for x in lo), shape=tuple(int(x) for x in box.shape), data=_pack_bits(box))

    def to_box(self) -> np.ndarray:
        """The boolean box, shape :attr:`shape` (array order ``[k, j, i]``)."""
        return _unpack_bits(self.data, self.shape, "initial mask")

    def to_array(self, image_shape: Sequence[int]) -> np.ndarray:
        lo = np.asarray(self.offset, np.int64)
        hi = lo + np.asarray(self.shape, np.int64)
        if np.any(lo < 0) or np.any(hi > np.asarray(image_shape)):  # before decoding: no work for a bad box
            raise PromptError(f"initial mask box {lo.tolist()}..{hi.tolist()} lies outside image {list(image_shape)}")
        box = _unpack_bits(self.data, self.shape, "initial mask")
        out = np.zeros(tuple(image_shape), np.uint8)
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
        return out


Prompt = Union[PointPrompt, BoxPrompt, ScribblePrompt, LassoPrompt, MaskPrompt]
PROMPT_KINDS: Tuple[str, ...] = ("point", "box", "scribble", "lasso", "mask")
AnyPrompt = Annotated[Prompt, Field(discriminator="kind")]
_PROMPT_ADAPTER: TypeAdapter = TypeAdapter(AnyPrompt)


def prompt_vertices_kji(prompt: Prompt) -> np.ndarray:
    """The prompt's coordinates as an ``(N, 3)`` array in array order ``[k, j, i]`` (empty for a mask):
    the click, the two box corners, the stroke's or polygon's vertices, or a slab's set voxels."""
    if isinstance(prompt, PointPrompt):
        pts = [prompt.position]
    elif isinstance(prompt, BoxPrompt):
        pts = [prompt.min_corner, prompt.max_corner]
    elif isinstance(prompt, (ScribblePrompt, LassoPrompt)):
        if prompt.slab is not None:
            return prompt.slab.voxels_kji().astype(float)
        pts = prompt.points
    else:
        return np.zeros((0, 3))
    return np.asarray(pts, float).reshape(-1, 3)[:, ::-1]


def _stroke_plane_axes(verts_kji: np.ndarray, normal_kji: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Two orthonormal in-plane directions of the slice a polyline was drawn on.

    The slice of ``normal_kji`` when given. Otherwise: vertices that share a coordinate lie on that
    axis-aligned slice (axial first, then coronal, sagittal), else the best-fit plane. A straight
    oblique stroke does not define its slice: the plane through it closest to an axis-aligned one is used.
    """
    eye = np.eye(3)
    flat = [axis for axis in range(3) if np.ptp(verts_kji[:, axis]) < 1e-6]
    if normal_kji is not None:
        normal = np.asarray(normal_kji, float) / np.linalg.norm(normal_kji)
    elif flat:
        normal = eye[flat[0]]
    else:
        centred = verts_kji - verts_kji.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        if len(sv) == 3 and sv[1] > 1e-6 * max(sv[0], 1.0):
            normal = vt[2]
        else:  # collinear: the plane holding the line whose normal is nearest an axis
            direction = vt[0]
            axis = int(np.argmin(np.abs(direction)))
            normal = eye[axis] - direction * direction[axis]
            normal /= np.linalg.norm(normal)
    u = np.cross(normal, eye[int(np.argmin(np.abs(normal)))])
    u /= np.linalg.norm(u)
    return u, np.cross(normal, u)


def _disc_coefficients(width: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """In-plane coordinates of the points that widen each sample of a stroke of ``width``: a disc on
    the half-voxel grid centred on the sample, so a stroke widens by the same amount on both sides
    whatever its width (None below width 2, where the disc holds the sample alone)."""
    radius = (width - 1.0) / 2.0
    half_steps = int(np.floor(2.0 * radius + 1e-9)) if radius > 0 else 0
    if half_steps == 0:
        return None
    steps = 0.5 * np.arange(-half_steps, half_steps + 1)
    a, b = np.meshgrid(steps, steps, indexing="ij")
    keep = a**2 + b**2 <= radius**2 + 1e-9
    return a[keep], b[keep]


_TIE_NUDGE = 1e-9  # voxels: see _scribble_disc


def _scribble_disc(verts_kji: np.ndarray, width: float, normal_kji: Optional[np.ndarray] = None) -> np.ndarray:
    """Offsets (array order) of the points that widen each sample of a stroke: a disc of the
    stroke's width in the slice it was drawn on (one zero offset at width 1).

    Each offset is nudged towards the disc's centre by far less than any coordinate's precision,
    so that a point half-way between two voxels rounds to the one nearer the sample: otherwise
    rounding (half to even) made a stroke on an even row wider or narrower than one on an odd row.
    """
    coefficients = _disc_coefficients(width)
    if coefficients is None:
        return np.zeros((1, 3))
    u, v = _stroke_plane_axes(verts_kji, normal_kji)
    a, b = coefficients
    disc = a[:, None] * u + b[:, None] * v
    return disc - _TIE_NUDGE * np.sign(disc)


def _scribble_budget_error(verts: np.ndarray, width: float) -> Optional[str]:
    """Why a polyline of ``width`` is beyond :data:`MAX_SCRIBBLE_SAMPLES` or :data:`MAX_SCRIBBLE_POINTS`
    (None when within both): the work and memory of :func:`_scribble_voxels` follow these counts."""
    coefficients = _disc_coefficients(width)
    n_disc = 1 if coefficients is None else len(coefficients[0])
    n_samples = rasterize.polyline_sample_count(verts, step=0.5)
    n_points = n_samples * n_disc
    if n_samples <= MAX_SCRIBBLE_SAMPLES and n_points <= MAX_SCRIBBLE_POINTS:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        length = float(np.sum(np.linalg.norm(np.diff(verts, axis=0), axis=1)))
    return (
        f"scribble too large to rasterise: {n_samples} samples (every half voxel along its {length:.0f} voxels, "
        f"{len(verts)} vertices) x {n_disc} points of its width {width:g} = {n_points} points, above the limits of "
        f"MAX_SCRIBBLE_SAMPLES = {MAX_SCRIBBLE_SAMPLES} samples and MAX_SCRIBBLE_POINTS = {MAX_SCRIBBLE_POINTS} "
        "points; draw a shorter or thinner stroke"
    )


def _scribble_voxels(verts_kji: np.ndarray, width: float, normal_kji: Optional[np.ndarray] = None) -> np.ndarray:
    """Voxels (array order) of a polyline with its width, thickened within the slice it was drawn on.

    The line's voxels are the ones the engines, the baselines and the scribble simulator take for
    "the voxels a polyline passes through": its points every half voxel, rounded to the nearest
    voxel. Every one of them, and every point of the width's disc, lies on the slice's plane, so the
    voxels form a digital plane (one voxel thick along the slice normal).

    The samples are widened and rounded in chunks (``_SCRIBBLE_CHUNK_POINTS`` points), so memory
    stays bounded; a stroke of more than :data:`MAX_SCRIBBLE_SAMPLES` samples, or more than
    :data:`MAX_SCRIBBLE_POINTS` samples times disc points, is refused with a :class:`PromptError`.
    Returns the sorted unique voxels, shape ``(N, 3)``.
    """
    verts_kji = np.asarray(verts_kji, float).reshape(-1, 3)
    problem = _scribble_budget_error(verts_kji, width)
    if problem:
        raise PromptError(problem)
    radius = max((width - 1.0) / 2.0, 0.0)
    disc = _scribble_disc(verts_kji, width, normal_kji)
    if len(disc) == 0 or len(verts_kji) == 0:
        return np.zeros((0, 3), np.int64)
    # Each voxel becomes one int64 key in a box holding every point (the samples lie between the
    # vertices, the disc within the radius); a sort of keys is a sort of rows, (k, j, i) order.
    base = np.floor(verts_kji.min(0) - radius) - 2
    top = np.ceil(verts_kji.max(0) + radius) + 2
    keyed = bool(np.all(np.abs(np.concatenate([base, top])) < 2.0**52))
    if keyed:
        lo = base.astype(np.int64)
        ext = (top - base + 1).astype(np.int64)
        keyed = int(ext[0]) * int(ext[1]) * int(ext[2]) < 2**62
    rows = max(1, _SCRIBBLE_CHUNK_POINTS // len(disc))
    widen = radius > 0
    merge = np.unique if keyed else (lambda rows_: np.unique(rows_, axis=0))
    found, pending, n_pending = [], [], 0  # found: the unique voxels so far (0 or 1 array)
    for samples in rasterize.polyline_sample_chunks(verts_kji, step=0.5, rows=rows):
        points = (samples[:, None, :] + disc[None]).reshape(-1, 3) if widen else samples
        voxels = np.rint(points).astype(np.int64)
        del points
        if keyed:
            voxels -= lo
            voxels = (voxels[:, 0] * ext[1] + voxels[:, 1]) * ext[2] + voxels[:, 2]
        # else: coordinates beyond 2**52, rows compared directly (slower, same voxels)
        pending.append(merge(voxels))
        n_pending += len(pending[-1])
        if n_pending > max(_SCRIBBLE_CHUNK_POINTS, len(found[0]) if found else 0):  # merged: memory ~ the result
            found, pending, n_pending = [merge(np.concatenate(found + pending))], [], 0
    keys = merge(np.concatenate(found + pending))
    del found, pending
    if not keyed:
        return keys
    out = np.empty((len(keys), 3), np.int64)
    out[:, 2] = keys % ext[2]
    keys //= ext[2]
    out[:, 1] = keys % ext[1]
    keys //= ext[1]
    out[:, 0] = keys
    out += lo
    return out


def _lasso_box(verts_kji: np.ndarray, image_shape: Sequence[int]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A filled planar polygon, outline included (``fill_planar_polygon``), drawn on a grid the size
    of its bounding box (clipped to the image) only: (the boolean box, its offset), or None when the
    box misses the image.

    Raises :class:`PromptError` before drawing when the polygon's voxels could not fit a slab
    (:data:`MAX_SLAB_AXIS`, :data:`MAX_SLAB_VOXELS`): the voxel nearest each vertex inside the
    image is drawn, so their extent is a lower bound of the slab's box.
    """
    shape = np.asarray(image_shape, np.int64)
    lo = np.maximum(np.floor(verts_kji.min(0)).astype(np.int64) - 1, 0)
    hi = np.minimum(np.ceil(verts_kji.max(0)).astype(np.int64) + 2, shape)
    if np.any(hi <= lo):
        return None
    held = verts_kji[np.all((verts_kji >= 0) & (verts_kji <= shape - 1), axis=1)]
    if len(held):
        # a margin of a voxel for rounding: the voxel drawn nearest a vertex is within 0.5 (+ float error)
        least = np.maximum(np.ceil(held.max(0) - 0.51) - np.floor(held.min(0) + 0.51) + 1, 1).astype(np.int64)
        if np.any(least > MAX_SLAB_AXIS) or int(np.prod(least)) > MAX_SLAB_VOXELS:
            raise PromptError(
                f"the lasso cannot be made a slab: its voxels span at least {least.tolist()} (array order k, j, i), "
                f"too large: at most {MAX_SLAB_AXIS} voxels along an axis and {MAX_SLAB_VOXELS} in its box"
            )
    local = np.zeros(tuple(hi - lo), bool)
    rasterize.fill_planar_polygon(local, verts_kji - lo)
    return local, lo


def _lasso_voxels(verts_kji: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Voxels (array order) of a filled planar polygon, outline included (``fill_planar_polygon``),
    drawn on a grid the size of its bounding box only."""
    drawn = _lasso_box(verts_kji, image_shape)
    if drawn is None:
        return np.zeros((0, 3), np.int64)
    local, lo = drawn
    return np.argwhere(local) + lo


def scribble_voxels(prompt: ScribblePrompt) -> np.ndarray:
    """The voxels (array order ``[k, j, i]``, not clipped to any image, read-only) of a scribble in
    points form with its width, as :func:`to_slab` draws them; computed once per prompt."""
    points = tuple(tuple(float(x) for x in p) for p in prompt.points)
    normal = None if prompt.normal is None else tuple(float(x) for x in prompt.normal)
    return np.frombuffer(_stroke_voxel_bytes(points, float(prompt.width), normal), np.int64).reshape(-1, 3)


# A session's every stroke is looked at on each click: past this many, each click drew them all again.
@lru_cache(maxsize=256)
def _stroke_voxel_bytes(
    points: Tuple[Tuple[float, ...], ...], width: float, normal: Optional[Tuple[float, ...]]
) -> bytes:
    # rasterised once per stroke: the engine draws every earlier stroke again in each window of each
    # click, and the edge snap once more. Keyed by the stroke's content, not held on the (frozen)
    # prompt, so that copies, equality and pickles of prompts stay as they are
    normal_kji = None if normal is None else np.asarray(normal, float)[::-1]
    return _scribble_voxels(np.asarray(points, float)[:, ::-1], width, normal_kji).astype(np.int64).tobytes()


def to_slab(prompt: Prompt, image_shape: Sequence[int]) -> Prompt:
    """The same prompt in slab form: a polyline scribble (with its width, in the plane it was drawn
    on) or a lasso polygon (filled, outline included) rasterised into the image grid
    (``image_shape``, array order ``[k, j, i]``) and cropped to its bounding box.

    Other kinds, and scribbles and lassos already in slab form, are returned unchanged. Raises
    :class:`PromptError` when nothing of the stroke lies in the image, or when its voxels cannot
    form a valid slab (a stroke that is not on one slice, or one too large for a slab).
    """
    if not isinstance(prompt, (ScribblePrompt, LassoPrompt)) or prompt.slab is not None:
        return prompt
    shape = np.asarray(tuple(image_shape), np.int64)
    if shape.shape != (3,):
        raise PromptError(f"to_slab needs a 3D image shape, got {list(image_shape)}")
    verts = np.asarray(prompt.points, float)[:, ::-1]
    outside = f"the {prompt.kind} lies outside the image (array shape k, j, i = {shape.tolist()})"
    if isinstance(prompt, ScribblePrompt):
        voxels = scribble_voxels(prompt)
        voxels = voxels[np.all((voxels >= 0) & (voxels < shape), axis=1)]
        if len(voxels) == 0:
            raise PromptError(outside)
        lo = voxels.min(0)
        extent = voxels.max(0) - lo + 1
        if np.any(extent > MAX_SLAB_AXIS) or int(np.prod(extent)) > MAX_SLAB_VOXELS:  # before allocating its box
            raise PromptError(f"the {prompt.kind} cannot be made a slab: {_slab_too_large(extent)}")
        box = np.zeros(tuple(extent), bool)
        box[tuple((voxels - lo).T)] = True
    else:
        drawn = _lasso_box(verts, shape)  # inside the image by construction
        if drawn is None or not drawn[0].any():
            raise PromptError(outside)
        box, lo = drawn
    fields = prompt.model_dump(exclude={"points", "slab", "kind", "normal"})  # a slab is its own slice
    try:
        return type(prompt)(slab=Slab.from_mask(box, lo), **fields)
    except ValidationError as exc:  # not on one slice, too large
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise PromptError(f"the {prompt.kind} cannot be made a slab: {reasons}") from exc


def parse_prompt(data: Union[dict, str]) -> Prompt:
    """Parse one prompt from a dict or JSON text; raises :class:`PromptError` with the reason, in one
    line (:func:`describe_validation_error`: where in the prompt, and what is wrong there)."""
    if not isinstance(data, (dict, str, BaseModel)):  # pydantic: "a valid dictionary or object to extract fields from"
        shown = repr(data) if len(repr(data)) <= 40 else repr(data)[:37] + "..."
        raise PromptError(
            f"invalid prompt: expected an object with a kind ({', '.join(PROMPT_KINDS)}), "
            f"got {type(data).__name__} {shown}"
        )
    try:
        if isinstance(data, str):
            return _PROMPT_ADAPTER.validate_json(data)
        return _PROMPT_ADAPTER.validate_python(data)
    except Exception as exc:  # pydantic.ValidationError, json errors
        raise PromptError(f"invalid prompt: {describe_validation_error(exc, whole='')}") from exc


def _schema_version(v: object) -> Optional[Tuple[int, int]]:
    """(major, minor) of a ``schema_version`` such as "1.2"; None when it is not "major.minor"."""
    if not isinstance(v, str) or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", v):
        return None
    major, minor = v.split(".")
    return int(major), int(minor)


_SCHEMA: Tuple[int, int] = (int(SCHEMA_VERSION.split(".")[0]), int(SCHEMA_VERSION.split(".")[1]))


class ImageInfo(BaseModel):
    """The image a log was recorded on: its voxel coordinates mean something on that grid only."""

    model_config = ConfigDict(extra="forbid")
    shape_ijk: Tuple[int, int, int]
    spacing: Vec3
    origin: Optional[Vec3] = Field(
        None, description="1.3: physical position (mm, LPS as in ITK) of the centre of voxel (0, 0, 0)"
    )
    direction: Optional[Tuple[Vec3, Vec3, Vec3]] = Field(
        None,
        description="1.3: the 3x3 direction matrix as ITK's, by rows: its columns are the physical directions "
        "of the i, j and k axes",
    )
    sha256: Optional[str] = Field(
        None,
        description="the digest of the image's voxel values (SegAssistLib.image.voxel_digest, 64 lowercase hex "
        "digits; absent or null: not recorded): SHA-256 of the ASCII line 'segassist-voxels-v1 <type> <ni> <nj> "
        "<nk>' and a newline, then every value as <type>, little-endian, i fastest, then j, then k; <type> is the "
        "first of int16, int32, int64, uint64 that holds them all when all are integers, else (also integers none "
        "of those holds) float32 when each is one exactly, else float64 (-0.0 as 0.0, one NaN). The same values "
        "give the same digest whatever the "
        "file format or dtype they are stored in; a replay on an image of the same grid with another digest is "
        "noted (another scan?), never refused",
    )

    @field_validator("origin", mode="before")
    @classmethod
    def _check_origin(cls, v):
        return None if v is None else _finite_vec3(v, "image origin")

    @field_validator("direction", mode="before")
    @classmethod
    def _check_direction(cls, v):
        if v is None:
            return None
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__") or len(v) != 3:
            raise ValueError(f"image direction must be a 3x3 matrix (3 rows of 3 numbers), got {_describe(v)}")
        return tuple(_finite_vec3(row, "image direction row") for row in v)

    @classmethod
    def from_volume(cls, volume, digest: Optional[str] = None) -> ImageInfo:
        """The grid of a :class:`~SegAssistLib.image.Volume` (shape, spacing, origin and direction) and the
        digest of its voxel values (``sha256``: :func:`~SegAssistLib.image.voxel_digest`, about 0.15 s for
        a 512x512x300 int16 CT; ``digest``: that of ``volume.array`` when the caller already computed it,
        as a replay that read logs of the same voxels has, :class:`~SegAssistLib.headless.Voxels`)."""
        return cls(
            shape_ijk=tuple(int(n) for n in volume.shape_ijk),
            spacing=tuple(float(x) for x in volume.spacing),
            origin=tuple(float(x) for x in volume.origin),
            direction=np.asarray(volume.direction, float).reshape(3, 3),
            sha256=voxel_digest(volume.array) if digest is None else digest,
        )

    def recorded_digest(self) -> Optional[str]:
        """``sha256`` when it is a voxel digest (64 hex digits, in lowercase), else None: a log without one,
        or whose ``sha256`` some other tool wrote in another form, is not compared (nor refused)."""
        value = (self.sha256 or "").strip().lower()
        return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


#: The bounds of :class:`EngineSettings` (inclusive), which the command-line options that set them share
#: (``segassist eval --refine-depth``, the benchmarks' ``--betas``, ...): a value the engine would refuse is
#: refused by argparse with one line, not by pydantic with a traceback.
MAX_REFINE_DEPTH = 16
MAX_REFINE_TILES = 4096
MAX_MIN_VIEW_MM = 1e5
MAX_EDGE_BAND = 100
MAX_EDGE_BETA = 1e9
MAX_EDGE_MAX_VOXELS = 2**40


class SettingsError(SegAssistError, ValueError):
    """Engine settings out of their range (:class:`EngineSettings`): a refine depth of 17, a negative view."""

    code = "invalid_settings"


class EngineSettings(BaseModel):
    """1.4: the built-in engine's settings that shape its answers beyond the model's weights: a session
    answered with other settings (segassist serve --edge-band 0 or --refine-depth 2) gives another mask
    for the same prompts. Plain numbers, checked as the engine checks them."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    refine_depth: int = Field(
        ge=1, le=MAX_REFINE_DEPTH, description="zoom levels finer than a zoomed-out answer it is refined at"
    )
    max_refine_tiles: int = Field(ge=1, le=MAX_REFINE_TILES, description="no refinement when it would need more tiles")
    min_view_mm: float = Field(
        ge=0, le=MAX_MIN_VIEW_MM, description="the narrowest view (mm) a prompt is first looked at"
    )
    correction_zoom_share: float = Field(
        ge=0, lt=1, description="share of a window side a correction must change to zoom out"
    )
    edge_band: float = Field(
        ge=0, le=MAX_EDGE_BAND, description="half-width (voxels) of the band snapped to the image's edges; 0: no snap"
    )
    edge_beta: float = Field(gt=0, le=MAX_EDGE_BETA, description="the edge snap's random walker sensitivity")
    edge_max_voxels: int = Field(ge=1, le=MAX_EDGE_MAX_VOXELS, description="answers with a larger box are not snapped")

    @classmethod
    def checked(cls, **values) -> EngineSettings:
        """Settings from the engine's own options: out of range, a :class:`SettingsError` (a ValueError)
        that says which in one line, such as ``refine_depth must be at least 1 and at most 16, got 17``."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = ".".join(str(x) for x in err.get("loc", ()))
                if name in cls.model_fields and str(err.get("type", "")).endswith(("_than", "_than_equal")):
                    problems.append(f"{name} must be {cls.range_of(name)}, got {err.get('input')!r}")
                else:
                    problems.append(describe_validation_error(ValidationError.from_exception_data(
                        exc.title, [err]), whole=""))  # fmt: skip
            raise SettingsError(f"engine settings out of range: {'; '.join(problems)}") from exc

    @classmethod
    def range_of(cls, name: str) -> str:
        """The range of setting ``name`` in words: ``at least 1 and at most 16``."""
        words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}

        def number(value: float) -> str:
            return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"

        parts = [
            f"{words[key]} {number(getattr(bound, key))}"
            for bound in cls.model_fields[name].metadata
            for key in words
            if getattr(bound, key, None) is not None
        ]
        return " and ".join(parts)

    @field_validator("edge_band")
    @classmethod
    def _check_band(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(f"edge_band must be 0 (no snap) or at least 1 voxel, got {v}")
        return v

    def differences(self, other: EngineSettings) -> List[str]:
        """``"name a (here) vs b (other)"`` for each setting that differs, in field order."""
        return [
            f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in type(self).model_fields
            if getattr(self, name) != getattr(other, name)
        ]


class PromptLog(BaseModel):
    """A replayable record of one interactive session."""

    model_config = ConfigDict(extra="forbid")
    schema_version: str = SCHEMA_VERSION
    image: Optional[ImageInfo] = None
    model: Optional[str] = None
    engine: Optional[EngineSettings] = Field(
        None,
        description="1.4: the built-in engine's settings the session answered with (absent: not recorded, "
        "a log of 1.3 or before or of another engine); segassist segment applies them when it replays the log",
    )
    prompts: List[AnyPrompt] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _check_version(cls, v: str) -> str:
        version = _schema_version(v)
        if version is None:
            raise ValueError(f"prompt log schema_version must be 'major.minor' (such as {SCHEMA_VERSION!r}), got {v!r}")
        if version[0] != _SCHEMA[0]:
            raise ValueError(
                f"prompt log schema {v} is not readable by this version (reads {_SCHEMA[0]}.0 to {SCHEMA_VERSION})"
            )
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _name_a_newer_schema(cls, data, handler):
        """A log of a newer 1.x schema reads when it uses nothing this reader lacks; otherwise the error
        says so, instead of only "Extra inputs are not permitted" about a field added since."""
        try:
            return handler(data)
        except ValidationError as exc:
            version = _schema_version(data.get("schema_version")) if isinstance(data, dict) else None
            if version is None or version[0] != _SCHEMA[0] or version <= _SCHEMA:
                raise
            raise ValueError(
                f"written by a newer SegAssist (prompt log schema {version[0]}.{version[1]}; this reader reads "
                f"{_SCHEMA[0]}.0 to {SCHEMA_VERSION}), with what this reader lacks: upgrade SegAssist to read it "
                f"({describe_validation_error(exc, most=1)})"
            ) from None

    @model_serializer(mode="wrap")
    def _drop_unrecorded_engine(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        """A log without engine settings is written without the key: a reader of 1.3 reads it."""
        out = handler(self)
        if isinstance(out, dict) and out.get("engine", 0) is None:
            del out["engine"]
        return out

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> PromptLog:
        try:
            return cls.model_validate_json(text)
        except Exception as exc:
            raise PromptError(f"invalid prompt log: {describe_validation_error(exc)}") from exc

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> PromptLog:
        return cls.from_json(Path(path).read_text())


def describe_validation_error(exc: Exception, most: int = 3, whole: str = "the log") -> str:
    """One line for an error: a pydantic validation error's first problems, each with where it is
    (``whole``: what a problem of the whole input is said to be of; empty: no place named)."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    errors = exc.errors()
    parts = []
    for err in errors[:most]:
        where = ".".join(str(x) for x in err.get("loc", ())) or whole
        message = " ".join(str(err.get("msg", "")).removeprefix("Value error, ").split())
        parts.append(f"{where}: {message}" if where else message)
    more = f" (and {len(errors) - most} more)" if len(errors) > most else ""
    return "; ".join(parts) + more


def prompt_log_json_schema() -> dict:
    return PromptLog.model_json_schema()


def dumps_prompt(prompt: Prompt) -> str:
    return json.dumps(prompt.model_dump(mode="json"))
