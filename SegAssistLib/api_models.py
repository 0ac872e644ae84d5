"""Request and reply models of the SegAssist HTTP API, shared by server and client. Torch-free.

The API is versioned by its path prefix (:data:`API_PREFIX`); a change that breaks a client gets a
new prefix. Every failure answers :class:`ErrorReply`: HTTP status, a machine-readable ``code``
(one of :class:`ErrorCode`) and a message a person can act on.

Array order is the engine's: ``[k, j, i]`` for shapes and offsets; prompt coordinates are voxel
indices ``(i, j, k)`` as in :mod:`SegAssistLib.prompts`.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, StrictFloat, TypeAdapter, field_validator
from typing_extensions import TypeAliasType

from SegAssistLib import transport
from SegAssistLib.errors import ImageError
from SegAssistLib.image import normalise_modality
from SegAssistLib.prompts import AnyPrompt, Prompt

API_VERSION = "1"
API_PREFIX = "/v1"
FRAME_MEDIA_TYPE = transport.FRAME_MEDIA_TYPE
#: Mutating requests carry a client-chosen id; the server answers a repeat of the last one from
#: its cache instead of applying it twice, which is what makes client retries safe.
REQUEST_ID_HEADER = "X-SegAssist-Request-Id"
#: Codecs the client reads, best first (comma-separated); the server picks the best it also has.
ACCEPT_CODECS_HEADER = "X-SegAssist-Accept-Codecs"

IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"
SESSION_ID_PATTERN = r"^[0-9a-f]{32}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Vec3 = Tuple[float, float, float]
#: a number a client sends: a JSON number only (not true/false, not "1.5", not an integer beyond float range)
Number = StrictFloat
StrictVec3 = Tuple[Number, Number, Number]
Shape3 = Tuple[int, int, int]


class ErrorCode:
    """Every ``code`` the server sends, grouped by HTTP status."""

    MALFORMED_BODY = "malformed_body"  # 400: not JSON / not a frame / fields missing
    TRUNCATED_BODY = "truncated_body"  # 400: fewer bytes than declared
    MALFORMED_ARRAY = "malformed_array"  # 400: payload does not decompress
    INVALID_ID = "invalid_id"  # 400: a session or image id of the wrong form
    HASH_MISMATCH = "hash_mismatch"  # 400: the uploaded image does not hash to what the client said
    UNAUTHORIZED = "unauthorized"  # 401: token missing or wrong
    NOT_FOUND = "not_found"  # 404: no such endpoint
    IMAGE_NOT_FOUND = "image_not_found"  # 404: upload it first
    SESSION_NOT_FOUND = "session_not_found"  # 404: never existed, closed, or the server restarted
    SESSION_EXPIRED = "session_expired"  # 404: closed after being idle too long
    LEARNING_DISABLED = "learning_disabled"  # 404: the server runs without --learn-store
    CASE_NOT_FOUND = "case_not_found"  # 404: no such case (or label version) in the datastore
    JOB_NOT_FOUND = "job_not_found"  # 404: no such training job
    VERSION_NOT_FOUND = "version_not_found"  # 404: no such adapter version
    NO_CASE_LEFT = "no_case_left"  # 404: every case is labelled, being worked on, or holds someone's drafts
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    NOT_ACCEPTABLE = "not_acceptable"  # 406: an uncompressed reply above its limit (accept zlib or zstd)
    UPLOAD_TIMEOUT = "upload_timeout"  # 408: the body did not arrive within the upload time limit
    SESSION_STATE = "session_state"  # 409: nothing to undo / redo
    PROMPT_LIMIT = "prompt_limit"  # 409: the session has had its maximum number of prompts
    DUPLICATE_CASE = "duplicate_case"  # 409: the image is already a case
    CASE_LOCKED = "case_locked"  # 409: another annotator holds the case
    CASE_STATE = "case_state"  # 409: the case is not in a state that allows this
    TRAINING_BUSY = "training_busy"  # 409: a training job is running on this datastore
    VERSION_STATE = "version_state"  # 409: that adapter version cannot be made current
    IMAGE_CONFLICT = "image_conflict"  # 409: the image is held already with another modality
    BODY_TOO_LARGE = "body_too_large"  # 413
    IMAGE_TOO_LARGE = "image_too_large"  # 413: voxel count or an axis above the limit
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415
    INVALID_REQUEST = "invalid_request"  # 422: a field fails validation
    INVALID_PROMPT = "invalid_prompt"  # 422: degenerate or malformed prompt
    PROMPT_OUTSIDE_IMAGE = "prompt_outside_image"  # 422
    INVALID_IMAGE = "invalid_image"  # 422: NaN, constant, not 3D, bad geometry
    UNSUPPORTED_DTYPE = "unsupported_dtype"  # 422
    INVALID_SHAPE = "invalid_shape"  # 422: shape and byte count disagree
    IMAGE_MISMATCH = "image_mismatch"  # 422: a label from a session on another image than the case's
    UNSUPPORTED_CODEC = "unsupported_codec"  # 422
    UNSUPPORTED_PROMPT = "unsupported_prompt"  # 422: the model does not take this prompt kind
    TRAINING_REFUSED = "training_refused"  # 422: bad settings, or too few submitted labels to train on
    TOO_MANY_SESSIONS = "too_many_sessions"  # 429: per user or in total
    CLIENT_GONE = "client_gone"  # 499: the client left before its request took effect (the server's log sees it)
    QUEUE_FULL = "queue_full"  # 503: inference queue full, retry later
    UPLOADS_BUSY = "uploads_busy"  # 503: no upload slot came free in time (or the user's own is taken); retry
    SHUTTING_DOWN = "shutting_down"  # 503
    STORAGE_UNAVAILABLE = "storage_unavailable"  # 503: a stored file cannot be read now, or by this server (kept)
    CORRUPT_DATA = "corrupt_data"  # 500: a datastore file is missing or fails its recorded checksum
    INTERNAL_ERROR = "internal_error"  # 500: a bug; the message says where to look

    @classmethod
    def all(cls) -> List[str]:
        return sorted(v for k, v in vars(cls).items() if k.isupper())


class _Model(BaseModel):
    """Requests, and what a reader must understand whole (an array's encoding): unknown fields refused."""

    model_config = ConfigDict(extra="forbid")


class ReplyModel(BaseModel):
    """A server's reply: fields a newer server adds within the same API version (additive changes)
    are ignored, so an older client (Slicer's, updated less often than a server) goes on working."""

    model_config = ConfigDict(extra="ignore")


class ErrorBody(ReplyModel):
    status: int = Field(description="HTTP status, repeated for clients that only see the body")
    code: str = Field(description="machine-readable code, one of: " + ", ".join(ErrorCode.all()))
    message: str = Field(description="what went wrong and what to do about it")
    details: Optional[Dict[str, Any]] = None


class ErrorReply(ReplyModel):
    error: ErrorBody


class Health(ReplyModel):
    status: Literal["ok"] = "ok"
    version: str
    api_version: str = API_VERSION


class ModelInfo(ReplyModel):
    name: str
    version: str
    licence: str
    description: str = ""
    version_error: Optional[str] = Field(
        None,
        description="with a learning datastore: why the workers could not switch to the registry's current "
        "adapter version (this version goes on answering); null when they did, or without a datastore",
    )


class LimitsInfo(ReplyModel):
    max_voxels: int
    max_axis: int
    max_body_bytes: int
    max_json_bytes: int
    max_sessions_per_user: int
    max_sessions_total: int
    max_prompts_per_session: int
    idle_timeout_s: float


class ServerInfo(ReplyModel):
    version: str
    api_version: str = API_VERSION
    model: ModelInfo
    prompt_kinds: List[str]
    patch_size: Shape3
    devices: List[str]
    codecs: List[str]
    limits: LimitsInfo
    auth_required: bool
    user: str


class ArrayPayload(_Model):
    """A compressed array inside a JSON reply (base64 of the codec's output)."""

    dtype: str
    shape: List[int]
    codec: str
    nbytes: int
    payload_nbytes: int
    data: str = Field(description="base64 of the compressed little-endian C-order bytes")

    @classmethod
    def from_array(cls, array: np.ndarray, codec: str = "zstd", level: int = 3) -> ArrayPayload:
        meta, payload = transport.encode_array(array, codec=codec, level=level)
        return cls(data=base64.b64encode(payload).decode("ascii"), **meta.to_dict())

    def to_array(self, max_voxels: Optional[int] = None) -> np.ndarray:
        meta = transport.ArrayMeta.from_dict(self.model_dump(exclude={"data"}))
        try:
            payload = base64.b64decode(self.data, validate=True)
        except ValueError as exc:
            raise transport.TransportError(f"array data is not valid base64: {exc}", "malformed_body") from exc
        return transport.decode_array(meta, payload, max_voxels)


def check_box(
    offset: Sequence[int], shape: Sequence[int], within: Sequence[int], what: str = "mask box", whole: str = "image"
) -> Tuple[slice, ...]:
    """The slices of a reply's box (``offset`` and ``shape`` in array order) in an array of shape
    ``within``; a ``ValueError`` unless it has three offsets and sizes, none below 0 (numpy would count
    from the far end), each ending within."""
    lo, size, bound = (tuple(int(n) for n in values) for values in (offset, shape, within))
    in_bounds = all(a >= 0 and n >= 0 and a + n <= m for a, n, m in zip(lo, size, bound))
    if not (len(lo) == len(size) == len(bound) == 3 and in_bounds):
        raise ValueError(f"the {what} {list(size)} at {list(lo)} does not fit the {whole} of shape {list(bound)}")
    return tuple(slice(a, a + n) for a, n in zip(lo, size))


def box_voxels(
    offset: Sequence[int], shape: Sequence[int], mask: ArrayPayload, within: Sequence[int],
    what: str = "mask box", whole: str = "image",
) -> np.ndarray:  # fmt: skip
    """The voxels of a reply's box (``offset`` and ``shape`` in array order, ``mask`` its compressed
    voxels) that must lie within an array of shape ``within``.

    A reader's defence against a broken or hostile reply: the box is checked first (three offsets and
    sizes, none below 0, which numpy would count from the far end, each ending within), then the
    declared array against the box, and only then is it decompressed, to no more than the box's voxel
    count. So a small reply that declares a huge array never costs its declared size in memory.
    A ``ValueError`` (a :class:`~SegAssistLib.transport.TransportError` for data that does not decode)
    otherwise."""
    check_box(offset, shape, within, what, whole)
    size = tuple(int(n) for n in shape)
    if list(mask.shape) != list(size):
        raise ValueError(f"the {what} {list(size)} holds an array of shape {transport.describe_value(mask.shape)}")
    return mask.to_array(max_voxels=int(np.prod(size, dtype=np.int64)))


_MODALITY_DOC = "CT or MR, spelt as a Volume takes it: any case, and MRI for MR (null: guessed from intensities)"


def _spelt_as_volume(value: Any) -> Any:
    """A request's modality normalised (:func:`normalise_modality`); anything else, a string Volume
    refuses included, is left for the field's own check to refuse with its usual message."""
    if not isinstance(value, str):
        return value
    try:
        return normalise_modality(value)
    except ImageError:
        return value


class ImageHeader(_Model):
    """The JSON header of an image upload frame (``POST /v1/images``).

    The frame also carries the :class:`~SegAssistLib.transport.ArrayMeta` fields (dtype, shape,
    codec, nbytes, payload_nbytes) of the voxels, array order ``[k, j, i]``; the server takes those
    out and validates the rest with this model, which refuses any field it does not know (a
    misspelt ``"spacnig"`` would otherwise be a silent 1 mm spacing).
    """

    spacing: StrictVec3 = (1.0, 1.0, 1.0)
    origin: StrictVec3 = (0.0, 0.0, 0.0)
    direction: Tuple[Number, Number, Number, Number, Number, Number, Number, Number, Number] = (
        1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0,
    )  # fmt: skip
    modality: Optional[Literal["CT", "MR"]] = Field(None, description=_MODALITY_DOC)
    sha256: Optional[str] = Field(
        None, pattern=IMAGE_ID_PATTERN, description="the client's content hash; checked when given"
    )

    @field_validator("modality", mode="before")
    @classmethod
    def _modality_spelt_as_volume(cls, value: Any) -> Any:
        return _spelt_as_volume(value)


class StoredImage(ReplyModel):
    image_id: str = Field(description="SHA-256 of voxels and geometry (Volume.content_hash)")
    shape: Shape3 = Field(description="array order [k, j, i]")
    dtype: str
    spacing: Vec3
    origin: Vec3
    direction: List[float]
    modality: Optional[str] = None
    uploaded: bool = Field(False, description="true when this request stored the image")


class CreateSession(_Model):
    image_id: str = Field(pattern=IMAGE_ID_PATTERN)
    # Not validated with the body: that runs on the server's event loop, and checking a slab means
    # decompressing it (up to 4096 x 4096 bits), so a small body of many slabs froze the server. The
    # server counts them against its prompt limit first, then validates them in its thread pool
    # (validate_prompts); the schema is List[AnyPrompt] all the same.
    prompts: SkipValidation[List[AnyPrompt]] = Field(default_factory=list, description="replayed first (a stored log)")
    modality: Optional[Literal["CT", "MR"]] = Field(None, description=_MODALITY_DOC)

    @field_validator("modality", mode="before")
    @classmethod
    def _modality_spelt_as_volume(cls, value: Any) -> Any:
        return _spelt_as_volume(value)


_PROMPT_LIST: TypeAdapter = TypeAdapter(List[AnyPrompt])
_PROMPT: TypeAdapter = TypeAdapter(AnyPrompt)


def validate_prompts(prompts: Any) -> List[Prompt]:
    """``CreateSession.prompts`` as checked prompts; raises pydantic's ValidationError (CPU work: a
    slab is decompressed to be checked, so the server calls this off its event loop)."""
    return _PROMPT_LIST.validate_python(prompts)


def validate_prompt(prompt: Any) -> Prompt:
    """``AddPrompt.prompt`` as a checked prompt; raises pydantic's ValidationError (off the event loop,
    as :func:`validate_prompts`)."""
    return _PROMPT.validate_python(prompt)


#: AnyPrompt under a name: SkipValidation[AnyPrompt] leaves its discriminator on an unvalidated field,
#: which FastAPI cannot turn into a schema; the alias keeps it inside (the schema is the same)
_NamedPrompt = TypeAliasType("Prompt", AnyPrompt)  # type: ignore[valid-type]


class AddPrompt(_Model):
    # Not validated with the body, as CreateSession.prompts (a slab is decompressed to be checked):
    # the server validates it in its thread pool (validate_prompt); the schema is AnyPrompt all the same.
    prompt: SkipValidation[_NamedPrompt]  # type: ignore[valid-type]


SessionState = Literal["idle", "queued", "running"]


class SessionInfo(ReplyModel):
    session_id: str
    image_id: str
    shape: Shape3
    device: str
    n_prompts: int = Field(description="prompts added so far, undone ones included")
    can_undo: bool
    can_redo: bool
    state: SessionState
    queue_position: Optional[int] = Field(
        None, description="jobs of other sessions that run before this session's next one (when queued)"
    )
    queue_length: int = Field(description="jobs waiting on this session's device, all sessions")
    idle_timeout_s: float
    expires_in_s: float
    model_version: Optional[str] = Field(
        None, description="the model (and adapter) version that made the current mask (null: none did yet, or a reset)"
    )


class MaskUpdateReply(ReplyModel):
    """The box of the mask that changed and its new voxels; ``mask`` is null when nothing changed."""

    session_id: str
    offset: Shape3 = Field(description="array order [k, j, i]")
    shape: Shape3
    mask: Optional[ArrayPayload] = None
    can_undo: bool
    can_redo: bool
    n_prompts: int
    latency_s: float = Field(description="engine time")
    queue_wait_s: float = Field(description="time spent queued behind other sessions")
    model_version: Optional[str] = Field(
        None,
        description="the model (and adapter) version that made the mask now current: undo and redo bring back "
        "the version of the mask they bring back (null: no model made it, as after a reset)",
    )
    info: Dict[str, Any] = Field(default_factory=dict)

    @field_validator("info", mode="before")
    @classmethod
    def _jsonable_info(cls, v: Any) -> Dict[str, Any]:
        return {str(k): _jsonable(x) for k, x in dict(v or {}).items()}


class ResultReply(ReplyModel):
    session_id: str
    mask: ArrayPayload
    n_prompts: int


def _jsonable(value: Any) -> Any:
    """Engine ``info`` dicts may hold numpy scalars and tuples; make them JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<array {list(value.shape)}>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def parse_codecs(header: Optional[str]) -> Sequence[str]:
    if not header:
        return ("zlib",)  # what every Python can read
    return tuple(c.strip() for c in header.split(",") if c.strip())
