"""``segassist bench``: every engine, every protocol, every dataset, one Markdown report.

The benchmark drives the evaluation harness (:func:`SegAssistLib.evaluation.runner.evaluate_target`)
over a selection of cases (:mod:`SegAssistLib.evaluation.selection`) with each engine and each
protocol: the box, the scribble and the first click are the same for every engine (fixed by the
ground truth), and every later click comes from the simulated user by the same rule applied to the
engine's own current mask. It writes ``results.json`` and the report
(:mod:`SegAssistLib.evaluation.report`) to the output folder, by default ``docs/benchmarks`` of the
repository wherever the command runs from (as ``--data`` is found beside the repository); a folder
that holds an earlier run's results or report, or pictures in its plots/ or gallery/, is refused
before any work unless ``--overwrite`` (which then removes only the pictures the earlier report
links). The results are written over a file only with ``--overwrite``, also one that appeared
during the run; when they cannot be written they are saved to a rescue file
(:mod:`SegAssistLib.evaluation.output`). Ctrl-C writes the sessions finished, marked as partial.
Each slow part of the report (a plot, a gallery session replayed) is announced on stderr as it starts.

Fixed choices, all stated in the report:

- protocols: ``clicks`` (``--clicks``, 10 by default), ``box+clicks`` and ``scribble+clicks``
  (``--refine-clicks``, 5 by default: the CVPR 2025 challenge's box then five clicks);
- scribbles: orientation cycles axial, coronal, sagittal, oblique over the structures of each
  dataset, the source alternates skeleton / contour every four, 1.5 mm of hand jitter, a seed from
  the case and structure names;
- the random walker runs on every image (its conjugate-gradient solve, restricted to the seeds'
  region like Grow from seeds, takes ~10 s per click on the 2.3 M-voxel left-atrium images on a
  2-core CPU); ``--randomwalker-max-voxels N`` skips it on bigger images for a faster run;
- one untimed warm-up interaction per engine before the first record, on the first readable case
  that holds one of its structures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, TextIO, Tuple

import numpy as np

from SegAssistLib.cli_types import non_negative_mm, positive_int
from SegAssistLib.datasets import REPO_ROOT, dataset_folder_problem, dataset_ignore_label, default_data_root
from SegAssistLib.engine.base import Engine
from SegAssistLib.errors import ImageError, ModelError, PromptError, SegAssistError
from SegAssistLib.evaluation import scribbles
from SegAssistLib.evaluation.dataset_json import passed_over_warning
from SegAssistLib.evaluation.output import write_results_file
from SegAssistLib.evaluation.progress import ProgressBar
from SegAssistLib.evaluation.runner import (
    PROTOCOLS,
    check_targets,
    evaluate_target,
    label_values,
    load_case,
    model_record,
    parse_targets,
    target_masks,
    warm_up,
)
from SegAssistLib.evaluation.scribbles import ScribbleSpec
from SegAssistLib.evaluation.selection import (
    SPECS,
    Job,
    cases_left_out,
    default_jobs,
    describe,
    jobs_for,
    spec_for_folder,
)
from SegAssistLib.files import output_problem
from SegAssistLib.machine import machine_info

BENCH_ENGINES = ("builtin", "ablation", "growcut", "randomwalker")
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"  # the committed report, wherever the command runs from
RESULTS_NAME = "results.json"
BENCH_BUDGET = "about 25-40 minutes on a 2-core CPU, within the 60-minute budget; --quick about 5 minutes"


@dataclass
class BenchConfig:
    folders: List[Path] = field(default_factory=list)  # explicit dataset folders; none = the default selection
    data_root: Optional[Path] = None
    datasets: Optional[List[str]] = None
    out: Path = DEFAULT_OUT
    quick: bool = False
    engines: Tuple[str, ...] = BENCH_ENGINES
    protocols: Tuple[str, ...] = PROTOCOLS
    clicks: Optional[int] = None  # clicks-only protocol; default 10 (5 with --quick)
    refine_clicks: Optional[int] = None  # after the box or scribble; default 5 (3 with --quick)
    cases: Optional[int] = None
    labels: Optional[str] = None
    model: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None
    randomwalker_max_voxels: Optional[int] = None  # None: the random walker runs on every image
    scribble_jitter_mm: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        # each once: "clicks,clicks" ran every session twice and counted both in the report
        self.engines = tuple(dict.fromkeys(self.engines))
        self.protocols = tuple(dict.fromkeys(self.protocols))
        # absolute: "." is named after the folder (and takes its dataset's selection), and the image and
        # label paths recorded hold wherever the report is rendered again; not resolved, a link keeps its name
        self.folders = [Path(os.path.abspath(f)) for f in self.folders]
        if self.data_root is not None:
            self.data_root = Path(os.path.abspath(self.data_root))
        unknown = [e for e in self.engines if e not in BENCH_ENGINES]
        if unknown or not self.engines:
            raise SegAssistError(f"unknown engine(s) {unknown} (choose from {', '.join(BENCH_ENGINES)})")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise SegAssistError(f"unknown protocol(s) {bad} (choose from {', '.join(PROTOCOLS)})")
        if self.clicks is None:
            self.clicks = 5 if self.quick else 10
        if self.refine_clicks is None:
            self.refine_clicks = 3 if self.quick else 5
        if self.clicks < 1 or self.refine_clicks < 1:  # a box or scribble alone has no click curve to score
            raise SegAssistError("--clicks and --refine-clicks must be at least 1")

    def max_clicks(self, protocol: str) -> int:
        return int(self.clicks if protocol == "clicks" else self.refine_clicks)


# --- engines -----------------------------------------------------------------------------------
def build_engines(config: BenchConfig) -> Dict[str, Engine]:
    """One engine per name; ``builtin`` and ``ablation`` share the loaded model."""
    engines: Dict[str, Engine] = {}
    if "builtin" in config.engines or "ablation" in config.engines:
        from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, load_default_engine
        from SegAssistLib.evaluation.ablation import NoHistoryEngine

        try:
            builtin = load_default_engine(checkpoint=config.model, device=config.device, threads=config.threads)
        except ModelError as exc:
            hint = (
                f" The shipped weights ({DEFAULT_CHECKPOINT}) are not there: pass --model CHECKPOINT, or run the "
                "baselines only with --engines growcut,randomwalker."
                if config.model is None
                else ""
            )
            raise ModelError(f"{exc}.{hint}") from exc
        if "builtin" in config.engines:
            engines["builtin"] = builtin
        if "ablation" in config.engines:
            engines["ablation"] = NoHistoryEngine(builtin)
    from SegAssistLib.evaluation.baselines import BASELINES

    for name in ("growcut", "randomwalker"):
        if name in config.engines:
            engines[name] = BASELINES[name]()
    return {name: engines[name] for name in config.engines}


# --- selection ---------------------------------------------------------------------------------
def select_jobs(config: BenchConfig) -> Tuple[List[Job], List[str]]:
    """The jobs and the datasets of the default selection that were not found."""
    if config.folders:
        jobs: List[Job] = []
        for folder in config.folders:
            folder_problem(Path(folder))
            if config.labels:  # a label the folder's dataset.json lacks: refused, not skipped case by case
                check_targets(Path(folder), parse_targets(config.labels))
            spec = spec_for_folder(Path(folder), config.labels, config.cases)
            jobs.extend(jobs_for(Path(folder), spec, config.quick))
        missing: List[str] = []
    else:
        if config.labels:
            raise SegAssistError("--labels applies to dataset folders given on the command line")
        root = Path(config.data_root) if config.data_root else default_data_root()
        jobs, missing = default_jobs(root, config.quick, config.datasets, config.cases)
    if not jobs:
        raise SegAssistError("nothing to run: no evaluation cases with the selected structures were found")
    return jobs, missing


def folder_problem(folder: Path) -> None:
    """Refuse, as ``segassist eval`` does, a folder that is not there (a typo was said to lack a
    dataset.json, with advice to pass --labels) or, without a dataset.json, is no dataset folder."""
    if not folder.is_dir():
        raise SegAssistError(f"dataset folder not found: {folder}")
    problem = None if (folder / "dataset.json").is_file() else dataset_folder_problem(folder)
    if problem:
        raise SegAssistError(problem)


def folder_warnings(config: BenchConfig, jobs: List[Job]) -> Tuple[List[str], Dict[str, List[str]]]:
    """The ``warning:`` lines on what the selection leaves out, and the cases left out per dataset:
    labelled cases without the channel's file, and, where the structures come from a folder's
    dataset.json, label entries passed over."""
    lines: List[str] = []
    left_out: Dict[str, List[str]] = {}
    for dataset, folder in dict.fromkeys((j.dataset, j.case.image.parent.parent) for j in jobs):
        lacking, text = cases_left_out(folder)
        if lacking:
            left_out[dataset] = lacking
            lines.append(f"warning: {text}")
        if dataset not in SPECS and not config.labels:  # structures read from its dataset.json
            passed = passed_over_warning(folder)
            if passed:
                lines.append(passed)
    return lines, left_out


def scribble_for(dataset: str, case: str, structure: str, index: int, config: BenchConfig) -> ScribbleSpec:
    """The scribble of the ``index``-th structure of a dataset (see the module docstring)."""
    seed = zlib.crc32(f"{dataset}/{case}/{structure}".encode()) ^ int(config.seed)
    return ScribbleSpec(
        orientation=scribbles.ORIENTATIONS[index % len(scribbles.ORIENTATIONS)],
        source=scribbles.SOURCES[(index // len(scribbles.ORIENTATIONS)) % len(scribbles.SOURCES)],
        jitter_mm=config.scribble_jitter_mm,
        seed=seed,
    )




# --- the run -----------------------------------------------------------------------------------
def _too_big_for_random_walker(voxels: int, config: BenchConfig) -> bool:
    return config.randomwalker_max_voxels is not None and voxels > config.randomwalker_max_voxels


def _warm_up(engines: Dict[str, Engine], job: Job, config: BenchConfig) -> List[str]:
    """One untimed interaction per engine (the random walker only where its records run); the names
    of the engines warmed up (none where the case holds none of its structures)."""
    volume, labels = load_case(job.case)
    too_big = _too_big_for_random_walker(volume.array.size, config)
    ready = {name: e for name, e in engines.items() if not (name == "randomwalker" and too_big)}
    if ready and warm_up(list(ready.values()), volume, [np.isin(labels, s.labels) for s in job.structures]):
        return list(ready)
    return []


def run_bench(
    config: BenchConfig,
    engines: Optional[Dict[str, Engine]] = None,
    stream: Optional[TextIO] = None,
    command: str = "",
    built_from_config: bool = False,
) -> Dict:
    """Run every job with every protocol and engine; returns the JSON-ready result. ``built_from_config``:
    the ``engines`` given were loaded from ``config`` (:func:`build_engines`), so that no ``config.model``
    means the shipped weights in the record of the checkpoint (see :func:`~.runner.model_record`)."""
    jobs, missing = select_jobs(config)
    loaded_here = engines is None or built_from_config
    engines = engines if engines is not None else build_engines(config)
    stream = stream if stream is not None else sys.stderr
    for name in missing:
        stream.write(f"bench: dataset {name} not found under the data folder; left out\n")
    notices, left_out = folder_warnings(config, jobs)
    for line in notices:
        stream.write(f"bench: {line}\n")
    sessions = sum(len(j.structures) for j in jobs) * len(config.protocols) * len(engines)
    stream.write(f"bench: {len(jobs)} case(s), {sessions} sessions; engines {', '.join(engines)}; "
                 f"protocols {', '.join(config.protocols)}\n")
    for line in describe(jobs):
        stream.write(f"  {line}\n")
    started = time.time()
    machine = machine_info(config.device)  # now: the commit whose code runs, not the one at the end
    unreadable: List[SegAssistError] = []
    cold = dict(engines)  # warm up on the first readable cases holding a structure; none readable: nothing to measure
    for job in jobs:
        if not cold:
            break
        try:
            for name in _warm_up(cold, job, config):
                del cold[name]
        except SegAssistError as exc:
            unreadable.append(exc)
    if jobs and len(unreadable) == len(jobs):
        raise unreadable[0]
    bar = ProgressBar(sessions, stream=stream)
    records: List[Dict] = []
    skipped: List[Dict] = []
    index_in_dataset: Dict[str, int] = {}
    interrupted: Optional[str] = None
    current = 0  # the case being run, from 1
    try:
        for job in jobs:
            current += 1
            try:
                volume, labels = load_case(job.case)
            except SegAssistError as exc:  # one unreadable case must not lose the rest of the run
                skipped.extend({"dataset": job.dataset, "case": job.case.name, "structure": s.name, "target": s.key,
                                "engine": name, "protocol": protocol, "reason": f"case not read: {exc}"}
                               for s in job.structures for protocol in config.protocols for name in engines)
                bar.update(len(job.structures) * len(config.protocols) * len(engines),
                           label=f"{job.case.name} (not read)")
                continue
            rejected: Dict[str, str] = {}  # engine -> why it refused this image (every session would be refused)
            ignore_label = dataset_ignore_label(job.case.image.parent.parent)  # the folder's dataset.json
            held: Optional[str] = None  # the label map's values, read once, when a structure is absent
            for structure in job.structures:
                mask, ignore = target_masks(labels, structure.labels, ignore_label)
                base = {"dataset": job.dataset, "case": job.case.name, "structure": structure.name,
                        "target": structure.key}
                if not mask.any():
                    held = held or label_values(labels)  # beside the reason, which the report groups by
                    skipped.extend({**base, "engine": name, "protocol": protocol,
                                    "reason": "structure absent in this case", "label_values": held}
                                   for protocol in config.protocols for name in engines)
                    bar.update(len(config.protocols) * len(engines), label=f"{job.case.name} (absent)")
                    continue
                index = index_in_dataset.get(job.dataset, 0)
                index_in_dataset[job.dataset] = index + 1
                scribble = scribble_for(job.dataset, job.case.name, structure.name, index, config)
                for protocol in config.protocols:
                    for name, engine in engines.items():
                        bar.update(0, label=f"{job.dataset}/{job.case.name} {structure.name}: {name} {protocol}")
                        if name == "randomwalker" and _too_big_for_random_walker(volume.array.size, config):
                            skipped.append({**base, "engine": name, "protocol": protocol,
                                            "reason": f"image above {config.randomwalker_max_voxels:,} voxels"})
                            bar.update(1)
                            continue
                        if name in rejected:
                            skipped.append({**base, "engine": name, "protocol": protocol, "reason": rejected[name]})
                            bar.update(1)
                            continue
                        t0 = time.perf_counter()
                        try:
                            record = evaluate_target(engine, volume, mask, job.case.name, structure.key, protocol,
                                                     config.max_clicks(protocol), scribble, ignore)
                        except PromptError as exc:
                            skipped.append({**base, "engine": name, "protocol": protocol,
                                            "reason": f"prompt rejected: {exc}"})
                            bar.update(1)
                            continue
                        except ImageError as exc:  # constant, single slice, too big: one case must not stop the run
                            rejected[name] = f"image rejected: {exc}"
                            skipped.append({**base, "engine": name, "protocol": protocol, "reason": rejected[name]})
                            bar.message(f"bench: {job.dataset}/{job.case.name}: {name} skipped ({rejected[name]})")
                            bar.update(1)
                            continue
                        record.update(base)
                        record.update({
                            "engine": name,
                            "engine_name": engine.capabilities().name,
                            "session_wall_s": round(time.perf_counter() - t0, 3),
                            "image": str(job.case.image),
                            "label": str(job.case.label),
                            "channel": job.case.channel,  # of a 4D or vector image (None: the file is the channel)
                            "labels": list(structure.labels),
                        })
                        records.append(record)
                        bar.update(1)
    except KeyboardInterrupt:  # the sessions finished are kept, for the caller to write
        interrupted = f"interrupted in case {current} of {len(jobs)}, after {len(records)} session(s)"
    finally:
        bar.close()
    capabilities = {name: e.capabilities().to_dict() for name, e in engines.items()}
    result = {
        "format": "segassist-bench",
        "format_version": 1,
        "config": {
            "command": command,
            "quick": config.quick,
            "engines": list(engines),
            "engine_capabilities": capabilities,
            "model": config.model,
            "model_weights": next((model_record(e, config.model, shipped=loaded_here) for n, e in engines.items()
                                   if n in ("builtin", "ablation")), None),
            "protocols": list(config.protocols),
            "clicks": config.clicks,
            "refine_clicks": config.refine_clicks,
            "randomwalker_max_voxels": config.randomwalker_max_voxels,
            "scribble_jitter_mm": config.scribble_jitter_mm,
            "seed": config.seed,
            "selection": describe(jobs),
            "missing_datasets": missing,
            "left_out": left_out,
            "cases": {d: [j.case.name for j in jobs if j.dataset == d] for d in dict.fromkeys(j.dataset for j in jobs)},
        },
        "machine": machine,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "records": records,
        "skipped": skipped,
    }
    if interrupted:
        result["interrupted"] = interrupted
        raise BenchInterrupted(result)
    return result


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_bench`: ``partial`` holds the sessions finished before it (its
    ``interrupted`` says where), for the caller to write; still a KeyboardInterrupt."""

    def __init__(self, partial: Dict):
        super().__init__(partial.get("interrupted", "interrupted"))
        self.partial = partial


RECORD_KEYS = {  # what the report reads from every record, and the type it expects
    "dataset": str, "case": str, "structure": str, "engine": str, "protocol": str, "dice": list,
    "latency_s": list, "interactions": list, "prompts": list, "labels": list, "noc": dict, "reached": dict,
    "final_dice": (int, float), "peak_rss_mb": (int, float),
}


def results_problem(result: object) -> Optional[str]:
    """What makes a loaded ``results.json`` unusable for the report (None: nothing found): a damaged
    or hand-edited file must be refused with a reason, not fail half-way with a traceback."""
    if not isinstance(result, dict) or result.get("format") != "segassist-bench":
        return "not a segassist bench results file"
    config = result.get("config")
    if not isinstance(config, dict):
        return "it has no config"
    engines = config.get("engines")
    if not isinstance(engines, list) or not engines or not all(isinstance(e, str) for e in engines):
        return "its config lists no engines"
    if not isinstance(config.get("cases", {}), dict):
        return "its config's cases are not a mapping of dataset to cases"
    records = result.get("records")
    if not isinstance(records, list) or not isinstance(result.get("skipped", []), list):
        return "it has no list of records or of skipped sessions"
    if records and not isinstance(config.get("refine_clicks"), int):
        return "its config has no refine_clicks"
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            return f"record {index} is not an object"
        for key, kind in RECORD_KEYS.items():
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                return f"record {index} has no {key}" if key not in record else f"record {index}: bad {key}"
        if not record["dice"] or "final_hd95_mm" not in record:
            return f"record {index} has no Dice or final HD95"
    return None


def write_results(result: Dict, out: Path, overwrite: bool = False) -> Path:
    """Write ``results.json`` into ``out`` whole or not at all; an existing one, also one that appeared
    during the run, is replaced only with ``overwrite``. When the write fails the results are saved to
    a rescue file and :class:`~SegAssistLib.evaluation.output.ResultsSavedElsewhere` says where."""
    data = json.dumps(result, separators=(",", ":")).encode()
    return write_results_file(data, Path(out) / RESULTS_NAME, overwrite, "bench results")


# --- command line ------------------------------------------------------------------------------
def _csv(text: str) -> Tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the model and the baselines on every dataset; writes a Markdown report with plots",
        description=(
            "Simulated-user benchmark: protocols clicks, box+clicks (CVPR 2025 challenge) and scribble+clicks; "
            "engines builtin (the model), ablation (the model without prompt history), growcut (3D Slicer's "
            "Grow from seeds) and randomwalker, each given the same first interaction and later clicks by the "
            "same rule from its own mask. Dice and HD95 after each interaction, NoC@80/85/90, latency, peak "
            "memory, 95 percent bootstrap intervals resampling patients. Default selection: "
            f"the evaluation split of every dataset under the data folder ({BENCH_BUDGET})."
        ),
    )
    parser.add_argument("folders", nargs="*", metavar="DATASET_DIR",
                        help="dataset folders in the MSD layout (default: the default selection under --data)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder holding the datasets (default: $SEGASSIST_SHARED_DATA or ../shared/data)")
    parser.add_argument("--datasets", default=None,
                        help="only these datasets of the default selection (comma-separated)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"output folder (default: docs/benchmarks of the repository, {DEFAULT_OUT}, wherever "
                        "the command runs from)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results.json and report of an earlier run in --out (and the pictures "
                        "its report links; other pictures there are kept)")
    parser.add_argument("--quick", action="store_true", help="a subset that runs in about 5 minutes on a 2-core CPU")
    parser.add_argument("--engines", default=",".join(BENCH_ENGINES), help=f"default {','.join(BENCH_ENGINES)}")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"default {','.join(PROTOCOLS)}")
    parser.add_argument("--clicks", type=positive_int, default=None,
                        help="clicks of the clicks protocol (default 10; quick 5)")
    parser.add_argument("--refine-clicks", type=positive_int, default=None,
                        help="clicks after the box or scribble (default 5, the challenge's; quick 3)")
    parser.add_argument("--cases", type=positive_int, default=None,
                        help="first N evaluation cases of every dataset (with --quick too, of the datasets it keeps)")
    parser.add_argument("--labels", default=None,
                        help="targets for the given folders, e.g. 1,2,1+2 (default: dataset.json)")
    parser.add_argument("--model", default=None, help="checkpoint of the model (default: the shipped weights)")
    parser.add_argument("--device", default="cpu", help="device of the model: cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--randomwalker-max-voxels", type=positive_int, default=None, metavar="N",
                        help="skip the random walker on images above N voxels (default: run it everywhere)")
    parser.add_argument("--scribble-jitter", type=non_negative_mm, default=1.5, metavar="MM",
                        help="hand jitter (default 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of scribbles and bootstrap (default 0)")
    parser.add_argument("--list", action="store_true", help="print the selection and exit")
    parser.add_argument("--from-json", default=None, metavar="RESULTS",
                        help="render the report again from a results.json (replays the gallery sessions)")
    parser.set_defaults(func=run_cli)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        folders=[Path(f) for f in args.folders],
        data_root=Path(args.data) if args.data else None,
        datasets=list(_csv(args.datasets)) if args.datasets else None,
        out=Path(args.out),
        quick=args.quick,
        engines=_csv(args.engines),
        protocols=_csv(args.protocols),
        clicks=args.clicks,
        refine_clicks=args.refine_clicks,
        cases=args.cases,
        labels=args.labels,
        model=args.model,
        device=args.device,
        threads=args.threads,
        randomwalker_max_voxels=args.randomwalker_max_voxels,
        scribble_jitter_mm=args.scribble_jitter,
        seed=args.seed,
    )


def check_out_folder(out: Path, overwrite: bool, from_json: bool = False) -> None:
    """Refuse, before hours of work, an output folder that cannot be written or that holds an earlier
    run's results or report (the default, docs/benchmarks, holds the committed one), or pictures in
    its ``plots/`` or ``gallery/`` (the report writes its own there, and once removed every picture
    found): replaced only with ``overwrite``, and then only the pictures the earlier report links are
    removed. ``from_json``: only the report is written."""
    from SegAssistLib.evaluation.report import PER_CASE_NAME, PICTURE_FOLDERS, REPORT_NAME

    problem = output_problem(out, folder=True)
    if problem:
        raise SegAssistError(f"--out {out}: {problem}")
    if overwrite:
        return
    names = (REPORT_NAME, PER_CASE_NAME) if from_json else (RESULTS_NAME, REPORT_NAME, PER_CASE_NAME)
    held = [name for name in names if (out / name).exists()]
    if held:
        raise SegAssistError(f"--out {out} already holds {', '.join(held)} of an earlier run: pass --overwrite "
                             "to replace them, or choose another --out")
    pictures = sorted(f"{p.parent.name}/{p.name}" for folder in PICTURE_FOLDERS for p in (out / folder).glob("*.png"))
    if pictures:
        shown = ", ".join(pictures[:3]) + (", ..." if len(pictures) > 3 else "")
        raise SegAssistError(f"--out {out} already holds {len(pictures)} picture(s) ({shown}) where the report "
                             "writes its own: choose another --out, or pass --overwrite (the pictures an earlier "
                             "report.md links are replaced, the others kept)")


def _progress(line: str) -> None:
    """A line of the report's progress on stderr (stdout names the files written)."""
    print(f"bench: {line}", file=sys.stderr, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    from SegAssistLib.evaluation.report import render_report

    config = config_from_args(args)
    if args.list:
        jobs, missing = select_jobs(config)
        for line in describe(jobs):
            print(line)
        for name in missing:
            print(f"{name}: not found")
        return 0
    check_out_folder(config.out, args.overwrite, from_json=bool(args.from_json))  # before hours of work
    if args.from_json:
        try:
            result = json.loads(Path(args.from_json).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SegAssistError(f"cannot read the results file {args.from_json}: {exc}") from exc
        problem = results_problem(result)
        if problem:
            raise SegAssistError(f"{args.from_json}: {problem}")
        model = result["config"].get("model") if args.model is None else args.model
        _progress(f"{len(result['records'])} session(s) read from {args.from_json}; loading the engines "
                  f"{', '.join(result['config']['engines'])} to replay the gallery sessions")
        engines = build_engines(BenchConfig(engines=tuple(result["config"]["engines"]), model=model,
                                            device=config.device))
        _progress(f"writing the report to {config.out}")
        try:
            report = render_report(result, config.out, engines=engines, progress=_progress,
                                   overwrite=args.overwrite)
        except SegAssistError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # damaged past the checks
            raise SegAssistError(f"{args.from_json}: a damaged results file ({type(exc).__name__}: {exc})") from exc
        print(f"wrote {report}")
        return 0 if result["records"] else 1
    command = "segassist bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    select_jobs(config)  # a missing folder or a label its dataset.json lacks: said before the model loads
    engines = build_engines(config)
    try:
        result = run_bench(config, engines, command=command.strip(), built_from_config=True)
    except BenchInterrupted as stop:  # Ctrl-C: the sessions finished are written, the report is not
        path = write_results(stop.partial, config.out, overwrite=args.overwrite)
        print(f"bench: {stop.partial['interrupted']}: partial results written to {path} (a report of them: "
              f"segassist bench --from-json {path} --out DIR)", file=sys.stderr)
        raise KeyboardInterrupt from None
    print(f"wrote {write_results(result, config.out, overwrite=args.overwrite)}")
    report = render_report(result, config.out, engines=engines, progress=_progress, overwrite=args.overwrite)
    print(f"wrote {report}")
    return 0 if result["records"] else 1
