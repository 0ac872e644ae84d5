"""A 3D image with its geometry, and the checks every image passes before it is segmented.

Torch-free. The array is indexed ``[k, j, i]``; spacing, origin and direction follow ITK
(physical LPS coordinates, ``direction`` columns are the i, j, k axes).

A float16 array becomes float32 when the :class:`Volume` is made (lossless): SimpleITK, NIfTI
writers and most numeric code have no float16, and doing it here means every path (a file, an
upload frame, the client before it hashes) sees, hashes and stores the same float32 image.

Geometry must fit the files images are stored in: NIfTI keeps spacing and origin as float32, so
:func:`validate_image` refuses a NaN, infinite or out-of-float32-range origin or spacing instead of
letting it become NaN or 0 on disk.

:func:`voxel_digest` is the digest of an image's voxel values alone (not their dtype, not the file
they came from), which a prompt log records (``image.sha256``) to tell a replay on another scan of the
same grid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.errors import ImageError

MAX_VOXELS_DEFAULT = 1024 * 1024 * 1024  # about 1 G voxels: a 1024x1024x1000 volume


@dataclass
class Volume:
    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: Optional[str] = None  # "CT", "MR" or None (guessed from intensities when needed)

    def __post_init__(self) -> None:
        if isinstance(self.array, np.ndarray) and self.array.dtype.kind == "f" and self.array.dtype.itemsize == 2:
            self.array = self.array.astype(np.float32)  # lossless; see the module docstring
        try:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            self.origin = tuple(float(s) for s in self.origin)  # type: ignore[assignment]
            self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        except (TypeError, ValueError) as exc:
            raise ImageError(
                f"image geometry: spacing and origin must be numbers and direction a 3x3 matrix ({exc})"
            ) from exc
        # "ct" was taken for MR: no CT windowing, no word said
        self.modality = normalise_modality(self.modality)

    @property
    def shape_ijk(self) -> Tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    def ijk_to_physical(self, ijk: Sequence[float]) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + (self.direction * np.asarray(self.spacing)) @ ijk

    def physical_to_ijk(self, point: Sequence[float]) -> np.ndarray:
        m = self.direction * np.asarray(self.spacing)
        return np.linalg.solve(m, np.asarray(point, dtype=float) - np.asarray(self.origin))

    def content_hash(self) -> str:
        """SHA-256 of voxels and geometry: the same image always hashes the same."""
        h = hashlib.sha256()
        arr = np.ascontiguousarray(self.array)
        h.update(str(arr.dtype.str).encode())
        h.update(np.asarray(arr.shape, np.int64).tobytes())
        h.update(np.asarray(self.spacing + self.origin, np.float64).tobytes())
        h.update(np.asarray(self.direction, np.float64).tobytes())
        h.update(memoryview(arr).cast("B"))
        return h.hexdigest()


VOXEL_DIGEST_TAG = "segassist-voxels-v1"
VOXEL_DIGEST_CHUNK = 1 << 20  # voxels converted and hashed at a time: 8 MiB as float64, whatever the image
_INTEGER_CLASSES = (("int16", "<i2"), ("int32", "<i4"), ("int64", "<i8"), ("uint64", "<u8"))


def _c_order_chunks(arr: np.ndarray, chunk_voxels: int):
    """Consecutive pieces of ``arr`` in C order (slabs of whole slices, else rows, else parts of a row),
    each of at most ``chunk_voxels`` voxels: no copy of the whole array, whatever its strides."""
    if arr.ndim == 0:
        yield arr.reshape(1)
    elif arr.size <= chunk_voxels:
        yield arr
    else:
        per = arr[0].size  # > 0: arr.size > chunk_voxels >= 1
        if per <= chunk_voxels:
            step = chunk_voxels // per
            for start in range(0, arr.shape[0], step):
                yield arr[start : start + step]
        else:
            for index in range(arr.shape[0]):
                yield from _c_order_chunks(arr[index], chunk_voxels)


def _integer_class(lo: int, hi: int) -> Optional[Tuple[str, str]]:
    """The first of the digest's integer classes that holds every value from ``lo`` to ``hi`` (None: none)."""
    for name, dtype in _INTEGER_CLASSES:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return name, dtype
    return None


def _digest_class(arr: np.ndarray, chunk_voxels: int) -> Tuple[str, str]:
    """The canonical type the values of ``arr`` are hashed in (name, numpy dtype), from the values alone:
    the first integer class that holds them all when all are whole numbers, else float32 when each is
    one exactly (also whole numbers no integer class holds: beyond uint64, or below int64's range and
    above it at once), else float64."""
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise ImageError(f"image dtype {arr.dtype} is not numeric (integer or float expected)")
    if arr.size == 0:
        return _INTEGER_CLASSES[0]
    if kind in "biu":  # int64 or uint64 holds every numpy integer array
        found = _integer_class(int(arr.min()), int(arr.max()))
        if found is not None:
            return found
    else:  # a float image: of integers (a CT stored as float32), or not
        whole, flo, fhi = True, np.inf, -np.inf
        for chunk in _c_order_chunks(arr, chunk_voxels):
            if not (np.isfinite(chunk).all() and np.array_equal(chunk, np.trunc(chunk))):
                whole = False
                break
            flo, fhi = min(flo, float(chunk.min())), max(fhi, float(chunk.max()))
        found = _integer_class(int(flo), int(fhi)) if whole and flo >= -(2.0**63) and fhi < 2.0**64 else None
        if found is not None:  # (the bounds: exact as Python integers then)
            return found
    # not all whole numbers, or whole numbers no integer class holds (beyond uint64; or below 0 and
    # above int64's range at once): float32 when each value is one exactly, as the definition says
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32: inf, not equal
        fits32 = arr.dtype.itemsize <= 4 or all(
            np.array_equal(part.astype(np.float32), part, equal_nan=True) for part in _c_order_chunks(arr, chunk_voxels)
        )
    return ("float32", "<f4") if fits32 else ("float64", "<f8")


def voxel_digest(array: np.ndarray, chunk_voxels: int = VOXEL_DIGEST_CHUNK) -> str:
    """SHA-256 (hex) of an image's voxel values, the same for every representation of the same values:
    the image read from NIfTI, NRRD or MHA, or re-saved as another dtype that holds them exactly.

    The values are hashed in the first of these types that holds every one of them exactly: ``int16``,
    ``int32``, ``int64``, ``uint64`` when all are integers (a float image of whole numbers too),
    else ``float32``, else ``float64`` (a negative zero as zero, every NaN as one NaN). The bytes hashed
    are the ASCII line ``"segassist-voxels-v1 <type> <ni> <nj> <nk>\\n"`` (the shape, i first), then
    the values in that type, little-endian, i varying fastest, then j, then k: the order NIfTI, NRRD
    and MHA store them in (``array`` is indexed ``[k, j, i]``, C order). Geometry is not part of it.

    Hashed ``chunk_voxels`` at a time (the digest does not depend on it): a 512x512x600 CT is never
    copied whole. It reads the values twice (their range, then the hash): about 0.15 s for a
    512x512x300 int16 CT on one core, as it hashes the stored bytes; 0.2 to 0.3 s for the same
    values as int32 or float32; a float64 image of that size up to 1.7 s (its values checked, then
    converted).
    """
    arr = np.asarray(array)
    chunk_voxels = max(1, int(chunk_voxels))
    name, dtype = _digest_class(arr, chunk_voxels)
    h = hashlib.sha256(f"{VOXEL_DIGEST_TAG} {name} {' '.join(str(n) for n in arr.shape[::-1])}\n".encode("ascii"))
    floating = name.startswith("float")
    with np.errstate(invalid="ignore"):
        for chunk in _c_order_chunks(arr, chunk_voxels):
            values = np.ascontiguousarray(chunk, dtype=dtype)  # no copy when already so stored
            if floating:
                values = values + values.dtype.type(0)  # -0.0 + 0.0 is 0.0
                nan = np.isnan(values)
                if nan.any():
                    values[nan] = np.nan
            if values.size:
                h.update(values)  # C-contiguous: its bytes, as they lie
    return h.hexdigest()


def geometry_difference(a: Volume, b: Volume, tolerance: float = 1e-3) -> Optional[str]:
    """How the geometry of image ``a`` differs from that of ``b`` (None when it is the same): spacing
    (relative ``tolerance``), origin (``tolerance`` x ``b``'s finest spacing, in mm) or direction
    (``tolerance`` per cosine); shapes are the caller's to compare. The tolerance absorbs float32
    storage (NIfTI), not a shifted or reoriented grid."""
    sa, sb = np.asarray(a.spacing, float), np.asarray(b.spacing, float)
    if np.any(np.abs(sa - sb) > tolerance * np.abs(sb)):
        return f"spacing {[round(float(s), 6) for s in sa]} mm instead of {[round(float(s), 6) for s in sb]}"
    if np.any(np.abs(np.asarray(a.origin) - np.asarray(b.origin)) > tolerance * float(sb.min())):
        return f"origin {[round(float(s), 4) for s in a.origin]} mm instead of {[round(float(s), 4) for s in b.origin]}"
    if np.any(np.abs(np.asarray(a.direction) - np.asarray(b.direction)) > tolerance):
        return (f"direction {np.round(a.direction, 4).ravel().tolist()} instead of "
                f"{np.round(b.direction, 4).ravel().tolist()}")  # fmt: skip
    return None


_ALLOWED_KINDS = "iuf"
#: mm: the finest and coarsest voxel spacing taken as millimetres. Finer is a file whose spacing is in
#: metres (0.0005 for 0.5 mm), or corrupt: the engine's windows (millimetres wide, in voxels) grew
#: past any integer (a raw OverflowError at 1e-30)
MIN_SPACING_MM = 1e-3
#: mm: ten metres a voxel is no medical image either (a spacing in micrometres?)
MAX_SPACING_MM = 1e4
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I|: float32 storage (NIfTI quaternions) stays far below
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fits_float32(values: np.ndarray) -> bool:
    """Finite, and still finite once stored as float32 (NIfTI's spacing and origin)."""
    return bool(np.all(np.isfinite(values)) and np.all(np.abs(values) <= _FLOAT32_MAX))


def _check_spacing_is_millimetres(spacing: np.ndarray) -> None:
    """Refuse a spacing outside :data:`MIN_SPACING_MM` .. :data:`MAX_SPACING_MM`, saying what it may be."""
    shown = [float(f"{x:.6g}") for x in spacing]
    if np.any(spacing < MIN_SPACING_MM):
        raise ImageError(
            f"image spacing {shown} is implausibly fine: below {MIN_SPACING_MM:g} mm per voxel. SegAssist reads "
            "spacing in millimetres; is it in metres (0.0005 for 0.5 mm)? Fix the file's spacing (or its units) "
            "first"
        )
    if np.any(spacing > MAX_SPACING_MM):
        raise ImageError(
            f"image spacing {shown} is implausibly coarse: above {MAX_SPACING_MM:g} mm per voxel. SegAssist reads "
            "spacing in millimetres; is it in micrometres? Fix the file's spacing (or its units) first"
        )


def validate_image(volume: Volume, max_voxels: int = MAX_VOXELS_DEFAULT) -> None:
    """Raise :class:`ImageError` naming the problem if the image cannot be segmented."""
    arr = volume.array
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"image must be a numpy array, got {type(arr).__name__}")
    if arr.ndim == 4 and 1 in arr.shape:
        raise ImageError(
            f"image has 4 dimensions {arr.shape}: squeeze the singleton axis or pick one channel first"
        )
    if arr.ndim != 3:
        raise ImageError(f"image must be 3D, got {arr.ndim}D with shape {arr.shape}")
    if arr.dtype.kind == "b":
        raise ImageError("image of dtype bool: that is a mask, not an image (cast it to uint8 to segment it anyway)")
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise ImageError(f"image dtype {arr.dtype} is not numeric (integer or float expected)")
    if arr.size == 0 or min(arr.shape) < 1:
        raise ImageError(f"image is empty: shape {arr.shape}")
    if min(arr.shape) < 2:
        raise ImageError(f"image is a single slice (shape {arr.shape}): a 3D volume is needed")
    if arr.size > max_voxels:
        raise ImageError(f"image has {arr.size} voxels, above the limit of {max_voxels}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ImageError(f"image has {bad} NaN or infinite voxels: fill or mask them before segmenting")
    sp = np.asarray(volume.spacing, dtype=float)
    if sp.shape != (3,) or not _fits_float32(sp) or np.any(sp.astype(np.float32) <= 0):
        raise ImageError(f"image spacing must be 3 positive finite numbers within float32 range, got {volume.spacing}")
    _check_spacing_is_millimetres(sp)
    origin = np.asarray(volume.origin, dtype=float)
    if origin.shape != (3,) or not _fits_float32(origin):
        raise ImageError(
            f"image origin must be 3 finite numbers within float32 range (|x| <= {_FLOAT32_MAX:.3g}, what "
            f"NIfTI stores), got {volume.origin}"
        )
    d = np.asarray(volume.direction)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)):
        raise ImageError("image direction must be a 3x3 matrix of finite numbers")
    off = float(np.abs(d.T @ d - np.eye(3)).max())
    if off > ORTHONORMAL_TOLERANCE:
        raise ImageError(
            f"image direction must be a rotation (orthonormal columns; off by {off:.3g}): a scaled or sheared "
            "grid (an image under a non-rigid transform?) cannot be stored as NIfTI; harden or resample it first"
        )
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f" and max(abs(float(lo)), abs(float(hi))) > _FLOAT32_MAX:
        raise ImageError(
            f"image values reach {max(abs(float(lo)), abs(float(hi))):.3g}, beyond the float32 range the model "
            f"computes in (|x| <= {_FLOAT32_MAX:.3g}): rescale the intensities first"
        )
    if hi == lo:  # compared in the image's own dtype: 2**62 and 2**62 + 1 differ, as floats they would not
        raise ImageError("image is constant: there is nothing to segment")


def normalise_modality(value: Optional[str]) -> Optional[str]:
    """A modality as SegAssist spells it: ``"CT"`` or ``"MR"`` whatever the case and spaces (``"MRI"``
    is ``"MR"``); None (guess from the intensities) stays None. :class:`ImageError` for anything else."""
    if value is None:
        return None
    modality = str(value).strip().upper()
    modality = {"MRI": "MR"}.get(modality, modality)
    if modality not in ("CT", "MR"):
        raise ImageError(f"modality must be 'CT', 'MR' or None (guessed), got {value!r}")
    return modality


def guess_modality(volume: Volume) -> str:
    """'CT' when intensities look like Hounsfield units, else 'MR'."""
    if volume.modality:
        return volume.modality
    arr = volume.array
    step = max(1, int(round((arr.size / 200_000) ** (1 / 3))))
    sample = arr[::step, ::step, ::step]
    lo, hi = np.percentile(sample, [1, 99])
    return "CT" if lo <= -500 and hi >= 0 and hi < 5000 else "MR"


def scaled_to_unit(image: np.ndarray) -> np.ndarray:
    """Intensities clipped to their 0.5-99.5 percentiles and scaled to [0, 1] (float32): what the
    seeded methods (the baselines, the engine's edge snap) compare."""
    image = np.asarray(image, np.float64)  # float32 near its limit overflows hi - lo and image - lo
    lo, hi = (float(x) for x in np.percentile(image, [0.5, 99.5]))
    span = hi - lo
    # constant (relative: tiny units) only where float64 rounding could have made the spread: at
    # float32's 1e-6, an image of 2e9 + 0..100 (int32) or 1e8 + 0..5 was taken as constant and blanked
    if span <= 1e-12 * max(abs(lo), abs(hi)) or span == 0.0:
        span = 1.0
    return np.clip((image - lo) / span, 0.0, 1.0).astype(np.float32)
