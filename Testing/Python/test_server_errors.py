"""Every class of bad input gets a 4xx with the one error shape, and the server stays healthy."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from test_server_fixtures import TOKENS, ManualClock, assert_error, make_volume, raw

from SegAssistLib.api_models import FRAME_MEDIA_TYPE
from SegAssistLib.client import (
    AuthenticationError,
    ImageNotFoundError,
    InvalidPromptError,
    LimitExceededError,
    PayloadTooLargeError,
    SegAssistClient,
    SessionNotFoundError,
    SessionStateError,
)
from SegAssistLib.prompts import MaskPrompt, PointPrompt
from SegAssistLib.transport import encode_array, encode_frame, pack_frame

pytest_plugins = ["test_server_fixtures"]

FRAME = {"Content-Type": FRAME_MEDIA_TYPE}


def frame_for(array: np.ndarray, **header) -> bytes:
    return encode_frame(array, {"spacing": [1, 1, 1], **header})


@pytest.fixture
def session(alice, blob_volume):
    with alice.open_session(blob_volume) as s:
        yield s


# ---- authentication ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,path",
    [("GET", "/v1/info"), ("POST", "/v1/images"), ("POST", "/v1/sessions"), ("GET", "/v1/images/" + "a" * 64)],
)
def test_every_endpoint_but_health_needs_a_valid_token(shared_server, method, path):
    assert_error(raw(shared_server, method, path, token=None), 401, "unauthorized")
    response = raw(shared_server, method, path, token="not-the-token-0123456789")
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    basic = raw(shared_server, method, path, token=None, headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert_error(basic, 401, "unauthorized")


def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(shared_server):
    """FastAPI parses a JSON body before it checks the token: a stranger's malformed body got a 400
    (so it was parsed), and a large one cost the server its parse. Now the token comes first."""
    json_type = {"Content-Type": "application/json"}
    for token in (None, "not-the-token-0123456789"):
        reply = raw(shared_server, "POST", "/v1/sessions", token=token, data=b'{"image_id": ', headers=json_type)
        assert_error(reply, 401, "unauthorized")
    streamed = (b"[" + b"[]," * 100_000 + b"[]]" for _ in range(1))  # chunked: no Content-Length to refuse by
    assert_error(raw(shared_server, "POST", "/v1/sessions", token=None, data=streamed, headers=json_type),
                 401, "unauthorized")  # fmt: skip
    assert raw(shared_server, "GET", "/v1/health", token=None).status_code == 200
    assert raw(shared_server, "GET", "/openapi.json", token=None).status_code == 200  # the API docs stay public


def test_client_raises_authentication_error(shared_server):
    with SegAssistClient(shared_server.url, "wrong-token-0123456789") as bad:
        assert bad.health().status == "ok"
        with pytest.raises(AuthenticationError) as e:
            bad.info()
        assert e.value.status == 401


# ---- malformed and truncated bodies ----------------------------------------------------------------
def test_malformed_json_bodies(shared_server, session):
    path = f"/v1/sessions/{session.session_id}/prompts"
    json_type = {"Content-Type": "application/json"}
    assert_error(raw(shared_server, "POST", path, data=b'{"prompt": ', headers=json_type), 400, "malformed_body")
    assert_error(raw(shared_server, "POST", path, data=b"[1, 2]", headers=json_type), 400, "malformed_body")
    assert_error(raw(shared_server, "POST", path, data=b"", headers=json_type), 400, "malformed_body")
    assert_error(raw(shared_server, "POST", path, json={"prompt": {"kind": "blob"}}), 422, "invalid_prompt")
    assert_error(raw(shared_server, "POST", path, json={"prompt": {"kind": "point"}}), 422, "invalid_prompt")
    assert_error(raw(shared_server, "POST", path, json={"prmopt": {}}), 422, "invalid_request")
    body = '{"prompt": {"kind": "point", "position": [NaN, 1, 1]}}'
    assert_error(raw(shared_server, "POST", path, data=body, headers=json_type), 422, "invalid_prompt")
    degenerate = {"kind": "box", "min_corner": [1, 1, 1], "max_corner": [1, 1, 5]}
    assert_error(raw(shared_server, "POST", path, json={"prompt": degenerate}), 422, "invalid_prompt")
    collinear = {"kind": "lasso", "points": [[1, 1, 1], [2, 2, 1], [3, 3, 1]]}
    assert_error(raw(shared_server, "POST", path, json={"prompt": collinear}), 422, "invalid_prompt")
    corrupt_mask = {"kind": "mask", "offset": [0, 0, 0], "shape": [4, 4, 4], "data": "eJwDAAAAAAE="}
    assert_error(raw(shared_server, "POST", path, json={"prompt": corrupt_mask}), 422, "invalid_prompt")
    assert_error(raw(shared_server, "POST", "/v1/sessions", json={"image_id": 5}), 400, "invalid_id")
    assert_error(raw(shared_server, "POST", "/v1/sessions", json={}), 422, "invalid_request")


def test_a_json_body_of_another_content_type_is_refused_as_such(shared_server, session):
    """FastAPI reads a body as JSON only under a JSON content type: any other body (or one with no
    type) failed validation as raw bytes, a 400 malformed_body about the model, not about the type."""
    path = f"/v1/sessions/{session.session_id}/prompts"
    body = json.dumps({"prompt": {"kind": "point", "position": [24.0, 20.0, 12.0]}}).encode()
    for media in ("text/plain", FRAME["Content-Type"], "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": media} if media else {}
        reply = raw(shared_server, "POST", path, data=body, headers=headers)
        error = assert_error(reply, 415, "unsupported_media_type")
        assert "application/json" in error["message"] and (media or "without a Content-Type") in error["message"]
    opening = json.dumps({"image_id": session.image_id}).encode()
    reply = raw(shared_server, "POST", "/v1/sessions", data=opening, headers={"Content-Type": "text/plain"})
    assert_error(reply, 415, "unsupported_media_type")
    # a JSON type with parameters is JSON; no body at all is a malformed request, whatever its type
    charset = {"Content-Type": "application/json; charset=utf-8"}
    assert raw(shared_server, "POST", path, data=body, headers=charset).status_code == 200
    assert_error(raw(shared_server, "POST", "/v1/sessions"), 400, "malformed_body")
    assert session.status().n_prompts == 1


def test_malformed_and_truncated_uploads(shared_server, blob_volume):
    frame = frame_for(blob_volume.array)
    assert_error(raw(shared_server, "POST", "/v1/images", data=frame[:-10], headers=FRAME), 400, "truncated_body")
    assert_error(raw(shared_server, "POST", "/v1/images", data=frame[:30], headers=FRAME), 400, "truncated_body")
    assert_error(raw(shared_server, "POST", "/v1/images", data=b"GIF89a" + frame, headers=FRAME), 400, "malformed_body")
    assert_error(raw(shared_server, "POST", "/v1/images", data=b"", headers=FRAME), 400, "malformed_body")
    bad_json = b"SGAF" + (5).to_bytes(4, "little") + b"{nope"
    assert_error(raw(shared_server, "POST", "/v1/images", data=bad_json, headers=FRAME), 400, "malformed_body")
    meta, payload = encode_array(blob_volume.array)
    corrupt = bytearray(payload)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\xff" * 64
    body = pack_frame({**meta.to_dict(), "spacing": [1, 1, 1]}, bytes(corrupt))
    assert_error(raw(shared_server, "POST", "/v1/images", data=body, headers=FRAME), 400, "malformed_array")
    missing = pack_frame({"dtype": "<f4", "shape": [4, 4, 4]}, b"")
    assert_error(raw(shared_server, "POST", "/v1/images", data=missing, headers=FRAME), 400, "malformed_body")
    json_upload = raw(shared_server, "POST", "/v1/images", json={"voxels": [1, 2]})
    assert_error(json_upload, 415, "unsupported_media_type")


def test_a_frame_that_decompresses_past_its_declared_size_is_refused(shared_server):
    """A decompression bomb: a few bytes that claim a small image but expand far beyond it."""
    meta, payload = encode_array(np.zeros(4_000_000, np.uint8))
    header = {**meta.to_dict(), "shape": [10, 10, 10], "nbytes": 1000, "spacing": [1, 1, 1]}
    response = raw(shared_server, "POST", "/v1/images", data=pack_frame(header, payload), headers=FRAME)
    assert_error(response, 400, "truncated_body")


def test_wrong_dtype_or_shape(shared_server, blob_volume):
    for dtype in ("<c8", "|O", "|b1", ">f4", "<U4"):
        header = {"dtype": dtype, "shape": [4, 4, 4], "codec": "none", "nbytes": 512, "payload_nbytes": 512}
        body = pack_frame(header, bytes(512))
        assert_error(raw(shared_server, "POST", "/v1/images", data=body, headers=FRAME), 422, "unsupported_dtype")
    meta, payload = encode_array(blob_volume.array)
    wrong = {**meta.to_dict(), "shape": [24, 40, 47]}  # nbytes no longer matches the shape
    body = pack_frame(wrong, payload)
    assert_error(raw(shared_server, "POST", "/v1/images", data=body, headers=FRAME), 422, "invalid_shape")
    unknown_codec = pack_frame({**meta.to_dict(), "codec": "lzma"}, payload)
    assert_error(raw(shared_server, "POST", "/v1/images", data=unknown_codec, headers=FRAME), 422, "unsupported_codec")
    flat = frame_for(np.random.default_rng(0).normal(size=(40, 48)).astype(np.float32))
    assert_error(raw(shared_server, "POST", "/v1/images", data=flat, headers=FRAME), 422, "invalid_image")
    four_d = frame_for(np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32))
    assert_error(raw(shared_server, "POST", "/v1/images", data=four_d, headers=FRAME), 422, "invalid_image")
    one_slice = frame_for(np.random.default_rng(0).normal(size=(1, 40, 48)).astype(np.float32))
    assert_error(raw(shared_server, "POST", "/v1/images", data=one_slice, headers=FRAME), 422, "invalid_image")


def test_nan_constant_or_badly_placed_images(shared_server, blob_volume):
    nan = blob_volume.array.copy()
    nan[3, 4, 5] = np.nan
    error = assert_error(
        raw(shared_server, "POST", "/v1/images", data=frame_for(nan), headers=FRAME), 422, "invalid_image"
    )
    assert "NaN" in error["message"]
    constant = frame_for(np.full((8, 8, 8), 7, np.int16))
    assert_error(raw(shared_server, "POST", "/v1/images", data=constant, headers=FRAME), 422, "invalid_image")
    negative = frame_for(blob_volume.array, spacing=[1, -1, 1])
    assert_error(raw(shared_server, "POST", "/v1/images", data=negative, headers=FRAME), 422, "invalid_image")
    singular = frame_for(blob_volume.array, direction=[1, 0, 0, 1, 0, 0, 0, 0, 1])
    assert_error(raw(shared_server, "POST", "/v1/images", data=singular, headers=FRAME), 422, "invalid_image")
    meta, payload = encode_array(blob_volume.array)
    head = json.dumps({**meta.to_dict(), "spacing": [1, float("nan"), 1]}).encode()  # NaN in the header
    body = b"SGAF" + len(head).to_bytes(4, "little") + head + payload
    assert_error(raw(shared_server, "POST", "/v1/images", data=body, headers=FRAME), 422, "invalid_image")
    claimed = frame_for(blob_volume.array, sha256="0" * 64)
    assert_error(raw(shared_server, "POST", "/v1/images", data=claimed, headers=FRAME), 400, "hash_mismatch")


# ---- oversize ----------------------------------------------------------------------------------------
def test_oversize_images_and_bodies(shared_server, alice):
    big = np.zeros((80, 80, 80), np.uint8)  # 512 000 voxels, above the 400 000 limit
    big[0, 0, 0] = 1
    error = assert_error(
        raw(shared_server, "POST", "/v1/images", data=frame_for(big), headers=FRAME), 413, "image_too_large"
    )
    assert error["details"]["limit"] == 400_000
    long_axis = np.zeros((4, 4, 300), np.uint8)
    long_axis[0, 0, 0] = 1
    assert_error(
        raw(shared_server, "POST", "/v1/images", data=frame_for(long_axis), headers=FRAME), 413, "image_too_large"
    )
    # The client checks the limits before it sends anything.
    with pytest.raises(PayloadTooLargeError):
        alice.upload_image(big)
    with pytest.raises(PayloadTooLargeError):
        alice.open_session(big)
    huge_json = {"image_id": "a" * 64, "prompts": [], "pad": "x" * 600_000}
    assert_error(raw(shared_server, "POST", "/v1/sessions", json=huge_json), 413, "body_too_large")


def test_a_declared_length_above_the_limit_is_refused_before_the_body_is_read(shared_server):
    head = (
        "POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Type: {FRAME_MEDIA_TYPE}\r\n"
        "Content-Length: 50000000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        reply = _read_http_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"


def _read_http_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if _ and b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                return data


# ---- unknown ids -------------------------------------------------------------------------------------
def test_unknown_and_malformed_ids(shared_server, alice):
    unknown = "0123456789abcdef" * 2
    for method, suffix in (("GET", ""), ("POST", "/undo"), ("GET", "/result"), ("DELETE", "")):
        assert_error(raw(shared_server, method, f"/v1/sessions/{unknown}{suffix}"), 404, "session_not_found")
    for bad in ("xyz", "0123456789ABCDEF" * 2, "0" * 33, "0" * 31 + "%00"):
        assert_error(raw(shared_server, "GET", f"/v1/sessions/{bad}"), 400, "invalid_id")
    assert_error(raw(shared_server, "GET", "/v1/images/" + "f" * 64), 404, "image_not_found")
    assert_error(raw(shared_server, "GET", "/v1/images/../../etc/passwd"), 404, "not_found")
    assert_error(raw(shared_server, "GET", "/v1/images/" + "g" * 64), 400, "invalid_id")
    assert_error(raw(shared_server, "POST", "/v1/sessions", json={"image_id": "e" * 64}), 404, "image_not_found")
    assert_error(raw(shared_server, "POST", "/v1/sessions", json={"image_id": "../x"}), 400, "invalid_id")
    assert_error(raw(shared_server, "GET", "/v1/nothing-here"), 404, "not_found")
    assert_error(raw(shared_server, "PUT", "/v1/health"), 405, "method_not_allowed")
    with pytest.raises(SessionNotFoundError):
        alice.session(unknown)


# ---- prompts outside the image -----------------------------------------------------------------------
OUTSIDE = [
    {"kind": "point", "position": [48.0, 5, 5]},  # i runs 0..47
    {"kind": "point", "position": [5, -1.0, 5]},
    {"kind": "box", "min_corner": [50, 50, 30], "max_corner": [60, 60, 40]},
    {"kind": "box", "min_corner": [-3, 10, 5], "max_corner": [40, 30, 20]},  # one corner past the edge
    {"kind": "scribble", "points": [[5, 5, 5], [5, 5, 30]]},
    {"kind": "lasso", "points": [[60, 1, 2], [70, 1, 2], [70, 20, 2]]},  # wholly past i = 47.5 (one reaching
    # into the image is taken: its part inside is drawn, test_lasso_forms.py)
]


@pytest.mark.parametrize("prompt", OUTSIDE, ids=lambda p: p["kind"])
def test_prompts_outside_the_image_are_refused(shared_server, session, prompt):
    path = f"/v1/sessions/{session.session_id}/prompts"
    error = assert_error(raw(shared_server, "POST", path, json={"prompt": prompt}), 422, "prompt_outside_image")
    assert "outside the image" in error["message"]
    assert session.status().n_prompts == 0  # nothing applied


def test_the_server_and_the_engine_share_the_half_voxel_edge(shared_server, session):
    """prompts.inside_image: the last voxel's outer face (i = 47.5 on 48 voxels) is inside, a hair beyond is not."""
    path = f"/v1/sessions/{session.session_id}/prompts"
    beyond = {"kind": "point", "position": [float(np.nextafter(47.5, 48.0)), 5, 5]}
    assert_error(raw(shared_server, "POST", path, json={"prompt": beyond}), 422, "prompt_outside_image")
    on_edge = raw(shared_server, "POST", path, json={"prompt": {"kind": "point", "position": [47.5, 5, -0.5]}})
    assert on_edge.status_code == 200, on_edge.text
    assert session.status().n_prompts == 1


def test_mask_prompt_outside_and_typed_client_errors(session, alice, blob_volume):
    mask = MaskPrompt(offset=(20, 0, 0), shape=(10, 4, 4), data=MaskPrompt.from_array(np.ones((10, 4, 4))).data)
    with pytest.raises(InvalidPromptError) as e:
        session.add_prompt(mask)
    assert e.value.code == "prompt_outside_image" and isinstance(e.value, ValueError)
    with pytest.raises(InvalidPromptError):
        alice.open_session(blob_volume, prompts=[PointPrompt(position=(100, 1, 1))])


# ---- limits on sessions and prompts, idle expiry -------------------------------------------------------
def test_session_and_prompt_limits(server_factory, blob_volume):
    server = server_factory.start(max_sessions_per_user=2, max_sessions_total=3, max_prompts_per_session=2)
    alice = SegAssistClient(server.url, TOKENS["alice"])
    bob = SegAssistClient(server.url, TOKENS["bob"])
    a1, a2 = alice.open_session(blob_volume), alice.open_session(blob_volume)
    with pytest.raises(LimitExceededError) as e:
        alice.open_session(blob_volume)
    assert e.value.code == "too_many_sessions" and e.value.status == 429
    b1 = bob.open_session(blob_volume)
    with pytest.raises(LimitExceededError):  # the server-wide limit
        bob.open_session(blob_volume)
    a2.close()
    a2 = alice.open_session(blob_volume)  # a closed session frees its place
    a1.add_prompt(PointPrompt(position=(24, 20, 12)))
    a1.add_prompt(PointPrompt(position=(20, 20, 12)))
    with pytest.raises(SessionStateError) as e:
        a1.add_prompt(PointPrompt(position=(22, 20, 12)))
    assert e.value.code == "prompt_limit" and e.value.status == 409
    too_many = [PointPrompt(position=(24, 20, 12))] * 3
    a2.close()
    with pytest.raises(SessionStateError):
        alice.open_session(blob_volume, prompts=too_many)
    for s in (a1, b1):
        s.close()


def test_idle_sessions_expire(server_factory, blob_volume):
    clock = ManualClock()
    server = server_factory.start(clock=clock, idle_timeout_s=0.4, max_sessions_per_user=1)
    client = SegAssistClient(server.url, TOKENS["alice"])
    session = client.open_session(blob_volume)
    session.add_prompt(PointPrompt(position=(24, 20, 12)))
    served = server.app.state.segassist.sessions._sessions[session.session_id]
    clock.advance(0.3)
    assert session.status().expires_in_s == pytest.approx(0.4)  # using it keeps it alive
    clock.advance(0.5)
    with pytest.raises(SessionNotFoundError) as e:
        session.add_prompt(PointPrompt(position=(24, 20, 12)))
    assert e.value.code == "session_expired"
    deadline = _deadline(10)  # found idle by the request, not the sweep: its engine session is closed too
    while served.engine_session is not None and not deadline():
        server._thread.join(0.01)
    assert served.engine_session is None
    other = client.open_session(blob_volume)  # the expired session no longer counts against the limit
    clock.advance(0.5)
    state = server.app.state.segassist
    deadline = _deadline(10)
    while len(state.sessions) and not deadline():  # the background sweep closes it unasked
        server._thread.join(0.01)
    assert len(state.sessions) == 0
    with pytest.raises(SessionNotFoundError):
        other.status()


def test_a_session_past_its_idle_timeout_no_longer_holds_a_place_before_the_sweep(server_factory, blob_volume):
    clock = ManualClock()  # a long timeout: the background sweep (every 30 s) does not run in this test
    server = server_factory.start(clock=clock, idle_timeout_s=120, max_sessions_per_user=1, max_sessions_total=1)
    client = SegAssistClient(server.url, TOKENS["alice"])
    first = client.open_session(blob_volume)
    with pytest.raises(LimitExceededError, match="limit"):
        client.open_session(blob_volume)
    clock.advance(121)
    second = SegAssistClient(server.url, TOKENS["bob"]).open_session(blob_volume)  # the server's limit too
    with pytest.raises(SessionNotFoundError):
        first.status()
    second.close()
    client.open_session(blob_volume).close()


def _deadline(seconds: float):
    import time

    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


# ---- a client that disconnects mid-upload ---------------------------------------------------------------
def test_a_client_that_disconnects_mid_upload_leaves_the_server_healthy(server_factory):
    server = server_factory.start(max_concurrent_uploads=1)
    vol = make_volume(seed=21)
    frame = frame_for(vol.array)
    head = (
        "POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Type: {FRAME_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(frame)}\r\n\r\n"
    ).encode()
    for _ in range(3):  # more than the upload slots: each must be given back
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + frame[: len(frame) // 2])
    client = SegAssistClient(server.url, TOKENS["alice"])
    assert client.health().status == "ok"
    with pytest.raises(ImageNotFoundError):  # nothing half-stored
        client.image(vol.content_hash())
    info = client.upload_image(vol)
    assert info.uploaded and info.image_id == vol.content_hash()


def test_a_stalled_upload_times_out(server_factory):
    server = server_factory.start(upload_timeout_s=0.5)
    frame = frame_for(make_volume(seed=22).array)
    head = (
        "POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKENS['alice']}\r\nContent-Type: {FRAME_MEDIA_TYPE}\r\n"
        f"Content-Length: {len(frame)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + frame[:100])  # and then nothing more
        reply = _read_http_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "upload_timeout"
