"""Prompts: the plain, JSON-serialisable, replayable inputs of an interactive session.

Coordinates are continuous voxel indices ``(i, j, k)`` of the image the session was opened on
(``i`` fastest, as in ITK and Slicer's IJK). Arrays elsewhere in SegAssist are indexed ``[k, j, i]``
(the order of ``SimpleITK.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``).

Kinds:

- ``point``: a positive or negative click.
- ``box``: an axis-aligned box in IJK, inclusive corners. It is a 2D box when one axis has zero
  thickness (drawn on an axial, coronal or sagittal slice) and a 3D box otherwise. A box drawn on an
  oblique slice is sent as a 4-vertex ``lasso``: both say "the object lies within this outline".
- ``scribble``: a positive or negative polyline drawn on a slice of any orientation.
- ``lasso``: a closed, planar polygon drawn on a slice of any orientation. Positive: the object's
  outline on that slice lies close to it. Negative: everything inside is background.
- ``mask``: an initial mask, stored compressed in the log, which becomes the current result.

A :class:`PromptLog` is versioned (``schema_version``) so that logs written today stay readable.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Annotated, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from SegAssistLib.errors import PromptError

SCHEMA_VERSION = "1.0"

Vec3 = Tuple[float, float, float]


def _finite_vec3(value: Sequence[float], what: str) -> Vec3:
    arr = np.asarray(value, dtype=float)
    if arr.shape != (3,):
        raise ValueError(f"{what} must have 3 coordinates (i, j, k), got {np.ravel(arr).tolist()}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} has a non-finite coordinate: {arr.tolist()}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


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
        flat = int(np.sum(hi - lo < 1.0))
        if flat > 1:
            raise ValueError(
                f"degenerate box {self.min_corner}..{self.max_corner}: it is thinner than one voxel "
                "along more than one axis (a 2D box may be flat along one axis only)"
            )
        if not self.positive:
            raise ValueError("negative boxes are not supported: use a negative lasso or scribble")
        return self

    @property
    def is_2d(self) -> bool:
        return bool(np.any(np.asarray(self.max_corner) - np.asarray(self.min_corner) < 1.0))


class _PolyPrompt(_Prompt):
    points: List[Vec3]
    positive: bool = True

    @field_validator("points", mode="before")
    @classmethod
    def _check_points(cls, v):
        if v is None or len(v) == 0:
            raise ValueError("no points: an empty stroke is not a prompt")
        return [_finite_vec3(p, "vertex") for p in v]


class ScribblePrompt(_PolyPrompt):
    kind: Literal["scribble"] = "scribble"
    width: float = Field(1.0, gt=0, le=20, description="stroke width in voxels")


class LassoPrompt(_PolyPrompt):
    kind: Literal["lasso"] = "lasso"

    @model_validator(mode="after")
    def _check_polygon(self):
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
    offset: Tuple[int, int, int]
    shape: Tuple[int, int, int]
    data: str = Field(description="base64 of zlib-compressed np.packbits of the boolean box, C order")

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
        data = base64.b64encode(zlib.compress(np.packbits(box.ravel()).tobytes(), 6)).decode("ascii")
        return cls(offset=tuple(int(x) for x in lo), shape=tuple(int(x) for x in box.shape), data=data)

    def to_array(self, image_shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(self.shape))
        bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(self.data)), np.uint8))
        if bits.size < n:
            raise PromptError("initial mask data is truncated")
        box = bits[:n].reshape(self.shape).astype(np.uint8)
        out = np.zeros(tuple(image_shape), np.uint8)
        lo = np.asarray(self.offset)
        hi = lo + np.asarray(self.shape)
        if np.any(lo < 0) or np.any(hi > np.asarray(image_shape)):
            raise PromptError(f"initial mask box {lo.tolist()}..{hi.tolist()} lies outside image {list(image_shape)}")
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
        return out


Prompt = Union[PointPrompt, BoxPrompt, ScribblePrompt, LassoPrompt, MaskPrompt]
PROMPT_KINDS: Tuple[str, ...] = ("point", "box", "scribble", "lasso", "mask")
AnyPrompt = Annotated[Prompt, Field(discriminator="kind")]
_PROMPT_ADAPTER: TypeAdapter = TypeAdapter(AnyPrompt)


def prompt_vertices_kji(prompt: Prompt) -> np.ndarray:
    """The prompt's coordinates as an ``(N, 3)`` array in array order ``[k, j, i]`` (empty for a mask):
    the click, the two box corners, or the stroke's or polygon's vertices."""
    if isinstance(prompt, PointPrompt):
        pts = [prompt.position]
    elif isinstance(prompt, BoxPrompt):
        pts = [prompt.min_corner, prompt.max_corner]
    elif isinstance(prompt, (ScribblePrompt, LassoPrompt)):
        pts = prompt.points
    else:
        return np.zeros((0, 3))
    return np.asarray(pts, float).reshape(-1, 3)[:, ::-1]


def parse_prompt(data: Union[dict, str]) -> Prompt:
    """Parse one prompt from a dict or JSON text; raises :class:`PromptError` with the reason."""
    try:
        if isinstance(data, str):
            return _PROMPT_ADAPTER.validate_json(data)
        return _PROMPT_ADAPTER.validate_python(data)
    except Exception as exc:  # pydantic.ValidationError, json errors
        raise PromptError(f"invalid prompt: {exc}") from exc


class ImageInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape_ijk: Tuple[int, int, int]
    spacing: Vec3
    sha256: Optional[str] = None


class PromptLog(BaseModel):
    """A replayable record of one interactive session."""

    model_config = ConfigDict(extra="forbid")
    schema_version: str = SCHEMA_VERSION
    image: Optional[ImageInfo] = None
    model: Optional[str] = None
    prompts: List[AnyPrompt] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _check_version(cls, v: str) -> str:
        major = v.split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(f"prompt log schema {v} is not readable by this version (reads {SCHEMA_VERSION})")
        return v

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> PromptLog:
        try:
            return cls.model_validate_json(text)
        except Exception as exc:
            raise PromptError(f"invalid prompt log: {exc}") from exc

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> PromptLog:
        return cls.from_json(Path(path).read_text())


def prompt_log_json_schema() -> dict:
    return PromptLog.model_json_schema()


def dumps_prompt(prompt: Prompt) -> str:
    return json.dumps(prompt.model_dump(mode="json"))
