"""What ``segassist bench`` runs: datasets, cases and target structures.

Cases always come from the engine's evaluation split (``Resources/splits.json``; a folder the split
does not know is all evaluation, unless it holds evaluation cases of exactly one known dataset), in
sorted order, the first ``cases`` of them: training never saw them. Targets are named structures
(a label id or a union of ids); datasets whose label ids mean different things per case
(TotalSegmentator's examples, the brain structures) name them per case.

The default selection was sized so that three protocols x four engines run on a 2-core CPU in
well under 60 minutes (``bench.BENCH_BUDGET``; estimated from per-interaction timings of every
engine on one case of each dataset): small structures get more cases, big
volumes fewer. ``--quick`` keeps one structure of each dataset except the biggest volumes (left
atrium), for a run of about 5 minutes. ``--cases N`` sets the number of cases of every dataset,
with ``--quick`` too (which still leaves the left atrium out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from SegAssistLib.datasets import Case, cases_and_left_out, dataset_targets, left_out_text, split_cases
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.dataset_json import named_targets
from SegAssistLib.evaluation.runner import parse_targets

UNKNOWN_FOLDER_CASES = 5


@dataclass(frozen=True)
class Structure:
    labels: Tuple[int, ...]
    name: str

    @property
    def key(self) -> str:
        return "+".join(str(i) for i in self.labels)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    cases: Optional[int]  # first N evaluation cases; None = all
    structures: Tuple[Structure, ...] = ()
    per_case: Dict[str, Tuple[Structure, ...]] = field(default_factory=dict)  # overrides, and limits cases
    quick_cases: int = 1
    quick_structures: Tuple[str, ...] = ()  # structure names kept by --quick; () = the first one
    note: str = ""

    def structures_of(self, case: str) -> Tuple[Structure, ...]:
        return self.per_case.get(case, self.structures)


def _s(labels, name: str) -> Structure:
    return Structure(tuple(labels) if isinstance(labels, (tuple, list)) else (int(labels),), name)


DEFAULT_SELECTION: Tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "hippocampus", 10, (_s(1, "anterior hippocampus"), _s(2, "posterior hippocampus")), quick_cases=3,
        quick_structures=("anterior hippocampus", "posterior hippocampus"),
    ),
    DatasetSpec(
        "acdc", 4, (_s(1, "right ventricle"), _s(2, "myocardium"), _s(3, "left ventricle")),
        quick_structures=("left ventricle",),
        note="spacing unknown (written as 1 mm, really about 1.5 x 1.5 x 5-10 mm): HD95 is in those units",
    ),
    DatasetSpec("sunnybrook", 2, (_s(1, "LV blood pool"), _s(2, "LV myocardium")),
                quick_structures=("LV blood pool",), note="myocardium is labelled in one phase only"),
    DatasetSpec("left_atrium", 2, (_s(1, "left atrium"),), quick_cases=0),
    DatasetSpec("brats", 2, (_s((1, 2, 3, 4), "whole tumour"),), note="FLAIR channel"),
    DatasetSpec(
        "totalsegmentator_examples", None,
        per_case={
            # aorta_crop is a training case since 2026-11-24 (one scan with pulmonary_crop): the
            # aorta is measured on example_ct_sm
            "example_ct_sm": (_s(5, "liver"), _s(1, "spleen"), _s(3, "left kidney"), _s(52, "aorta")),
        },
        quick_structures=("spleen",),
        note="pseudo ground truth (TotalSegmentator output); CT at 3 mm",
    ),
    DatasetSpec(
        "brain_structures", None,
        per_case={
            "itksnap_mricrop": (_s(1, "lateral ventricles"), _s(4, "right hippocampus"), _s(7, "caudates")),
        },
        quick_structures=("lateral ventricles",),
    ),
)
SPECS: Dict[str, DatasetSpec] = {spec.name: spec for spec in DEFAULT_SELECTION}


@dataclass
class Job:
    """One case with the structures to segment in it."""

    dataset: str
    case: Case
    structures: List[Structure]
    channel: int = 0


def structures_from_dataset_json(folder: Path) -> Tuple[Structure, ...]:
    """The targets ``segassist eval`` takes by default (:func:`~SegAssistLib.datasets.dataset_targets`):
    every named, numeric, non-background label of ``dataset.json``, then each nnU-Net region as the
    union of its labels; the error when it names none also names the entries meant as labels."""
    return tuple(Structure(ids, name) for ids, name in named_targets(folder).items())


def _names(folder: Path) -> Dict[Tuple[int, ...], str]:
    try:
        return dict(dataset_targets(folder))
    except SegAssistError:
        return {}


def parse_labels(text: str, folder: Path) -> Tuple[Structure, ...]:
    """``"1,2,1+2"`` -> structures named from ``dataset.json`` where it names them (a union by its
    nnU-Net region's name, else by its labels' names)."""
    names = _names(folder)

    def name(ids: Tuple[int, ...]) -> str:
        return names.get(ids) or " + ".join(names.get((i,), f"label {i}") for i in ids)

    return tuple(Structure(ids, name(ids)) for ids in parse_targets(text))


def spec_for_folder(folder: Path, labels: Optional[str], cases: Optional[int]) -> DatasetSpec:
    """The selection of a folder: the default one for a known dataset name, else every target of its
    ``dataset.json`` (named labels and nnU-Net regions, as ``segassist eval`` takes them) on the first
    ``UNKNOWN_FOLDER_CASES`` evaluation cases. ``cases`` given
    wins over both counts, ``--quick``'s included (a dataset that ``--quick`` leaves out stays out)."""
    known = SPECS.get(folder.name)
    if labels:
        structures = parse_labels(labels, folder)
        count = cases if cases is not None else (known.cases if known else UNKNOWN_FOLDER_CASES)
        return DatasetSpec(folder.name, count, structures, quick_cases=1 if cases is None else cases,
                           quick_structures=tuple(s.name for s in structures))
    if known is not None:
        return known if cases is None else DatasetSpec(
            known.name, cases, known.structures, known.per_case, cases if known.quick_cases else 0,
            known.quick_structures, known.note,
        )
    structures = structures_from_dataset_json(folder)
    if cases is None:
        return DatasetSpec(folder.name, UNKNOWN_FOLDER_CASES, structures)
    return DatasetSpec(folder.name, cases, structures, quick_cases=cases)


def jobs_for(folder: Path, spec: DatasetSpec, quick: bool = False, channel: int = 0) -> List[Job]:
    """The evaluation-split cases of ``folder`` that the spec selects, with their structures."""
    if not folder.is_dir():
        raise SegAssistError(f"dataset folder not found: {folder}")
    cases = split_cases(cases_and_left_out(folder, channel=channel)[0], "evaluation")  # left out: cases_left_out
    if spec.per_case:
        cases = [c for c in cases if c.name in spec.per_case]
    count = spec.quick_cases if quick else spec.cases
    jobs = []
    for case in cases:
        if count is not None and len(jobs) >= count:
            break
        structures = list(spec.structures_of(case.name))
        if quick:
            keep = spec.quick_structures or tuple(s.name for s in structures[:1])
            structures = [s for s in structures if s.name in keep]
        if structures:
            jobs.append(Job(spec.name, case, structures, channel))
    return jobs


def cases_left_out(folder: Path, channel: int = 0) -> Tuple[List[str], str]:
    """The labelled cases of ``folder`` that :func:`jobs_for` leaves out for lacking the channel's file,
    and the notice saying so (empty when there are none)."""
    lacking = cases_and_left_out(folder, channel=channel)[1]
    return lacking, left_out_text(folder, channel, lacking) if lacking else ""


def default_jobs(data_root: Path, quick: bool = False, datasets: Optional[Sequence[str]] = None,
                 cases: Optional[int] = None) -> Tuple[List[Job], List[str]]:
    """Jobs of the default selection under ``data_root`` and the datasets it could not find."""
    if not data_root.is_dir():
        raise SegAssistError(
            f"data folder not found: {data_root} (pass --data, set SEGASSIST_SHARED_DATA, or give dataset folders)"
        )
    wanted = list(datasets) if datasets else [s.name for s in DEFAULT_SELECTION]
    unknown = [d for d in wanted if d not in SPECS]
    if unknown:
        raise SegAssistError(f"unknown dataset(s) {', '.join(unknown)} (the default selection has {', '.join(SPECS)})")
    jobs: List[Job] = []
    missing: List[str] = []
    for name in wanted:
        folder = data_root / name
        if not (folder / "imagesTr").is_dir():
            missing.append(name)
            continue
        spec = SPECS[name] if cases is None else spec_for_folder(folder, None, cases)
        jobs.extend(jobs_for(folder, spec, quick))
    return jobs, missing


def describe(jobs: Sequence[Job]) -> List[str]:
    """Human-readable lines: one per dataset with its cases and structures."""
    lines = []
    for dataset in dict.fromkeys(j.dataset for j in jobs):
        mine = [j for j in jobs if j.dataset == dataset]
        structures = list(dict.fromkeys(s.name for j in mine for s in j.structures))
        lines.append(
            f"{dataset}: {len(mine)} case(s) ({', '.join(j.case.name for j in mine)}); "
            f"structures: {', '.join(structures)}"
        )
    return lines
