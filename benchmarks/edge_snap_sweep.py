"""How the edge snap's band and beta were chosen: Dice after 5 clicks on the *training* split.

The evaluation split stays for the acceptance table; the settings are chosen here, on cases the
network was trained on (its boundaries there are, if anything, better than on unseen cases, so the
snap's gain here is a lower estimate). Each setting runs ``segassist eval``'s click protocol on the
first ``--cases`` training cases of each dataset; "off" is the network's answers alone.

Writes ``edge_snap_sweep.json`` (every run's summary) and ``edge_snap_sweep.md`` (the table).

Usage: python benchmarks/edge_snap_sweep.py [--data DIR] [--cases 16]
       [--bands 1,2] [--betas 30,130,500,2000] [--out benchmarks/results/edge_snap_sweep]

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository;
``--out`` to ``benchmarks/results/edge_snap_sweep`` of the repository, wherever it is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from SegAssistLib.datasets import add_data_root_argument
from SegAssistLib.engine.builtin import load_default_engine
from SegAssistLib.engine.edges import EdgeSnap
from SegAssistLib.evaluation.cli import edge_band, edge_beta
from SegAssistLib.evaluation.metrics import carried_forward
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, parse_targets
from SegAssistLib.machine import machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]

DATASETS = [("hippocampus", "1,2"), ("acdc", "1,2,3"), ("brats", "1+2+3+4"),
            ("totalsegmentator_examples", "1,2,3,5,7,52")]


def _list_of(item):
    """argparse type of a comma-separated list, each item checked by ``item`` (the engine's bounds: a
    beta of 1e10 is refused here with one line, not by the engine after the sweep started)."""

    def parse(text: str):
        values = [item(x) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values

    return parse


def _band(text: str) -> float:
    """A band of the sweep: 1 to 10 voxels ("off", a band of 0, is always swept)."""
    value = edge_band(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("the sweep always runs with the snap off: give bands of 1 to 10 voxels")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root_argument(parser)
    parser.add_argument("--cases", type=int, default=16, help="training cases per dataset (default 16)")
    parser.add_argument("--bands", type=_list_of(_band), default=[1.0, 2.0], help="1 to 10 voxels each")
    parser.add_argument("--betas", type=_list_of(edge_beta), default=[30.0, 130.0, 500.0, 2000.0],
                        help="above 0 and at most 1e9 each")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "edge_snap_sweep")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = [None] + [EdgeSnap(band=b, beta=beta) for b in args.bands for beta in args.betas]
    rows, started = [], time.time()
    for snap in settings:
        name = "off" if snap is None else f"band {snap.band:g}, beta {snap.beta:g}"
        engine = load_default_engine(threads=2, edge_snap=snap)
        row = {"setting": name, "band": None if snap is None else snap.band,
               "beta": None if snap is None else snap.beta, "dice5": {}, "median_latency_ms": {}}
        for dataset, targets in DATASETS:
            config = EvalConfig(args.data / dataset, parse_targets(targets), "clicks", 5, args.cases, "training",
                                "builtin")
            result = evaluate(config, engine=engine, progress=lambda line: None)
            # a session that reached Dice 1.0 stops early: its last value stands for the clicks it did not need
            dice = np.array([carried_forward(r["dice"], 5) for r in result["records"]])
            latency = [x for r in result["records"] for x in r["latency_s"]]
            row["dice5"][dataset] = round(float(dice[:, 4].mean()), 4)
            row["median_latency_ms"][dataset] = round(1000 * float(np.median(latency)), 1)
            row.setdefault("n", {})[dataset] = int(len(dice))
        row["mean_dice5"] = round(float(np.mean(list(row["dice5"].values()))), 4)
        print(f"{name:22s} " + " ".join(f"{d} {v:.3f}" for d, v in row["dice5"].items())
              + f"  mean {row['mean_dice5']:.3f}", flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = shlex.join(["python", "benchmarks/edge_snap_sweep.py", *given])
    info = machine_info("cpu")
    machine = (f"{info['cpu']}, {info['cpu_count']} cores, Python {info['python']}, "
               f"commit {info.get('commit', 'unknown')}")
    (args.out / "edge_snap_sweep.json").write_text(json.dumps({"command": command, "argv": given, "machine": info,
                                                               "date": time.strftime("%Y-%m-%d"),
                                                               "wall_s": round(time.time() - started),
                                                               "rows": rows}, indent=1))
    names = [d for d, _ in DATASETS]
    lines = ["# Edge snap settings: Dice after 5 clicks, training split", "",
             f"Command: `{command}`; machine: {machine}; {time.strftime('%Y-%m-%d')}; "
             f"wall time {round(time.time() - started)} s; first {args.cases} training cases (targets: "
             + ", ".join(f"{d} {t}" for d, t in DATASETS) + ").", "",
             "| setting | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['setting']} | " + " | ".join(f"{row['dice5'][d]:.3f}" for d in names)
                     + f" | {row['mean_dice5']:.3f} |")
    (args.out / "edge_snap_sweep.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
