"""Where a training step's time goes: waiting for the loader, finding correction clicks, the rest
(network rounds, drawing the corrections, backward and the optimiser step), in the training process.

The real trainer on the real training data (or a pack): ``Trainer.train_step`` is run as ``segassist
train`` runs it, with the stream and the correction finder wrapped by timers. On a GPU machine this
tells whether the GPU or the CPU work around it bounds a step (see docs/training.md).

Usage: python benchmarks/training_throughput.py [--config cfg.json] [--steps 60] [--warmup 10]
       [--out benchmarks/results/training_throughput.json]

``--out`` defaults to ``benchmarks/results/training_throughput.json`` of the repository, wherever it
is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from SegAssistLib.cli import run_script
from SegAssistLib.machine import machine_info
from SegAssistLib.training.cli import load_config
from SegAssistLib.training.train import TrainConfig, Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Timed:
    """Wraps a callable or an iterator and adds the seconds spent in it to ``self.seconds``."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def _timed(self, work):
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            self.seconds += time.perf_counter() - t0

    def __call__(self, *args, **kwargs):
        return self._timed(lambda: self.inner(*args, **kwargs))

    def __next__(self):
        return self._timed(lambda: next(self.inner))


def measure(cfg: TrainConfig, steps: int, warmup: int) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        try:
            for _ in range(warmup):  # the loader's first cases and oneDNN's kernel choice
                trainer.train_step()
            stream, corrections = _Timed(trainer.stream), _Timed(trainer.corrections)
            trainer.stream, trainer.corrections = stream, corrections
            step_seconds: List[float] = []
            rounds = 0
            for _ in range(steps):
                t0 = time.perf_counter()
                rounds += trainer.train_step()["rounds"]
                step_seconds.append(time.perf_counter() - t0)
        finally:
            trainer.close()
    total = float(np.sum(step_seconds))
    per_step = lambda seconds: round(1000 * seconds / steps, 1)  # noqa: E731
    return {
        "steps": steps,
        "batch_size": cfg.batch_size,
        "mean_correction_rounds": round(rounds / steps, 2),
        "step_ms_median": round(1000 * float(np.median(step_seconds)), 1),
        "step_ms_mean": per_step(total),
        "loader_wait_ms": per_step(stream.seconds),
        "corrections_ms": per_step(corrections.seconds),
        "network_and_rest_ms": per_step(total - stream.seconds - corrections.seconds),
        "samples_per_s": round(steps * cfg.batch_size / total, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a training config (JSON); default: TrainConfig's defaults")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "training_throughput.json")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    cfg = load_config(args.config)  # a missing or bad file: one line naming it (TrainConfig's defaults without)
    result = measure(cfg, args.steps, args.warmup)
    report = {"command": shlex.join(["python", "benchmarks/training_throughput.py", *given]), "argv": given,
              "config": str(args.config) if args.config else "defaults", "machine": machine_info(cfg.device),
              "result": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "training_throughput.py"))
