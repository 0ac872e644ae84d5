"""``/v1/images``: upload an image once, look it up by content hash."""

from __future__ import annotations

from typing import Tuple

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from SegAssistLib.api_models import FRAME_MEDIA_TYPE, IMAGE_ID_PATTERN, ErrorCode, ImageHeader, StoredImage
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume
from SegAssistLib.server.deps import current_user, get_state
from SegAssistLib.server.errors import LIBRARY_ERRORS, ApiError, from_library_error
from SegAssistLib.server.images import decode_image_frame, image_info
from SegAssistLib.server.limits import check_image_shape, read_body
from SegAssistLib.server.responses import ERROR_RESPONSES
from SegAssistLib.server.state import ServerState
from SegAssistLib.transport import ArrayMeta, unpack_frame

router = APIRouter(tags=["images"], responses=ERROR_RESPONSES)

_UPLOAD_DOC = f"""Upload an image as one frame (`Content-Type: {FRAME_MEDIA_TYPE}`):

    b"SGAF" | uint32 little-endian header length | UTF-8 JSON header | compressed voxels

The header holds the array metadata (`dtype` such as `<i2`, `shape` in array order [k, j, i],
`codec` zstd|zlib|none, `nbytes` raw, `payload_nbytes` compressed) and the image geometry
(`spacing`, `origin`, `direction`, optional `modality` and `sha256`, see ImageHeader).

The image id is the SHA-256 of voxels and geometry. Uploading an image the server already holds
stores nothing and answers 200; a new image answers 201. Check with `GET /v1/images/{{id}}` first
and the same image never travels twice."""


@router.post(
    "/images",
    response_model=StoredImage,
    status_code=201,
    summary="Upload an image",
    description=_UPLOAD_DOC,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {FRAME_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "x-segassist-frame-header": {
                "description": "the frame's JSON header: these fields plus dtype, shape, codec, nbytes, payload_nbytes",
                **ImageHeader.model_json_schema(),
            },
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
    if media not in (FRAME_MEDIA_TYPE, "application/octet-stream"):
        raise ApiError(
            415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"an image upload must be a SegAssist frame ({FRAME_MEDIA_TYPE}), not {media or 'untyped'}",
        )  # fmt: skip
    assert state.upload_slots is not None
    async with state.upload_slots:  # bounds the memory held by uploads being decoded
        limits = state.limits
        body = await read_body(request, limits.upload_timeout_s)

        def decode() -> Tuple[str, Volume, ImageHeader]:
            header, _ = unpack_frame(body)
            check_image_shape(ArrayMeta.from_dict(header).shape, limits.max_voxels, limits.max_axis)
            volume, geometry, _ = decode_image_frame(body, limits.max_voxels)
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
        if known:
            response.status_code = 200
            state.images.hold(image_id, volume)  # decoded already: sessions need not read the stored file
        else:
            await run_in_threadpool(state.images.put, image_id, volume, body)
    return image_info(image_id, volume, uploaded=not known)


@router.get("/images/{image_id}", response_model=StoredImage, summary="Is this image held? (by content hash)")
async def get_image(
    image_id: str = Path(pattern=IMAGE_ID_PATTERN, description="SHA-256 content hash, 64 lowercase hex"),
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> StoredImage:
    try:
        volume = await run_in_threadpool(state.images.get, image_id)
    except (ImageError, ValueError) as exc:  # a stored file that no longer decodes
        raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"image {image_id} is unreadable: upload it again") from exc
    if volume is None:
        raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"no image {image_id} on this server: upload it")
    return image_info(image_id, volume)
