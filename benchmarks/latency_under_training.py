"""Interactive latency of the in-process engine while a background adapter training job runs.

Issue 5 asks that training in the background (``learning.jobs.start_training``: a separate
process, 1 torch thread, lower CPU priority) degrade interactive latency by at most 30 % on this
CPU. This measures it:

1. Click sequences: on a few real cases (a left atrium and a hippocampus of the evaluation split)
   the evaluation's simulated user makes a first click and corrections
   (``evaluation.simulator``), answered by the engine. This also warms the engine up. Each
   later round *replays* exactly these prompts in fresh sessions, so every round does identical
   work and latencies pair up interaction by interaction.
2. Rounds with nothing else running (before), rounds while a training job runs, rounds after the
   job was cancelled (after). The job trains a SALT adapter (default) on a datastore of real
   hippocampus cases of the training split with their reference labels, with the job defaults
   (1 thread, nice 10). Measuring starts only once the job reports its training phase (past
   start-up and the incumbent's validation) and each interaction is tagged with the job's phase;
   the job's step counter before and after shows it really trained meanwhile.
3. Reported: median and 95th percentile per-interaction latency (wall time of ``add_prompt``)
   idle (before and after pooled) and under training, the degradation ratios (medians, p95s, and
   the median of the paired per-interaction ratios) against the target of 1.30 on the median.

Scheduling is recorded with the result (the nice value and Linux autogroup of both processes):
where autogroup scheduling is on, ``start_training`` starts the worker in a new session, hence a
new autogroup, and a plain nice would then rank it only against itself; the job therefore also
lowers its autogroup (``learning.jobs.lower_priority``), which the recorded ``autogroup`` line
shows (``nice 10``).

``--threads`` may list several engine thread counts (for example ``1,2``): each is measured with
its own job. The default is torch's choice, which is what the server uses unless told otherwise.

Usage (from the repository root)::

    python benchmarks/latency_under_training.py [--model runs/v1/model.pt] [--threads 1,2]
        [--clicks 5] [--rounds 6] [--train-kind salt] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from SegAssistLib.datasets import add_data_root_argument, list_cases, load_splits
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, BuiltinEngine
from SegAssistLib.engine.network import load_checkpoint
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.simulator import first_click, next_click
from SegAssistLib.evaluation.stats import latency_summary
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume
from SegAssistLib.learning import Datastore
from SegAssistLib.learning.jobs import FINAL_STATES, TrainingJob, start_training
from SegAssistLib.learning.trainer import AdapterTrainConfig
from SegAssistLib.machine import machine_info
from SegAssistLib.prompts import Prompt

TARGET_RATIO = 1.30
REPO_ROOT = Path(__file__).resolve().parents[1]
# (dataset, case, label): one large volume (zoom-out and refinement tiles) and one small crop
DEFAULT_CASES = (("left_atrium", "LA_06SR5RBREL16DQ6M8LWS", 1), ("hippocampus", "hippocampus_001", 1))


@dataclass
class LatencyCase:
    name: str
    volume: Volume
    target: np.ndarray


def load_case(data_root: Path, dataset: str, name: str, label: int) -> LatencyCase:
    case = next((c for c in list_cases(Path(data_root) / dataset) if c.name == name), None)
    if case is None:
        raise SystemExit(f"case {name} not found in {Path(data_root) / dataset}")
    return LatencyCase(f"{dataset}/{name}", load_volume(case.image), (load_mask(case.label) == label).astype(np.uint8))


def training_cases(data_root: Path, dataset: str, label: int, count: int) -> List[LatencyCase]:
    """The first ``count`` training-split cases of a dataset (what the background job learns from)."""
    evaluation = set(load_splits().get(dataset, []))
    ordered = sorted(list_cases(Path(data_root) / dataset), key=lambda c: c.name)
    chosen = [c for c in ordered if c.name not in evaluation]
    return [LatencyCase(c.name, load_volume(c.image), (load_mask(c.label) == label).astype(np.uint8))
            for c in chosen[:count]]


def build_training_store(root: Path, cases: Sequence[LatencyCase]) -> Path:
    """A datastore whose cases are submitted with their reference labels: a job has something to train on."""
    with Datastore(root) as store:
        for case in cases:
            record = store.import_volume(case.volume, name=case.name.replace("/", "_"), user="bench")
            store.save_label(record.id, case.target, user="bench")
    return root


# ---------------------------------------------------------------------------------------- clicks


@dataclass
class ClickSequence:
    case: str
    volume: Volume
    prompts: List[Prompt]
    dice: List[float]


def record_sequence(engine: BuiltinEngine, case: LatencyCase, clicks: int) -> ClickSequence:
    """The simulated user's clicks on one case, answered by ``engine`` (also its warm-up)."""
    session = engine.open_session(case.volume)
    prompts: List[Prompt] = []
    dices: List[float] = []
    try:
        pred = np.zeros(case.target.shape, np.uint8)
        prompt: Optional[Prompt] = first_click(case.target, case.volume.spacing)
        while prompt is not None and len(prompts) < clicks:
            session.add_prompt(prompt).apply_to(pred)
            prompts.append(prompt)
            dices.append(dice(case.target, pred))
            prompt = next_click(case.target, pred, case.volume.spacing)
    finally:
        session.close()
    return ClickSequence(case.name, case.volume, prompts, dices)


def replay(engine: BuiltinEngine, sequence: ClickSequence, before_each=None) -> List[Dict[str, Any]]:
    """Latency of each prompt of a recorded sequence in a fresh session; ``before_each()`` tags it."""
    session = engine.open_session(sequence.volume)
    rows = []
    try:
        for index, prompt in enumerate(sequence.prompts):
            tag = before_each() if before_each is not None else None
            t0 = time.perf_counter()
            session.add_prompt(prompt)
            rows.append({"case": sequence.case, "click": index + 1, "latency_s": time.perf_counter() - t0, "job": tag})
    finally:
        session.close()
    return rows


def rounds(engine: BuiltinEngine, sequences: Sequence[ClickSequence], n: int, before_each=None) -> List[Dict[str, Any]]:
    out = []
    for r in range(n):
        for seq in sequences:
            for row in replay(engine, seq, before_each):
                row["round"] = r
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------- the job


def wait_for_phase(job: TrainingJob, phase: str, timeout_s: float) -> Dict[str, Any]:
    """Block until the job reports ``phase`` (or ends, or ``timeout_s``); returns its status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job.status()
        if status.get("phase") == phase or status.get("state") in FINAL_STATES or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def scheduling(pid: int) -> Dict[str, Any]:
    """A process's nice value and (Linux) autogroup: with autogroup scheduling on, a process in another
    session competes as its own group, so its nice value only ranks it within that group."""
    out: Dict[str, Any] = {"pid": pid}
    try:
        out["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
    except (AttributeError, OSError):
        out["nice"] = None
    try:
        out["autogroup"] = Path(f"/proc/{pid}/autogroup").read_text().strip()
    except OSError:
        out["autogroup"] = None
    return out


def _autogroup_enabled() -> Optional[bool]:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def _stats(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    values = [r["latency_s"] for r in rows]
    out = {"interactions": len(values)}
    if values:
        out.update(median_ms=round(1000 * float(np.median(values)), 2),
                   p95_ms=round(1000 * float(np.percentile(values, 95)), 2),
                   mean_ms=round(1000 * float(np.mean(values)), 2))
        out["summary"] = latency_summary(values)
    return out


def _paired_ratios(idle: Sequence[Dict[str, Any]], loaded: Sequence[Dict[str, Any]]) -> List[float]:
    """Per interaction (case, click): latency under training / median idle latency of the same one."""
    reference: Dict[tuple, List[float]] = {}
    for r in idle:
        reference.setdefault((r["case"], r["click"]), []).append(r["latency_s"])
    return [r["latency_s"] / float(np.median(reference[(r["case"], r["click"])]))
            for r in loaded if (r["case"], r["click"]) in reference]


def measure(
    engine: BuiltinEngine,
    sequences: Sequence[ClickSequence],
    store_root: Path,
    checkpoint: Path,
    train_config: AdapterTrainConfig,
    n_rounds: int = 6,
    start_timeout_s: float = 300.0,
) -> Dict[str, Any]:
    """Idle rounds, rounds under a background training job, idle rounds again; latencies and ratios."""
    before = rounds(engine, sequences, n_rounds)
    job = start_training(store_root, checkpoint, train_config)
    try:
        status = wait_for_phase(job, "training", start_timeout_s)
        if status.get("phase") != "training":
            raise RuntimeError(f"the training job did not reach its training phase: {status}")
        step_start = int(job.status().get("step", 0))
        sched = {"autogroup_enabled": _autogroup_enabled(), "benchmark": scheduling(os.getpid()),
                 "job": scheduling(job.process.pid) if job.process is not None else None}
        t0 = time.perf_counter()

        def tag() -> str:
            s = job.status()
            return f"{s.get('state')}/{s.get('phase')}"

        loaded_all = rounds(engine, sequences, n_rounds, tag)
        window_s = time.perf_counter() - t0
        end = job.status()
        step_end = int(end.get("step", 0))
    finally:
        job.cancel()
        final = job.wait(timeout=120.0)
        if final.get("state") not in FINAL_STATES:
            job.kill()
    after = rounds(engine, sequences, n_rounds)
    loaded = [r for r in loaded_all if r["job"] == "running/training"]
    idle = before + after
    idle_s, loaded_s = _stats(idle), _stats(loaded)
    ratios = _paired_ratios(idle, loaded)
    out: Dict[str, Any] = {
        "engine_threads": torch.get_num_threads(),
        "idle": idle_s,
        "idle_before": _stats(before),
        "idle_after": _stats(after),
        "under_training": loaded_s,
        "excluded_interactions": len(loaded_all) - len(loaded),
        "job": {
            "job_id": job.job_id, "kind": train_config.kind, "threads": train_config.threads,
            "nice": train_config.nice, "steps_during_measurement": step_end - step_start,
            "steps_per_s": round((step_end - step_start) / window_s, 3) if window_s > 0 else None,
            "measurement_window_s": round(window_s, 2), "final_state": final.get("state"),
        },
        "scheduling": sched,
    }
    if idle_s.get("interactions") and loaded_s.get("interactions"):
        ratio = loaded_s["median_ms"] / idle_s["median_ms"]
        out.update(
            degradation_ratio_median=round(ratio, 3),
            degradation_ratio_p95=round(loaded_s["p95_ms"] / idle_s["p95_ms"], 3),
            degradation_ratio_paired_median=round(float(np.median(ratios)), 3) if ratios else None,
            target_ratio=TARGET_RATIO,
            target_met=ratio <= TARGET_RATIO,
        )
    out["interactions"] = [
        {**r, "latency_s": round(r["latency_s"], 5), "phase": name}
        for name, rows in (("idle_before", before), ("under_training", loaded_all), ("idle_after", after))
        for r in rows
    ]
    return out


def run_benchmark(
    cases: Sequence[LatencyCase],
    train_cases: Sequence[LatencyCase],
    checkpoint: Path,
    threads: Sequence[int],
    clicks: int = 5,
    n_rounds: int = 6,
    train_config: Optional[AdapterTrainConfig] = None,
    work: Optional[Path] = None,
    log=print,
) -> Dict[str, Any]:
    """The whole benchmark: one measurement per engine thread count, each with its own job."""
    cfg = train_config or AdapterTrainConfig(kind="salt", time_budget_s=3600.0, max_steps=10_000_000)
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    results = []
    with tempfile.TemporaryDirectory(prefix="segassist-latency-") as tmp:
        root = Path(work) if work is not None else Path(tmp)
        store_root = build_training_store(root / "store", train_cases)
        base = load_checkpoint(checkpoint)
        model_version, model_identity = str(base.meta.get("version", "")), base.identity
        engine = BuiltinEngine(base)
        for n_threads in threads:
            torch.set_num_threads(int(n_threads))
            sequences = [record_sequence(engine, case, clicks) for case in cases]
            log(f"engine threads {n_threads}: {sum(len(s.prompts) for s in sequences)} interactions per round")
            res = measure(engine, sequences, store_root, checkpoint, cfg, n_rounds)
            res["click_dice"] = {s.case: [round(d, 4) for d in s.dice] for s in sequences}
            log(f"  idle median {res['idle'].get('median_ms')} ms p95 {res['idle'].get('p95_ms')} ms; under training "
                f"median {res['under_training'].get('median_ms')} ms p95 {res['under_training'].get('p95_ms')} ms; "
                f"ratio {res.get('degradation_ratio_median')} (paired {res.get('degradation_ratio_paired_median')}); "
                f"job steps {res['job']['steps_during_measurement']}")
            results.append(res)
    return {
        "benchmark": "interactive latency while an adapter trains in the background (issue 5)",
        "target": f"median latency under training <= {TARGET_RATIO} x idle",
        "model": str(checkpoint),
        "model_version": model_version,
        "model_identity": model_identity,  # a hash of the weights: the same path may hold others later
        "cases": [c.name for c in cases],
        "training_cases": [c.name for c in train_cases],
        "clicks_per_case": clicks,
        "rounds": n_rounds,
        "train_config": asdict(cfg),
        "machine": machine_info("cpu"),
        "load_average_at_start": load_at_start,
        "results": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root_argument(p)
    p.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--threads", default=None, help="engine torch threads, comma-separated (default: torch's choice)")
    p.add_argument("--clicks", type=int, default=5, help="clicks per case (a first click and corrections)")
    p.add_argument("--rounds", type=int, default=6, help="replays of all cases per condition")
    p.add_argument("--train-kind", default="salt", choices=("lora", "salt", "full"))
    p.add_argument("--train-cases", type=int, default=8, help="hippocampus training cases in the job's datastore")
    p.add_argument("--job-threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--work", type=Path, help="keep the job's datastore here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"model not found: {args.model} (until the shipped weights exist, pass "
                         "--model runs/v1/model.pt)")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    cases = [load_case(args.data, *spec) for spec in DEFAULT_CASES]
    train_cases = training_cases(args.data, "hippocampus", 1, args.train_cases)
    cfg = AdapterTrainConfig(kind=args.train_kind, time_budget_s=3600.0, max_steps=10_000_000,
                             threads=args.job_threads, nice=args.nice)
    result = run_benchmark(cases, train_cases, args.model.resolve(), threads, args.clicks, args.rounds, cfg, args.work)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    result = {"command": shlex.join(["python", "benchmarks/latency_under_training.py", *given]), "argv": given,
              **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latency_under_training.json"
    path.write_text(json.dumps(result, indent=1))
    keys = ("engine_threads", "degradation_ratio_median", "degradation_ratio_p95", "degradation_ratio_paired_median",
            "target_met")
    brief = [{**{k: r.get(k) for k in keys}, "idle_median_ms": r["idle"].get("median_ms"),
              "training_median_ms": r["under_training"].get("median_ms")} for r in result["results"]]
    print(json.dumps(brief, indent=1))
    print("written:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
