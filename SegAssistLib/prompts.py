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
- ``scribble``: a positive or negative stroke drawn on a slice of any orientation. Negative: the
  answer to it has none of its voxels set (an edit, not only a hint to the network).
- ``lasso``: a closed, planar polygon drawn on a slice of any orientation. Positive: the object's
  outline on that slice lies close to it. Negative: everything inside is background (erased, as a
  negative scribble's voxels are). Its vertices may lie past the image's edge (:func:`lasso_in_image`).
- ``mask``: an initial mask, stored compressed in the log, which becomes the current result.

A scribble or lasso comes in one of two forms: ``points`` (the polyline or polygon vertices, as
drawn) or ``slab`` (a :class:`Slab`: the voxels it covers on its slice, as a small bit-packed box
one voxel thick plus its offset). :func:`to_slab` turns the first into the second; the remote
client sends scribbles of width 2 (:data:`WIDE_SCRIBBLE_WIDTH`) or more, and lassos reaching past
the image, as slabs, and other lassos and thinner scribbles as drawn (so that the engine draws them
as it does in-process), so what travels is a 2D stroke, never a volume. A scribble with a vertex
past the image is refused in-process and sent as drawn, so the server refuses it alike.

The prompt log that records a session's prompts is :mod:`SegAssistLib.prompt_log`; the voxels of a
stroke, :mod:`SegAssistLib.stroke_voxels`; the limits on a prompt's size, :mod:`SegAssistLib.prompt_limits`.
Their public names are also importable from here, as they were when this module held them all
(import them from their own modules in new code).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import TYPE_CHECKING, Annotated, Callable, List, Literal, Optional, Sequence, Tuple, Union

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

from SegAssistLib.errors import PromptError

# Names that moved to modules of their own: the public ones stay importable from here (`import X as X`
# re-exports X); the private ones are imported for this module's own use only.
from SegAssistLib.prompt_limits import _MAX_SLAB_DATA_CHARS
from SegAssistLib.prompt_limits import MAX_MADE_BY_CHARS as MAX_MADE_BY_CHARS
from SegAssistLib.prompt_limits import MAX_MASK_EXTENT as MAX_MASK_EXTENT
from SegAssistLib.prompt_limits import MAX_MASK_VOXELS as MAX_MASK_VOXELS
from SegAssistLib.prompt_limits import MAX_SCRIBBLE_POINTS as MAX_SCRIBBLE_POINTS
from SegAssistLib.prompt_limits import MAX_SCRIBBLE_SAMPLES as MAX_SCRIBBLE_SAMPLES
from SegAssistLib.prompt_limits import MAX_SLAB_AXIS as MAX_SLAB_AXIS
from SegAssistLib.prompt_limits import MAX_SLAB_OFFSET as MAX_SLAB_OFFSET
from SegAssistLib.prompt_limits import MAX_SLAB_VOXELS as MAX_SLAB_VOXELS
from SegAssistLib.prompt_limits import MAX_STROKE_VERTICES as MAX_STROKE_VERTICES
from SegAssistLib.stroke_voxels import VOXEL_CACHE_BYTES, ByteBudgetCache, _lasso_box, _scribble_budget_error
from SegAssistLib.stroke_voxels import scribble_voxels as scribble_voxels

if TYPE_CHECKING:  # for type checkers: what __getattr__ at the end of this module gives at run time
    from SegAssistLib.prompt_log import MAX_EDGE_BAND as MAX_EDGE_BAND
    from SegAssistLib.prompt_log import MAX_EDGE_BETA as MAX_EDGE_BETA
    from SegAssistLib.prompt_log import MAX_EDGE_MAX_VOXELS as MAX_EDGE_MAX_VOXELS
    from SegAssistLib.prompt_log import MAX_MIN_VIEW_MM as MAX_MIN_VIEW_MM
    from SegAssistLib.prompt_log import MAX_REFINE_DEPTH as MAX_REFINE_DEPTH
    from SegAssistLib.prompt_log import MAX_REFINE_TILES as MAX_REFINE_TILES
    from SegAssistLib.prompt_log import SCHEMA_VERSION as SCHEMA_VERSION
    from SegAssistLib.prompt_log import EngineSettings as EngineSettings
    from SegAssistLib.prompt_log import ImageInfo as ImageInfo
    from SegAssistLib.prompt_log import PromptLog as PromptLog
    from SegAssistLib.prompt_log import SettingsError as SettingsError
    from SegAssistLib.prompt_log import prompt_log_json_schema as prompt_log_json_schema

BOX_FLAT_TOLERANCE = 1e-4  # voxels: a box axis this thin is flat (float noise of corners on one plane)
SLAB_PLANE_TOLERANCE = 1.0  # voxels: half the thickness of the layer that must hold a slab's voxel centres

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


#: voxels of a mask looked at at once when finding its bounding box (:func:`set_voxel_bounds`): 4 MB of
#: bool temporaries, whatever the mask's size
_BOUNDS_CHUNK_VOXELS = 1 << 22


def set_voxel_bounds(
    shape: Sequence[int], is_set: Callable[[slice], np.ndarray]
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(first, one past the last) index per axis of the set voxels of a 3D array of ``shape``, or
    None when no voxel is set. ``is_set(rows)`` gives the boolean array of the rows ``rows`` of the
    first axis (``mask[rows] > 0``, ``before[rows] != after[rows]``).

    Per-axis ``any()`` reductions over a few rows at a time (:data:`_BOUNDS_CHUNK_VOXELS` voxels):
    memory stays a few MB, where listing every set voxel (``np.argwhere``, 24 bytes each) took
    gigabytes for a segment of a CT.
    """
    n0, n1, n2 = (int(n) for n in shape)
    rows_set = np.zeros(n0, bool)
    cols_set = [np.zeros(n1, bool), np.zeros(n2, bool)]
    step = max(1, _BOUNDS_CHUNK_VOXELS // max(1, n1 * n2))
    for a in range(0, n0, step):
        chunk = np.asarray(is_set(slice(a, min(a + step, n0))), bool)
        along_j = chunk.any(axis=2)  # (rows, n1): small, and the other two reductions come from it
        rows_set[a : a + len(chunk)] = along_j.any(axis=1)
        cols_set[0] |= along_j.any(axis=0)
        cols_set[1] |= chunk.any(axis=(0, 1))
    hits = [np.flatnonzero(x) for x in (rows_set, *cols_set)]
    if any(len(h) == 0 for h in hits):
        return None
    return np.array([h[0] for h in hits], np.int64), np.array([h[-1] + 1 for h in hits], np.int64)


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


def _true_or_false(x: object) -> bool:
    if not isinstance(x, (bool, np.bool_)):  # pydantic's lax bool read "yes", "off", 1 and 0: not JSON booleans
        raise ValueError(f"must be true or false, got {x!r}" if isinstance(x, (int, np.integer)) else
                         f"must be true or false, got {_describe(x)}")  # fmt: skip
    return bool(x)


def _number_not_bool_or_text(x: object) -> object:
    if _real_number(x) is None:  # pydantic's lax float read "2" and true
        raise ValueError(f"must be a number, got {_describe(x)}")
    return x


#: a prompt's polarity: JSON true or false only, as the published schema says (not "yes", not 1)
Polarity = Annotated[bool, BeforeValidator(_true_or_false)]
#: a plain number: a JSON string such as "2", or true, is refused as the published schema refuses it
Number = Annotated[float, BeforeValidator(_number_not_bool_or_text)]


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
    positive: Polarity = True

    @field_validator("position", mode="before")
    @classmethod
    def _check_position(cls, v):
        return _finite_vec3(v, "point position")


class BoxPrompt(_Prompt):
    kind: Literal["box"] = "box"
    min_corner: Vec3
    max_corner: Vec3
    positive: Polarity = True

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
        bounds = set_voxel_bounds(mask.shape, lambda rows: mask[rows] != 0)
        if bounds is None:
            raise PromptError("empty slab: no voxel is set (an empty stroke is not a prompt)")
        lo, hi = bounds
        box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
        start = np.asarray(offset, np.int64) + lo
        return cls(offset=tuple(int(x) for x in start), shape=tuple(int(x) for x in box.shape), data=_pack_bits(box))

    def to_box(self) -> np.ndarray:
        """The boolean box, shape :attr:`shape`."""
        return _unpack_bits(self.data, self.shape, "slab")

    def voxels_kji(self) -> np.ndarray:
        """``(N, 3)`` int array of the set voxels, image array indices ``[k, j, i]`` (read-only).

        The engine asks in every window of every click: the list (24 bytes a voxel) is kept in a
        process-wide cache bounded by :data:`~SegAssistLib.stroke_voxels.VOXEL_CACHE_BYTES`, not on
        the slab, which a session holds for its life (a slab of a 1024 x 1024 slice, a 300-byte
        request, held 24 MB)."""
        key = (tuple(int(n) for n in self.offset), tuple(int(n) for n in self.shape), self.data)
        return np.frombuffer(_SLAB_VOXELS.get(key, self._voxel_bytes, len(self.data)), np.int64).reshape(-1, 3)

    def _voxel_bytes(self) -> bytes:
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


_SLAB_VOXELS = ByteBudgetCache(VOXEL_CACHE_BYTES)  # Slab.voxels_kji's, by the slab's content


class _PolyPrompt(_Prompt):
    """A scribble or lasso: exactly one of ``points`` (as drawn) or ``slab`` (the voxels drawn)."""

    points: Optional[List[Vec3]] = None
    slab: Optional[Slab] = None
    positive: Polarity = True

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
    width: Number = Field(1.0, gt=0, le=20, description="stroke width in voxels")
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
    made_by: Optional[str] = Field(
        None,
        min_length=1,
        max_length=MAX_MADE_BY_CHARS,
        description="1.5: the model version that made this mask (a proposal: the version that proposed it), "
        "credited with the session's mask until a prompt changes it; absent or null: no model's (drawn by hand, "
        "an existing segment)",
    )

    @field_validator("made_by")
    @classmethod
    def _check_made_by(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v.isprintable() or v != v.strip()):
            raise ValueError(f"made_by must be a model version (printable, no surrounding spaces), got {v!r}")
        return v

    @model_serializer(mode="wrap")
    def _drop_unknown_maker(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        """A mask no model made is written without ``made_by``: a reader of 1.4 reads it."""
        out = handler(self)
        if isinstance(out, dict) and out.get("made_by", 0) is None:
            del out["made_by"]
        return out

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
    def from_array(cls, mask: np.ndarray, made_by: Optional[str] = None) -> MaskPrompt:
        """Encode a full-image mask (array order ``[k, j, i]``), keeping only its bounding box (found
        in bounded memory, :func:`set_voxel_bounds`; the box itself is held once as bool). ``made_by``:
        the model version that made it (a proposal's), None when no model did."""
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise PromptError(f"an initial mask must be 3D, got shape {mask.shape}")
        bounds = set_voxel_bounds(mask.shape, lambda rows: mask[rows] > 0)
        if bounds is None:
            lo = np.zeros(3, int)
            box = np.zeros((1, 1, 1), bool)
        else:
            lo, hi = bounds
            box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0
        return cls(
            offset=tuple(int(x) for x in lo), shape=tuple(int(x) for x in box.shape), data=_pack_bits(box),
            made_by=made_by,
        )

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


_PROMPT_TYPES = (PointPrompt, BoxPrompt, ScribblePrompt, LassoPrompt, MaskPrompt)


def require_prompt(value: object) -> Prompt:
    """``value`` when it is a prompt (one of the prompt models); a :class:`PromptError` naming what
    it is otherwise (a dict read from a JSON log, JSON text, a tuple, None), before anything looks at it."""
    if isinstance(value, _PROMPT_TYPES):
        return value
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    hint = (
        ": parse it first with SegAssistLib.prompts.parse_prompt (a dict or JSON text of one prompt)"
        if isinstance(value, (dict, str, bytes))
        else ""
    )
    raise PromptError(
        f"expected a prompt ({', '.join(t.__name__ for t in _PROMPT_TYPES)}), got {type(value).__name__} {shown}{hint}"
    )


def _outside(what: str, shape_kji: Sequence[int]) -> PromptError:
    return PromptError(f"{what} lies outside the image (i, j, k sizes {[int(n) for n in shape_kji][::-1]})")


def check_prompt_inside(prompt: Prompt, shape_kji: Sequence[int]) -> None:
    """Raise :class:`PromptError` unless the prompt lies in the image of array shape ``shape_kji``:
    the rule of the engine and of the server alike (which answers it with ``prompt_outside_image``).

    Every click, box corner and scribble vertex must be inside (:func:`inside_image`: voxel centres
    at integers, half a voxel of slack), and a slab's or mask's box within the image. A lasso in
    points form may reach past the image's edge, as one drawn around an object at the edge of the
    field of view does: its part in the image counts (:func:`lasso_in_image`), as when the remote
    client sends it as its slab, cropped; one whose vertices' bounding box misses the image is
    refused here, and one whose box meets the image but whose polygon misses it (passing by a
    corner) when it is drawn (:func:`lasso_in_image`). Cheap: nothing is rasterised, and a mask's
    bits are not decoded.
    """
    if isinstance(prompt, MaskPrompt):
        lo = [int(n) for n in prompt.offset]  # Python ints: a huge client number cannot wrap
        hi = [a + int(n) for a, n in zip(lo, prompt.shape)]
        if any(a < 0 for a in lo) or any(b > int(n) for b, n in zip(hi, shape_kji)):
            raise _outside(f"mask box {lo}..{hi} (array order k, j, i)", shape_kji)
        return
    slab = getattr(prompt, "slab", None)
    if slab is not None:
        lo, hi = slab.bounds()
        if np.any(lo < 0) or np.any(hi > np.asarray(shape_kji)):
            raise _outside(f"{prompt.kind} slab box {lo.tolist()}..{hi.tolist()} (array order k, j, i)", shape_kji)
        return
    pts = prompt_vertices_kji(prompt)
    outside = ~inside_image(pts, shape_kji)
    if not outside.any():
        return
    if isinstance(prompt, LassoPrompt):
        upper = np.asarray(tuple(shape_kji), float) - 0.5
        if np.all(pts.max(0) >= -0.5) and np.all(pts.min(0) <= upper):
            return  # reaches into the image: its part there is drawn
        raise _outside(f"lasso (its {len(pts)} vertices and all between them)", shape_kji)
    if isinstance(prompt, PointPrompt):
        raise _outside(f"point {list(prompt.position)}", shape_kji)
    if isinstance(prompt, BoxPrompt):  # as strict as a click: a box corner past the edge is refused
        raise _outside(f"box {list(prompt.min_corner)}..{list(prompt.max_corner)}", shape_kji)
    first = pts[np.argmax(outside)][::-1].tolist()
    raise _outside(f"{prompt.kind} vertex {first} ({int(outside.sum())} of {len(pts)} vertices)", shape_kji)


def lasso_in_image(prompt: Prompt, shape_kji: Sequence[int]) -> Prompt:
    """The form of a prompt an engine draws on the image of array shape ``shape_kji``: a lasso in
    points form with a vertex outside the image as its slab (:func:`to_slab`: the polygon rasterised
    on the image's grid, the part in the image kept), what the remote client sends for it; any
    other prompt as it is. Raises :class:`PromptError` when nothing of the lasso lies in the image."""
    if not isinstance(prompt, LassoPrompt) or prompt.points is None:
        return prompt
    if inside_image(prompt_vertices_kji(prompt), shape_kji).all():
        return prompt
    return to_slab(prompt, shape_kji)


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


def describe_validation_error(
    exc: Exception, most: int = 3, whole: str = "the log", place: Optional[Callable[[Tuple], str]] = None
) -> str:
    """One line for an error: a pydantic validation error's first problems, each with where it is
    (``whole``: what a problem of the whole input is said to be of; empty: no place named; ``place``:
    how a location is named, such as a log's prompts counted from 1; default: its parts joined by dots)."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    errors = exc.errors()
    parts = []
    for err in errors[:most]:
        loc = tuple(err.get("loc", ()))
        where = (place(loc) if place is not None and loc else ".".join(str(x) for x in loc)) or whole
        message = " ".join(str(err.get("msg", "")).removeprefix("Value error, ").split())
        parts.append(f"{where}: {message}" if where else message)
    more = f" (and {len(errors) - most} more)" if len(errors) > most else ""
    return "; ".join(parts) + more


def dumps_prompt(prompt: Prompt) -> str:
    return json.dumps(prompt.model_dump(mode="json"))


# The prompt log's schema (prompt_log.py) is built on the prompts above, so this module cannot import it
# while it loads: its public names, defined here before, are imported from it on first use (PEP 562).
_PROMPT_LOG_NAMES = frozenset(
    {
        "SCHEMA_VERSION",
        "ImageInfo",
        "MAX_REFINE_DEPTH",
        "MAX_REFINE_TILES",
        "MAX_MIN_VIEW_MM",
        "MAX_EDGE_BAND",
        "MAX_EDGE_BETA",
        "MAX_EDGE_MAX_VOXELS",
        "SettingsError",
        "EngineSettings",
        "PromptLog",
        "prompt_log_json_schema",
    }
)

if not TYPE_CHECKING:  # type checkers read the imports at the top instead (and refuse any other name)

    def __getattr__(name: str) -> object:
        if name in _PROMPT_LOG_NAMES:
            from SegAssistLib import prompt_log

            value = getattr(prompt_log, name)
            globals()[name] = value  # once: the next lookup finds it here
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(globals()) | _PROMPT_LOG_NAMES)
