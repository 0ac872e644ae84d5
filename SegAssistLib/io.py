"""Reading images and writing segmentations with SimpleITK. Torch-free.

Reads NIfTI, NRRD, MHA and any other single-file format SimpleITK knows, and DICOM series
directories. Writes masks as NIfTI (``.nii.gz``) and as Slicer segmentations (``.seg.nrrd``).

ITK's NIfTI reader turns NaN and infinite voxels of float data into 0; they are read back from the
file and put back (:func:`_keep_nonfinite`), so that such an image is refused as it is in any other
format. It also reads a NIfTI file cut short with zeros for the missing voxels: such a file is refused,
naming it (:func:`_check_nifti_header`), before its voxels are allocated, as a truncated NRRD or MetaImage is
by ITK itself; so is a NIfTI file whose qform and sform disagree (programs differ in which they take). Every mask
written is read back and compared (:func:`write_image_checked`): SimpleITK's NIfTI writer reports no
failed write, and a full disk left an empty or truncated file behind a success.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SegAssistLib.dicom import read_dicom_series
from SegAssistLib.errors import ImageError
from SegAssistLib.files import image_suffix, sitk_path
from SegAssistLib.image import MAX_VOXELS_DEFAULT, Volume, geometry_difference
from SegAssistLib.labels import as_labels  # noqa: F401  (re-exported: part of the IO API)

PathLike = Union[str, Path]


@contextlib.contextmanager
def _readable_name(path: Path) -> Iterator[str]:
    """The name to give ITK for ``path``. ITK's NIfTI reader, asked for ``x.nii.gz``, takes the
    voxels of an ``x.nii`` beside it (under ``x.nii.gz``'s header); and ITK finds no reader for a NIfTI
    or MetaImage suffix in mixed case (``.Nii``, ``.nii.GZ``, ``.Mha``: names ``segment --out`` writes)
    nor for a name that is only ``.nii.gz``. Such a file is read through a link named ``image`` and the
    suffix in lower case, with no sibling."""
    name = sitk_path(path)
    suffix = image_suffix(Path(name).name)
    shadowed = name.lower().endswith(".nii.gz") and Path(name[: -len(".gz")]).exists()
    unknown = suffix in (".nii.gz", ".nii", ".mha") and (not name.endswith(suffix) or Path(name).name == suffix)
    if not (shadowed or unknown):
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="segassist-read-") as folder:
        link = Path(folder) / f"image{suffix}"
        try:
            link.symlink_to(Path(name).resolve())
        except OSError:  # no symlinks (Windows without the privilege): a hard link, else a copy
            try:
                os.link(name, link)
            except OSError:
                shutil.copyfile(name, link)
        yield str(link)


def _reason(exc: BaseException) -> str:
    """The last line of a SimpleITK error (the line that says what went wrong)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _image_reader(name: str) -> sitk.ImageFileReader:
    """A reader of the file ``name``. ITK picks its reader by the suffix and finds none for ``.MHD`` (a
    MetaImage header of another case; unlike ``.mha`` it cannot be read through a link, whose folder would
    not hold its data file): it is given the MetaImage reader."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    if name.lower().endswith(".mhd"):
        reader.SetImageIO("MetaImageIO")
    return reader


def _read_sitk(path: Path) -> sitk.Image:
    """The image file ``path`` (or DICOM series folder) as SimpleITK reads it, checked first by its header
    (:func:`_check_announced`): a file that announces more voxels than it holds, or than SegAssist takes,
    is refused before its voxels are allocated."""
    sitk_path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not os.access(path, os.R_OK):  # ITK would say the file does not exist
        raise ImageError(f"cannot read {path}: permission denied")
    with _readable_name(path) as name:
        reader = _image_reader(name)
        try:
            reader.ReadImageInformation()
            nifti = sitk.ImageFileReader.GetImageIOFromFileName(name) == "NiftiImageIO"
            _check_announced(reader, Path(name) if nifti else None, path)
            image = reader.Execute()
            return _keep_nonfinite(image, Path(name)) if nifti else image
        except RuntimeError as exc:
            raise ImageError(f"cannot read {path}: {_unreadable(Path(name), exc)}") from exc


def _check_announced(reader: sitk.ImageFileReader, nifti: Optional[Path], shown: Path) -> None:
    """Refuse, from the header ``reader`` read, an image of more voxels (on its first three axes) than
    :data:`~SegAssistLib.image.MAX_VOXELS_DEFAULT`, and a NIfTI file (``nifti``, else None) that holds less
    data than it announces or whose two geometries disagree (:func:`_check_nifti_header`)."""
    size = reader.GetSize()
    voxels = int(np.prod(size[:3], dtype=np.int64))
    if voxels > MAX_VOXELS_DEFAULT:
        raise ImageError(
            f"cannot read {shown}: its header announces {voxels} voxels (size {size}), above the limit of "
            f"{MAX_VOXELS_DEFAULT}"
        )
    if nifti is not None:
        _check_nifti_header(nifti, shown)


def _unreadable(name: Path, exc: RuntimeError) -> str:
    """Why ITK could not read the file ``name``, for a person: for a NIfTI name, what is wrong with the
    file (gzip data under a ``.nii`` name, damaged compressed data), where ITK says only that it has no
    reader for it, which reads as an unsupported format."""
    reason = _reason(exc)
    suffix = image_suffix(name.name)
    if suffix not in (".nii", ".nii.gz"):
        return reason
    try:
        with open(name, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
        if gzipped and suffix == ".nii":
            return "the file is gzip-compressed but named .nii: rename it to .nii.gz"
        damage = _data_length(name, _WHOLE_FILE, trust_trailer=False)[1] if gzipped else None
    except OSError as err:
        return err.strerror or str(err)
    if damage:
        return f"the file is damaged: its compressed data cannot be read ({damage}); copy or download it again"
    if "Unable to determine ImageIO reader" in reason:
        return "the file is damaged or not NIfTI: its header cannot be read"
    return reason


_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _check_nifti_header(name: Path, shown: Path) -> None:
    """:class:`ImageError` naming ``shown`` when the NIfTI file ``name`` holds less data than its header
    says, or when its qform and sform disagree. ITK's NIfTI reader fills what is missing with zeros (after
    allocating all the header announces) and reports nothing, so a file cut short (a copy or download
    interrupted, a full disk) became an image, or a mask, with zeros where its data ended. ITK reads the
    qform unless the sform's code is 1 (scanner), nibabel, FSL and SPM the sform: a mask written on the
    one would sit elsewhere in the others. A header nibabel cannot read is left to ITK's reading."""
    import nibabel  # only for NIfTI files

    try:
        nifti = nibabel.load(str(name))
        proxy = nifti.dataobj
        voxels = int(np.prod(proxy.shape, dtype=np.int64))
        needed = int(proxy.offset) + voxels * np.dtype(proxy.dtype).itemsize
        data_file = Path(nifti.file_map["image"].filename)
        header = nifti.header
    except Exception:  # what ITK read and nibabel cannot (any reason): left as ITK read it
        return
    _check_nifti_forms(header, shown)
    try:
        found, damage = _data_length(data_file, needed)
    except OSError as exc:  # a .hdr whose .img is missing: named
        where = f" ({data_file.name})" if data_file != name else ""
        raise ImageError(f"cannot read {shown}: {exc.strerror or exc}{where}") from exc
    if found < needed:
        why = f"its compressed data is damaged ({damage})" if damage else "the file is truncated"
        raise ImageError(
            f"cannot read {shown}: {why} (it holds {found} of the {needed} bytes its header announces, "
            "uncompressed); its missing voxels would be read as zeros: copy or download it again"
        )


def _affine_geometry(affine: np.ndarray) -> Volume:
    """The spacing, origin and direction of a NIfTI affine (RAS), as a volume without voxels."""
    linear = np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    return Volume(np.zeros((0, 0, 0), np.uint8), spacing, affine[:3, 3], linear / np.where(spacing > 0, spacing, 1))


def _check_nifti_forms(header, shown: Path) -> None:
    """Refuse a NIfTI header whose qform and sform are both set and place the voxels differently (beyond
    :func:`~SegAssistLib.image.geometry_difference`'s float32 tolerance): programs differ in which one
    they take, so no mask written for it lines up with it in all of them."""
    codes = int(header["qform_code"]), int(header["sform_code"])
    if min(codes) <= 0:
        return
    try:
        qform, sform = _affine_geometry(header.get_qform()), _affine_geometry(header.get_sform())
    except Exception:  # a header nibabel cannot turn into affines: left as ITK read it
        return
    if min(qform.spacing) <= 0 or min(sform.spacing) <= 0:
        return  # a degenerate form: ITK refuses it or takes the other, as before
    difference = geometry_difference(sform, qform)
    if difference:
        raise ImageError(
            f"cannot read {shown}: its NIfTI header holds two geometries that disagree, the sform (code "
            f"{codes[1]}) has {difference} in the qform (code {codes[0]}; RAS, mm): programs differ in which "
            "one they use, so a mask made on it would sit elsewhere in some of them; make the two agree, or set "
            "the wrong one's code to 0 (e.g. with nibabel or fslorient), first"
        )


_WHOLE_FILE = 1 << 62  # bytes "needed" to read a file to its end


def _data_length(path: Path, needed: int, trust_trailer: bool = True) -> Tuple[int, Optional[str]]:
    """How many bytes of ``path`` can be read, decompressed when it is gzip, up to ``needed`` (enough to
    tell), and what damage stopped the reading (None: none, or the file just ends). A gzip file whose
    trailer records the expected length (modulo 2**32, as gzip does) is taken as whole unread: a file cut
    short ends in compressed data, which matches that by chance once in 2**32 (``trust_trailer`` False:
    read all the same, to find damage inside)."""
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        if raw.read(2) != _GZIP_MAGIC:
            return size, None
        if size >= 6 and trust_trailer:
            raw.seek(-4, os.SEEK_END)
            if int.from_bytes(raw.read(4), "little") == needed % (1 << 32):
                return needed, None
    found = 0
    stream = zlib.decompressobj(wbits=31)  # gzip
    with open(path, "rb") as raw:
        data = b""
        while found < needed:
            if not data:
                data = raw.read(_CHUNK)
                if not data:  # the file ends before the data does
                    break
            try:
                found += len(stream.decompress(data, _CHUNK))  # bounded: a block of zeros inflates a thousandfold
            except zlib.error as exc:
                return found, str(exc)
            data = stream.unconsumed_tail
            if stream.eof:  # a member ends: another may follow (gzip allows several), or nothing
                data = stream.unused_data + data
                if not data.startswith(_GZIP_MAGIC):
                    break
                stream = zlib.decompressobj(wbits=31)
    return found, None


_NONFINITE = "image has {} NaN or infinite voxels: fill or mask them before segmenting"  # validate_image's
_SCAN_VOXELS = 4 << 20  # voxels read at once when looking for non-finite ones


def _keep_nonfinite(image: sitk.Image, path: Path) -> sitk.Image:
    """``image`` as ITK read it from the NIfTI file ``path``, with the NaN and infinite voxels the file
    holds put back: ITK's NIfTI reader sets them to 0, so a NaN-filled scan was segmented as if those
    voxels were 0, where the same scan in NRRD is refused. nibabel reads the file's floats as stored, a
    slab at a time; an image whose layout ITK reads otherwise (a vector or complex image) with such
    voxels is refused here, with the message of :func:`SegAssistLib.image.validate_image`."""
    import nibabel  # only for NIfTI files: the Slicer side never reads one through here

    try:
        nifti = nibabel.load(str(path), keep_file_open=True)  # one open file: no re-reading of a .gz per slab
        if nifti.get_data_dtype().kind not in "fc":
            return image
        shape = tuple(int(n) for n in nifti.shape)
        per_slab = max(1, _SCAN_VOXELS // max(1, int(np.prod(shape[:-1], dtype=np.int64))))
        positions, values = [], []
        for first in range(0, shape[-1], per_slab):
            slab = np.asarray(nifti.dataobj[..., first : first + per_slab])
            bad = np.argwhere(~np.isfinite(slab))
            if bad.size:
                values.append(slab[tuple(bad.T)])
                bad[:, -1] += first
                positions.append(bad)
        del nifti
    except Exception:  # what ITK read and nibabel cannot (any reason): left as ITK read it
        return image
    if not positions:
        return image
    where, found = np.concatenate(positions), np.concatenate(values)
    array = sitk.GetArrayFromImage(image)
    while where.shape[1] > array.ndim and np.all(where[:, -1] == 0):  # trailing axes of one voxel
        where, shape = where[:, :-1], shape[:-1]
    if np.iscomplexobj(found) or image.GetNumberOfComponentsPerPixel() != 1 or array.shape != shape[::-1]:
        raise ImageError(_NONFINITE.format(len(where)))
    array[tuple(where[:, ::-1].T)] = found.astype(array.dtype)  # nibabel's (i, j, k, ...) is ITK's reversed
    restored = sitk.GetImageFromArray(array, isVector=False)
    restored.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        restored.SetMetaData(key, image.GetMetaData(key))
    return restored


def _check_channel(channel: object, count: int, what: str) -> int:
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= int(channel) < count:
        raise ImageError(f"channel {channel!r} does not exist: the image has {what} (channels 0..{count - 1})")
    return int(channel)


def _check_time_axis_last(image: sitk.Image) -> None:
    """Refuse a 4D image whose 4th axis is not apart from the three spatial ones (its direction mixes
    them: axes stored as x, y, t, z). One volume taken from it would be given a made-up direction, and
    its time step as its slice spacing."""
    direction = np.asarray(image.GetDirection(), float).reshape(4, 4)
    apart = np.eye(4)[3]
    if np.abs(np.abs(direction[3]) - apart).max() > 1e-6 or np.abs(np.abs(direction[:, 3]) - apart).max() > 1e-6:
        raise ImageError(
            f"image is 4D (size {image.GetSize()}) but its 4th axis is not its time (or channel) axis: its "
            "direction matrix mixes it with the spatial axes (axes stored as x, y, t, z?); store the image with "
            "the time axis last"
        )


def volume_from_sitk(image: sitk.Image, channel: Optional[int] = None) -> Volume:
    """A 3D volume from a SimpleITK image; ``channel`` picks one volume of a 4D image or one component
    of a vector image (a 4D image with one volume needs none; channel 0 of a scalar image is the
    image)."""
    if image.GetDimension() == 4:
        count = image.GetSize()[3]
        if channel is None and count > 1:
            raise ImageError(f"image is 4D (size {image.GetSize()}): choose a channel")
        index = _check_channel(0 if channel is None else channel, count, f"{count} volumes along its 4th axis")
        _check_time_axis_last(image)
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, index], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        channel = None
    if image.GetDimension() != 3:
        raise ImageError(f"image must be 3D, got {image.GetDimension()}D (size {image.GetSize()})")
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if channel is None:
            raise ImageError(f"image has {components} components: choose a channel")
        image = sitk.VectorIndexSelectionCast(image, _check_channel(channel, components, f"{components} components"))
    elif channel is not None:
        _check_channel(channel, 1, "one channel")
    array = sitk.GetArrayFromImage(image)
    return Volume(
        array=array,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )


def read_geometry(path: PathLike) -> Volume:
    """The spacing, origin and direction of an image file (its first three axes), without its voxels
    (the returned volume's array is empty)."""
    try:
        with _readable_name(Path(path)) as name:
            reader = _image_reader(name)
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(f"cannot read {path}: {_reason(exc)}") from exc
    if reader.GetDimension() < 3:
        raise ImageError(f"image must be 3D, got {reader.GetDimension()}D (size {reader.GetSize()})")
    n = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), float).reshape(n, n)[:3, :3]
    return Volume(np.zeros((0, 0, 0), np.uint8), reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)


def load_volume(path: PathLike, channel: Optional[int] = None) -> Volume:
    """Load a 3D image from a file or a DICOM series directory."""
    return volume_from_sitk(_read_sitk(Path(path)), channel=channel)


def volume_to_sitk(volume: Volume, array: Optional[np.ndarray] = None) -> sitk.Image:
    """``array`` (default: the volume's own voxels) as a SimpleITK image on ``volume``'s grid. An array
    of another shape than the volume's (an ``(i, j, k)`` array, a mask of another image) is an
    :class:`ImageError`: it would be written with this grid's spacing and origin on a grid of another size.
    A volume without voxels (a geometry read alone) takes any shape."""
    values = np.asarray(volume.array if array is None else array)
    reference = np.shape(volume.array)
    if np.size(volume.array) and values.shape != reference:
        raise ImageError(
            f"the mask's shape {values.shape} is not the image's {reference} (both [k, j, i]): a mask of "
            "another image, or with its axes in another order?"
        )
    if values.dtype == bool:
        values = values.astype(np.uint8)
    elif not values.dtype.isnative:  # SimpleITK takes native byte order only
        values = values.astype(values.dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(np.asarray(volume.direction, float).ravel()))
    return image


_FULL_DISK = "is the disk full?"


def write_image_checked(image: sitk.Image, path: Path) -> None:
    """Write ``image`` to ``path`` (compressed) and read it back whole: :class:`ImageError` naming the file
    when SimpleITK fails, or wrote a file that is empty, unreadable or holds other voxels (its NIfTI
    writer reports no failed write: a full disk left a 0-byte or truncated file and no error)."""
    name = sitk_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, name, useCompression=True)
    except RuntimeError as exc:
        raise ImageError(f"cannot write {path}: {_reason(exc)} ({_FULL_DISK})") from exc
    failed = f"writing {path} failed"
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageError(f"{failed}: SimpleITK wrote no file of that name") from None
    if not size:
        raise ImageError(f"{failed}: the file written is empty ({_FULL_DISK})")
    try:
        with _readable_name(path) as readable:
            back = sitk.ReadImage(readable)
    except RuntimeError as exc:
        raise ImageError(f"{failed}: the file written cannot be read back: {_reason(exc)} ({_FULL_DISK})") from exc
    if back.GetSize() != image.GetSize() or not np.array_equal(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
    ):
        raise ImageError(f"{failed}: the file written does not hold the whole image ({_FULL_DISK})")


def save_mask_nifti(mask: np.ndarray, reference: Volume, path: PathLike) -> Path:
    """Write a label mask on the reference image's grid (``.nii.gz`` or any SimpleITK format), checked
    by reading it back (see :func:`write_image_checked`)."""
    path = Path(path)
    labels = as_labels(mask)
    write_image_checked(volume_to_sitk(reference, labels), path)
    return path


def save_segmentation_nrrd(
    mask: np.ndarray,
    reference: Volume,
    path: PathLike,
    segment_names: Sequence[str] = ("SegAssist",),
    colors: Sequence[Sequence[float]] = ((0.95, 0.45, 0.2),),
) -> Path:
    """Write a label mask as a Slicer segmentation file (``.seg.nrrd``, one layer).

    Label value ``n`` becomes segment ``n``, named ``segment_names[n - 1]`` (``Segment n`` past the
    names given); every named label has a segment, present or not (an absent one with an empty
    extent), and so has every label present. The metadata keys are the ones Slicer's segmentation
    storage node reads. The file is checked by reading it back (see :func:`write_image_checked`).
    """
    path = Path(path)
    labels = as_labels(mask)
    present = {int(v) for v in np.unique(labels) if v}
    values = sorted(present | set(range(1, len(segment_names) + 1)))
    image = volume_to_sitk(reference, labels)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    full = " ".join(f"0 {n - 1}" for n in image.GetSize())
    for index, value in enumerate(values):
        name = segment_names[value - 1] if value <= len(segment_names) else f"Segment {value}"
        color = colors[(value - 1) % len(colors)]
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{value}")
        image.SetMetaData(prefix + "Name", name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", " ".join(f"{c:.4f}" for c in color))
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", full if value in present else "0 -1 0 -1 0 -1")
        image.SetMetaData(prefix + "Tags", "Segmentation.Status:inprogress|")
    write_image_checked(image, path)
    return path


def load_mask(path: PathLike) -> np.ndarray:
    return sitk.GetArrayFromImage(_read_sitk(Path(path)))
