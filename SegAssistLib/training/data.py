"""Training samples: real cases of the training split and synthetic volumes, cut into patches the
way the engine cuts them at run time (same windows, zoom levels, resampling, normalisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from SegAssistLib.datasets import Case, cases_and_left_out, list_cases, load_splits, split_cases
from SegAssistLib.engine import patching
from SegAssistLib.errors import ImageError, SegAssistError
from SegAssistLib.image import Volume, guess_modality, validate_image
from SegAssistLib.training import pack
from SegAssistLib.training.simulation import EXTENT_KINDS, FIRST_KINDS
from SegAssistLib.training.synthetic import synthetic_case

MIN_TARGET_VOXELS = 30
# Datasets whose union of labels is itself the structure a click names (BraTS: the whole tumour,
# the usual interactive target). Elsewhere a union (the whole heart, the whole hippocampus) is only
# trained from a box or an outline: taught from a single click, the network learns to spill a
# click in the left ventricle over the myocardium and the right ventricle.
CLICK_UNION_DATASETS = ("brats",)


@dataclass
class TrainCase:
    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing_kji: Tuple[float, float, float]
    modality: str
    targets: List[Tuple[int, ...]] = field(default_factory=list)
    click_unions: bool = False
    _boxes: Dict[Tuple[int, ...], Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def box(self, target: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
        if target not in self._boxes:
            nz = np.argwhere(np.isin(self.labels, target))
            self._boxes[target] = (nz.min(0), nz.max(0))
        return self._boxes[target]

    def first_prompt_kinds(self, target: Tuple[int, ...]) -> Tuple[str, ...]:
        """The prompt kinds that can start a session on ``target`` in this case."""
        return EXTENT_KINDS if len(target) > 1 and not self.click_unions else FIRST_KINDS


def _targets(labels: np.ndarray, rng_union: bool = True) -> List[Tuple[int, ...]]:
    values, counts = np.unique(labels, return_counts=True)
    single = [(int(v),) for v, c in zip(values, counts) if v != 0 and c >= MIN_TARGET_VOXELS]
    if rng_union and len(single) > 1 and len(single) <= 6:
        single.append(tuple(v for (v,) in single))
    return single


def load_training_cases(
    data_root: Path,
    datasets: Optional[Sequence[str]] = None,
    click_union_datasets: Sequence[str] = CLICK_UNION_DATASETS,
    patch: Optional[int] = None,
) -> Dict[str, List[TrainCase]]:
    """Every training-split case under ``data_root``, grouped by dataset: dataset folders in MSD
    layout, or a training pack (see :mod:`SegAssistLib.training.pack`; ``patch`` is checked
    against the patch size it was cut for), or a folder of packs."""
    packs, folders = training_sources(Path(data_root))
    if packs:
        return _load_packs(packs, datasets, click_union_datasets, patch)
    out: Dict[str, List[TrainCase]] = {}
    for folder in folders:
        if datasets and folder.name not in datasets:
            continue
        loaded = _load_dataset_folder(folder, folder.name in click_union_datasets)
        if loaded:
            out[folder.name] = loaded
    return out


def _load_dataset_folder(folder: Path, click_unions: bool) -> List[TrainCase]:
    """The training-split cases of one dataset folder; a case that cannot be read, or that the engine
    or evaluation would refuse, is skipped and named with the reason."""
    loaded = []
    for case in split_cases(list_cases(folder), "training"):
        try:
            volume, labels = _read_case(case)
        except SegAssistError as exc:
            print(f"skipped training case {case.name}: {exc}", flush=True)
            continue
        arr = volume.array.astype(np.float32)
        spacing = tuple(float(s) for s in volume.spacing[::-1])
        modality = guess_modality(Volume(arr, spacing[::-1]))
        tc = TrainCase(case.name, arr, labels, spacing, modality, _targets(labels), click_unions=click_unions)
        if tc.targets:
            loaded.append(tc)
    return loaded


def _read_case(case: Case) -> Tuple[Volume, np.ndarray]:
    """A case's image and labels (int16, on the image's grid), read and checked as evaluation and the
    engine read them: through :mod:`SegAssistLib.io` (a NIfTI file cut short is refused, not read with
    zeros; its NaN voxels stay NaN), the image checks of ``validate_image`` (a NaN voxel would make
    every patch around it, the loss and then the weights NaN for good) and the label's grid.
    SegAssistError naming the problem."""
    # only here: training from a pack needs no SimpleITK (GPU machines may lack it)
    from SegAssistLib.evaluation.runner import label_on_image_grid, non_integer_labels
    from SegAssistLib.io import load_mask, load_volume

    volume = load_volume(case.image, channel=case.channel)  # the case's channel (a 4D BraTS file: FLAIR)
    validate_image(volume)
    labels, problem = label_on_image_grid(case.label, load_mask(case.label), volume)  # reversed axes too
    problem = problem or non_integer_labels(labels)
    if problem:
        raise ImageError(problem)
    return volume, labels.astype(np.int16)


def training_sources(data_root: Path) -> Tuple[List[Path], List[Path]]:
    """(training packs, dataset folders in MSD layout) that ``data_root`` offers: it is a pack, or a
    folder of packs, or a folder of dataset folders. A folder that holds packs and dataset folders
    side by side is refused: training on one kind would leave the other out without a word."""
    root = Path(data_root)
    packs = pack.packs_in(root)
    if pack.is_pack(root):
        return packs, []
    folders = sorted(p for p in root.iterdir() if (p / "imagesTr").is_dir())
    if packs and folders:
        raise SegAssistError(
            f"{root} holds both training packs ({', '.join(p.name for p in packs)}) and dataset folders "
            f"({', '.join(f.name for f in folders)}): give a folder that holds one or the other (move the packs "
            "into a folder of their own)"
        )
    return packs, folders


def check_training_data(data_root: Path, datasets: Optional[Sequence[str]] = None,
                        patch: Optional[int] = None) -> List[str]:
    """The dataset names ``data_root`` offers, after checking, without reading any image, what the
    loader would otherwise find only once a run has started: each wanted dataset folder is complete,
    and each wanted pack dataset is packed for ``patch``, holds no evaluation case, is in one pack
    only and has readable case files. SegAssistError naming the problem."""
    packs, folders = training_sources(Path(data_root))
    if not packs:
        for folder in folders:
            if not datasets or folder.name in datasets:
                cases_and_left_out(folder)  # a folder without labelsTr/: "is not a dataset folder"
        return [f.name for f in folders]
    found: Dict[str, Path] = {}
    for folder in packs:
        manifest = pack.read_manifest(folder, patch)
        for dataset, entries in sorted(manifest["datasets"].items()):
            if dataset in found:
                raise pack.PackError(f"dataset {dataset} is in more than one pack under {Path(folder).parent}")
            found[dataset] = folder
            if datasets and dataset not in datasets:
                continue
            _refuse_evaluation_cases(folder, dataset, entries, manifest.get("split_of", {}).get(dataset))
            for entry in entries:
                pack.check_case_file(folder, entry)
    return sorted(found)


def _load_packs(
    folders: Sequence[Path], datasets: Optional[Sequence[str]], click_union_datasets: Sequence[str],
    patch: Optional[int],
) -> Dict[str, List[TrainCase]]:
    out: Dict[str, List[TrainCase]] = {}
    for folder in folders:
        manifest = pack.read_manifest(folder, patch)
        for dataset, entries in sorted(manifest["datasets"].items()):
            if datasets and dataset not in datasets:
                continue
            if dataset in out:
                raise pack.PackError(f"dataset {dataset} is in more than one pack under {Path(folder).parent}")
            _refuse_evaluation_cases(folder, dataset, entries, manifest.get("split_of", {}).get(dataset))
            loaded = _packed_cases(folder, entries, dataset in click_union_datasets)
            if loaded:
                out[dataset] = loaded
    return dict(sorted(out.items()))


def _refuse_evaluation_cases(folder: Path, dataset: str, entries: List[Dict], split_of: Optional[str]) -> None:
    """A pack made before the evaluation split changed may hold cases that are evaluation cases now.
    ``split_of``: the known dataset whose split the pack was cut with (a renamed copy's original);
    packs that do not record it are checked under their own dataset name."""
    split_as = str(split_of) if split_of else dataset
    packed = [Case(split_as, str(e["name"]), Path(), Path()) for e in entries]
    held_out = sorted(c.name for c in split_cases(packed, "evaluation"))
    if held_out and split_as not in load_splits() and len(held_out) == len(packed):
        why = (f"was cut with the split of {split_as}, which Resources/splits.json no longer lists" if split_of else
               "does not record which known dataset's split it was cut with (a renamed copy, packed before packs "
               "recorded it?)")
        raise pack.PackError(f"the pack {folder} holds {dataset}, a dataset Resources/splits.json does not list, and "
                             f"{why}: its cases cannot be told from evaluation cases; make the pack again")
    if held_out:
        raise pack.PackError(
            f"the pack {folder} holds {dataset} case(s) of the evaluation split ({', '.join(held_out[:5])}"
            f"{', ...' if len(held_out) > 5 else ''}; Resources/splits.json): make the pack again"
        )


def _packed_cases(folder: Path, entries: List[Dict], click_unions: bool) -> List[TrainCase]:
    loaded = []
    for entry in entries:
        image, labels = pack.read_case(folder, entry)
        spacing = tuple(float(s) for s in entry["spacing_kji"])
        tc = TrainCase(entry["name"], image, labels, spacing, entry["modality"], _targets(labels),
                       click_unions=click_unions)
        if tc.targets:
            loaded.append(tc)
    return loaded


def synthetic_train_case(rng: np.random.Generator) -> TrainCase:
    syn = synthetic_case(rng, size=int(rng.integers(72, 112)))
    return TrainCase("synthetic", syn.image, syn.labels, syn.spacing_kji, "MR", _targets(syn.labels, False))


def needed_level(extent_vox: np.ndarray, spacing_kji, patch: int, margin: float = 1.15) -> int:
    for level in range(7):
        size = np.asarray(patching.window_size(spacing_kji, patch, level))
        if np.all(size >= extent_vox * margin):
            return level
    return 6


def sample_patch(
    case: TrainCase, target: Tuple[int, ...], rng: np.random.Generator, patch: int
) -> Optional[Tuple[torch.Tensor, np.ndarray]]:
    """(normalised image patch, boolean target patch) around ``target``; None if the view misses it."""
    lo, hi = case.box(target)
    level = needed_level(hi - lo + 1, case.spacing_kji, patch)
    partial = rng.random() < 0.25 and level > 0
    if partial:
        level = max(0, level - int(rng.integers(1, 3)))
        for _ in range(50):
            centre = rng.integers(lo, hi + 1)
            if case.labels[tuple(centre)] in target:
                break
    else:
        size = np.asarray(patching.window_size(case.spacing_kji, patch, level))
        slack = np.maximum(size - (hi - lo + 1), 0) / 2.0
        centre = (lo + hi) / 2.0 + rng.uniform(-0.7, 0.7, 3) * slack
    window = patching.window_around(centre, case.spacing_kji, patch, level)
    crop = np.isin(patching.crop_window(case.labels, window, 0), target).astype(np.float32)
    gt = patching.resample_to_patch(torch.from_numpy(crop), patch).numpy() > 0.5
    if gt.sum() < 8:
        return None
    image = patching.extract_image_patch(case.image, window, case.modality)
    # augmentation: flips and axis order, then a gamma on the intensities
    for axis in range(3):
        if rng.random() < 0.5:
            image, gt = image.flip(axis), np.flip(gt, axis)
    perm = tuple(int(a) for a in rng.permutation(3))
    image, gt = image.permute(perm), np.ascontiguousarray(gt.transpose(perm))
    if rng.random() < 0.3:
        lo_v = image.min()
        image = ((image - lo_v) / (image.max() - lo_v + 1e-6)) ** float(rng.uniform(0.6, 1.6))
        image = (image - image.mean()) / (image.std() + 1e-6)
    return image.contiguous(), gt
