"""A training pack: the training split cut down to what the patch sampler can ever look at.

A GPU machine that cannot reach ``../shared`` gets its training data as a folder that travels with
the repository. For every training-split case the pack keeps the box of the image that holds every
window :func:`~SegAssistLib.training.data.sample_patch` can cut around any of the case's targets
(the box centre of a target, plus or minus the window size at its zoom level), so sampling from a
packed case gives exactly the patches the full case gives, for the network patch size it was packed
for (only that one: a smaller patch can need a larger zoom level, whose window the box may not
hold). Intensities are stored losslessly, in the smallest form that holds them: int16 for integer
images (raw MRI, CT in HU), an 8- or 16-bit index into a table of values for images with few
distinct values (the z-scored left-atrium MRIs have about 200), float32 otherwise. Files are
compressed NumPy archives (``.npz``), one per case, and ``pack.json`` lists them with their
geometry.
"""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.engine import patching
from SegAssistLib.errors import SegAssistError
from SegAssistLib.files import atomic_write, atomic_write_bytes, check_format

PACK_FORMAT = "segassist-training-pack"
PACK_VERSION = 1
MANIFEST = "pack.json"


class PackError(SegAssistError):
    """A training pack that cannot be written or read."""


@dataclass
class PackSummary:
    folder: Path
    cases: Dict[str, int]
    bytes: int
    source_voxels: int
    packed_voxels: int
    seconds: float


def sampling_box(
    targets_boxes: Sequence[Tuple[np.ndarray, np.ndarray]],
    spacing_kji: Sequence[float],
    shape: Sequence[int],
    patch: int,
    levels: Callable[[np.ndarray], int],
) -> Tuple[np.ndarray, np.ndarray]:
    """(lo, hi) voxel box of the image that holds every window sampled around any of the targets.

    A sampled window is centred within half a window of its target's box centre (partial views
    are centred on a voxel of the target, whole views within 0.35 windows of the centre), so the
    box centre plus or minus one window (and two voxels for rounding) holds it.
    """
    lo_all = np.asarray(shape, int)
    hi_all = np.zeros(3, int)
    for lo, hi in targets_boxes:
        size = np.asarray(patching.window_size(spacing_kji, patch, levels(hi - lo + 1)))
        centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
        lo_all = np.minimum(lo_all, np.maximum(np.floor(centre - size - 2).astype(int), 0))
        hi_all = np.maximum(hi_all, np.minimum(np.ceil(centre + size + 3).astype(int), shape))
    return lo_all, hi_all


def encode_image(array: np.ndarray) -> Dict[str, np.ndarray]:
    """Arrays that hold ``array`` (float32) exactly, in the smallest of the forms described above."""
    array = np.asarray(array, np.float32)
    if not np.all(np.isfinite(array)):
        raise PackError("the image has NaN or infinite values")
    if array.size and array.min() >= -32768 and array.max() <= 32767 and np.array_equal(array, np.rint(array)):
        return {"image": array.astype(np.int16)}
    values, index = np.unique(array, return_inverse=True)
    if len(values) <= 65536:
        dtype = np.uint8 if len(values) <= 256 else np.uint16
        return {"image_index": index.reshape(array.shape).astype(dtype), "image_values": values.astype(np.float32)}
    return {"image": array}


def decode_image(arrays) -> np.ndarray:
    if "image_index" in arrays:
        return np.asarray(arrays["image_values"], np.float32)[np.asarray(arrays["image_index"])]
    return np.asarray(arrays["image"], np.float32)


def _case_file_name(dataset: str, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}__{name}")
    return f"{safe}.npz"


MAX_PACK_PATCH = 512  # far beyond the network patches in use (64): larger ones would pack whole images


def write_pack(
    data_root: Path,
    out: Path,
    patch: int = 64,
    datasets: Optional[Sequence[str]] = None,
    progress: Callable[[str], None] = print,
) -> PackSummary:
    """Pack the training split of every dataset folder under ``data_root`` into ``out`` (new or empty)."""
    from SegAssistLib.datasets import list_cases, split_dataset
    from SegAssistLib.training.data import load_training_cases, needed_level

    started = time.time()
    out = Path(out)
    if not Path(data_root).is_dir():
        raise PackError(f"data folder not found: {data_root}")
    if not 8 <= int(patch) <= MAX_PACK_PATCH:
        raise PackError(f"the patch must be from 8 to {MAX_PACK_PATCH} voxels, got {patch}")
    if out.exists() and not out.is_dir():
        raise PackError(f"{out} is a file: a pack is written into a new folder")
    if out.exists() and any(out.iterdir()):
        raise PackError(f"{out} is not empty: a pack is written into a new folder")
    by_dataset = load_training_cases(Path(data_root), datasets, click_union_datasets=())
    missing = sorted(set(datasets or ()) - {name for name, cases in by_dataset.items() if cases})
    if missing and any(by_dataset.values()):
        raise PackError(f"no training cases of {', '.join(missing)} under {data_root} (--datasets)")
    if not any(by_dataset.values()):
        wanted = f" among {', '.join(datasets)}" if datasets else ""
        raise PackError(f"no training cases found under {data_root}{wanted} (MSD layout: imagesTr, labelsTr)")
    out.mkdir(parents=True, exist_ok=True)
    manifest: Dict = {"format": PACK_FORMAT, "format_version": PACK_VERSION, "patch": int(patch),
                      "source": str(data_root), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "datasets": {}, "split_of": {}}
    total_bytes = source_voxels = packed_voxels = 0
    counts: Dict[str, int] = {}
    for dataset, cases in by_dataset.items():
        entries: List[Dict] = []
        for case in cases:
            lo, hi = sampling_box([case.box(t) for t in case.targets], case.spacing_kji, case.image.shape,
                                  patch, lambda extent, c=case: needed_level(extent, c.spacing_kji, patch))
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            arrays = encode_image(case.image[box])
            labels = case.labels[box]
            arrays["labels"] = labels.astype(np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int16)
            name = _case_file_name(dataset, case.name)
            atomic_write(out / name, lambda p, a=arrays: _save_npz(p, a))
            size = (out / name).stat().st_size
            total_bytes += size
            source_voxels += case.image.size
            packed_voxels += labels.size
            entries.append({"name": case.name, "file": name, "shape": list(case.image.shape),
                            "crop_start": [int(v) for v in lo], "spacing_kji": list(case.spacing_kji),
                            "modality": case.modality, "bytes": size})
        manifest["datasets"][dataset] = entries
        # the known dataset whose split this folder's was cut with (a renamed copy's: its original's),
        # which the pack alone cannot tell, holding training cases only
        manifest["split_of"][dataset] = split_dataset(dataset, {c.name for c in list_cases(Path(data_root) / dataset)})
        counts[dataset] = len(entries)
        progress(f"{dataset}: {len(entries)} cases, {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB")
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return PackSummary(out, counts, total_bytes, source_voxels, packed_voxels, time.time() - started)


def _save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def is_pack(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def packs_in(folder: Path) -> List[Path]:
    """``[folder]`` when it is a pack, else the packs directly inside it (a pack too large to travel
    in one piece is written as several, one per group of datasets, into one folder)."""
    folder = Path(folder)
    if is_pack(folder):
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_pack(p))


def read_manifest(folder: Path, patch: Optional[int] = None) -> Dict:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PackError(f"cannot read the training pack manifest {path}: {exc}") from exc
    check_format(data, path, PACK_FORMAT, PACK_VERSION, "training pack", PackError)
    # a smaller patch can need the next zoom level, whose window runs past the box packed for this one
    if patch is not None and int(patch) != int(data["patch"]):
        raise PackError(f"{folder} was packed for a network patch of {data['patch']} voxels; this network's "
                        f"patch is {patch}: pack the data again with --patch {patch}")
    return data


def _case_path(folder: Path, entry: object) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise PackError(f"the training pack manifest {Path(folder) / MANIFEST} lists a case without its file: "
                        "make the pack again")
    return Path(folder) / entry["file"]


def check_case_file(folder: Path, entry: Dict) -> None:
    """PackError unless one packed case's file is there and its archive's directory lists its arrays:
    a file cut short in transfer is found at once, before a run starts, without decompressing it."""
    path = _case_path(folder, entry)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackError(f"cannot read packed case {path}: {exc}") from exc
    if "labels.npy" not in names or not names & {"image.npy", "image_index.npy"}:
        raise PackError(f"cannot read packed case {path}: it lacks its image or labels (it holds "
                        f"{', '.join(sorted(names)) or 'nothing'})")


def read_case(folder: Path, entry: Dict) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32, labels int16) of one packed case, as cropped."""
    path = _case_path(folder, entry)
    try:
        with np.load(path) as arrays:
            image, labels = decode_image(arrays), np.asarray(arrays["labels"], np.int16)
    # BadZipFile: truncated or damaged in transfer; zlib.error: compressed data damaged inside a whole archive
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise PackError(f"cannot read packed case {path}: {exc}") from exc
    if image.shape != labels.shape:
        raise PackError(f"{path}: image {image.shape} and labels {labels.shape} differ in shape")
    return image, labels
