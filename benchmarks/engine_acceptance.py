"""The engine issue's acceptance table: Dice after 5 clicks on the evaluation split, for the shipped
model and the two baselines (each with and without background seeded on the image edge), all given
the same first click and later clicks by the same rule on their own masks (``segassist eval``'s
click protocol).

Writes ``benchmarks/results/acceptance.json`` (every record) and ``acceptance.md`` (the table).

Usage: python benchmarks/engine_acceptance.py [--data DIR] [--model CKPT]
       [--engines builtin,growcut,growcut-inside,randomwalker,randomwalker-inside]
       [--out benchmarks/results] [--cases N]
       [--correction-zoom-share S] [--edge-band B]
       [--baselines-from benchmarks/results/acceptance.json]   # new weights: rerun only the model

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository;
``--out`` to ``benchmarks/results`` of the repository, wherever it is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from SegAssistLib.cli import run_script
from SegAssistLib.cli_types import positive_int
from SegAssistLib.datasets import add_data_root_argument
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.cli import CORRECTION_ZOOM_SHARE_HELP, EDGE_BAND_HELP, edge_band, share_of_a_side
from SegAssistLib.evaluation.runner import EvalConfig, evaluate, make_engine, parse_targets, select_cases
from SegAssistLib.machine import machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]

# dataset, targets, minimum Dice@5 for the model, case limit per engine (None: whole evaluation split)
SELECTION = [
    ("hippocampus", "1,2", 0.85, {}),
    ("left_atrium", "1", 0.85, {"randomwalker": 2}),
    ("acdc", "1,2,3", 0.85, {}),
    ("brats", "1+2+3+4", 0.75, {}),
    ("totalsegmentator_examples", "1,2,3,5,7,52", 0.75, {}),
]
CLICKS = 5
# the model and the two baselines, each baseline with and without background seeded on the image edge
ENGINES = ("builtin", "growcut", "growcut-inside", "randomwalker", "randomwalker-inside")
COLUMNS = {"builtin": "SegAssist Dice@5", "growcut": "Grow-from-seeds", "growcut-inside": "Grow-from-seeds, inside",
           "randomwalker": "random walker", "randomwalker-inside": "random walker, inside"}


def _limit(limits: dict, engine: str, cases: Optional[int]) -> Optional[int]:
    """The case limit of an engine on a dataset: its own (the slow random walker's) or ``--cases``."""
    own = limits.get(engine.split("-")[0])  # a variant (randomwalker-inside) shares its method's limit
    return min((n for n in (own, cases) if n is not None), default=None)


def required_margin(baseline: float) -> float:
    """Ahead by 0.10, or by a third of the way from the baseline to 1.0 where that is smaller."""
    return min(0.10, (1.0 - baseline) / 3.0)


def _dice5(records) -> dict:
    """(case, target) -> Dice after the fifth click (the last one when a run stopped earlier)."""
    return {(r["case"], r["target"]): r["dice"][min(CLICKS, len(r["dice"])) - 1] for r in records}


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


def _case_mean(dice5: dict) -> float:
    """The mean over cases of each case's mean over its targets (the table's mean is over records)."""
    per_case = {}
    for (case, _), value in dice5.items():
        per_case.setdefault(case, []).append(value)
    return _mean(np.mean(v) for v in per_case.values())


def _paired(model: dict, baseline: dict) -> dict:
    """The model against a baseline on the records both have: ahead by the issue's margin?"""
    common = sorted(set(model) & set(baseline))
    m, b = _mean(model[k] for k in common), _mean(baseline[k] for k in common)
    return {"n": len(common), "model": m, "baseline": b, "ahead": bool(common) and m - b >= required_margin(b)}


def read_baseline_runs(path: Path) -> dict:
    """The runs of an earlier acceptance.json (``--baselines-from``); a SegAssistError naming the file when
    it cannot be read or holds no runs."""
    try:
        runs = json.loads(path.read_text()).get("runs")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise SegAssistError(f"--baselines-from {path}: cannot read it as an acceptance.json: {exc}") from exc
    if not isinstance(runs, dict):
        raise SegAssistError(f"--baselines-from {path}: not an acceptance.json (no runs)")
    return runs


def _reusable(earlier: dict, engine: str, spec: tuple, args: argparse.Namespace, results: dict, source: Path) -> bool:
    """Take ``engine``'s run on a dataset from an earlier acceptance.json into ``results`` when it
    used this run's settings and cases; otherwise say why it runs again."""
    dataset, targets, _, limits = spec
    run = earlier.get(f"{engine}/{dataset}")
    if run is None:
        print(f"{source} has no {engine} run on {dataset}: running it", flush=True)
        return False
    ran = run.get("config", {})
    asked = {"targets": ["+".join(map(str, t)) for t in parse_targets(targets)], "protocol": "clicks",
             "max_clicks": CLICKS}
    differs = [f"{k} {ran.get(k)!r} (this run: {v!r})" for k, v in asked.items() if ran.get(k) != v]
    had = {r["case"] for r in run["records"] + run.get("skipped", [])}
    wanted = {c.name for c in select_cases(args.data / dataset, "evaluation", _limit(limits, engine, args.cases))}
    if had != wanted:
        differs.append(f"cases {sorted(had)} (this run: {sorted(wanted)})")
    if differs:
        print(f"the {engine} run on {dataset} in {source} used other settings: {'; '.join(differs)}: running it",
              flush=True)
        return False
    results[f"{engine}/{dataset}"] = run
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_root_argument(parser)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--datasets", help="comma-separated subset of the selection")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--cases", type=positive_int,
                        help="only the first N evaluation cases of each dataset (a quick check)")
    parser.add_argument("--correction-zoom-share", type=share_of_a_side, default=None, metavar="S",
                        help=CORRECTION_ZOOM_SHARE_HELP)
    parser.add_argument("--edge-band", type=edge_band, default=None, metavar="B", help=EDGE_BAND_HELP)
    parser.add_argument("--baselines-from", type=Path, metavar="JSON",
                        help="take the baselines' runs from an earlier acceptance.json (they do not depend on the "
                             "model's weights); the model, and each baseline run that file lacks or made on other "
                             "cases or settings, run here")
    return parser


def _model_record(engine, checkpoint: Optional[Path]) -> Optional[dict]:
    """The builtin engine's weights: path, version and identity (a hash of the weights); None when
    the model did not run."""
    if engine is None:
        return None
    if checkpoint is None:
        from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT as checkpoint
    return {"path": str(checkpoint), "version": getattr(engine, "version", None),
            "identity": getattr(getattr(engine, "model", None), "identity", None)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # for the report's command line
    engines = args.engines.split(",")
    chosen = [s for s in SELECTION if not args.datasets or s[0] in args.datasets.split(",")]
    results = {}
    to_run = [(e, spec) for e in engines for spec in chosen]
    if args.baselines_from:
        earlier = read_baseline_runs(args.baselines_from)
        to_run = [(e, spec) for e, spec in to_run
                  if e == "builtin" or not _reusable(earlier, e, spec, args, results, args.baselines_from)]
    taken = sorted(results)  # the runs reused so far: baselines only
    t0 = time.time()
    engine_objects = {}
    for engine_name, (dataset, targets, _, limits) in to_run:
        if engine_name not in engine_objects:
            model = str(args.model) if args.model and engine_name == "builtin" else None
            own = engine_name == "builtin"  # the options are the model's; the baselines take none
            engine_objects[engine_name] = make_engine(
                engine_name, model, correction_zoom_share=args.correction_zoom_share if own else None,
                edge_band=args.edge_band if own else None)
        limit = _limit(limits, engine_name, args.cases)
        cfg = EvalConfig(args.data / dataset, parse_targets(targets), "clicks", CLICKS, limit, "evaluation",
                         engine_name)
        print(f"== {engine_name} on {dataset} ({targets})", flush=True)
        res = evaluate(cfg, engine=engine_objects[engine_name], progress=lambda line: print("  " + line, flush=True))
        results[f"{engine_name}/{dataset}"] = res
    rows = []
    for dataset, targets, floor, _ in chosen:
        row = {"dataset": dataset, "targets": targets, "floor": floor}
        dice5 = {e: _dice5(results[f"{e}/{dataset}"]["records"]) for e in engines}
        for engine_name in engines:
            res = results[f"{engine_name}/{dataset}"]
            row[engine_name] = {"dice5": _mean(dice5[engine_name].values()), "n": len(dice5[engine_name]),
                                "dice5_case_mean": _case_mean(dice5[engine_name]),
                                "median_latency_s": res["summary"].get("median_latency_s")}
        if "builtin" in engines:  # each baseline against the model on the records both have
            row["paired"] = {e: _paired(dice5["builtin"], dice5[e]) for e in engines if e != "builtin"}
        rows.append(row)
    shown = ["builtin"] + [e for e in ENGINES[1:] if e in engines]
    lines = ["| dataset | targets | " + " | ".join(COLUMNS[e] for e in shown[:1]) + " | floor | floor met | "
             + " | ".join(COLUMNS[e] for e in shown[1:]) + " | ahead of every baseline |",
             "|---|---|---|---|---|" + "---|" * len(shown)]
    for row in rows:
        paired = row.get("paired", {})
        verdict = "yes" if paired and all(p["ahead"] for p in paired.values()) else "no" if paired else "-"
        if verdict == "yes" and set(paired) != set(ENGINES[1:]):
            verdict += " (of those run)"
        met = ("yes" if row["builtin"]["dice5"] >= row["floor"] else "no") if "builtin" in row else "-"
        cells = []
        for e in shown:
            cell = f"{row[e]['dice5']:.3f} (n={row[e]['n']})" if e in row else "-"
            if e in paired and paired[e]["n"] != row["builtin"]["n"]:  # compared on fewer records
                cell += f"; SegAssist {paired[e]['model']:.3f} on these"
            cells.append(cell)
        lines.append(f"| {row['dataset']} | {row['targets']} | {cells[0]} | {row['floor']} | {met} | "
                     f"{' | '.join(cells[1:])} | {verdict} |")
    command = shlex.join(["python", "benchmarks/engine_acceptance.py", *given])
    info = machine_info("cpu")
    machine = (f"{info['cpu']}, {info['cpu_count']} cores, Python {info['python']}, "
               f"commit {info.get('commit', 'unknown')}")
    table = "\n".join(lines)
    md = (f"# Engine acceptance: mean Dice after {CLICKS} clicks, evaluation split\n\n"
          "Means are over (case, target) records; \"ahead of every baseline\" compares the model with each baseline "
          "(\"inside\": no background seeded on the image edge, see `SegAssistLib/evaluation/baselines.py`) on the "
          "records both ran (where a baseline ran fewer cases, the model's mean on those is in its cell); "
          "`acceptance.json` also has each mean over cases (`dice5_case_mean`).\n\n"
          f"Command: `{command}`; machine: {machine}; {time.strftime('%Y-%m-%d')}; "
          f"wall time {time.time() - t0:.0f} s"
          + (f" (baseline runs taken from an earlier run, `--baselines-from {args.baselines_from}`: "
             f"{', '.join(taken) or 'none'})" if args.baselines_from else "")
          + f".\n\n{table}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance.md").write_text(md)
    record = {"command": command, "argv": given, "machine": info, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wall_s": round(time.time() - t0), "model": _model_record(engine_objects.get("builtin"), args.model),
              "rows": rows, "runs": results}
    (args.out / "acceptance.json").write_text(json.dumps(record, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "engine_acceptance.py"))
