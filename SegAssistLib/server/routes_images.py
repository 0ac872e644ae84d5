"""``/v1/images``: upload an image once, look it up by content hash."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from SegAssistLib.api_models import FRAME_MEDIA_TYPE, IMAGE_ID_PATTERN, ErrorCode, ImageHeader, StoredImage
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume
from SegAssistLib.server.deps import current_user, get_state
from SegAssistLib.server.errors import LIBRARY_ERRORS, ApiError, from_library_error
from SegAssistLib.server.images import ARRAY_FIELDS, decode_image_frame, image_header, image_info
from SegAssistLib.server.limits import check_image_shape, read_body
from SegAssistLib.server.responses import ERROR_RESPONSES, IMAGE_CONFLICT, conflict
from SegAssistLib.server.state import ServerState
from SegAssistLib.transport import ArrayMeta

router = APIRouter(tags=["images"], responses=ERROR_RESPONSES)


def _frame_header_schema() -> Dict[str, Any]:
    """ImageHeader's schema as the frame header's: the header also holds the array's fields, which
    ImageHeader leaves to ArrayMeta (so its ``additionalProperties: false`` would say otherwise)."""
    schema = ImageHeader.model_json_schema()
    schema.pop("additionalProperties", None)
    return {
        "description": f"the frame's JSON header: these fields plus {', '.join(ARRAY_FIELDS)}; any other field "
        "is refused (422 invalid_request, naming it)",
        **schema,
    }


_UPLOAD_DOC = f"""Upload an image as one frame (`Content-Type: {FRAME_MEDIA_TYPE}`; any other type is
415 `unsupported_media_type`):

    b"SGAF" | uint32 little-endian header length | UTF-8 JSON header | compressed voxels

The header holds the array metadata (`dtype` such as `<i2`, `shape` in array order [k, j, i],
`codec` zstd|zlib|none, `nbytes` raw, `payload_nbytes` compressed) and the image geometry
(`spacing`, `origin`, `direction`, optional `modality` and `sha256`, see ImageHeader); any other
field is refused, 422 `invalid_request` naming it.

The image id is the SHA-256 of voxels and geometry. Uploading an image the server already holds
stores nothing and answers 200; a new image answers 201. Check with `GET /v1/images/{{id}}` first
and the same image never travels twice. A held image never changes: the modality of its first
upload stays, and an upload of it naming another modality answers 409 `image_conflict` (a
session's `modality` in `POST /v1/sessions` overrides the image's for that session)."""


@router.post(
    "/images",
    response_model=StoredImage,
    status_code=201,
    summary="Upload an image",
    description=_UPLOAD_DOC,
    responses={
        200: {"model": StoredImage, "description": "the server held the image already: nothing stored"},
        **conflict(IMAGE_CONFLICT),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {FRAME_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "x-segassist-frame-header": _frame_header_schema(),
        }
    },
)
async def upload_image(
    request: Request,
    response: Response,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> StoredImage:
    media = request.headers.get("content-type", "").split(";")[0].strip()
    if media != FRAME_MEDIA_TYPE:  # as documented: no client version has sent any other type
        raise ApiError(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"an image upload must be a SegAssist frame ({FRAME_MEDIA_TYPE}), not {media or 'untyped'}",
        )  # fmt: skip
    assert state.upload_slots is not None
    async with state.upload_slots.hold(user):  # bounds the memory held by uploads, one per user at a time
        limits = state.limits

        def check_header(header: Dict[str, Any], header_bytes: int) -> int:
            """The checks of decoding that need the frame header only, in the same order (so the same
            error comes first), run as soon as the header arrives: a refused image is never read whole.
            Returns the frame's length in bytes (its header and its declared payload)."""
            meta = ArrayMeta.from_dict(header)
            check_image_shape(meta.shape, limits.max_voxels, limits.max_axis)
            image_header(header)
            meta.check(limits.max_voxels)
            return header_bytes + meta.payload_nbytes

        body = await read_body(request, limits.upload_timeout_s, check_header)

        def decode() -> Tuple[str, Volume, ImageHeader]:
            volume, geometry, _ = decode_image_frame(body, limits.max_voxels, limits.max_axis)
            return volume.content_hash(), volume, geometry

        try:
            image_id, volume, geometry = await run_in_threadpool(decode)
        except LIBRARY_ERRORS as exc:
            raise from_library_error(exc) from exc
        if geometry.sha256 is not None and geometry.sha256 != image_id:
            raise ApiError(
                400, ErrorCode.HASH_MISMATCH,
                f"the image hashes to {image_id}, not the {geometry.sha256} the client sent: the voxels, "
                "dtype, shape or geometry changed on the way (or the client hashed a different array)",
            )  # fmt: skip
        known = await run_in_threadpool(state.images.has, image_id)
        # the image held already, from memory or its stored file (None when that file is damaged: dropped)
        held = await run_in_threadpool(state.images.get, image_id) if known else None
        if held is None:  # stored now (over a damaged file, too); an upload of it that came first is kept
            held = await run_in_threadpool(state.images.put, image_id, volume, body)
        if held is not volume:
            _check_same_modality(image_id, held, volume)
        # this request's volume is the one held only when this request stored it (put keeps an earlier one)
        uploaded = held is volume
        if not uploaded:
            response.status_code = 200
    return image_info(image_id, held, uploaded=uploaded)


def _check_same_modality(image_id: str, held: Volume, upload: Volume) -> None:
    """A held image is never changed: an upload of it that names another modality is refused (409).

    The image id covers voxels and geometry, not the modality, and every session on the image,
    whoever opened it, reads the held one (the engine normalises intensities by modality).
    An upload that names none asks nothing of the held image: it is answered 200.
    """
    if upload.modality is None or upload.modality == held.modality:
        return
    has = f"modality {held.modality}" if held.modality else "no modality (guessed from its intensities)"
    raise ApiError(
        409, ErrorCode.IMAGE_CONFLICT,
        f"image {image_id} is held already, with {has}, and this upload says {upload.modality}: the image id "
        "covers voxels and geometry, not modality, and a held image never changes. Open sessions with "
        f'"modality": "{upload.modality}" in POST /v1/sessions instead (the Python client does this itself)',
        details={"held_modality": held.modality, "upload_modality": upload.modality},
    )  # fmt: skip


@router.get("/images/{image_id}", response_model=StoredImage, summary="Is this image held? (by content hash)")
async def get_image(
    image_id: str = Path(pattern=IMAGE_ID_PATTERN, description="SHA-256 content hash, 64 lowercase hex"),
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> StoredImage:
    # from the stored frame's header: the reply holds no voxels, so none are read or decoded
    try:
        info = await run_in_threadpool(state.images.info, image_id)
    except (ImageError, ValueError) as exc:  # a stored file that no longer decodes
        raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"image {image_id} is unreadable: upload it again") from exc
    if info is None:
        raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"no image {image_id} on this server: upload it")
    return info
