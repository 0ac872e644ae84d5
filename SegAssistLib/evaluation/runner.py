"""The evaluation harness: a simulated user segments every case of a dataset with one engine.

For each case and target (a label, or a union such as ``1+2+3+4``) the harness opens a session,
sends the protocol's first prompt (nothing, the target's box, or a scribble on a slice through the
object, see :mod:`SegAssistLib.evaluation.scribbles`) and then corrective clicks from
:mod:`SegAssistLib.evaluation.simulator`, recording the Dice and HD95 after every interaction, the
engine's wall-clock latency per interaction (the simulator and the metrics are not timed) and the
peak memory.

Counting: ``max_clicks`` is the number of clicks. With ``box+clicks`` and ``scribble+clicks`` the
box or scribble is one more interaction, the first, so every record has ``max_clicks`` (clicks) or
``max_clicks + 1`` interactions; NoC counts interactions, the box or scribble included. When the
prediction is already perfect the user stops; the remaining Dice values repeat the last one.

Memory: the resident set size of this process is sampled every 5 ms by a background thread
reading ``/proc/self/statm`` while the engine opens each session and answers its prompts
(``peak_rss_mb``, includes the loaded image and the engine; the simulated user and the metrics in
between are not sampled); where torch runs on CUDA, ``torch.cuda.max_memory_allocated`` is
reported as well.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.datasets import Case, dataset_targets, list_cases, split_cases
from SegAssistLib.engine.base import Engine
from SegAssistLib.errors import ImageError, PromptError, SegAssistError
from SegAssistLib.evaluation import metrics, simulator
from SegAssistLib.evaluation.scribbles import ScribbleSpec
from SegAssistLib.files import atomic_write_bytes
from SegAssistLib.image import Volume, geometry_difference
from SegAssistLib.io import load_mask, load_volume, read_geometry
from SegAssistLib.prompt_mirror import reversed_back
from SegAssistLib.prompts import Prompt, dumps_prompt

PROTOCOLS = ("clicks", "box+clicks", "scribble+clicks")
ENGINES = ("builtin", "growcut", "randomwalker", "growcut-inside", "randomwalker-inside", "ablation")
SPLITS = ("evaluation", "training", "all")
NOC_THRESHOLDS = (0.80, 0.85, 0.90)
MEMORY_CONVENTION = (
    "peak resident set size of the process while the engine opens the session and answers prompts, sampled "
    "every 5 ms from /proc/self/statm (the simulated user and the metrics between interactions are not sampled)"
)
# where there is no /proc (macOS, Windows) only the process's lifetime peak can be read: it never
# falls from one record to the next
LIFETIME_MEMORY_CONVENTION = (
    "peak resident set size of the process since it started (getrusage ru_maxrss; no /proc/self/statm on this "
    "system), so a record's figure includes every earlier record's peak"
)
UNMEASURED_MEMORY_CONVENTION = "not measured: this system has neither /proc/self/statm nor getrusage"


def memory_convention() -> str:
    """How this system's ``peak_rss_mb`` figures were measured (written into the results)."""
    if os.path.exists("/proc/self/statm"):
        return MEMORY_CONVENTION
    try:
        import resource  # noqa: F401  (Unix only)
    except ImportError:
        return UNMEASURED_MEMORY_CONVENTION
    return LIFETIME_MEMORY_CONVENTION
Target = Tuple[int, ...]


# --- targets -----------------------------------------------------------------------------------
def parse_targets(text: str) -> List[Target]:
    """``"1,2,1+2+3+4"`` -> ``[(1,), (2,), (1, 2, 3, 4)]``."""
    targets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids = tuple(sorted({int(x) for x in part.split("+")}))
        except ValueError:
            raise SegAssistError(f"bad target {part!r}: use label ids such as 1 or 1+2+3+4") from None
        if any(i <= 0 for i in ids):
            raise SegAssistError(f"bad target {part!r}: label ids are positive (0 is background)")
        if ids not in targets:  # "2,2" is one target, not the same one counted twice
            targets.append(ids)
    if not targets:
        raise SegAssistError(f"no targets in {text!r}")
    return targets


def target_name(target: Target) -> str:
    return "+".join(str(i) for i in target)


def default_targets(dataset_dir: Path) -> List[Target]:
    """Every named, non-background label of ``dataset.json`` (MSD's or nnU-Net v2's layout), and each
    nnU-Net region as the union of its labels (see :func:`~SegAssistLib.datasets.dataset_targets`)."""
    return list(dataset_targets(dataset_dir))


def check_targets(dataset_dir: Union[str, Path], targets: Sequence[Target]) -> None:
    """Refuse, before any engine loads, a target label that the folder's ``dataset.json`` does not name
    (a typo once gave empty results, or with another label dropped it case by case); a label named only
    inside an nnU-Net region is known. Nothing is checked where ``dataset.json`` is missing or names no
    numeric labels at its top level (per-case labels)."""
    try:
        named = dataset_targets(Path(dataset_dir))
    except SegAssistError:
        return
    unknown = sorted({i for target in targets for i in target} - {i for ids in named for i in ids})
    if unknown:
        labels = ", ".join(f"{target_name(ids)} ({name})" for ids, name in named.items())
        raise SegAssistError(f"--labels: label{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} "
                             f"not in {Path(dataset_dir) / 'dataset.json'}, which has {labels}")


# --- engines -----------------------------------------------------------------------------------
def builtin_options(correction_zoom_share: Optional[float] = None, edge_band: Optional[float] = None) -> Dict:
    """Keyword options of the builtin engine for the command lines' ``--correction-zoom-share`` and
    ``--edge-band`` (None: the engine's default; an edge band of 0 turns the snap off)."""
    from SegAssistLib.engine.edges import EdgeSnap

    options: Dict = {}
    if correction_zoom_share is not None:
        options["correction_zoom_share"] = correction_zoom_share
    if edge_band is not None:
        options["edge_snap"] = EdgeSnap.from_band(edge_band)
    return options


def edge_snap_record(engine: Engine) -> Optional[Dict]:
    """The builtin engine's edge snap settings for a report (None: off, or another engine)."""
    snap = getattr(engine, "edge_snap", None)
    return asdict(snap) if snap is not None else None


def builtin_engine_record(engine: Engine) -> Dict:
    """The builtin engine's answer-shaping settings for a report: results made with other settings
    are not comparable even with the same weights."""
    return {"refine_depth": getattr(engine, "refine_depth", None),
            "correction_zoom_share": getattr(engine, "correction_zoom_share", None),
            "edge_snap": edge_snap_record(engine)}


def make_engine(
    name: str,
    model: Optional[str] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    refine_depth: int = 1,
    correction_zoom_share: Optional[float] = None,
    edge_band: Optional[float] = None,
) -> Engine:
    """``builtin`` (the shipped model or ``model``), ``ablation`` (the same model without prompt
    history, see :mod:`SegAssistLib.evaluation.ablation`), ``growcut``, ``randomwalker`` or their
    ``-inside`` variants (no background seeded on the image edge).
    ``refine_depth`` and ``correction_zoom_share`` (None: the engine's default) as for
    :class:`~SegAssistLib.engine.builtin.BuiltinEngine`; ``edge_band``: the band of its edge snap
    (None: the default, 0: no snap)."""
    if name in ("builtin", "ablation"):
        from SegAssistLib.engine.builtin import load_default_engine

        options = builtin_options(correction_zoom_share, edge_band)
        builtin = load_default_engine(checkpoint=model, device=device, threads=threads, refine_depth=refine_depth,
                                      **options)
        if name == "builtin":
            return builtin
        from SegAssistLib.evaluation.ablation import NoHistoryEngine

        return NoHistoryEngine(builtin)
    if model is not None:
        raise SegAssistError(f"--model applies to the builtin and ablation engines only, not {name}")
    from SegAssistLib.evaluation.baselines import BASELINES

    if name not in BASELINES:
        raise SegAssistError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    return BASELINES[name]()


# --- memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Samples this process's resident set size in a background thread (context manager).

    With ``engine_only``, only the spans inside :meth:`engine_call` are sampled: the simulated
    user and the metrics that run between interactions allocate too (a distance transform of the
    error, surface distances), and their peak is not the engine's.
    """

    def __init__(self, interval_s: float = 0.005, engine_only: bool = False):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._active = threading.Event()
        self.engine_only = engine_only
        if not engine_only:
            self._active.set()
        self._thread: Optional[threading.Thread] = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @contextmanager
    def engine_call(self) -> Iterator[None]:
        """Sample while the block runs (and once at its start and end)."""
        self.peak_bytes = max(self.peak_bytes, self._rss())
        self._active.set()
        try:
            yield
        finally:
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._active.clear()

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process-lifetime peak is the best available
            try:
                import resource
            except ImportError:  # Windows: see memory_convention()
                return 0
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._active.wait(self.interval_s) and not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, self._rss())
                self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.start_bytes = self.peak_bytes = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._active.set()  # wake the sampler so that it sees the stop
        if self._thread is not None:
            self._thread.join()
        if not self.engine_only:
            self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def _cuda_peak_mb_reset() -> Optional[Callable[[], float]]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    torch.cuda.reset_peak_memory_stats()
    return lambda: torch.cuda.max_memory_allocated() / 2**20


# --- one case ----------------------------------------------------------------------------------
def initial_prompt(
    protocol: str, target: np.ndarray, spacing: Sequence[float], scribble: Optional[ScribbleSpec] = None
) -> Optional[Prompt]:
    if protocol == "clicks":
        return None
    if protocol == "box+clicks":
        return simulator.box_prompt(target)
    if protocol == "scribble+clicks":
        spec = scribble or ScribbleSpec()
        return simulator.scribble_prompt(
            target, spacing, orientation=spec.orientation, source=spec.source, jitter_mm=spec.jitter_mm, seed=spec.seed
        )
    raise SegAssistError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")


def run_session(
    engine: Engine,
    volume,
    target: np.ndarray,
    protocol: str = "clicks",
    max_clicks: int = 10,
    scribble: Optional[ScribbleSpec] = None,
    hd95_each: bool = False,
    memory: Optional[PeakMemory] = None,
) -> Dict:
    """Drive one session; returns the prompts and the Dice, latency (and, with ``hd95_each``, HD95
    in mm after every interaction; ``inf`` when one mask is empty) lists and the final mask.
    ``memory``: sampled while the engine works (see :class:`PeakMemory`)."""
    spacing = volume.spacing

    def engine_call():
        return memory.engine_call() if memory is not None else nullcontext()

    with engine_call():
        session = engine.open_session(volume)
    prompts: List[Prompt] = []
    dices: List[float] = []
    hds: List[float] = []
    latencies: List[float] = []
    try:
        first = initial_prompt(protocol, target, spacing, scribble)
        planned = max_clicks + (first is not None)
        pred = np.zeros(target.shape, np.uint8)
        while len(dices) < planned:
            if first is not None and not prompts:
                prompt: Optional[Prompt] = first
            else:
                prompt = simulator.next_click(target, pred, spacing)
            if prompt is None:  # perfect: the user stops
                dices.extend([dices[-1] if dices else 1.0] * (planned - len(dices)))
                if hd95_each:
                    hds.extend([hds[-1] if hds else 0.0] * (planned - len(hds)))
                break
            with engine_call():
                start = time.perf_counter()
                update = session.add_prompt(prompt)
                latencies.append(time.perf_counter() - start)
            update.apply_to(pred)
            prompts.append(prompt)
            dices.append(metrics.dice(target, pred))
            if hd95_each:
                hds.append(metrics.hd95(target, pred, spacing))
        final = session.result()
    finally:
        session.close()
    out = {"prompts": prompts, "dice": dices, "latency_s": latencies, "final": final}
    if hd95_each:
        out["hd95_mm"] = hds
    return out


def _finite_or_none(value: float) -> Optional[float]:
    return None if not math.isfinite(value) else float(value)


def evaluate_target(
    engine: Engine,
    volume,
    mask: np.ndarray,
    case_name: str,
    target: str,
    protocol: str,
    max_clicks: int,
    scribble: Optional[ScribbleSpec] = None,
) -> Dict:
    """The record of one session on one target (``mask``: uint8, the image's grid, not empty).

    Raises :class:`PromptError` when the engine rejects a prompt of the protocol.
    """
    cuda_peak = _cuda_peak_mb_reset()
    with PeakMemory(engine_only=True) as memory:
        out = run_session(engine, volume, mask, protocol, max_clicks, scribble, hd95_each=True, memory=memory)
    dices = out["dice"]
    allowed = len(dices)
    noc, reached = {}, {}
    for t in NOC_THRESHOLDS:
        key = f"{round(t * 100)}"
        noc[key], reached[key] = metrics.number_of_clicks(dices, t, allowed)
    clicks = dices[1:] if protocol != "clicks" else dices  # the challenge's AUC is over the clicks
    record = {
        "case": case_name,
        "target": target,
        "protocol": protocol,
        "interactions": [p.kind for p in out["prompts"]],
        "prompts": [json.loads(dumps_prompt(p)) for p in out["prompts"]],
        "dice": [round(d, 6) for d in dices],
        "hd95_mm": [_finite_or_none(round(h, 4)) for h in out["hd95_mm"]],
        "latency_s": [round(x, 6) for x in out["latency_s"]],
        "noc": noc,
        "reached": reached,
        "dice_auc": round(metrics.dice_auc(clicks), 6),
        "dice_auc_norm": round(metrics.normalised_dice_auc(clicks), 6),
        "final_dice": round(dices[-1], 6),
        "final_hd95_mm": _finite_or_none(metrics.hd95(mask, out["final"], volume.spacing)),
        "peak_rss_mb": round(memory.peak_mb, 1),
        "rss_before_mb": round(memory.start_bytes / 2**20, 1),
        "target_voxels": int(mask.sum()),
        "image_shape_ijk": list(volume.shape_ijk),
        "spacing": list(volume.spacing),
    }
    if protocol == "scribble+clicks":
        record["scribble"] = (scribble or ScribbleSpec()).to_dict()
    if cuda_peak is not None:
        record["peak_cuda_mb"] = round(cuda_peak(), 1)
    return record


def warm_up(engines: Sequence[Engine], volume: Volume, masks: Sequence[np.ndarray]) -> bool:
    """One untimed click per engine on the first non-empty mask, so that no record's first
    interaction pays for lazy initialisation (loading weights, first-call allocations). False when
    every mask is empty and nothing was clicked: the caller warms up on another case."""
    mask = next((m for m in masks if m.any()), None)
    if mask is None:
        return False
    click = simulator.first_click(mask, volume.spacing)
    for engine in engines:
        session = engine.open_session(volume)
        try:
            session.add_prompt(click)
        finally:
            session.close()
    return True


def label_grid_problem(label: Union[str, Path], labels: np.ndarray, volume: Volume) -> Optional[str]:
    """Why the label map ``labels`` read from the file ``label`` is not on ``volume``'s grid (None:
    it is). A same-shaped label elsewhere, a flipped axis, would make every Dice wrong; nothing is
    resampled or reoriented. Strict: a label that holds the image's voxels in reverse order along
    some axes is a problem here too; :func:`label_on_image_grid` takes it, reversed back."""
    if labels.shape != volume.array.shape:
        return f"label grid {labels.shape} differs from image grid {volume.array.shape}"
    moved = geometry_difference(read_geometry(label), volume)
    if moved:
        return f"the label is not on the image's grid: its {moved}"
    return None


def label_on_image_grid(
    label: Union[str, Path], labels: np.ndarray, volume: Volume
) -> Tuple[np.ndarray, Optional[str]]:
    """The label map ``labels`` read from the file ``label`` on ``volume``'s grid, and why it cannot be
    (None: it is). A label stored with some axes in reverse order, every voxel at the same place in
    space (a DICOM series and a NIfTI label written from it with j reversed: direction diag(1, -1, 1),
    origin at the other end), is reversed back along those axes; any other grid is refused with
    :func:`label_grid_problem`'s reason, and the array is returned as read."""
    problem = label_grid_problem(label, labels, volume)
    if problem is None or labels.shape != volume.array.shape:
        return labels, problem
    back = reversed_back(labels, read_geometry(label), volume)  # read again only for a label off the grid
    return (labels, problem) if back is None else (back, None)


def load_case(case: Case) -> Tuple[Volume, np.ndarray]:
    """A case's image and label map on the image's grid (reversed along an axis the label file stores
    in reverse order, see :func:`label_on_image_grid`); SegAssistError when the label is on another grid."""
    volume = load_volume(case.image, channel=case.channel)
    labels, problem = label_on_image_grid(case.label, load_mask(case.label), volume)
    if problem:
        raise SegAssistError(f"{case.name}: {problem}")
    return volume, labels


def evaluate_case(
    engine: Engine,
    case: Case,
    targets: Sequence[Target],
    protocol: str,
    max_clicks: int,
    scribble: Optional[ScribbleSpec] = None,
) -> Tuple[List[Dict], List[Dict]]:
    """Records and skips of one case (a case that cannot be read, or whose image the engine
    rejects, is skipped with the reason: one bad file must not lose the rest of a long run)."""
    records, skipped = [], []
    try:
        volume, labels = load_case(case)
    except SegAssistError as exc:
        return records, [{"case": case.name, "target": target_name(t), "reason": f"case not read: {exc}"}
                         for t in targets]
    rejected: Optional[str] = None  # the engine refused the image: every other target would be refused too
    for target in targets:
        name = target_name(target)
        mask = np.isin(labels, target).astype(np.uint8)
        if not mask.any():
            skipped.append({"case": case.name, "target": name, "reason": "target label absent"})
            continue
        if rejected is not None:
            skipped.append({"case": case.name, "target": name, "reason": rejected})
            continue
        try:
            records.append(evaluate_target(engine, volume, mask, case.name, name, protocol, max_clicks, scribble))
        except PromptError as exc:
            skipped.append({"case": case.name, "target": name, "reason": f"prompt rejected: {exc}"})
        except ImageError as exc:  # a constant, single-slice or too big image: refused when the session opens
            rejected = f"image rejected: {exc}"
            skipped.append({"case": case.name, "target": name, "reason": rejected})
    return records, skipped


# --- summary -----------------------------------------------------------------------------------
def summarise(records: Sequence[Dict]) -> Dict:
    if not records:
        return {"records": 0}
    n = max(len(r["dice"]) for r in records)
    # carry the last value forward so records of different lengths average per interaction
    dice = np.asarray([r["dice"] + [r["dice"][-1]] * (n - len(r["dice"])) for r in records])
    latencies = np.concatenate([np.asarray(r["latency_s"], float) for r in records])
    hd = [r["final_hd95_mm"] for r in records if r["final_hd95_mm"] is not None]  # None: one mask empty
    out = {
        "records": len(records),
        "mean_dice": [round(float(x), 4) for x in dice.mean(0)],
        "mean_noc": {k: round(float(np.mean([r["noc"][k] for r in records])), 3) for k in records[0]["noc"]},
        "fraction_reached": {
            k: round(float(np.mean([r["reached"][k] for r in records])), 3) for k in records[0]["reached"]
        },
        "median_latency_s": round(float(np.median(latencies)), 4) if latencies.size else None,
        "p95_latency_s": round(float(np.percentile(latencies, 95)), 4) if latencies.size else None,
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "mean_final_hd95_mm": round(float(np.mean(hd)), 3) if hd else None,
        "final_hd95_undefined": len(records) - len(hd),  # sessions that ended with an empty mask
        "mean_dice_auc": round(float(np.mean([r["dice_auc"] for r in records])), 4),
    }
    cuda = [r["peak_cuda_mb"] for r in records if "peak_cuda_mb" in r]
    if cuda:
        out["max_peak_cuda_mb"] = max(cuda)
    return out


# --- the whole run -----------------------------------------------------------------------------
@dataclass
class EvalConfig:
    dataset_dir: Union[str, Path]
    targets: Optional[List[Target]] = None
    protocol: str = "clicks"
    max_clicks: int = 10
    cases: Optional[int] = None
    split: str = "evaluation"
    engine: str = "growcut"
    model: Optional[str] = None
    device: str = "cpu"
    refine_depth: int = 1  # builtin engine: see BuiltinEngine
    correction_zoom_share: Optional[float] = None  # builtin engine: None = BuiltinEngine's default
    edge_band: Optional[float] = None  # builtin engine: None = the default edge snap, 0 = none
    channel: int = 0
    scribble: ScribbleSpec = ScribbleSpec()


def progress_part(record: Dict) -> str:
    """A record on the progress line: Dice after the first, fifth and last interaction (each count
    once), NoC@85, and the median latency per interaction."""
    d = record["dice"]
    dice = " ".join(f"@{k} {d[k - 1]:.3f}" for k in sorted({1, min(5, len(d)), len(d)}))
    noc = record["noc"]["85"] if record["reached"]["85"] else "not reached"
    latency = float(np.median(record["latency_s"])) if record["latency_s"] else 0.0
    return f"target {record['target']}: Dice {dice}, NoC@85 {noc}, median latency {latency:.2f} s"


def select_cases(dataset_dir: Path, split: str, count: Optional[int], channel: int = 0) -> List[Case]:
    if split not in SPLITS:
        raise SegAssistError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    cases = list_cases(dataset_dir, channel=channel)
    if split != "all":
        cases = split_cases(cases, split)
    if not cases:
        raise SegAssistError(f"no {split} cases in {dataset_dir}")
    return cases if count is None else cases[: max(0, int(count))]


def evaluate(config: EvalConfig, engine: Optional[Engine] = None, progress: Callable[[str], None] = print) -> Dict:
    """Run the evaluation and return the JSON-ready result (``config``, ``records``, ``skipped``,
    ``summary``, ``per_target``)."""
    dataset_dir = Path(config.dataset_dir)
    if config.protocol not in PROTOCOLS:
        raise SegAssistError(f"unknown protocol {config.protocol!r} (choose from {', '.join(PROTOCOLS)})")
    if config.max_clicks < 1:
        raise SegAssistError("max_clicks must be at least 1")
    targets = config.targets or default_targets(dataset_dir)
    check_targets(dataset_dir, targets)
    cases = select_cases(dataset_dir, config.split, config.cases, config.channel)
    engine = engine or make_engine(config.engine, config.model, config.device, refine_depth=config.refine_depth,
                                  correction_zoom_share=config.correction_zoom_share, edge_band=config.edge_band)
    caps = engine.capabilities()
    needed = {"box+clicks": "box", "scribble+clicks": "scribble"}.get(config.protocol, "point")
    if needed not in caps.prompt_kinds or "point" not in caps.prompt_kinds:
        raise SegAssistError(
            f"engine {caps.name} does not take the prompts of protocol {config.protocol} "
            f"(it takes {', '.join(caps.prompt_kinds)})"
        )
    records: List[Dict] = []
    skipped: List[Dict] = []
    started = time.time()
    unreadable: List[SegAssistError] = []
    # warm up on the first usable case that holds a target (evaluate_case reports the others)
    for case in cases:
        try:
            volume, labels = load_case(case)
        except SegAssistError as exc:
            unreadable.append(exc)
            continue
        try:
            if warm_up([engine], volume, [np.isin(labels, t) for t in targets]):
                break
        except (ImageError, PromptError) as exc:  # the engine refuses this image: warm up on the next
            unreadable.append(exc)
    if cases and len(unreadable) == len(cases):  # nothing to measure: say why
        raise unreadable[0]
    for index, case in enumerate(cases, start=1):
        case_records, case_skipped = evaluate_case(
            engine, case, targets, config.protocol, config.max_clicks, config.scribble
        )
        records.extend(case_records)
        skipped.extend(case_skipped)
        parts = [progress_part(r) for r in case_records]
        parts += [f"target {s['target']}: skipped ({s['reason']})" for s in case_skipped]
        progress(f"[{index}/{len(cases)}] {case.name} " + "; ".join(parts))
    per_target = {}
    for target in targets:
        name = target_name(target)
        per_target[name] = summarise([r for r in records if r["target"] == name])
    return {
        "config": {
            "dataset": str(dataset_dir),
            "dataset_name": dataset_dir.name,
            "split": config.split,
            "cases": [c.name for c in cases],
            "targets": [target_name(t) for t in targets],
            "protocol": config.protocol,
            "max_clicks": config.max_clicks,
            "channel": config.channel,
            "engine": caps.to_dict(),
            "refine_depth": getattr(engine, "refine_depth", None),
            "correction_zoom_share": getattr(engine, "correction_zoom_share", None),
            "edge_snap": edge_snap_record(engine),
            "noc_thresholds": list(NOC_THRESHOLDS),
            "conventions": {**metrics.CONVENTIONS, "memory": memory_convention()},
            "platform": platform.platform(),
            "python": platform.python_version(),
            "wall_s": round(time.time() - started, 2),
        },
        "records": records,
        "skipped": skipped,
        "summary": summarise(records),
        "per_target": per_target,
    }


def check_json_output(path: Union[str, Path], overwrite: bool) -> None:
    """Refuse, before the evaluation, a ``--json`` that cannot be written or holds earlier results
    (replaced only with ``overwrite``)."""
    from SegAssistLib.files import output_problem

    path = Path(path)
    problem = output_problem(path)
    if problem:
        raise SegAssistError(f"--json {path}: {problem}")
    if path.exists() and not overwrite:
        raise SegAssistError(f"--json {path} exists (earlier results): pass --overwrite to replace it, "
                             "or choose another file")


def write_json(result: Dict, path: Union[str, Path]) -> Path:
    """Write the results whole or not at all (an interrupted run leaves the earlier file as it was).
    It replaces an existing file: the command line refuses one up front (:func:`check_json_output`)."""
    path = Path(path)
    atomic_write_bytes(path, json.dumps(result, indent=1).encode(), overwrite=True)
    return path
