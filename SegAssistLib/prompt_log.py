"""The prompt log: a replayable record of one interactive session (the image it was recorded on, the
model, the built-in engine's settings, the prompts in order) and its JSON schema.

A :class:`PromptLog` is versioned (``schema_version``) so that logs written today stay readable.
The prompts themselves are :mod:`SegAssistLib.prompts`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, List, Optional, Tuple, Union

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.image import voxel_digest
from SegAssistLib.prompt_limits import MAX_MADE_BY_CHARS
from SegAssistLib.prompts import AnyPrompt, Index, Vec3, _describe, _finite_vec3, describe_validation_error

# 1.1: scribbles and lassos may be given as a slab instead of points
# 1.2: a scribble given as points may carry the normal of the slice it was drawn on
# 1.3: a log's image may record its origin and direction (a log replayed on a flipped copy is refused)
# 1.4: a log may record the built-in engine's settings that shape its answers (``engine``), so that a
#      replay answers as the session did (``segassist segment`` applies them)
# 1.5: an initial mask may name the model version that made it (``made_by``: a proposal's), credited with
#      the session's mask until a prompt changes it; a log may name every model version that answered its
#      prompts when more than one did (``models``: a version promoted while the session was open)
SCHEMA_VERSION = "1.5"


def _schema_version(v: object) -> Optional[Tuple[int, int]]:
    """(major, minor) of a ``schema_version`` such as "1.2"; None when it is not "major.minor"."""
    if not isinstance(v, str) or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", v):
        return None
    major, minor = v.split(".")
    return int(major), int(minor)


_SCHEMA: Tuple[int, int] = (int(SCHEMA_VERSION.split(".")[0]), int(SCHEMA_VERSION.split(".")[1]))


def describe_log_error(exc: Exception, data: object = None, most: int = 3) -> str:
    """:func:`~SegAssistLib.prompts.describe_validation_error` for a prompt log: a prompt is named as a
    list's prompts are, counted from 1 (``prompt 2 of 3: point.position: ...``, not ``prompts.1...``);
    ``data``: the log as read from JSON, for the count."""
    prompts = data.get("prompts") if isinstance(data, dict) else None
    count = f" of {len(prompts)}" if isinstance(prompts, list) else ""

    def place(loc: Tuple) -> str:
        if len(loc) >= 2 and loc[0] == "prompts" and isinstance(loc[1], int):
            rest = ".".join(str(x) for x in loc[2:])
            return f"prompt {loc[1] + 1}{count}" + (f": {rest}" if rest else "")
        return ".".join(str(x) for x in loc)

    return describe_validation_error(exc, most, whole="", place=place)


class ImageInfo(BaseModel):
    """The image a log was recorded on: its voxel coordinates mean something on that grid only."""

    model_config = ConfigDict(extra="forbid")
    shape_ijk: Tuple[Index, Index, Index]
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

    @field_validator("spacing", mode="before")
    @classmethod
    def _check_spacing(cls, v):
        return _finite_vec3(v, "image spacing")  # numbers, as the schema says: "1" is not one

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


def _whole_float_as_int(v: object) -> object:
    """JSON Schema's "integer" holds 1.0 (a number whose value is whole): read as 1, so that the reader takes
    what the published schema does; 1.5, "1" and true stay refused (strict)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


#: an engine setting that is a whole number: strict, but 1.0 reads as 1
WholeNumber = Annotated[int, BeforeValidator(_whole_float_as_int)]


class SettingsError(SegAssistError, ValueError):
    """Engine settings out of their range (:class:`EngineSettings`): a refine depth of 17, a negative view."""

    code = "invalid_settings"


class EngineSettings(BaseModel):
    """1.4: the built-in engine's settings that shape its answers beyond the model's weights: a session
    answered with other settings (segassist serve --edge-band 0 or --refine-depth 2) gives another mask
    for the same prompts. Plain numbers, checked as the engine checks them."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    refine_depth: WholeNumber = Field(
        ge=1, le=MAX_REFINE_DEPTH, description="zoom levels finer than a zoomed-out answer it is refined at"
    )
    max_refine_tiles: WholeNumber = Field(
        ge=1, le=MAX_REFINE_TILES, description="no refinement when it would need more tiles"
    )
    min_view_mm: float = Field(
        ge=0, le=MAX_MIN_VIEW_MM, description="the narrowest view (mm) a prompt is first looked at"
    )
    correction_zoom_share: float = Field(
        ge=0, lt=1, description="share of a window side a correction must change to zoom out"
    )
    edge_band: float = Field(
        ge=0,
        le=MAX_EDGE_BAND,
        description="half-width (voxels) of the band snapped to the image's edges; 0: no snap, else at least 1",
        json_schema_extra={"not": {"exclusiveMinimum": 0, "exclusiveMaximum": 1}},  # as _check_band
    )
    edge_beta: float = Field(gt=0, le=MAX_EDGE_BETA, description="the edge snap's random walker sensitivity")
    edge_max_voxels: WholeNumber = Field(
        ge=1, le=MAX_EDGE_MAX_VOXELS, description="answers with a larger box are not snapped"
    )

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


def _version_required(schema: dict) -> None:
    """The published schema requires ``schema_version``, as the reader does of a log read from JSON (the
    model's default is for logs made in code)."""
    schema["required"] = sorted({*schema.get("required", ()), "schema_version"})
    schema["properties"]["schema_version"].pop("default", None)


#: a model version as a log names it (``name@version``)
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MADE_BY_CHARS)]


class PromptLog(BaseModel):
    """A replayable record of one interactive session."""

    # schema_version is required when a log is read from JSON (from_json, load, model_validate_json, or
    # model_validate(data, context=READ)), as the published schema says: an object without it is not taken
    # for a log of any version. A log made in code (PromptLog(prompts=...)) is of this reader's schema.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_version_required)
    schema_version: str = Field(
        SCHEMA_VERSION,
        description="'major.minor' of the prompt log schema the log was written in; a reader reads its own "
        "and older minor versions of its major version, and newer ones that use nothing it lacks",
        json_schema_extra={"pattern": rf"^{_SCHEMA[0]}\.[0-9]{{1,9}}$"},  # as _check_version: this major
    )
    image: Optional[ImageInfo] = None
    model: Optional[str] = None
    models: Optional[List[ModelName]] = Field(
        None,
        description="1.5: every model version that answered the prompts, in order of first use, when more than "
        "one did (a version promoted while the session was open): no one model replays the log to its mask, "
        "and a replay warns; absent: one model answered them all (model)",
    )
    engine: Optional[EngineSettings] = Field(
        None,
        description="1.4: the built-in engine's settings the session answered with (absent: not recorded, "
        "a log of 1.3 or before or of another engine); segassist segment applies them when it replays the log",
    )
    prompts: List[AnyPrompt] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _require_version_when_read(cls, data: Any, info: ValidationInfo) -> Any:
        reading = info.mode == "json" or bool((info.context or {}).get("read"))
        if reading and isinstance(data, dict) and "schema_version" not in data:
            raise ValueError(f"schema_version is missing: a prompt log names the schema it was written in "
                             f"(\"schema_version\": \"{SCHEMA_VERSION}\")")  # fmt: skip
        return data

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
                f"({describe_log_error(exc, data, most=1)})"
            ) from None

    @model_serializer(mode="wrap")
    def _drop_unrecorded_engine(self, handler: SerializerFunctionWrapHandler):  # no return type: keeps the schema
        """A log without engine settings is written without the key: a reader of 1.3 reads it; so is one
        that one model answered (``models``): a reader of 1.4 reads it."""
        out = handler(self)
        for name in ("engine", "models"):
            if isinstance(out, dict) and out.get(name, 0) is None:
                del out[name]
        return out

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> PromptLog:
        try:
            return cls.model_validate_json(text)
        except Exception as exc:
            raise PromptError(f"invalid prompt log: {describe_log_error(exc, _json_or_none(text))}") from exc

    def save(self, path: Union[str, Path]) -> None:
        """Write the log as UTF-8, whatever the locale's encoding (cp1252 in Slicer on Windows)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path]) -> PromptLog:
        """Read a log written as UTF-8 (a byte order mark, as Notepad writes one, is skipped)."""
        return cls.from_json(Path(path).read_text(encoding="utf-8-sig"))


def _json_or_none(text: object) -> object:
    """``text`` parsed as JSON for an error message (None when it is not JSON)."""
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError):
        return None


#: ``model_validate(data, context=READ)``: ``data`` was read from JSON, so ``schema_version`` is required
READ = MappingProxyType({"read": True})

#: the keys that make a JSON object a prompt log (an object with only ``prompts``, and perhaps a comment,
#: is a plain list of prompts): one that has any of them is read, and checked, as a log
LOG_KEYS = frozenset(PromptLog.model_fields) - {"prompts"}


def prompt_log_json_schema() -> dict:
    return PromptLog.model_json_schema()
