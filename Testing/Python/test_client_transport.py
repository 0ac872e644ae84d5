"""Array transport (compression with explicit metadata) and the client's torch-free footing."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_server_fixtures import TOKENS

from SegAssistLib import transport
from SegAssistLib.api_models import ArrayPayload, ErrorCode
from SegAssistLib.client import errors
from SegAssistLib.client.http import HttpClient, ProgressBody
from SegAssistLib.transport import ArrayMeta, TransportError

pytest_plugins = ["test_server_fixtures"]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("codec", ["zstd", "zlib", "none"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", "<i2", ">i2", "<u4", "<i4", "<i8", "<f2", "<f4", ">f8"])
def test_round_trip_every_dtype_and_codec(codec, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 5, 7)) * 100).astype(dtype)
    meta, payload = transport.encode_array(array, codec=codec)
    assert meta.dtype in transport.WIRE_DTYPES and np.dtype(meta.dtype).kind == np.dtype(dtype).kind
    assert meta.shape == (3, 5, 7) and meta.payload_nbytes == len(payload)
    back = transport.decode_array(meta, payload)
    assert back.dtype.byteorder in "<|=" and np.array_equal(back, array)
    back[0, 0, 0] = 1  # decoded arrays are writable


def test_bool_travels_as_uint8_and_empty_arrays_work():
    meta, payload = transport.encode_array(np.array([[[True, False]]]))
    assert meta.dtype == "|u1"
    assert transport.decode_array(meta, payload).tolist() == [[[1, 0]]]
    empty = np.zeros((0, 0, 0), np.uint8)
    meta, payload = transport.encode_array(empty)
    assert transport.decode_array(meta, payload).shape == (0, 0, 0)


def test_unsendable_dtypes_are_refused():
    for array in (np.array(["a"]), np.array([1 + 2j]), np.array([object()])):
        with pytest.raises(TransportError) as e:
            transport.encode_array(array)
        assert e.value.code == "unsupported_dtype"


def test_frames_carry_header_fields_and_refuse_damage():
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    frame = transport.encode_frame(array, {"spacing": [1, 2, 3]})
    header, back = transport.decode_frame(frame)
    assert header["spacing"] == [1, 2, 3] and np.array_equal(back, array)
    cases = {
        frame[:-1]: "truncated_body",
        frame[:10]: "truncated_body",
        b"XXXX" + frame[4:]: "malformed_body",
        frame + b"extra": "truncated_body",
    }
    for damaged, code in cases.items():
        with pytest.raises(TransportError) as e:
            transport.decode_frame(damaged)
        assert e.value.code == code
    with pytest.raises(TransportError) as e:
        transport.decode_frame(frame, max_voxels=10)
    assert e.value.code == "image_too_large"


def test_metadata_is_checked_before_decompression():
    good = {"dtype": "<f4", "shape": [2, 2, 2], "codec": "zstd", "nbytes": 32, "payload_nbytes": 0}
    ArrayMeta.from_dict(good)
    for change, code in [
        ({"dtype": "<c8"}, "unsupported_dtype"),
        ({"shape": [2, -2, 2]}, "invalid_shape"),
        ({"shape": [1] * 5}, "invalid_shape"),
        ({"nbytes": 31}, "invalid_shape"),
        ({"codec": "brotli"}, "unsupported_codec"),
        ({"shape": "abc"}, "malformed_body"),
    ]:
        with pytest.raises(TransportError) as e:
            ArrayMeta.from_dict({**good, **change})
        assert e.value.code == code, change
    with pytest.raises(TransportError) as e:
        ArrayMeta.from_dict({"dtype": "<f4"})
    assert e.value.code == "malformed_body"


def test_zlib_payloads_that_lie_about_their_size():
    meta, payload = transport.encode_array(np.ones(1000, np.uint8), codec="zlib")
    short = ArrayMeta(meta.dtype, (500,), "zlib", 500, meta.payload_nbytes)
    with pytest.raises(TransportError):
        transport.decode_array(short, payload)
    with pytest.raises(TransportError):
        transport.decode_array(meta, payload[:-4] + b"\0\0\0\0")


def test_zlib_payloads_with_bytes_after_their_stream_are_refused():
    """As zstd refuses them: garbage, or a second stream, after a stream of the declared size."""
    array = np.arange(1000, dtype="<i2").reshape(10, 10, 10)
    codecs = [c for c in ("zlib", "zstd") if c in transport.available_codecs()]
    for codec in codecs:
        meta, payload = transport.encode_array(array, codec=codec)
        for extra in (b"GARBAGE-AFTER-THE-STREAM", b"\0", zlib.compress(b"x" * 100)):
            lying = ArrayMeta(meta.dtype, meta.shape, codec, meta.nbytes, len(payload) + len(extra))
            with pytest.raises(TransportError) as e:
                transport.decode_array(lying, payload + extra)
            assert e.value.code == "malformed_array", (codec, extra)
        assert np.array_equal(transport.decode_array(meta, payload), array)  # the exact stream still decodes
    meta, payload = transport.encode_array(array, codec="zlib")
    second = transport.encode_array(np.ones(3, np.uint8), codec="zlib")[1]  # a second, valid stream
    with pytest.raises(TransportError, match=f"has {len(second)} bytes after the end of its compressed stream"):
        transport.decode_array(replace(meta, payload_nbytes=len(payload) + len(second)), payload + second)


@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_zlib_decodes_a_stream_fed_in_any_piece_size(monkeypatch, chunk):
    """Decoding goes piece by piece: any split of input and output gives the same array, and a
    stream that ends early, or that would write past the declared size, is refused."""
    monkeypatch.setattr(transport, "_ZLIB_IN_CHUNK", chunk)
    monkeypatch.setattr(transport, "_ZLIB_OUT_CHUNK", max(1, chunk // 3))
    array = (np.random.default_rng(1).normal(size=(6, 7, 8)) * 20).astype("<i2")
    meta, payload = transport.encode_array(array, codec="zlib")
    assert np.array_equal(transport.decode_array(meta, payload), array)
    with pytest.raises(TransportError, match="truncated or corrupt"):
        transport.decode_array(ArrayMeta(meta.dtype, meta.shape, "zlib", meta.nbytes, len(payload) - 4), payload[:-4])
    smaller = ArrayMeta(meta.dtype, (6, 7, 7), "zlib", 6 * 7 * 7 * 2, len(payload))
    with pytest.raises(TransportError, match="more bytes"):
        transport.decode_array(smaller, payload)


def test_zlib_decoding_holds_the_image_once():
    """zlib decompresses straight into the output array (as zstd does), not into a bytes object first."""
    raw_size = 40_000_000
    array = (np.arange(raw_size, dtype=np.uint32) % 977).astype(np.uint8)
    meta, payload = transport.encode_array(array, codec="zlib", level=1)
    tracemalloc.start()
    try:
        out = transport.decode_array(meta, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, array)
    assert peak < 1.3 * raw_size, f"zlib decoding peaked at {peak / 1e6:.0f} MB for a {raw_size / 1e6:.0f} MB image"


def test_frames_split_from_any_bytes_like_object():
    frame = transport.encode_frame(np.arange(60, dtype=np.int16).reshape(3, 4, 5), {"spacing": [1, 2, 3]})
    for data in (frame, bytearray(frame), memoryview(frame), np.frombuffer(frame, np.uint8)):
        header, array = transport.decode_frame(data)
        assert header["spacing"] == [1, 2, 3] and array.tolist() == np.arange(60).reshape(3, 4, 5).tolist()


def test_array_payload_in_json():
    array = np.zeros((4, 5, 6), np.uint8)
    array[1:3, 2:4, 3:5] = 1
    payload = ArrayPayload.from_array(array, codec="zlib")
    again = ArrayPayload.model_validate_json(payload.model_dump_json())
    assert np.array_equal(again.to_array(), array)
    broken = again.model_copy(update={"data": "not base64!"})
    with pytest.raises(TransportError):
        broken.to_array()
    assert base64.b64decode(payload.data)


def test_codec_negotiation():
    assert transport.best_codec(["zlib"]) == "zlib"
    assert transport.best_codec(["zstd", "zlib"]) == transport.available_codecs()[0]
    assert transport.best_codec(["snappy"]) == "none"


def test_progress_body_reports_monotonically_and_ends_at_the_total():
    seen = []
    body = ProgressBody(bytes(1_000_000), lambda sent, total: seen.append((sent, total)), chunk=10_000)
    assert len(body) == 1_000_000
    read = b""
    while chunk := body.read(8192):
        read += chunk
    assert len(read) == 1_000_000 and seen[-1] == (1_000_000, 1_000_000)
    assert 50 <= len(seen) <= 101 and [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_error_codes_map_to_typed_exceptions():
    assert isinstance(errors.error_for(422, "invalid_prompt", "x"), errors.InvalidPromptError)
    assert isinstance(errors.error_for(422, "invalid_prompt", "x"), ValueError)
    assert isinstance(errors.error_for(404, "session_expired", "x"), errors.SessionNotFoundError)
    assert isinstance(errors.error_for(409, "session_state", "x"), errors.SessionStateError)
    assert isinstance(errors.error_for(503, "queue_full", "x"), errors.ServerBusyError)
    assert isinstance(errors.error_for(502, "http_error", "x"), errors.ServerError)
    assert isinstance(errors.error_for(418, "teapot", "x"), errors.ServerReplyError)
    for code in ErrorCode.all():  # every code the server sends has a typed exception
        assert isinstance(errors.error_for(400, code, "x"), errors.ServerReplyError)


def test_tokens_are_not_sent_in_clear_text_beyond_loopback():
    with pytest.raises(ValueError, match="clear text"):
        HttpClient("http://example.org:8470", "token-0123456789abcdef")
    HttpClient("https://example.org:8470", "token-0123456789abcdef")
    HttpClient("http://127.0.0.1:8470", "token-0123456789abcdef")
    HttpClient("http://example.org:8470", "token-0123456789abcdef", allow_insecure_token=True)
    with pytest.raises(ValueError):
        HttpClient("ftp://example.org", None)


def _run_client_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_client_imports_without_torch_or_fastapi():
    done = _run_client_python(
        """
        import sys
        for banned in ("torch", "fastapi", "uvicorn", "monai", "starlette"):
            sys.modules[banned] = None  # importing any of them now fails
        import SegAssistLib.client, SegAssistLib.transport, SegAssistLib.api_models
        from SegAssistLib.client import SegAssistClient, LocalBackend
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_client_without_zstandard_works_against_the_server(shared_server):
    done = _run_client_python(
        """
        import sys
        sys.modules["zstandard"] = None  # as in a bare PythonSlicer
        import numpy as np
        from SegAssistLib import transport
        from SegAssistLib.client import SegAssistClient
        from SegAssistLib.image import Volume
        assert transport.available_codecs() == ("zlib", "none")
        client = SegAssistClient(sys.argv[1], sys.argv[2])
        rng = np.random.default_rng(5)
        volume = Volume((rng.normal(size=(20, 24, 28)) * 50).astype(np.int16))
        with client.open_session(volume) as session:
            update = session.add_prompt({"kind": "point", "position": [14, 12, 10]})
            assert np.array_equal(session.result(), session.fetch_result())
        print("ok", update.info["reply_bytes"])
        """,
        shared_server.url,
        TOKENS["alice"],
    )
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr
