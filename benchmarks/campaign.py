"""A simulated annotation campaign: does each case cost fewer clicks as the model learns from the annotator?

The question issue 5 asks of the human-in-the-loop machinery, answered with the machinery itself
(datastore, active learning, background trainer, registry, hot swap), not with a re-implementation:

1. A fresh datastore per mode receives the cases of one structure, in a fixed order.
2. The simulated annotator asks the active-learning API for the next case (``next_case``,
   strategy ``first``: the fixed order) and, with ``--proposal on``, for the model's proposal
   of it. It keeps the proposal as its initial mask (a ``MaskPrompt``) when the proposal is of any
   use (Dice >= ``--accept-proposal``; a person sees at a glance whether a proposal covers the
   structure and clears it otherwise), then clicks with the evaluation's protocol
   (``evaluation.simulator.next_click``: the most interior voxel of the largest error) until
   Dice >= 0.90 or ``--max-clicks`` clicks. It then submits the reference label (``--submit
   truth``, default: the annotator finishes the case by hand, as a campaign's submitted labels
   are finished labels; the clicks count the interactive part) or the session's mask as it
   stands (``--submit result``: the adapter learns only from what the tool produced, including
   the unfinished masks of cases that never reached 0.90, and validation then compares versions
   against labels the incumbent itself drew).
3. After every ``k`` submitted cases the adapter retrains in this process with
   ``learning.trainer.run_training`` for ``--train-steps`` steps (a fixed amount of learning,
   so the wall time per retraining measures the machine; ``--train-seconds`` caps it, validation
   included); the registry promotes the new version only if it beats the incumbent on held-out
   submitted cases, and ``EngineSync`` swaps a promoted version into the running engine.

Modes: ``none`` (the base model throughout), ``lora``, ``salt`` and ``full`` (full fine-tuning,
the reference). All modes see the same cases in the same order with the same annotator.

Counting: a case's cost is its number of clicks to reach Dice 0.90; a case that never gets there
costs ``--max-clicks`` (the usual NoC convention); an accepted proposal that is already good enough
costs 0. Halves: the first ``n // 2`` cases and the rest. The target of the issue: in the second
half, at least 30 % fewer clicks per case than without adaptation (``none``).

Structures (``--structure``; or any ``dataset:label[:channel]``):

- ``hippocampus``: MSD hippocampus, label 1 (anterior), 1 mm crops.
- ``left_atrium``: MSD left atrium, label 1, LGE MRI 0.625 mm.
- ``sunnybrook_myocardium``: Sunnybrook LV myocardium, label 2: the structure the base model saw
  least of. Only one phase of each of the 5 patients is labelled (5 cases in all, 4 of them in
  the base model's training split); the base model draws a real case from each of 7 datasets
  with equal chance and a target from its labels, so this structure is about 1 % of its real
  samples (1/7 dataset x 4/8 cases with it x 1/3 targets), against ~5 % for the hippocampus
  label. It is also a thin ring on 8-10 mm slices, the shape that costs a click-based tool most,
  and its true anisotropic geometry differs from ACDC's myocardium (written as 1 mm isotropic),
  the one similar structure the base model saw often. With 5 cases the default ``k`` is 2.
  (brain_structures has one scan per structure, too few for a sequence.)

Case order: the cases of the fixed evaluation split (``Resources/splits.json``, never trained on)
first, then the training split, each sorted by name; each case records whether the base model
was trained on it.

Outputs: ``<out>/campaign_<structure>[_<device>].json`` and ``.md``. A run with ``--modes``
naming a subset keeps the other modes of an existing results file made with the same cases,
settings, weights and engine settings (edge snap, refinement; a file that does not record them is
never merged), so the modes can be run in separate sessions.

Usage (from the repository root)::

    python benchmarks/campaign.py --structure hippocampus [--cases 24] [--k 4] [--train-steps 100]
        [--max-clicks 20] [--modes none,lora,salt,full] [--model runs/v1/model.pt] [--device cpu]
    python benchmarks/campaign.py --from-json benchmarks/results/campaign_*.json   # re-render the tables
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from SegAssistLib.cli import run_script
from SegAssistLib.datasets import add_data_root_argument, list_cases, split_cases
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, BuiltinEngine
from SegAssistLib.engine.network import LoadedModel, load_checkpoint
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.runner import builtin_engine_record, load_case
from SegAssistLib.evaluation.simulator import next_click
from SegAssistLib.image import Volume
from SegAssistLib.learning import Datastore
from SegAssistLib.learning.active import next_case
from SegAssistLib.learning.adapters import AdapterKind, apply_adapter
from SegAssistLib.learning.deploy import FULL, EngineSync, base_copy
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training
from SegAssistLib.machine import machine_info
from SegAssistLib.prompts import MaskPrompt
from SegAssistLib.training.data import MIN_TARGET_VOXELS

MODES = ("none", "lora", "salt", FULL)
PROPOSAL_POLICIES = ("on", "adapted", "off")
SUBMIT_POLICIES = ("result", "truth")
ANNOTATOR = "annotator"
TARGET_REDUCTION = 0.30
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StructureSpec:
    """One structure of one dataset: what the campaign annotates."""

    key: str
    dataset: str
    label: int
    channel: int = 0
    default_cases: int = 24
    default_k: int = 4
    description: str = ""


STRUCTURES: Dict[str, StructureSpec] = {
    "hippocampus": StructureSpec("hippocampus", "hippocampus", 1, description="anterior hippocampus (MSD), 1 mm"),
    "left_atrium": StructureSpec("left_atrium", "left_atrium", 1, description="left atrium (MSD), LGE MRI"),
    "sunnybrook_myocardium": StructureSpec(
        "sunnybrook_myocardium", "sunnybrook", 2, default_cases=5, default_k=2,
        description="LV myocardium (Sunnybrook), cine MRI, 8-10 mm slices: the structure the base model saw least of",
    ),
}


def parse_structure(text: str) -> StructureSpec:
    """A preset name, or ``dataset:label[:channel]`` for any other structure."""
    if text in STRUCTURES:
        return STRUCTURES[text]
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SegAssistError(
            f"unknown structure {text!r}: use one of {', '.join(STRUCTURES)} or dataset:label[:channel]"
        )
    try:
        label, channel = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise SegAssistError(f"bad structure {text!r}: label and channel are integers") from None
    return StructureSpec(f"{parts[0]}_label{label}", parts[0], label, channel)


@dataclass
class CampaignCase:
    """A case of the sequence: its image, the structure's reference mask, and its provenance."""

    name: str
    volume: Volume
    target: np.ndarray  # uint8, array order
    seen_in_base_training: bool


def campaign_cases(data_root: Path, spec: StructureSpec, count: Optional[int]) -> List[CampaignCase]:
    """The first ``count`` cases holding the structure: evaluation split first, then training split."""
    folder = Path(data_root) / spec.dataset
    if not (folder / "imagesTr").is_dir():
        raise SegAssistError(f"dataset folder {folder} not found (pass --data)")
    cases = list_cases(folder, channel=spec.channel)
    # the library's split rule: a dataset the split file does not know is all evaluation
    evaluation = {c.name for c in split_cases(cases, "evaluation")}
    ordered = sorted((c for c in cases if c.name in evaluation), key=lambda c: c.name)
    ordered += sorted((c for c in cases if c.name not in evaluation), key=lambda c: c.name)
    out: List[CampaignCase] = []
    for case in ordered:
        if count is not None and len(out) >= count:
            break
        try:
            volume, labels = load_case(case)  # the case's channel; the label checked against its grid
        except SegAssistError as exc:
            print(f"skipped {case.name}: {exc}", flush=True)
            continue
        target = (labels == spec.label).astype(np.uint8)
        if int(target.sum()) < MIN_TARGET_VOXELS:
            continue
        out.append(CampaignCase(case.name, volume, target, case.name not in evaluation))
    if len(out) < 2:
        raise SegAssistError(f"only {len(out)} case(s) of {spec.dataset} hold label {spec.label}: need at least 2")
    return out


@dataclass
class CampaignConfig:
    """Settings of a campaign; the defaults are those of the committed results."""

    modes: Tuple[str, ...] = MODES
    k: int = 4
    max_clicks: int = 20
    threshold: float = 0.90
    train_seconds: float = 600.0
    train_steps: int = 100
    proposal: str = "on"
    accept_proposal: float = 0.5
    perturbations: int = 4
    submit: str = "truth"
    device: str = "cpu"
    seed: int = 0
    learning_rates: Dict[str, float] = field(default_factory=dict)  # per mode; empty: the trainer's defaults

    def check(self) -> CampaignConfig:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode(s) {unknown} (known: {', '.join(MODES)})")
        if self.k < 1 or self.max_clicks < 1 or self.train_seconds <= 0 or self.train_steps < 1:
            raise ValueError("k, max_clicks, train_steps and train_seconds must be positive")
        if self.proposal not in PROPOSAL_POLICIES or self.submit not in SUBMIT_POLICIES:
            raise ValueError(f"proposal must be one of {PROPOSAL_POLICIES}, submit one of {SUBMIT_POLICIES}")
        bad = {m: lr for m, lr in self.learning_rates.items() if m not in MODES or m == "none" or not lr > 0}
        if bad:
            raise ValueError(f"learning rates need an adapting mode and a positive rate, got {bad}")
        return self

    def train_config(self, kind: str) -> AdapterTrainConfig:
        return AdapterTrainConfig(kind=kind, time_budget_s=self.train_seconds, max_steps=self.train_steps,
                                  learning_rate=self.learning_rates.get(kind), device=self.device, seed=self.seed)

    def comparable(self) -> Dict[str, Any]:
        """The settings two runs must share for their modes to sit in one results file."""
        out = asdict(self)
        out.pop("modes")
        if not out["learning_rates"]:  # results made before the option existed stay comparable
            out.pop("learning_rates")
        return out


# ---------------------------------------------------------------------------------------- one case


@dataclass
class Annotation:
    clicks: int
    reached: bool
    dice: List[float]  # after the initial mask (or nothing), then after each click
    latency_s: List[float]
    mask: np.ndarray
    prompt_log: Any


def annotate(
    engine: BuiltinEngine,
    volume: Volume,
    target: np.ndarray,
    max_clicks: int,
    threshold: float,
    initial: Optional[np.ndarray] = None,
) -> Annotation:
    """The simulated annotator on one case: an optional initial mask, then clicks until done."""
    session = engine.open_session(volume)
    try:
        pred = np.zeros(target.shape, np.uint8)
        if initial is not None and initial.any():
            session.add_prompt(MaskPrompt.from_array(initial)).apply_to(pred)
        dices, latencies = [dice(target, pred)], []
        while dices[-1] < threshold and len(latencies) < max_clicks:
            click = next_click(target, pred, volume.spacing)
            if click is None:
                break
            t0 = time.perf_counter()
            update = session.add_prompt(click)
            latencies.append(time.perf_counter() - t0)
            update.apply_to(pred)
            dices.append(dice(target, pred))
        log = session.prompt_log()
    finally:
        session.close()
    reached = dices[-1] >= threshold
    return Annotation(len(latencies) if reached else max_clicks, reached, dices, latencies, pred, log)


# ---------------------------------------------------------------------------------------- one mode


def trainable(base: LoadedModel, mode: str) -> Dict[str, Any]:
    """Trainable parameters of a mode with the trainer's default ranks, and their share of the total."""
    total = sum(p.numel() for p in base.network.parameters())
    if mode == "none":
        return {"trainable_parameters": 0, "trainable_share": 0.0, "base_parameters": total}
    if mode == FULL:
        return {"trainable_parameters": total, "trainable_share": 1.0, "base_parameters": total}
    adapters = apply_adapter(base_copy(base), AdapterKind.parse(mode), expected_identity=base.identity)
    return {"trainable_parameters": adapters.trainable_parameter_count(),
            "trainable_share": adapters.trainable_share(), "base_parameters": total,
            "adapter": {**adapters.config.to_dict(), "targets": len(adapters.config.targets)}}


def _retrain(store_root: Path, checkpoint: Path, cfg: CampaignConfig, mode: str, after: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    record: Dict[str, Any] = {"after_case": after, "kind": mode}
    try:
        result = run_training(store_root, checkpoint, cfg.train_config(mode))
    except TrainingError as exc:  # too few usable labels yet: the campaign goes on with the incumbent
        record.update(state="failed", reason=str(exc), wall_s=round(time.perf_counter() - t0, 3))
        return record
    version = result.version
    record.update(
        state=result.state, wall_s=round(time.perf_counter() - t0, 3), total_s=round(result.total_seconds, 3),
        train_s=round(result.train_seconds, 3), steps=result.steps, promoted=result.promoted,
        version=version.id if version is not None else None, current=result.current,
        val_dice=result.val_dice, incumbent=result.incumbent, incumbent_dice=result.incumbent_dice,
        warm_start=version.warm_start if version is not None else None,
        trainable_share=version.trainable_share if version is not None else None, reason=result.reason,
    )
    return record


def campaign_engine(base: LoadedModel, cfg: CampaignConfig) -> BuiltinEngine:
    """The annotator's engine: the builtin engine's defaults, as the trainer's validation uses."""
    return BuiltinEngine(base, device=cfg.device)


def run_mode(
    mode: str,
    cases: Sequence[CampaignCase],
    checkpoint: Path,
    cfg: CampaignConfig,
    work: Path,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """The whole sequence in one mode, on a fresh datastore under ``work``."""
    t_mode = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    store_root = work / f"store_{mode}"
    if store_root.exists():
        shutil.rmtree(store_root)
    store = Datastore(store_root)
    by_name = {}
    for case in cases:
        by_name[case.name] = case
        store.import_volume(case.volume, name=case.name, user=ANNOTATOR)
    base = load_checkpoint(checkpoint, cfg.device)
    engine = campaign_engine(base, cfg)
    registry = AdapterRegistry(store_root)
    sync = EngineSync(registry)
    rows: List[Dict[str, Any]] = []
    retrains: List[Dict[str, Any]] = []
    try:
        for index in range(len(cases)):
            sync.refresh(engine)
            adapted = registry.current() is not None
            use_proposal = cfg.proposal == "on" or (cfg.proposal == "adapted" and adapted)
            t_case = time.perf_counter()
            chosen = next_case(store, engine if use_proposal else None, "first", user=ANNOTATOR, lock=True,
                               with_proposal=use_proposal, n_perturbations=cfg.perturbations)
            case = by_name[chosen.case.name]
            proposal_dice, initial = None, None
            if chosen.proposal is not None:
                proposal_dice = dice(case.target, chosen.proposal.mask)
                if proposal_dice >= cfg.accept_proposal and chosen.proposal.mask.any():
                    initial = chosen.proposal.mask
            result = annotate(engine, case.volume, case.target, cfg.max_clicks, cfg.threshold, initial)
            seconds = time.perf_counter() - t_case
            label = case.target if cfg.submit == "truth" else result.mask
            current = registry.current()
            store.save_label(chosen.case.id, label, user=ANNOTATOR, prompt_log=result.prompt_log,
                             model=engine.version, adapter_version=current.id if current is not None else None,
                             n_interactions=result.clicks, seconds_spent=seconds)
            rows.append({
                "index": index + 1, "case": case.name, "seen_in_base_training": case.seen_in_base_training,
                "clicks": result.clicks, "reached": result.reached, "final_dice": round(result.dice[-1], 4),
                "dice": [round(d, 4) for d in result.dice], "proposal_dice": _round(proposal_dice),
                "proposal_used": initial is not None, "engine_version": engine.version,
                "adapter_version": current.id if current is not None else None,
                "median_click_latency_s": _round(float(np.median(result.latency_s)) if result.latency_s else None),
                "seconds": round(seconds, 3),
            })
            log(f"  [{mode}] case {index + 1}/{len(cases)} {case.name}: {result.clicks} clicks, Dice "
                f"{result.dice[-1]:.3f}, proposal {'-' if proposal_dice is None else f'{proposal_dice:.2f}'}"
                f"{' (used)' if initial is not None else ''}, {engine.version}, {seconds:.1f} s")
            done = index + 1
            if mode != "none" and done % cfg.k == 0 and done < len(cases):
                retrains.append(_retrain(store_root, checkpoint, cfg, mode, done))
                r = retrains[-1]
                verdict = f"promoted {r.get('version')}" if r.get("promoted") else "not promoted"
                log(f"  [{mode}] retrained after {done} cases: {r['state']}, {r.get('steps', 0)} steps, "
                    f"{r['wall_s']:.1f} s, {verdict} ({r.get('reason', '')})")
    finally:
        store.close()
    out = {"mode": mode, "device": cfg.device, "cases": rows, "retrains": retrains,
           "wall_s": round(time.perf_counter() - t_mode, 1), "machine": machine_info(cfg.device),
           "load_average_at_start": load_at_start}
    out.update(trainable(base, mode))
    return out


def _round(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(float(x), digits)


# ---------------------------------------------------------------------------------------- summary


SECONDARY_THRESHOLD = 0.85


def _dice_after(curve: Sequence[float], clicks: int) -> float:
    """Dice after ``clicks`` clicks (a case that stopped earlier keeps its last value)."""
    return float(curve[min(clicks, len(curve) - 1)])


def _clicks_to(curve: Sequence[float], threshold: float, max_clicks: int) -> int:
    """Clicks until Dice >= threshold (0: the kept proposal already was), ``max_clicks`` if never."""
    hits = [i for i, d in enumerate(curve) if d >= threshold]
    return hits[0] if hits else max_clicks


def secondary(cases: Sequence[Dict[str, Any]], max_clicks: int) -> Dict[str, Any]:
    """Second-half means that show what adaptation changed even where the 0.90 target is out of reach."""
    rows = cases[len(cases) // 2:]
    return {
        "proposal_dice": _round(float(np.mean([r.get("proposal_dice") or 0.0 for r in rows])), 3),
        "dice_after_5_clicks": _round(float(np.mean([_dice_after(r["dice"], 5) for r in rows])), 3),
        "final_dice": _round(float(np.mean([r["final_dice"] for r in rows])), 3),
        "clicks_to_085": _round(float(np.mean([_clicks_to(r["dice"], SECONDARY_THRESHOLD, max_clicks)
                                               for r in rows])), 2),
    }


def summarise(modes: Dict[str, Dict[str, Any]], max_clicks: int = 20) -> Dict[str, Any]:
    """Clicks per half per mode, the reduction against ``none`` and the retraining times."""
    out: Dict[str, Any] = {}
    none_second = None
    if "none" in modes:
        clicks = [r["clicks"] for r in modes["none"]["cases"]]
        none_second = float(np.mean(clicks[len(clicks) // 2:]))
    for mode, res in modes.items():
        clicks = [r["clicks"] for r in res["cases"]]
        half = len(clicks) // 2
        first, second = float(np.mean(clicks[:half])), float(np.mean(clicks[half:]))
        walls = [r["wall_s"] for r in res["retrains"] if r.get("state") != "failed"]
        per_step = [r["train_s"] / r["steps"] for r in res["retrains"] if r.get("steps")]
        row: Dict[str, Any] = {
            "clicks_per_case": clicks,
            "mean_clicks": round(float(np.mean(clicks)), 3),
            "mean_clicks_first_half": round(first, 3),
            "mean_clicks_second_half": round(second, 3),
            "reduction_within_mode": _round(1.0 - second / first if first > 0 else None, 3),
            "trainable_parameters": res.get("trainable_parameters"),
            "trainable_share": _round(res.get("trainable_share"), 6),
            "retrains": len(res["retrains"]),
            "promotions": sum(1 for r in res["retrains"] if r.get("promoted")),
            "retrain_wall_s_median": _round(float(np.median(walls)) if walls else None, 1),
            "retrain_wall_s_max": _round(max(walls) if walls else None, 1),
            "retrain_steps": [r.get("steps", 0) for r in res["retrains"]],
            "train_s_per_step_median": _round(float(np.median(per_step)) if per_step else None, 3),
            "device": res.get("device"),
            "second_half": secondary(res["cases"], max_clicks),
        }
        if none_second is not None and mode != "none":
            reduction = 1.0 - second / none_second if none_second > 0 else None
            row["reduction_vs_none_second_half"] = _round(reduction, 3)
            row["target_met"] = reduction is not None and reduction >= TARGET_REDUCTION
        out[mode] = row
    return out


def _change_in_words(reduction: Optional[float]) -> str:
    """A second half's clicks against ``none``: "31 % fewer", "4 % more", "same"."""
    if reduction is None:
        return "-"
    percent = round(100 * reduction)
    return "same" if percent == 0 else f"{abs(percent)} % {'fewer' if percent > 0 else 'more'}"


def describe_engine(options: Optional[Dict[str, Any]]) -> str:
    """The engine settings of a result in words (results made before they were recorded say so)."""
    if not options:
        return "settings not recorded"
    snap = options.get("edge_snap")
    snap_text = f"edge snap band {snap['band']:g}, beta {snap['beta']:g}" if snap else "edge snap off"
    return (f"refine depth {options.get('refine_depth')}, correction zoom share "
            f"{options.get('correction_zoom_share')}, {snap_text}")


def render_markdown(result: Dict[str, Any]) -> str:
    s, cfg = result["summary"], result["config"]
    lines = [
        f"# Simulated annotation campaign: {result['structure']['key']}",
        "",
        f"{result['structure']['description'] or result['structure']['dataset']}; {len(result['cases'])} cases in a "
        f"fixed order (evaluation split first), retraining after every {cfg['k']} submitted cases "
        f"({cfg['train_steps']} steps, budget {cfg['train_seconds']:.0f} s), Dice target {cfg['threshold']}, "
        f"at most {cfg['max_clicks']} clicks, proposal {cfg['proposal']} (kept at Dice >= {cfg['accept_proposal']}), "
        f"submitted label: {cfg['submit']}. Model `{result['model']}` (version "
        f"{result.get('model_version') or 'not recorded'}, weights {result.get('model_identity') or 'not recorded'}); "
        f"engine: {describe_engine(result.get('engine_options'))}; device {cfg['device']}"
        + (f"; learning rates {cfg['learning_rates']}" if cfg.get("learning_rates") else "")
        + ".",
        "",
        "| mode | trainable share | mean clicks, 1st half | 2nd half | 2nd half vs none | target (>= 30 %) "
        "| promoted / retrains | wall s per retraining (median, max) | s per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in s.items():
        red = row.get("reduction_vs_none_second_half")
        lines.append(
            f"| {mode} | {100 * row['trainable_share']:.2f} % | {row['mean_clicks_first_half']:.2f} | "
            f"{row['mean_clicks_second_half']:.2f} | {_change_in_words(red)} | "
            f"{'-' if 'target_met' not in row else ('met' if row['target_met'] else 'not met')} | "
            f"{row['promotions']} / {row['retrains']} | "
            f"{'-' if row['retrain_wall_s_median'] is None else row['retrain_wall_s_median']}, "
            f"{'-' if row['retrain_wall_s_max'] is None else row['retrain_wall_s_max']} | "
            f"{'-' if row['train_s_per_step_median'] is None else row['train_s_per_step_median']} |"
        )
    lines += [
        "",
        f"Second half, means per case (what adaptation changed, also where Dice {cfg['threshold']} stays out of "
        f"reach): Dice of the model's proposal, Dice after 5 clicks, final Dice, clicks to Dice {SECONDARY_THRESHOLD} "
        f"({cfg['max_clicks']} when never).",
        "",
        "| mode | proposal Dice | Dice after 5 clicks | final Dice | clicks to 0.85 |",
        "|---|---|---|---|---|",
    ]
    for mode, row in s.items():
        sec = row.get("second_half") or secondary(result["modes"][mode]["cases"], cfg["max_clicks"])
        lines.append(f"| {mode} | {sec['proposal_dice']:.3f} | {sec['dice_after_5_clicks']:.3f} | "
                     f"{sec['final_dice']:.3f} | {sec['clicks_to_085']:.2f} |")
    lines += ["", "Clicks per case over the sequence:", ""]
    for mode, row in s.items():
        lines.append(f"- {mode}: {' '.join(str(c) for c in row['clicks_per_case'])}")
    lines += ["", "Cases (* = in the base model's training split): "
              + ", ".join(c["name"] + ("*" if c["seen_in_base_training"] else "") for c in result["cases"]), ""]
    machine = next(iter(result["modes"].values()))["machine"]
    lines.append(f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} cores, torch threads "
                 f"{machine.get('torch_threads')}{', GPU ' + machine['gpu'] if machine.get('gpu') else ''}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- the run


def run_campaign(
    spec: StructureSpec,
    cases: Sequence[CampaignCase],
    checkpoint: Path,
    cfg: CampaignConfig,
    work: Optional[Path] = None,
    previous: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Every mode of ``cfg`` over ``cases``; ``previous``: an earlier result whose other modes are kept
    when it was made with the same cases, model and settings."""
    cfg.check()
    case_list = [{"name": c.name, "seen_in_base_training": c.seen_in_base_training,
                  "target_voxels": int(c.target.sum())} for c in cases]
    base = load_checkpoint(checkpoint)
    model_version, model_identity = str(base.meta.get("version", "")), base.identity
    engine_options = builtin_engine_record(campaign_engine(base, cfg))
    del base
    modes: Dict[str, Dict[str, Any]] = {}
    # same weights, not the same path: new weights shipped under the old name must not mix with old modes
    if previous and previous.get("cases") == case_list and previous.get("comparable") == cfg.comparable() \
            and previous.get("model_identity") == model_identity and previous.get("engine_options") == engine_options:
        modes = {m: r for m, r in previous.get("modes", {}).items() if m not in cfg.modes}
    with tempfile.TemporaryDirectory(prefix="segassist-campaign-") as tmp:
        root = Path(work) if work is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for mode in cfg.modes:
            log(f"{spec.key}: mode {mode}")
            modes[mode] = run_mode(mode, cases, checkpoint, cfg, root, log)
    ordered = {m: modes[m] for m in MODES if m in modes}
    return {
        "benchmark": "simulated annotation campaign (issue 5)",
        "structure": asdict(spec),
        "model": str(checkpoint),
        "model_version": model_version,
        "model_identity": model_identity,
        "engine_options": engine_options,
        "config": asdict(cfg),
        "comparable": cfg.comparable(),
        "target": f"second half: >= {100 * TARGET_REDUCTION:.0f} % fewer clicks per case than mode none",
        "cases": case_list,
        "summary": summarise(ordered, cfg.max_clicks),
        "modes": ordered,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def results_paths(out: Path, spec: StructureSpec, device: str) -> Tuple[Path, Path]:
    suffix = "" if device == "cpu" else "_" + device.split(":")[0]
    stem = f"campaign_{spec.key}{suffix}"
    return out / f"{stem}.json", out / f"{stem}.md"


def write_results(result: Dict[str, Any], out: Path, spec: StructureSpec, device: str) -> Tuple[Path, Path]:
    json_path, md_path = results_paths(out, spec, device)
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def parse_learning_rates(items: Sequence[str]) -> Dict[str, float]:
    """``["salt=1e-2", ...]`` -> ``{"salt": 0.01}``."""
    out = {}
    for item in items:
        mode, _, value = item.partition("=")  # no "=": value "" fails float() below
        try:
            out[mode.strip()] = float(value)
        except ValueError:
            raise SegAssistError(f"--learning-rate wants MODE=LR (for example salt=1e-2), got {item!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structure", default="hippocampus",
                   help=f"{', '.join(STRUCTURES)}, or dataset:label[:channel] (default hippocampus)")
    add_data_root_argument(p)
    p.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--cases", type=int, help="number of cases (default: the structure's, 24 or 5)")
    p.add_argument("--k", type=int, help="retrain after every k submitted cases (default 4; 2 for the myocardium)")
    p.add_argument("--train-steps", type=int, default=100, help="training steps per retraining")
    p.add_argument("--train-seconds", type=float, default=600.0,
                   help="time budget of one retraining, validation included (a cap: the steps decide)")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.90)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,lora,salt,full")
    p.add_argument("--proposal", choices=PROPOSAL_POLICIES, default="on",
                   help="start from the active-learning proposal: on (every mode), adapted (only with an adapter), off")
    p.add_argument("--accept-proposal", type=float, default=0.5, help="keep a proposal with at least this Dice")
    p.add_argument("--submit", choices=SUBMIT_POLICIES, default="truth",
                   help="the label submitted: the reference (truth) or the session's mask (result)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: inference and training")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-rate", action="append", default=[], metavar="MODE=LR",
                   help="learning rate of one mode's retraining (repeatable; default: the trainer's, "
                        "1e-2 for lora and salt, 3e-4 for full)")
    p.add_argument("--work", type=Path, help="keep the per-mode datastores here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="RESULTS",
                   help="only re-render the .md beside each of these results files (no campaign is run)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        for json_path in args.from_json:
            md_path = json_path.with_suffix(".md")
            md_path.write_text(render_markdown(json.loads(json_path.read_text())))
            print("written:", md_path)
        return 0
    if not args.model.is_file():
        raise SegAssistError(f"model not found: {args.model} (until the shipped weights exist, pass "
                         "--model runs/v1/model.pt)")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = parse_structure(args.structure)
    cfg = CampaignConfig(
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), k=args.k or spec.default_k,
        max_clicks=args.max_clicks, threshold=args.threshold, train_seconds=args.train_seconds,
        train_steps=args.train_steps, proposal=args.proposal, accept_proposal=args.accept_proposal,
        submit=args.submit, device=args.device, seed=args.seed,
        learning_rates=parse_learning_rates(args.learning_rate),
    )
    try:
        cfg.check()
    except ValueError as exc:
        raise SegAssistError(str(exc)) from None
    cases = campaign_cases(args.data, spec, args.cases or spec.default_cases)
    json_path, _ = results_paths(args.out, spec, args.device)
    previous = json.loads(json_path.read_text()) if json_path.is_file() else None
    result = run_campaign(spec, cases, args.model.resolve(), cfg, args.work, previous)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = shlex.join(["python", "benchmarks/campaign.py", *given])
    result["command"], result["argv"] = command, given  # this run's; each mode keeps the run that made it
    for mode in cfg.modes:
        result["modes"][mode]["command"] = command
    paths = write_results(result, args.out, spec, args.device)
    print(render_markdown(result))
    print("written:", ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "campaign.py"))
