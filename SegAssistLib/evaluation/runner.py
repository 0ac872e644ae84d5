"""The evaluation harness: a simulated user segments every case of a dataset with one engine.

For each case and target (a label, or a union such as ``1+2+3+4``) the harness opens a session,
sends the protocol's first prompt (nothing, the target's box, or a scribble on a slice through the
object, see :mod:`SegAssistLib.evaluation.scribbles`) and then corrective clicks from
:mod:`SegAssistLib.evaluation.simulator`, recording the Dice and HD95 after every interaction, the
engine's wall-clock latency per interaction (the simulator and the metrics are not timed) and the
peak memory.

Counting: ``max_clicks`` is the number of clicks. With ``box+clicks`` and ``scribble+clicks`` the
box or scribble is one more interaction, the first, so a record allows ``max_clicks`` (clicks) or
``max_clicks + 1`` interactions (``interactions_allowed``); NoC counts interactions, the box or
scribble included. When the prediction is already perfect the user stops: the record holds only the
interactions made, every per-interaction list (``dice``, ``hd95_mm``, ``latency_s``,
``interactions``, ``prompts``) the same length, and ``stopped`` says why; NoC, the Dice AUC and the
means per interaction carry the last value forward to the number allowed. A target whose bounding
box is flat along two or more axes (a voxel, a line) cannot be sent as a box: with ``box+clicks`` its
first interaction is a click instead (``first_prompt``).

Voxels of nnU-Net's ``"ignore"`` label (``dataset.json``) are unannotated: left out of Dice and HD95
and of the simulated user's error regions (:data:`SegAssistLib.evaluation.metrics.CONVENTIONS`).
The JSON layout is described in ``docs/evaluation.md``.

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
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.datasets import (
    Case,
    cases_and_left_out,
    dataset_folder_problem,
    dataset_ignore_label,
    dataset_targets,
    left_out_text,
    split_cases,
    split_dataset,
    unpaired_files,
)
from SegAssistLib.engine.base import Engine
from SegAssistLib.errors import ImageError, PromptError, SegAssistError
from SegAssistLib.evaluation import metrics, simulator
from SegAssistLib.evaluation.aggregate import allowed, padded
from SegAssistLib.evaluation.dataset_json import named_targets, passed_over_labels, passed_over_warning
from SegAssistLib.evaluation.output import probe_file, write_results_file
from SegAssistLib.evaluation.scribbles import ScribbleSpec
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
    nnU-Net region as the union of its labels (see :func:`~SegAssistLib.datasets.dataset_targets`); the
    error when it names none also names the entries meant as labels that were passed over."""
    return list(named_targets(dataset_dir))


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
    if not unknown:
        return
    path = Path(dataset_dir) / "dataset.json"
    labels = ", ".join(f"{target_name(ids)} ({name})" for ids, name in named.items())
    ignore = dataset_ignore_label(dataset_dir)
    if ignore in unknown:  # in the file, but as the voxels nobody annotated
        raise SegAssistError(f"--labels: label {ignore} is the \"ignore\" label of {path} (voxels left unannotated, "
                             f"never a target); its structures are {labels}")
    passed = passed_over_labels(dataset_dir)
    why = f" (passed over: {'; '.join(passed)})" if passed else ""
    raise SegAssistError(f"--labels: label{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} "
                         f"not in {path}, which has {labels}{why}")


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


MODEL_ENGINES = ("builtin", "ablation")  # the engines that run the model and take its options


def engine_options_problem(name: str, **options: object) -> Optional[str]:
    """Why the model's options (``model``, ``device``, ``refine_depth``, ``correction_zoom_share``,
    ``edge_band``; None: not given) cannot go with the engine ``name`` (None: they can): the baselines
    run on the CPU and have no checkpoint, refinement, correction zoom or edge snap, so these options
    given with them would be accepted and ignored. ``device="cpu"`` is where they run anyway."""
    if name in MODEL_ENGINES:
        return None
    given = [f"--{key.replace('_', '-')}" for key, value in options.items()
             if value is not None and not (key == "device" and value == "cpu")]
    if not given:
        return None
    verb = "applies" if len(given) == 1 else "apply"
    return f"{', '.join(given)} {verb} to the builtin and ablation engines only, not {name}"


def make_engine(
    name: str,
    model: Optional[str] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    refine_depth: Optional[int] = None,
    correction_zoom_share: Optional[float] = None,
    edge_band: Optional[float] = None,
) -> Engine:
    """``builtin`` (the shipped model or ``model``), ``ablation`` (the same model without prompt
    history, see :mod:`SegAssistLib.evaluation.ablation`), ``growcut``, ``randomwalker`` or their
    ``-inside`` variants (no background seeded on the image edge).
    ``device`` (None: cpu), ``refine_depth`` (None: 1) and ``correction_zoom_share`` (None: the
    engine's default) as for :class:`~SegAssistLib.engine.builtin.BuiltinEngine`; ``edge_band``: the
    band of its edge snap (None: the default, 0: no snap). These are the model's: SegAssistError when
    one is given with a baseline (:func:`engine_options_problem`)."""
    if name in MODEL_ENGINES:
        from SegAssistLib.engine.builtin import load_default_engine

        options = builtin_options(correction_zoom_share, edge_band)
        builtin = load_default_engine(checkpoint=model, device=device or "cpu", threads=threads,
                                      refine_depth=1 if refine_depth is None else refine_depth, **options)
        if name == "builtin":
            return builtin
        from SegAssistLib.evaluation.ablation import NoHistoryEngine

        return NoHistoryEngine(builtin)
    problem = engine_options_problem(name, model=model, device=device, refine_depth=refine_depth,
                                     correction_zoom_share=correction_zoom_share, edge_band=edge_band)
    if problem:
        raise SegAssistError(problem)
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
BOX_DEGENERATE = "click (box degenerate)"


def initial_prompt(
    protocol: str, target: np.ndarray, spacing: Sequence[float], scribble: Optional[ScribbleSpec] = None
) -> Optional[Prompt]:
    """The protocol's first prompt (None: clicks only). PromptError from ``box+clicks`` when the
    target's bounding box is flat along two or more axes (see :func:`first_interaction`)."""
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


def first_interaction(
    protocol: str, target: np.ndarray, spacing: Sequence[float], scribble: Optional[ScribbleSpec] = None
) -> Tuple[Optional[Prompt], str]:
    """The protocol's first prompt (None: clicks only) and what it is: ``"click"`` (clicks only),
    ``"box"``, ``"scribble"`` or, for a target whose bounding box is flat along two or more axes (a
    single voxel, a line) that no box can be sent for, :data:`BOX_DEGENERATE`: the first click in
    the box's place, still one interaction of ``max_clicks + 1``."""
    try:
        first = initial_prompt(protocol, target, spacing, scribble)
    except PromptError:
        if protocol != "box+clicks":
            raise
        return simulator.first_click(target, spacing), BOX_DEGENERATE
    return first, "click" if first is None else first.kind


def run_session(
    engine: Engine,
    volume,
    target: np.ndarray,
    protocol: str = "clicks",
    max_clicks: int = 10,
    scribble: Optional[ScribbleSpec] = None,
    hd95_each: bool = False,
    memory: Optional[PeakMemory] = None,
    ignore: Optional[np.ndarray] = None,
) -> Dict:
    """Drive one session; returns the prompts and the Dice, latency (and, with ``hd95_each``, HD95
    in mm after every interaction; ``inf`` when one mask is empty) lists, the final mask,
    ``interactions_allowed``, ``first_prompt`` (see :func:`first_interaction`) and ``stopped``: why
    the user stopped before the number allowed (``"dice 1.0"``: no error left), None when it did not.
    Every list holds one value per interaction made (a caller that takes Dice after the k-th
    interaction of every session carries the last one forward: :func:`metrics.carried_forward`).
    ``memory``: sampled while the engine works (see :class:`PeakMemory`); ``ignore``: voxels left
    unannotated (nnU-Net's ignore label), left out of the metrics and the simulated user's error
    regions."""
    spacing = volume.spacing

    def engine_call():
        return memory.engine_call() if memory is not None else nullcontext()

    with engine_call():
        session = engine.open_session(volume)
    prompts: List[Prompt] = []
    dices: List[float] = []
    hds: List[float] = []
    latencies: List[float] = []
    stopped: Optional[str] = None
    try:
        first, first_kind = first_interaction(protocol, target, spacing, scribble)
        planned = max_clicks + (first is not None)
        pred = np.zeros(target.shape, np.uint8)
        while len(dices) < planned:
            if first is not None and not prompts:
                prompt: Optional[Prompt] = first
            else:
                prompt = simulator.next_click(target, pred, spacing, ignore)
            if prompt is None:  # perfect: the user stops
                stopped = "dice 1.0"
                break
            with engine_call():
                start = time.perf_counter()
                update = session.add_prompt(prompt)
                latencies.append(time.perf_counter() - start)
            update.apply_to(pred)
            prompts.append(prompt)
            dices.append(metrics.dice(target, pred, ignore))
            if hd95_each:
                hds.append(metrics.hd95(target, pred, spacing, ignore))
        final = session.result()
    finally:
        session.close()
    out = {"prompts": prompts, "dice": dices, "latency_s": latencies, "final": final,
           "interactions_allowed": planned, "first_prompt": first_kind, "stopped": stopped}
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
    ignore: Optional[np.ndarray] = None,
) -> Dict:
    """The record of one session on one target (``mask``: uint8, the image's grid, not empty;
    ``ignore``: the voxels of nnU-Net's ignore label, or None). Its per-interaction lists hold the
    interactions made (see the module's docstring; ``docs/evaluation.md`` lists every field).

    Raises :class:`PromptError` when the engine rejects a prompt of the protocol.
    """
    cuda_peak = _cuda_peak_mb_reset()
    with PeakMemory(engine_only=True) as memory:
        out = run_session(engine, volume, mask, protocol, max_clicks, scribble, hd95_each=True, memory=memory,
                          ignore=ignore)
    dices = out["dice"]
    limit = out["interactions_allowed"]
    carried = metrics.carried_forward(dices, limit)  # the user who stopped keeps its mask
    noc, reached = {}, {}
    for t in NOC_THRESHOLDS:
        key = f"{round(t * 100)}"
        noc[key], reached[key] = metrics.number_of_clicks(carried, t, limit)
    clicks = carried[1:] if protocol != "clicks" else carried  # the challenge's AUC is over the clicks
    record = {
        "case": case_name,
        "target": target,
        "protocol": protocol,
        "first_prompt": out["first_prompt"],
        "interactions": [p.kind for p in out["prompts"]],
        "prompts": [json.loads(dumps_prompt(p)) for p in out["prompts"]],
        "dice": [round(d, 6) for d in dices],
        "hd95_mm": [_finite_or_none(round(h, 4)) for h in out["hd95_mm"]],
        "latency_s": [round(x, 6) for x in out["latency_s"]],
        "interactions_allowed": limit,
        "stopped": out["stopped"],
        "noc": noc,
        "reached": reached,
        "dice_auc": round(metrics.dice_auc(clicks), 6),
        "dice_auc_norm": round(metrics.normalised_dice_auc(clicks), 6),
        "final_dice": round(dices[-1], 6),
        "final_hd95_mm": _finite_or_none(metrics.hd95(mask, out["final"], volume.spacing, ignore)),
        "peak_rss_mb": round(memory.peak_mb, 1),
        "rss_before_mb": round(memory.start_bytes / 2**20, 1),
        "target_voxels": int(mask.sum()),
        "ignored_voxels": 0 if ignore is None else int(np.count_nonzero(ignore)),
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


def label_values(labels: np.ndarray, most: int = 6) -> str:
    """The first few distinct values of a label map, for a reason: ``"0, 255"``, ``"0, 1, 2, ... (9 values)"``."""
    values = np.unique(labels)
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (f", ... ({len(values)} values)" if len(values) > most else "")


def non_integer_labels(labels: np.ndarray) -> Optional[str]:
    """Why a label map holds no label ids (None: its values are whole numbers): a probability map, or
    a label resampled with interpolation, holds values such as 0.9999999 that match no label."""
    if labels.dtype.kind not in "fc":
        return None
    fractional = labels[np.mod(labels.real, 1) != 0]  # NaN too
    if fractional.size == 0:
        return None
    return (f"the label map holds values that are not whole numbers ({label_values(fractional, 3)}; dtype "
            f"{labels.dtype}): label maps hold label ids (0, 1, 2...), not a probability map or an interpolated "
            "label")


def load_case(case: Case) -> Tuple[Volume, np.ndarray]:
    """A case's image and label map on the image's grid (reversed along an axis the label file stores
    in reverse order, see :func:`label_on_image_grid`); SegAssistError when the label is on another grid
    or holds values that are not whole numbers (:func:`non_integer_labels`)."""
    volume = load_volume(case.image, channel=case.channel)
    labels, problem = label_on_image_grid(case.label, load_mask(case.label), volume)
    problem = problem or non_integer_labels(labels)
    if problem:
        raise SegAssistError(f"{case.name}: {problem}")
    return volume, labels


def target_masks(labels: np.ndarray, target: Target, ignore_label: Optional[int] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The target's mask (uint8) of a label map and the voxels of nnU-Net's ignore label (None: the
    dataset has none, or the label map holds no such voxel); the ignore label is never part of a target."""
    ignore = None if ignore_label is None else labels == ignore_label
    if ignore is not None and not ignore.any():
        ignore = None
    mask = np.isin(labels, [t for t in target if t != ignore_label]).astype(np.uint8)
    return mask, ignore


def case_scribble(spec: Optional[ScribbleSpec], case_name: str, target: str) -> Optional[ScribbleSpec]:
    """The scribble of one case and target: with hand jitter, its own noise stream and oblique tilt
    (the seed is ``crc32("case/target")`` xor the spec's seed, as the benchmark derives one), so that
    the jitter is independent across cases; without jitter the spec as given (nothing random but the
    oblique tilt, kept as it was)."""
    if spec is None or spec.jitter_mm <= 0:
        return spec
    return replace(spec, seed=zlib.crc32(f"{case_name}/{target}".encode()) ^ int(spec.seed))


def evaluate_case(
    engine: Engine,
    case: Case,
    targets: Sequence[Target],
    protocol: str,
    max_clicks: int,
    scribble: Optional[ScribbleSpec] = None,
    ignore_label: Optional[int] = None,
) -> Tuple[List[Dict], List[Dict]]:
    """Records and skips of one case (a case that cannot be read, or whose image the engine
    rejects, is skipped with the reason: one bad file must not lose the rest of a long run; a target
    the label map lacks is skipped with the values it holds). ``ignore_label``: the value of nnU-Net's
    ignore label (:func:`~SegAssistLib.datasets.dataset_ignore_label`), None: none."""
    records, skipped = [], []
    try:
        volume, labels = load_case(case)
    except SegAssistError as exc:
        return records, [{"case": case.name, "target": target_name(t), "reason": f"case not read: {exc}"}
                         for t in targets]
    rejected: Optional[str] = None  # the engine refused the image: every other target would be refused too
    held: Optional[str] = None  # the label map's values, read once, when a target is absent
    for target in targets:
        name = target_name(target)
        mask, ignore = target_masks(labels, target, ignore_label)
        if not mask.any():
            held = held or label_values(labels)
            skipped.append({"case": case.name, "target": name,
                            "reason": f"target label absent (the label map holds {held})"})
            continue
        if rejected is not None:
            skipped.append({"case": case.name, "target": name, "reason": rejected})
            continue
        try:
            records.append(evaluate_target(engine, volume, mask, case.name, name, protocol, max_clicks,
                                           case_scribble(scribble, case.name, name), ignore))
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
    # carry the last value forward (a user who stopped early keeps its mask) so that every record
    # has a value after each interaction allowed
    dice = padded([r["dice"] for r in records], length=allowed(records))
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
    engine: str = "builtin"  # as the command line's --engine
    model: Optional[str] = None
    device: Optional[str] = None  # builtin engine: None = cpu
    refine_depth: Optional[int] = None  # builtin engine: None = 1, see BuiltinEngine
    correction_zoom_share: Optional[float] = None  # builtin engine: None = BuiltinEngine's default
    edge_band: Optional[float] = None  # builtin engine: None = the default edge snap, 0 = none
    channel: int = 0
    scribble: ScribbleSpec = ScribbleSpec()


def progress_part(record: Dict) -> str:
    """A record on the progress line: Dice after the first, fifth and last interaction made (each count
    once), why the user stopped early, NoC@85, and the median latency per interaction; a first click in
    place of a box is said."""
    d = record["dice"]
    dice = " ".join(f"@{k} {d[k - 1]:.3f}" for k in sorted({1, min(5, len(d)), len(d)}))
    if record.get("stopped"):
        dice += f" (stopped after {len(d)}: {record['stopped']})"
    first = record.get("first_prompt", "")
    first = f", first prompt a {first}" if first.startswith("click (") else ""
    noc = record["noc"]["85"] if record["reached"]["85"] else "not reached"
    latency = float(np.median(record["latency_s"])) if record["latency_s"] else 0.0
    return f"target {record['target']}: Dice {dice}{first}, NoC@85 {noc}, median latency {latency:.2f} s"


def _examples(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def unpaired_warning(dataset_dir: Union[str, Path]) -> Optional[str]:
    """A line on the files of a dataset folder that no case holds (an image without a label, a label
    without an image), None when there are none."""
    images, labels = unpaired_files(dataset_dir)
    parts = []
    if images:
        parts.append(f"{len(images)} image{'s' if len(images) > 1 else ''} in imagesTr/ without a label "
                     f"({_examples(images)})")
    if labels:
        parts.append(f"{len(labels)} label{'s' if len(labels) > 1 else ''} in labelsTr/ without an image "
                     f"({_examples(labels)})")
    return f"warning: {dataset_dir}: {' and '.join(parts)}: left out" if parts else None


def _no_cases(dataset_dir: Path) -> str:
    """Why a dataset folder has no case: no image has a label of the same name."""
    images, labels = unpaired_files(dataset_dir)  # no pair: every image and every label
    text = (f"no cases in {dataset_dir}: none of the {len(images)} image(s) in imagesTr/ has a label of the same "
            f"name among the {len(labels)} in labelsTr/ (a case is imagesTr/<case>.nii.gz or <case>_0000.nii.gz "
            "with labelsTr/<case>.nii.gz; .nii, .nrrd, .mha, .mhd also)")
    examples = [f"{kind} {names[0]}" for kind, names in (("image", images), ("label", labels)) if names]
    return text + (f"; e.g. {', '.join(examples)}" if examples else "")


def _split_of(dataset_dir: Path, split: str, channel: int) -> Tuple[List[Case], List[str]]:
    """Every case of a split of a dataset folder, and the labelled cases left out for lacking the
    channel's file; SegAssistError saying why when there are none: no image has a label, or every case
    is on the other side of the split."""
    if split not in SPLITS:
        raise SegAssistError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    dataset_dir = Path(dataset_dir)
    cases, lacking = cases_and_left_out(dataset_dir, channel=channel)
    if not cases:
        raise SegAssistError(_no_cases(dataset_dir))
    chosen = cases if split == "all" else split_cases(cases, split)
    if not chosen:
        known = split_dataset(dataset_dir.name, {c.name for c in cases})
        if split == "evaluation":
            raise SegAssistError(
                f"no evaluation cases in {dataset_dir}: it is the dataset {known} of Resources/splits.json and "
                f"none of its {len(cases)} cases is among that dataset's evaluation cases (they are training "
                "cases): pass --split all (or --split training) to evaluate them")
        why = (f"of {known} in Resources/splits.json" if known else
               "a folder that Resources/splits.json does not name is evaluation whole")
        raise SegAssistError(f"no training cases in {dataset_dir}: all {len(cases)} of its cases are evaluation "
                             f"cases ({why}): pass --split all to use every case")
    return chosen, lacking


def select_cases(dataset_dir: Path, split: str, count: Optional[int], channel: int = 0) -> List[Case]:
    """The first ``count`` (None: all) cases of a split of a dataset folder; SegAssistError saying why
    when there are none: no image has a label, or every case is on the other side of the split.
    Labelled cases without the channel's file are left out with a UserWarning, as
    :func:`~SegAssistLib.datasets.list_cases` does (:func:`evaluate` prints a ``warning:`` line)."""
    chosen, lacking = _split_of(Path(dataset_dir), split, channel)
    if lacking:
        warnings.warn(left_out_text(dataset_dir, channel, lacking), stacklevel=2)
    return chosen if count is None else chosen[: max(0, int(count))]


def model_record(engine: Engine, checkpoint: Optional[Union[str, Path]], shipped: bool = True) -> Optional[Dict]:
    """Which weights an engine that runs the model answered with (None: a baseline): the checkpoint's
    resolved path, its SHA-256 and the engine's weights identity, so that results can be traced to
    their weights even where a fine-tune kept the version. ``checkpoint`` None means the shipped
    weights where the engine was loaded here (``shipped``); for an engine a caller made, only its
    identity is known."""
    from SegAssistLib.evaluation.ablation import NoHistoryEngine
    from SegAssistLib.files import sha256_file

    inner = engine.inner if isinstance(engine, NoHistoryEngine) else engine
    model = getattr(inner, "model", None)
    if model is None:
        return None
    identity = getattr(model, "identity", "") or None
    if checkpoint is None and shipped:
        from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT

        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is None:
        return {"checkpoint": None, "sha256": None, "weights_identity": identity}
    path = Path(checkpoint).resolve()
    try:
        digest: Optional[str] = sha256_file(path)
    except OSError:  # loaded, then moved or removed: the identity still says which weights
        digest = None
    return {"checkpoint": str(path), "sha256": digest, "weights_identity": identity}


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`evaluate`: ``partial`` holds the results of the cases finished before it
    (``config.interrupted`` says how many), for the caller to write; still a KeyboardInterrupt."""

    def __init__(self, partial: Dict):
        super().__init__(partial["config"].get("interrupted", "interrupted"))
        self.partial = partial


def _notices(dataset_dir: Path, config: EvalConfig, chosen: Sequence[Case], lacking: Sequence[str]) -> List[str]:
    """The ``warning:`` lines on what the run leaves out: files without a partner, cases without the
    channel, label entries of ``dataset.json`` passed over, and a ``--cases`` beyond the cases there."""
    lines = [unpaired_warning(dataset_dir), passed_over_warning(dataset_dir)]
    if lacking:
        lines.append(f"warning: {left_out_text(dataset_dir, config.channel, list(lacking))}")
    if config.cases is not None and config.cases > len(chosen):
        part = "" if config.split == "all" else f"{config.split} "
        lines.append(f"warning: --cases {config.cases}: {dataset_dir} has {len(chosen)} {part}case(s); "
                     f"all {len(chosen)} are evaluated")
    return [line for line in lines if line]


def _left_out(dataset_dir: Path, lacking: Sequence[str]) -> Dict[str, List[str]]:
    images, labels = unpaired_files(dataset_dir)
    return {"images_without_label": images, "labels_without_image": labels,
            "cases_without_channel": list(lacking), "label_entries_passed_over": passed_over_labels(dataset_dir)}


def evaluate(config: EvalConfig, engine: Optional[Engine] = None, progress: Callable[[str], None] = print) -> Dict:
    """Run the evaluation and return the JSON-ready result (``config``, ``records``, ``skipped``,
    ``summary``, ``per_target``). What the run leaves out is said through ``progress`` as ``warning:``
    lines and listed in ``config.left_out``. Ctrl-C between or inside cases raises
    :class:`EvaluationInterrupted` holding the results of the cases finished."""
    # absolute, so that "." is named after the folder (and its split found) and the path recorded holds
    # wherever the results are read; not resolved: a link keeps the name it was given
    dataset_dir = Path(os.path.abspath(config.dataset_dir))
    if config.protocol not in PROTOCOLS:
        raise SegAssistError(f"unknown protocol {config.protocol!r} (choose from {', '.join(PROTOCOLS)})")
    if config.max_clicks < 1:
        raise SegAssistError("max_clicks must be at least 1")
    if engine is None:  # the model's options with a baseline: refused before any work
        problem = engine_options_problem(config.engine, model=config.model, device=config.device,
                                         refine_depth=config.refine_depth,
                                         correction_zoom_share=config.correction_zoom_share, edge_band=config.edge_band)
        if problem:
            raise SegAssistError(problem)
    # a folder without dataset.json (a parent of datasets) is said to be no dataset folder, not asked for
    # --labels; one with a dataset.json is meant as a dataset: a broken file is its first problem
    problem = None if (dataset_dir / "dataset.json").is_file() else dataset_folder_problem(dataset_dir)
    if problem:
        raise SegAssistError(problem)
    targets = config.targets or default_targets(dataset_dir)
    check_targets(dataset_dir, targets)
    chosen, lacking = _split_of(dataset_dir, config.split, config.channel)
    cases = chosen if config.cases is None else chosen[: max(0, int(config.cases))]
    for line in _notices(dataset_dir, config, chosen, lacking):
        progress(line)
    ignore_label = dataset_ignore_label(dataset_dir)
    loaded_here = engine is None
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
            if warm_up([engine], volume, [target_masks(labels, t, ignore_label)[0] for t in targets]):
                break
        except (ImageError, PromptError) as exc:  # the engine refuses this image: warm up on the next
            unreadable.append(exc)
    if cases and len(unreadable) == len(cases):  # nothing to measure: say why
        raise unreadable[0]
    done = 0
    interrupted: Optional[str] = None
    try:
        for index, case in enumerate(cases, start=1):
            case_records, case_skipped = evaluate_case(
                engine, case, targets, config.protocol, config.max_clicks, config.scribble, ignore_label
            )
            records.extend(case_records)
            skipped.extend(case_skipped)
            done = index
            parts = [progress_part(r) for r in case_records]
            parts += [f"target {s['target']}: skipped ({s['reason']})" for s in case_skipped]
            progress(f"[{index}/{len(cases)}] {case.name} " + "; ".join(parts))
    except KeyboardInterrupt:  # the cases finished are kept, for the caller to write
        interrupted = f"interrupted after {done} of {len(cases)} case(s)"
    per_target = {}
    for target in targets:
        name = target_name(target)
        per_target[name] = summarise([r for r in records if r["target"] == name])
    result = {
        "config": {
            "dataset": str(dataset_dir),
            "dataset_name": dataset_dir.name,
            "split": config.split,
            "cases": [c.name for c in cases],
            "targets": [target_name(t) for t in targets],
            "protocol": config.protocol,
            "max_clicks": config.max_clicks,
            "channel": config.channel,
            "ignore_label": ignore_label,
            "left_out": _left_out(dataset_dir, lacking),
            "engine": caps.to_dict(),
            "model": model_record(engine, config.model, shipped=loaded_here),
            "refine_depth": getattr(engine, "refine_depth", None),
            "correction_zoom_share": getattr(engine, "correction_zoom_share", None),
            "edge_snap": edge_snap_record(engine),
            "scribble": config.scribble.to_dict() if config.protocol == "scribble+clicks" else None,
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
    if interrupted:
        result["config"]["interrupted"] = interrupted
        raise EvaluationInterrupted(result)
    return result


def check_json_output(path: Union[str, Path], overwrite: bool) -> None:
    """Refuse, before the evaluation, a ``--json`` that cannot be written or holds earlier results
    (replaced only with ``overwrite``). The write's own temporary file is tried, not only the folder's
    permissions: a name that is just short enough failed only at the end, with the whole run lost."""
    from SegAssistLib.files import output_problem

    path = Path(path)
    problem = output_problem(path)
    if problem:
        raise SegAssistError(f"--json {path}: {problem}")
    if path.exists() and not overwrite:
        raise SegAssistError(f"--json {path} exists (earlier results): pass --overwrite to replace it, "
                             "or choose another file")
    problem = probe_file(path)
    if problem:
        raise SegAssistError(f"--json {path}: {problem}")


def write_json(result: Dict, path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write the results whole or not at all (an interrupted write leaves the earlier file as it was).
    An existing file, also one that appeared during the run, is replaced only with ``overwrite``; when
    the write fails the results are saved to a rescue file and
    :class:`~SegAssistLib.evaluation.output.ResultsSavedElsewhere` says where."""
    return write_results_file(json.dumps(result, indent=1).encode(), path, overwrite, "--json")
