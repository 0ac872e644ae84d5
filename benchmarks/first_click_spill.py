"""How much of a first click's answer lands in the neighbouring labelled structures.

On a dataset of touching structures (ACDC: right ventricle, myocardium, left ventricle) a click
inside one structure should come back as that structure alone. This puts the evaluation's first
click (the most interior voxel of the target) on every target of every evaluation case and reports
the share of the returned mask that lies in *other* labels (0 is ideal; background spill is not
counted, so this isolates the "which structure did the click mean" error), per target label and
overall, for each checkpoint given.

Usage: python benchmarks/first_click_spill.py [--dataset DIR] [--labels 1,2,3]
    [--model CKPT ...] [--cases N] [--out benchmarks/results/first_click_spill.json]

``--dataset`` defaults to ``acdc`` in ``$SEGASSIST_SHARED_DATA``, else in ``../shared/data`` beside
the repository.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from SegAssistLib.cli import run_script
from SegAssistLib.cli_types import positive_int
from SegAssistLib.datasets import default_data_root, list_cases, split_cases
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, BuiltinEngine
from SegAssistLib.evaluation.simulator import first_click
from SegAssistLib.io import load_mask, load_volume
from SegAssistLib.machine import machine_info
from SegAssistLib.training.data import MIN_TARGET_VOXELS

REPO_ROOT = Path(__file__).resolve().parents[1]


def spill_share(prediction: np.ndarray, labels: np.ndarray, target: int) -> Optional[float]:
    """Share of ``prediction`` inside labels other than ``target`` (None for an empty prediction)."""
    n = int(prediction.sum())
    if n == 0:
        return None
    return float((prediction & (labels > 0) & (labels != target)).sum() / n)


def measure(checkpoint: Path, dataset: Path, targets: Sequence[int], cases: Optional[int]) -> Dict:
    engine = BuiltinEngine.from_checkpoint(checkpoint)
    chosen = split_cases(list_cases(dataset), "evaluation")[:cases]
    per_target: Dict[int, List[float]] = {t: [] for t in targets}
    empty = 0
    for case in chosen:
        volume, labels = load_volume(case.image), load_mask(case.label)
        for t in targets:
            mask = labels == t
            if mask.sum() < MIN_TARGET_VOXELS:
                continue
            session = engine.open_session(volume)
            session.add_prompt(first_click(mask, volume.spacing))
            share = spill_share(session.result() > 0, labels, t)
            session.close()
            if share is None:
                empty += 1
            else:
                per_target[t].append(share)
    every = [s for v in per_target.values() for s in v]
    return {
        "model": str(checkpoint),
        "model_version": engine.version,
        "model_identity": engine.model.identity,  # a hash of the weights: the same path may hold others later
        "cases": [c.name for c in chosen],
        "spill_by_target": {str(t): round(float(np.mean(v)), 4) if v else None for t, v in per_target.items()},
        "spill_overall": round(float(np.mean(every)), 4) if every else None,
        "targets_measured": len(every),
        "empty_answers": empty,
    }


def label_list(text: str) -> List[int]:
    """argparse type of ``--labels``: label values, comma-separated (``1,2,3``)."""
    return [positive_int(x.strip()) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=default_data_root() / "acdc",
                   help="the dataset's folder (default: acdc in $SEGASSIST_SHARED_DATA, else in ../shared/data "
                        "beside the repository)")
    p.add_argument("--labels", type=label_list, default="1,2,3", help="target labels, comma-separated")
    p.add_argument("--model", type=Path, action="append", help="checkpoint (repeatable; default: shipped)")
    p.add_argument("--cases", type=int, help="only the first N evaluation cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "first_click_spill.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    torch.set_num_threads(args.threads)
    targets = args.labels
    runs = [measure(m, args.dataset, targets, args.cases) for m in (args.model or [DEFAULT_CHECKPOINT])]
    for run in runs:
        print(f"{run['model_version']}: spill {run['spill_overall']} overall, by target {run['spill_by_target']} "
              f"({run['targets_measured']} targets, {run['empty_answers']} empty answers)")
    result = {"benchmark": "first-click spill into neighbouring labels",
              "command": shlex.join(["python", "benchmarks/first_click_spill.py", *given]), "argv": given,
              "machine": machine_info("cpu"), "dataset": str(args.dataset), "labels": targets, "runs": runs,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("written:", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "first_click_spill.py"))
