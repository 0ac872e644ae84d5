"""Why Dice stalls below 0.90 after many clicks, and two engine-side ideas that did not lift it.

On the first N evaluation cases of the hippocampus (labels 1 and 2 separately, ``segassist eval``'s
click protocol, 20 clicks), with the shipped weights:

- ``baseline``: the engine as shipped;
- ``local``: a correction click keeps only the part of its change that is connected to voxels within
  ``--radius`` mm of the click (the rest of the window keeps the earlier answer), so a click cannot
  disturb regions that were already right (the idea of FocalClick's local refinement);
- ``flip-tta``: every window predicted twice, as it is and mirrored left-right, logits averaged.

It also reports where the error left after the last click lies: the share at the interface of the
two hippocampus labels (an anatomical convention no image edge shows) against the object's outer
boundary.

Usage: python benchmarks/correction_locality.py [--data DIR] [--cases 10] [--clicks 20] [--radius 10]
       [--out benchmarks/results/correction_locality]

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository;
``--out`` to ``benchmarks/results/correction_locality`` of the repository, wherever it is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from SegAssistLib.datasets import add_data_root_argument
from SegAssistLib.engine import builtin
from SegAssistLib.engine.builtin import load_default_engine
from SegAssistLib.evaluation.metrics import carried_forward
from SegAssistLib.evaluation.runner import run_session, select_cases
from SegAssistLib.io import load_mask, load_volume
from SegAssistLib.machine import machine_info
from SegAssistLib.prompts import PointPrompt, prompt_vertices_kji

REPO_ROOT = Path(__file__).resolve().parents[1]


def keep_local_change(radius_mm: float):
    """A ``_predict`` that keeps, for a correction click, only the changed voxels connected to the
    click's neighbourhood."""
    shipped = builtin.BuiltinSession._predict

    def predict(self, prompt):
        had_mask = bool(self.mask.any())
        box, new, info = shipped(self, prompt)
        if not had_mask or not isinstance(prompt, PointPrompt):
            return box, new, info
        old = self.mask[box]
        changed = old != new
        if not changed.any():
            return box, new, info
        click = prompt_vertices_kji(prompt)[0] - np.array([s.start for s in box])
        grids = np.ogrid[tuple(slice(0, n) for n in changed.shape)]
        near = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, click, self.spacing_kji)) <= radius_mm**2
        pieces, _ = ndimage.label(changed)
        touching = np.unique(pieces[near & changed])  # pieces of the change within reach of the click
        kept = np.isin(pieces, touching[touching > 0]) & near
        return box, np.where(kept, new, old).astype(np.uint8), info

    return predict


class FlipAveraged(torch.nn.Module):
    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.network(x) + self.network(x.flip(4)).flip(4)) / 2


def run(variant: str, cases, clicks: int, radius: float) -> dict:
    engine = load_default_engine(threads=2)
    shipped = builtin.BuiltinSession._predict
    if variant == "local":
        builtin.BuiltinSession._predict = keep_local_change(radius)
    if variant == "flip-tta":
        engine.network = FlipAveraged(engine.network)
    dice, latencies, interface, outer = [], [], 0, 0
    try:
        for case in cases:
            volume, labels = load_volume(case.image), load_mask(case.label)
            for value in (1, 2):
                target = (labels == value).astype(np.uint8)
                out = run_session(engine, volume, target, max_clicks=clicks)
                dice.append(carried_forward(out["dice"], clicks))  # a session that reached 1.0 stopped early
                latencies += out["latency_s"]
                errors = (out["final"] > 0) != (target > 0)
                other = ndimage.binary_dilation((labels > 0) & (labels != value), iterations=2)
                interface += int((errors & other).sum())
                outer += int((errors & ~other).sum())
    finally:
        builtin.BuiltinSession._predict = shipped
    d = np.asarray(dice)
    reached = [[next((i + 1 for i, x in enumerate(row) if x >= t), clicks) for row in d] for t in (0.85, 0.90)]
    return {
        "variant": variant, "targets": len(d),
        "mean_dice": {str(k): round(float(d[:, k - 1].mean()), 4) for k in (1, 5, 10, clicks)},
        "noc85": round(float(np.mean(reached[0])), 2), "noc90": round(float(np.mean(reached[1])), 2),
        "median_latency_s": round(float(np.median(latencies)), 4),
        "final_error_at_label_interface": round(interface / max(interface + outer, 1), 3),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_root_argument(parser)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--radius", type=float, default=10.0, help="mm around a correction click (default 10)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "correction_locality")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cases = select_cases(args.data / "hippocampus", "evaluation", args.cases)
    started = time.time()
    rows = []
    for variant in ("baseline", "local", "flip-tta"):
        rows.append(run(variant, cases, args.clicks, args.radius))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    machine = machine_info("cpu")
    result = {"command": shlex.join(["python", "benchmarks/correction_locality.py", *given]), "argv": given,
              "cases": [c.name for c in cases], "clicks": args.clicks, "radius_mm": args.radius, "rows": rows,
              "machine": machine, "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - started)}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    header = (f"| variant | Dice@1 | Dice@5 | Dice@10 | Dice@{args.clicks} | NoC@85 | NoC@90 | median latency s "
              "| final error at the label-1/2 interface |")
    lines = [f"# Correction locality and flip averaging, hippocampus ({rows[0]['targets']} targets, "
             f"{args.clicks} clicks)", "", header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mean_dice"]
        lines.append(f"| {r['variant']} | {m['1']} | {m['5']} | {m['10']} | {m[str(args.clicks)]} | {r['noc85']} | "
                     f"{r['noc90']} | {r['median_latency_s']} | {r['final_error_at_label_interface']:.0%} |")
    lines += ["", f"Command: `{result['command']}`; {machine['cpu']}, {machine.get('torch_threads')} torch threads, "
              f"commit {machine.get('commit', 'unknown')}; {result['date']}; {result['wall_s']} s."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
