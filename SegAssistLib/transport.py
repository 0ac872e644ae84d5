"""Moving numpy arrays between client and server: compression with explicit dtype/shape metadata.

Torch-free and pickle-free; shared by :mod:`SegAssistLib.client` and :mod:`SegAssistLib.server`.

An array travels as its raw little-endian C-order bytes, compressed with one *codec*, next to a
small metadata record (:class:`ArrayMeta`): dtype, shape, codec, raw byte count and compressed
byte count. The receiver checks every field before it decompresses anything, so a truncated,
corrupt, oversize or mislabelled payload is refused with a :class:`TransportError` whose ``code``
says which (the server turns it into a 4xx). ``shape``, ``nbytes`` and ``payload_nbytes`` must be
true integers (a JSON ``2.0``, ``1e400`` or ``true`` is refused, not coerced), and sizes are
computed with Python integers, so no client number can overflow or wrap a check.

Codecs: ``zstd`` (the default, via the ``zstandard`` package) and ``zlib`` (standard library).
``zlib`` exists so that a client with numpy and requests only (a bare ``PythonSlicer``) still
works; the client announces the codecs it reads and the server answers in the best one of them.

Large uploads travel as a *frame*, one self-describing byte string::

    b"SGAF" | uint32 little-endian header length | UTF-8 JSON header | payload

(the client sends the part before the payload and the payload one after the other,
:func:`encode_frame_parts`, rather than joining them into a second copy of the compressed image).

The JSON header holds the :class:`ArrayMeta` fields plus whatever else the sender adds (an
image's spacing, origin and direction). Small arrays in JSON replies travel as base64 of the
same compressed payload (see :class:`SegAssistLib.api_models.ArrayPayload`).

``<f2`` (float16) arrays travel as they are; an *image* made of one becomes float32 when its
:class:`SegAssistLib.image.Volume` is built (see there), so its id is the float32 image's hash.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.errors import SegAssistError
from SegAssistLib.image import Volume

try:  # zstandard is optional on the client side (see module docstring)
    import zstandard
except ImportError:  # pragma: no cover - exercised only where zstandard is absent
    zstandard = None  # type: ignore[assignment]

FRAME_MAGIC = b"SGAF"
FRAME_MEDIA_TYPE = "application/x-segassist-frame"
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 4

#: Anything with the buffer protocol that reads as bytes: bytes, bytearray, memoryview, uint8 arrays.
Buffer = Union[bytes, bytearray, memoryview]

#: dtypes accepted on the wire, all little-endian (or byte-sized). No object, bool or complex.
WIRE_DTYPES: Tuple[str, ...] = ("|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8")


def available_codecs() -> Tuple[str, ...]:
    """Codecs this Python can read and write, best first."""
    return ("zstd", "zlib", "none") if zstandard is not None else ("zlib", "none")


def best_codec(accepted: Optional[Sequence[str]]) -> str:
    """The best codec both this side and a peer that accepts ``accepted`` can use: ``none`` when the
    peer lists none we write (every reader takes uncompressed bytes; a server bounds such replies,
    ``Limits.max_uncompressed_reply_bytes``, answering 406 above it)."""
    ours = available_codecs()
    if not accepted:
        return ours[0]
    for codec in ours:
        if codec in accepted:
            return codec
    return "none"


class TransportError(SegAssistError, ValueError):
    """An array payload or frame is malformed; ``code`` names the problem for the error reply, and
    ``details`` (when given) go into it as they are (such as the ``errors`` of a frame's header)."""

    code = "malformed_array"

    def __init__(self, message: str, code: Optional[str] = None, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        if code:
            self.code = code
        self.details = details


#: Above this many bytes no array can exist on this machine (numpy's index limit).
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)


def _is_int(value: Any) -> bool:
    """A true integer: Python or numpy, not a bool and not a float (JSON's 2.0 or 1e400 are refused)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def describe_value(value: Any, limit: int = 60, _depth: int = 0) -> str:
    """A client-sent value for an error message, shortened (a 4000-digit number stays readable, a
    list nested a thousand deep does not recurse a thousand times)."""
    if isinstance(value, (list, tuple)):
        if _depth >= 3:
            return "[...]"
        items = ", ".join(describe_value(v, 24, _depth + 1) for v in value[:8])
        text = "[" + items + (", ..." if len(value) > 8 else "") + "]"
    else:
        try:
            text = repr(value)
        except ValueError:  # an int above Python's digit limit for str()
            text = "a very large number"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ArrayMeta:
    """What a receiver needs to rebuild an array, checked before decompression."""

    dtype: str
    shape: Tuple[int, ...]
    codec: str
    nbytes: int  # raw (decompressed) bytes
    payload_nbytes: int  # compressed bytes

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> ArrayMeta:
        """The metadata of a header or JSON payload, checked (see :meth:`check`); nothing is coerced:
        ``shape``, ``nbytes`` and ``payload_nbytes`` must already be integers."""
        try:
            shape = data["shape"]
            if not isinstance(shape, (list, tuple)):
                raise TransportError(f"shape must be a list of integers, got {describe_value(shape)}", "malformed_body")
            meta = cls(
                dtype=str(data["dtype"]),
                shape=tuple(shape),
                codec=str(data["codec"]),
                nbytes=data["nbytes"],
                payload_nbytes=data["payload_nbytes"],
            )
        except TransportError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"array metadata is incomplete or mistyped: {exc}", "malformed_body") from exc
        meta.check()
        return meta

    @property
    def size(self) -> int:
        """Voxel count, an exact Python int (never a wrapped int64)."""
        return math.prod(int(n) for n in self.shape)

    def check(self, max_voxels: Optional[int] = None) -> None:
        """Reject metadata that does not describe a sane array (before anything is decompressed).

        Every number must be a true integer (not a float, not a bool); sizes are computed with
        Python integers and compared with the limits before anything is allocated.
        """
        show = describe_value
        if self.dtype not in WIRE_DTYPES:
            raise TransportError(
                f"dtype {show(self.dtype)} is not accepted; use one of {', '.join(WIRE_DTYPES)}", "unsupported_dtype"
            )
        if not 1 <= len(self.shape) <= MAX_NDIM:
            raise TransportError(f"shape {show(self.shape)} must have 1 to {MAX_NDIM} entries", "invalid_shape")
        if not all(_is_int(n) for n in self.shape):  # mistyped, as a missing field is: malformed
            raise TransportError(f"shape {show(self.shape)} must be a list of integers", "malformed_body")
        if any(n < 0 for n in self.shape):
            raise TransportError(f"shape {show(self.shape)} has a negative size", "invalid_shape")
        for name in ("nbytes", "payload_nbytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise TransportError(f"{name} must be a non-negative integer, got {show(value)}", "malformed_body")
        if self.codec not in ("zstd", "zlib", "none"):
            raise TransportError(f"codec {show(self.codec)} is unknown (zstd, zlib or none)", "unsupported_codec")
        size = self.size
        if max_voxels is not None and size > max_voxels:
            raise TransportError(
                f"array of shape {show(self.shape)} has {show(size)} voxels, above the limit of {max_voxels}",
                "image_too_large",
            )
        expected = size * np.dtype(self.dtype).itemsize
        if expected > MAX_ARRAY_BYTES:
            raise TransportError(
                f"array of shape {show(self.shape)} would need {show(expected)} bytes: no array is that large",
                "invalid_shape",
            )
        if self.nbytes != expected:
            raise TransportError(
                f"nbytes {show(self.nbytes)} does not match dtype {self.dtype} and shape {show(self.shape)} "
                f"({expected} bytes expected)",
                "invalid_shape",
            )


def wire_array(array: np.ndarray) -> np.ndarray:
    """The array as it travels: C-contiguous, little-endian, a wire dtype (bool becomes uint8)."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise TransportError(f"dtype {arr.dtype} cannot be sent (integer or float arrays only)", "unsupported_dtype")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    if arr.dtype.str not in WIRE_DTYPES:
        raise TransportError(f"dtype {arr.dtype} cannot be sent", "unsupported_dtype")
    return arr


def compress(raw: bytes, codec: str, level: int = 3, threads: int = 0) -> bytes:
    if codec == "zstd":
        if zstandard is None:
            raise TransportError("the zstandard package is not installed", "unsupported_codec")
        # The checksum lets the receiver tell a corrupted payload from a valid one.
        return zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True).compress(raw)
    if codec == "zlib":
        return zlib.compress(raw, max(1, min(level, 9)))
    if codec == "none":
        return bytes(raw)
    raise TransportError(f"codec {codec!r} is unknown", "unsupported_codec")


#: zlib is fed and drained in pieces of these sizes: the only copies are of one piece.
_ZLIB_IN_CHUNK = 256 << 10
_ZLIB_OUT_CHUNK = 1 << 20


def _zlib_into(payload: Buffer, out: memoryview, nbytes: int) -> None:
    """Decompress one zlib stream into ``out`` (``nbytes`` long), piece by piece.

    Never more than ``nbytes`` bytes are produced (a decompression bomb stops at the declared
    size), and the stream must end exactly at the end of ``payload``.
    """
    src = memoryview(payload).cast("B")
    d = zlib.decompressobj()
    filled = pos = 0
    while not d.eof:
        if d.unconsumed_tail:  # input left over from the last call (it stopped at max_length)
            data: Buffer = d.unconsumed_tail
        elif pos < len(src):
            data = src[pos : pos + _ZLIB_IN_CHUNK]
            pos += len(data)
        else:
            break  # the input ended before the stream did
        room = nbytes - filled
        # max_length 0 would mean "no limit": with no room left, ask for one byte to see if more comes
        piece = d.decompress(data, min(room, _ZLIB_OUT_CHUNK) if room else 1)
        if len(piece) > room:
            raise TransportError(
                f"zlib payload decompresses to more bytes, but {nbytes} were declared", "truncated_body"
            )
        out[filled : filled + len(piece)] = piece
        filled += len(piece)
    if not d.eof or filled != nbytes:
        raise TransportError(
            f"zlib payload does not decompress to the declared {nbytes} bytes (truncated or corrupt)",
            "truncated_body",
        )
    trailing = len(d.unused_data) + len(d.unconsumed_tail) + (len(src) - pos)
    if trailing:
        raise TransportError(
            f"zlib payload has {trailing} bytes after the end of its compressed stream (corrupt or mislabelled)"
        )


def decompress(payload: Buffer, codec: str, nbytes: int) -> np.ndarray:
    """Decompress exactly ``nbytes`` bytes into a fresh writable uint8 buffer.

    Anything else (corrupt, short, longer than declared, bytes after the end of the compressed
    stream) is refused. Both codecs stream straight into the output buffer, so a large image is
    never held twice in memory.
    """
    out = np.empty(nbytes, np.uint8)
    try:
        if codec == "zstd":
            if zstandard is None:
                raise TransportError("the zstandard package is not installed", "unsupported_codec")
            with zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True) as reader:
                view = memoryview(out)
                filled = 0
                while filled < nbytes:
                    n = reader.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
                extra = reader.read(1)
            if filled != nbytes or extra:
                raise TransportError(
                    f"zstd payload decompresses to {'more' if extra else filled} bytes, but {nbytes} were declared",
                    "truncated_body",
                )
        elif codec == "zlib":
            _zlib_into(payload, memoryview(out), nbytes)
        elif codec == "none":
            if len(payload) != nbytes:
                raise TransportError(f"raw payload has {len(payload)} bytes, not {nbytes}", "truncated_body")
            out[:] = np.frombuffer(payload, np.uint8)
        else:
            raise TransportError(f"codec {codec!r} is unknown", "unsupported_codec")
    except TransportError:
        raise
    except Exception as exc:  # zstandard.ZstdError and zlib.error share no base class
        raise TransportError(f"{codec} payload cannot be decompressed (corrupt or truncated): {exc}") from exc
    return out


def encode_array(array: np.ndarray, codec: str = "zstd", level: int = 3, threads: int = 0) -> Tuple[ArrayMeta, bytes]:
    """Compress an array; returns its metadata and the compressed bytes."""
    arr = wire_array(array)
    payload = compress(memoryview(arr).cast("B") if arr.size else b"", codec, level, threads)
    meta = ArrayMeta(arr.dtype.str, tuple(int(n) for n in arr.shape), codec, int(arr.nbytes), len(payload))
    return meta, payload


def decode_array(meta: ArrayMeta, payload: Buffer, max_voxels: Optional[int] = None) -> np.ndarray:
    """Rebuild an array; checks metadata, payload length and decompressed length."""
    meta.check(max_voxels)
    if len(payload) != meta.payload_nbytes:
        raise TransportError(
            f"payload has {len(payload)} bytes, but {meta.payload_nbytes} were declared (truncated body?)",
            "truncated_body",
        )
    raw = decompress(payload, meta.codec, meta.nbytes)
    return raw.view(np.dtype(meta.dtype)).reshape(meta.shape)


def frame_prefix(header: Dict[str, Any]) -> bytes:
    """What comes before a frame's payload: magic, header length, JSON header."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise TransportError(f"frame header is {len(head)} bytes, above {MAX_HEADER_BYTES}", "malformed_body")
    return b"".join((FRAME_MAGIC, struct.pack("<I", len(head)), head))


def pack_frame(header: Dict[str, Any], payload: bytes) -> bytes:
    """One byte string: magic, header length, JSON header, payload."""
    return b"".join((frame_prefix(header), payload))


def unpack_frame(data: Buffer) -> Tuple[Dict[str, Any], memoryview]:
    """Split a frame into its JSON header and its payload (a view, not a copy).

    ``data`` may be any bytes-like object (bytes, bytearray, memoryview, a uint8 numpy array).
    """
    view = memoryview(data).cast("B")
    if len(view) < 8 or bytes(view[:4]) != FRAME_MAGIC:
        raise TransportError(f"body is not a SegAssist frame (it must start with {FRAME_MAGIC!r})", "malformed_body")
    (head_len,) = struct.unpack("<I", view[4:8])
    if head_len > MAX_HEADER_BYTES:
        raise TransportError(f"frame header length {head_len} is above {MAX_HEADER_BYTES}", "malformed_body")
    if len(view) < 8 + head_len:
        raise TransportError("frame ends inside its header (truncated body)", "truncated_body")
    try:
        header = json.loads(bytes(view[8 : 8 + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise TransportError(f"frame header is not valid JSON: {str(exc)[:200]}", "malformed_body") from exc
    if not isinstance(header, dict):
        raise TransportError("frame header must be a JSON object", "malformed_body")
    return header, view[8 + head_len :]


def encode_frame_parts(array: np.ndarray, extra: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Tuple[bytes, bytes]:
    """An array and extra header fields as a frame in two parts, its prefix (:func:`frame_prefix`)
    and its compressed payload: the frame is ``prefix + payload``. A sender that sends the two one
    after the other never holds the compressed array twice, as joining them would."""
    meta, payload = encode_array(array, **kwargs)
    header = dict(extra or {})
    header.update(meta.to_dict())
    return frame_prefix(header), payload


def encode_frame(array: np.ndarray, extra: Optional[Dict[str, Any]] = None, **kwargs: Any) -> bytes:
    """An array and extra header fields as one frame."""
    return b"".join(encode_frame_parts(array, extra, **kwargs))


def decode_frame(data: Buffer, max_voxels: Optional[int] = None) -> Tuple[Dict[str, Any], np.ndarray]:
    """The header and the array of a frame, every field checked."""
    header, payload = unpack_frame(data)
    meta = ArrayMeta.from_dict(header)
    return header, decode_array(meta, payload, max_voxels)


def wire_volume(volume: Union[Volume, np.ndarray]) -> Volume:
    """The volume as it travels (its array in wire form): client and server hash it the same."""
    if isinstance(volume, np.ndarray):
        volume = Volume(volume)
    array = wire_array(volume.array)
    return volume if array is volume.array else replace(volume, array=array)
