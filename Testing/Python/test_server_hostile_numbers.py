"""Hostile numbers in image geometry and array headers get a clear 4xx, never a 500 or wrong data.

Also the image store's file hygiene: float16 uploads, stale temporary files, transient read errors.
One real server (the real app, a tiny network) with a data directory and a learning datastore.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS, Servers, assert_error, make_volume, raw

from SegAssistLib.api_models import FRAME_MEDIA_TYPE
from SegAssistLib.client import SegAssistClient
from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.server import images as images_module
from SegAssistLib.transport import ArrayMeta, TransportError, decode_frame, encode_array, encode_frame

pytest_plugins = ["test_server_fixtures"]

FRAME = {"Content-Type": FRAME_MEDIA_TYPE}
JSON = {"Content-Type": "application/json"}
STALE, FRESH = ".upload-stale0001.tmp", ".upload-fresh0001.tmp"


@pytest.fixture(scope="module")
def server(server_checkpoint, tmp_path_factory):
    """A server whose image folder held temporaries of an earlier (killed) server when it started."""
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    images = data_dir / "images"
    images.mkdir(parents=True)
    for name in (STALE, FRESH):
        (images / name).write_bytes(b"SGAF half an upload")
    old = time.time() - 2 * images_module.STALE_UPLOAD_S
    os.utime(images / STALE, (old, old))
    servers = Servers(server_checkpoint)
    # image_cache_bytes=1: only the newest image stays in memory, the others are read from disk.
    srv = servers.start(
        data_dir=data_dir, learn_store=data_dir.parent / "store", max_voxels=400_000, max_axis=256,
        max_json_bytes=512_000, image_cache_bytes=1,
    )  # fmt: skip
    srv.data_dir = data_dir
    yield srv
    servers.stop_all()


def stored(server) -> set:
    return {p.name for p in (server.data_dir / "images").iterdir()}


def raw_frame(header_text: str, payload: bytes = b"") -> bytes:
    head = header_text.encode()
    return b"SGAF" + struct.pack("<I", len(head)) + head + payload


def upload(server, body: bytes) -> requests.Response:
    return raw(server, "POST", "/v1/images", data=body, headers=FRAME)


def geometry_frame(volume: Volume, origin_text: str) -> bytes:
    """An upload frame whose origin is written verbatim (json.dumps refuses NaN and Infinity)."""
    meta, payload = encode_array(volume.array, codec="zlib")
    header = json.dumps({**meta.to_dict(), "spacing": list(volume.spacing)})
    return raw_frame(header[:-1] + f', "origin": {origin_text}}}', payload)


def assert_healthy(server) -> None:
    assert raw(server, "GET", "/v1/info").status_code == 200


# ---- image origin ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "origin", ["[NaN, 0, 0]", "[0, Infinity, 0]", "[0, 0, -Infinity]", "[1e308, 0, 0]", "[0, -1e39, 0]"]
)
def test_a_non_finite_or_out_of_float32_origin_is_refused_and_not_stored(server, origin):
    before = stored(server)
    error = assert_error(upload(server, geometry_frame(make_volume(seed=1), origin)), 422, "invalid_image")
    assert "origin" in error["message"]
    assert stored(server) == before  # nothing persisted
    assert_healthy(server)


def test_origin_and_spacing_are_checked_by_validate_image():
    volume = make_volume(seed=2)
    validate_image(Volume(volume.array, origin=(-3.0e38, 0.0, 1.0e38)))  # float32 holds these
    for bad in ((np.nan, 0, 0), (0, np.inf, 0), (1e308, 0, 0)):
        with pytest.raises(ImageError, match="origin"):
            validate_image(Volume(volume.array, origin=bad))
    for bad in ((1e-50, 1, 1), (1, 1e39, 1)):  # 0 or infinite once stored as float32
        with pytest.raises(ImageError, match="spacing"):
            validate_image(Volume(volume.array, spacing=bad))


# ---- frame header numbers ------------------------------------------------------------------------------
def meta(shape: str, nbytes: str = "16", payload_nbytes: str = "16", dtype: str = "<i2", codec: str = "none") -> str:
    """A frame header written verbatim, so that it can hold what json.dumps never writes."""
    sizes = f'"nbytes":{nbytes},"payload_nbytes":{payload_nbytes}'
    return f'{{"dtype":"{dtype}","shape":{shape},"codec":"{codec}",{sizes}}}'


HEADERS = {
    "shape 1e400": (meta("[1e400,2,2]"), 400),
    "shape 2**70": (meta(f"[{2**70},2,2]"), 422),
    "shape 10**4000": (meta(f"[1{'0' * 4000},0,2]", "0", "0", "|u1"), 413),  # no voxels, but an absurd axis
    "negative": (meta("[-2,2,2]"), 422),
    "bool": (meta("[true,2,2]"), 400),
    "float": (meta("[2.0,2,2]"), 400),
    "not a list": (meta('"222"'), 400),
    "int64 wrap": (meta(f"[{2**32},{2**32},1]", "0", "0", "|u1"), 422),  # an int64 product wraps to 0
    "too many voxels": (meta("[65536,65536,65536]", str(2**48), "16", "|u1", "zstd"), 413),
    "nbytes 1e400": (meta("[2,2,2]", "1e400"), 400),
    "nbytes NaN": (meta("[2,2,2]", "NaN"), 400),
    "payload_nbytes bool": (meta("[2,2,2]", "16", "true"), 400),
    "nested": ("[" * 30000 + "]" * 30000, 400),
    "nested shape": (meta("[" * 400 + "1" + "]" * 400), 400),  # once a RecursionError describing it
}
CODES = {400: "malformed_body", 413: "image_too_large", 422: "invalid_shape"}


@pytest.mark.parametrize("name", list(HEADERS))
def test_hostile_numbers_in_a_frame_header_get_a_4xx(server, name):
    header, status = HEADERS[name]
    before = stored(server)
    error = assert_error(upload(server, raw_frame(header, b"\0" * 16)), status, CODES[status])
    assert len(error["message"]) < 400  # a 4000-digit number is not echoed whole
    assert stored(server) == before
    assert_healthy(server)


def test_array_metadata_takes_integers_only():
    good = {"dtype": "<f4", "shape": [2, 2, 2], "codec": "none", "nbytes": 32, "payload_nbytes": 32}
    assert ArrayMeta.from_dict(dict(good, shape=[np.int64(2), np.uint16(2), 2])).size == 8
    for change in ({"shape": [2, 2, True]}, {"shape": [2.0, 2, 2]}, {"nbytes": 32.0}, {"payload_nbytes": -1}):
        with pytest.raises(TransportError):
            ArrayMeta.from_dict({**good, **change})
    wraps = ArrayMeta("|u1", (2**32, 2**32, 1), "none", 0, 0)  # an int64 product would be 0
    assert wraps.size == 2**64
    with pytest.raises(TransportError) as e:
        wraps.check(max_voxels=1000)
    assert e.value.code == "image_too_large"


# ---- label masks -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_id(server):
    frame = encode_frame(make_volume(seed=5).array, {"spacing": [1, 1, 1.5]}, codec="zlib")
    image_id = upload(server, frame).json()["image_id"]
    reply = raw(server, "POST", "/v1/learn/cases", json={"image_id": image_id, "name": "hostile"})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


@pytest.mark.parametrize(
    "shape,nbytes,status",
    [([2**32, 2**32, 1], 0, 422), ([2**70, 1, 1], 0, 422), ([2**20, 2**20, 1], 2**40, 422), ([-1, 4, 4], 0, 422)],
)
def test_hostile_label_mask_shapes_get_a_4xx(server, case_id, shape, nbytes, status):  # none is the case's shape
    mask = {"dtype": "|u1", "shape": shape, "codec": "zstd", "nbytes": nbytes, "payload_nbytes": 0, "data": ""}
    reply = raw(server, "POST", f"/v1/learn/cases/{case_id}/labels", json={"mask": mask})
    assert_error(reply, status, CODES[status])
    assert_healthy(server)


# ---- float16 -------------------------------------------------------------------------------------------
def test_a_float16_image_is_stored_as_float32_and_imports_as_a_case(server):
    half = make_volume(seed=7, dtype=np.float16)
    assert half.array.dtype == np.float32  # a Volume widens float16 (losslessly)
    array16 = half.array.astype(np.float16)
    assert np.array_equal(array16.astype(np.float32), half.array)
    reply = upload(server, encode_frame(array16, {"spacing": list(half.spacing)}, codec="zlib"))
    assert reply.status_code == 201, reply.text
    info = reply.json()
    assert info["dtype"] == "<f4" and info["image_id"] == half.content_hash()
    with SegAssistClient(server.url, TOKENS["alice"]) as client:  # the client hashes it the same way
        assert client.upload_image(Volume(array16, spacing=half.spacing)).image_id == info["image_id"]
    case = raw(server, "POST", "/v1/learn/cases", json={"image_id": info["image_id"], "name": "half"})
    assert case.status_code == 201, case.text
    back = raw(server, "GET", f"/v1/learn/cases/{case.json()['id']}/image")
    assert back.status_code == 200, back.text
    header, array = decode_frame(back.content)
    assert array.dtype == np.float32 and np.array_equal(array, half.array)
    assert header["sha256"] == info["image_id"]


# ---- the image folder ----------------------------------------------------------------------------------
def test_stale_upload_temporaries_are_swept_when_the_store_opens(server):
    names = stored(server)
    assert STALE not in names  # left by a killed server: removed
    assert FRESH in names  # may belong to a live process sharing the data directory: kept


def test_a_transient_read_error_keeps_the_stored_image(server, monkeypatch):
    first = upload(server, encode_frame(make_volume(seed=11).array, {}, codec="zlib")).json()["image_id"]
    upload(server, encode_frame(make_volume(seed=12).array, {}, codec="zlib"))  # evicts the first from memory
    path = server.data_dir / "images" / f"{first}.sgaf"
    failed = []

    def flaky_open(file, *args, **kwargs):  # the store's one open() call fails once, as under EMFILE
        if Path(file) == path and not failed:
            failed.append(file)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", flaky_open, raising=False)
    reply = raw(server, "GET", f"/v1/images/{first}")
    error = assert_error(reply, 503, "storage_unavailable")
    assert "retry" in error["message"] and reply.headers.get("Retry-After")
    assert failed and path.is_file()  # kept
    assert raw(server, "GET", f"/v1/images/{first}").json()["image_id"] == first
    session = raw(server, "POST", "/v1/sessions", json={"image_id": first})
    assert session.status_code == 201, session.text


def test_a_lasting_read_error_drops_the_stored_copy_so_an_upload_repairs_it(server, monkeypatch):
    frame = encode_frame(make_volume(seed=13).array, {}, codec="zlib")
    first = upload(server, frame).json()["image_id"]
    upload(server, encode_frame(make_volume(seed=14).array, {}, codec="zlib"))  # evicts the first from memory
    path = server.data_dir / "images" / f"{first}.sgaf"

    def bad_block(file, *args, **kwargs):  # the disk cannot read this file: EIO every time
        if Path(file) == path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", bad_block, raising=False)
    assert_error(raw(server, "GET", f"/v1/images/{first}"), 404, "image_not_found")
    assert not path.exists()  # dropped: it was a copy of an upload, not a user's annotation
    monkeypatch.undo()
    assert upload(server, frame).json()["image_id"] == first  # uploading again repairs the store
    assert path.is_file() and raw(server, "GET", f"/v1/images/{first}").status_code == 200


# ---- prompt coordinates and image geometry -----------------------------------------------------------
HOSTILE_PROMPTS = {  # each once a 500: numpy raised OverflowError or TypeError inside a validator
    "position 10**400": {"kind": "point", "position": [10**400, 1, 1]},
    "position {}": {"kind": "point", "position": {}},
    "position true": {"kind": "point", "position": [True, 1, 1]},
    "position '1'": {"kind": "point", "position": ["1", 1, 1]},
    "box corner {}": {"kind": "box", "min_corner": [0, 0, 0], "max_corner": [{}, 1, 1]},
    "scribble vertex 10**400": {"kind": "scribble", "points": [[1, 1, 1], [10**400, 1, 1]]},
    "scribble normal 10**400": {"kind": "scribble", "points": [[1, 1, 1], [5, 1, 1]], "normal": [0, 0, 10**400]},
    "lasso vertex {}": {"kind": "lasso", "points": [[1, 1, 1], [5, 1, 1], {"a": 1}]},
}


@pytest.fixture(scope="module")
def session_id(server):
    image_id = upload(server, encode_frame(make_volume(seed=21).array, {}, codec="zlib")).json()["image_id"]
    reply = raw(server, "POST", "/v1/sessions", json={"image_id": image_id})
    assert reply.status_code == 201, reply.text
    return reply.json()["session_id"]


@pytest.mark.parametrize("name", list(HOSTILE_PROMPTS))
def test_hostile_prompt_coordinates_get_a_422(server, session_id, name):
    body = json.dumps({"prompt": HOSTILE_PROMPTS[name]})
    reply = raw(server, "POST", f"/v1/sessions/{session_id}/prompts", data=body, headers=JSON)
    error = assert_error(reply, 422, "invalid_prompt")
    assert len(error["message"]) < 2000  # a 400-digit number is not echoed whole
    image_id = raw(server, "GET", f"/v1/sessions/{session_id}").json()["image_id"]
    replay = json.dumps({"image_id": image_id, "prompts": [HOSTILE_PROMPTS[name]]})  # a replayed log
    assert_error(raw(server, "POST", "/v1/sessions", data=replay, headers=JSON), 422, "invalid_prompt")
    assert_healthy(server)


@pytest.mark.parametrize(
    "field, value",
    [("spacing", [True, True, True]), ("spacing", ["1", "1", "1.5"]), ("origin", [0, False, 0]),
     ("direction", ["1", "0", "0", "0", "1", "0", "0", "0", "1"]), ("origin", [10**400, 0, 0])],
)  # fmt: skip
def test_image_geometry_takes_numbers_only(server, field, value):
    volume = make_volume(seed=22)
    meta, payload = encode_array(volume.array, codec="zlib")
    before = stored(server)
    error = assert_error(upload(server, raw_frame(json.dumps({**meta.to_dict(), field: value}), payload)), 400,
                         "malformed_body")  # fmt: skip
    assert field in error["message"] and "valid number" in error["message"]
    assert stored(server) == before


# ---- one image, one modality ---------------------------------------------------------------------------
def test_a_stored_image_keeps_its_modality_when_uploaded_again(server):
    """Evicted from memory (a cache of 1 byte), the image is compared with its stored copy."""
    volume = make_volume(seed=23)

    def frame(modality):
        return encode_frame(volume.array, {"spacing": list(volume.spacing), "modality": modality}, codec="zlib")

    first = upload(server, frame("MR"))
    assert first.status_code == 201 and first.json()["modality"] == "MR"
    image_id = first.json()["image_id"]
    upload(server, encode_frame(make_volume(seed=24).array, {}, codec="zlib"))  # evicts it from memory
    error = assert_error(upload(server, frame("CT")), 409, "image_conflict")
    assert "MR" in error["message"] and '"modality": "CT"' in error["message"]
    assert error["details"] == {"held_modality": "MR", "upload_modality": "CT"}
    for again in (frame("MR"), frame(None)):  # the same modality, or none: the image as held
        reply = upload(server, again)
        assert reply.status_code == 200 and reply.json()["modality"] == "MR" and not reply.json()["uploaded"]
    assert raw(server, "GET", f"/v1/images/{image_id}").json()["modality"] == "MR"
    header, _ = decode_frame((server.data_dir / "images" / f"{image_id}.sgaf").read_bytes())
    assert header["modality"] == "MR"
