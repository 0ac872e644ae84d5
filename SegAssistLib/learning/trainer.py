"""Training an adapter (LoRA, SALT, or full fine-tuning as the reference) on the datastore's labels.

One run (:func:`run_training`):

1. Read the submitted labels; split them into training and held-out validation cases
   (deterministic and stable, a subject's cases on one side, see ``traindata``). Load the
   validation cases, then the training cases that fit in ``max_case_memory_gib`` beside them (the
   most recently submitted first; the status and the result say how many were left out).
2. Score the incumbent (the registry's current version, or the base model) on the held-out cases
   with simulated interactive sessions (see ``validation``).
3. Build the candidate on a fresh copy of the base weights: a new adapter, or (``warm_start``) the
   incumbent's adapter of the same kind and ranks to continue from; full fine-tuning starts from
   the incumbent's merged weights.
4. Train with the base model's own recipe (``SegAssistLib.training``): patches cut by
   ``sample_patch`` exactly as the engine cuts them, a simulated first prompt, then either a
   corrupted previous mask with a correction or a few rounds of the network's own predictions
   with corrections at the largest error, and DiceCE on the last round. The simulated prompts
   follow the mix of the training labels' prompt logs (``prompt_mix``). Only the adapter's
   parameters train; the learning rate follows a cosine over ``max_steps``, or over the training
   time once that is projected to end the run first (``training.schedule``: with a seed, a run
   that reaches ``max_steps`` gives the same weights on any machine). A loss that is not finite
   ends the run at once (nothing is registered), and a candidate whose parameters are not all
   finite is never registered.
5. Score the candidate on the same held-out cases; register it (file written once, atomically)
   and promote it only if it beats the incumbent by more than ``min_improvement``.

Progress (phase, step, loss, validation Dice, while loading ``progress``: "loading case i of n")
goes to a small JSON status file and/or a callback; ``should_stop`` cancels between case loads,
steps and validation cases.

The time budget covers the whole run, loading included. Every validation has a deadline and
starts no click that would end past it (``validation``): the incumbent's may use
``INCUMBENT_VALIDATION_SHARE`` of the time left after loading (if it cannot finish, nothing is
trained: the comparison would be impossible), the final one runs until ``REGISTRATION_RESERVE_S``
before the end. Training stops early enough to leave the final validation its clicks at the
measured cost per click times ``VALIDATION_MARGIN``: the incumbent's cost at first, then, halfway
through the training time, the candidate's own from one click on each held-out case (a network
that segments answers far slower than a base model that segments nothing). A step starts only if
it is expected to end before then: the first as :func:`first_step_estimate` says (one timed forward
pass, before any step), each later one as the slowest of the last ``RECENT_STEP_TIMES``; a budget
too small for the first step ends the run untrained, and says so. A candidate whose validation
could not finish is neither promoted nor registered, and the result says why (naming a training
step that ran into the validation's time). What can run past the budget: loading that alone
exceeds it, one click slower than every click before it, one training step slower than expected
(the first than its estimate, a later one than the slowest recent one), and a registration slower
than ``REGISTRATION_RESERVE_S``.

This module does not change process settings (threads, priority): ``jobs`` does that in the
separate process it starts, so that interactive inference keeps its core.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import secrets
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from monai.losses import DiceCELoss

from SegAssistLib.api_learning import (
    MAX_SEED,
    MAX_TRAIN_BATCH_SIZE,
    MAX_TRAIN_BUDGET_S,
    MAX_VAL_CASES,
    MAX_VAL_CLICKS,
    is_seed,
)
from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.engine.encoding import PatchPrompt, assemble_input, draw_prompts
from SegAssistLib.engine.network import LoadedModel, load_checkpoint, torch_device
from SegAssistLib.errors import DeviceError
from SegAssistLib.learning.adapters import AdapterKind, AdapterSet, apply_adapter, load_adapter
from SegAssistLib.learning.datastore import Datastore, open_datastore
from SegAssistLib.learning.deploy import FULL, base_copy, save_full_version, version_network
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.prompt_mix import DEFAULT_MIX, PromptMix, mix_from_logs
from SegAssistLib.learning.records import CaseRecord, LabelVersion
from SegAssistLib.learning.registry import AdapterRegistry, VersionRecord, version_label
from SegAssistLib.learning.traindata import (
    LabelledCase,
    check_enough_cases,
    fit_in_memory,
    holdout_split,
    load_labelled,
    subject_groups,
    training_bytes,
    usable_and_too_small,
    validation_bytes,
)
from SegAssistLib.learning.validation import ValidationResult, validate
from SegAssistLib.training import simulation
from SegAssistLib.training.data import TrainCase, sample_patch
from SegAssistLib.training.schedule import CosineSchedule

KINDS = ("lora", "salt", FULL)
# 1e-2 for the adapters: with 2e-3 a 100-step retraining barely moved SALT (benchmarks/results/adapter_lr_sweep)
DEFAULT_LEARNING_RATES = {"lora": 1e-2, "salt": 1e-2, FULL: 3e-4}
VALIDATION_MARGIN = 1.5  # the final validation is budgeted at 1.5x its clicks at the measured cost per click
REGISTRATION_RESERVE_S = 0.5  # kept at the end of the budget for writing the version and the registry
INCUMBENT_VALIDATION_SHARE = 0.4  # of the budget left after loading: the incumbent's validation at most
PROBE_AT = 0.5  # of the training time: the candidate's cost per click is measured there
# a step's passes, in forward passes without gradients: its correction rounds, then a forward with
# gradients and the backward (about twice a forward); the first step's estimate counts them with a margin
STEP_PASSES_BEYOND_ROUNDS = 3
STEP_ESTIMATE_MARGIN = 1.5
RECENT_STEP_TIMES = 20  # a step is expected to take as long as the slowest of this many last ones
MAX_ADAPTER_RANK = 256  # a rank above a layer's own size is refused when the adapter is made
MAX_NICE = 19  # POSIX's lowest priority
GIB = 1024**3


def max_threads() -> int:
    """The most torch threads a job may use: this machine's cores (more only slows everything down)."""
    return max(1, os.cpu_count() or 1)


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool, not text)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_integer(name: str, value: Any, lowest: int, most: Optional[int] = None, name_range: bool = False) -> int:
    """``value`` as an ``int``: a whole number (an integral float too, as JSON may write one) from ``lowest``
    (0 or 1) to ``most``. The refusal names the range, or (without ``name_range``) below it or not whole,
    the sign. The caller stores the ``int`` back: ``range``, slices and ``torch.set_num_threads`` refuse
    a float."""
    whole = _is_number(value) and float(value).is_integer()
    if whole and value >= lowest and (most is None or value <= most):
        return int(value)
    if most is not None and (name_range or (whole and value > most)):
        raise TrainingError(f"{name} must be an integer from {lowest} to {most}, got {value!r}")
    raise TrainingError(f"{name} must be a {'positive' if lowest else 'non-negative'} integer, got {value!r}")


@dataclass
class AdapterTrainConfig:
    """Settings of one training run. ``rank``/``lora_rank``/``alpha``: see ``apply_adapter``; ``lora_rank``
    is SALT's alone, and kind ``full`` takes none of the three (:meth:`check` refuses what the kind ignores)."""

    kind: str = "salt"
    rank: Optional[int] = None
    lora_rank: Optional[int] = None
    alpha: Optional[float] = None
    learning_rate: Optional[float] = None  # None: DEFAULT_LEARNING_RATES[kind]
    weight_decay: float = 1e-5
    batch_size: int = 2  # up to MAX_TRAIN_BATCH_SIZE (64); >= 2: fp32 batch-1 3D convolutions hit a slow CPU kernel
    max_steps: int = 2000
    time_budget_s: float = 300.0  # the whole run, validation included
    max_correction_rounds: int = 3
    corrupt_share: float = 0.3
    val_fraction: float = 0.2
    min_val_cases: int = 1  # the fewest subjects (patients) held out, each with all its cases
    max_val_cases: int = 8  # the most held-out cases (whole subjects only), up to MAX_VAL_CASES (200)
    val_clicks: int = 3  # 1 to MAX_VAL_CLICKS (20)
    validate_every: int = 0  # steps between progress validations (0: only before and after)
    min_improvement: float = 0.0  # promote only if val Dice > incumbent's + this
    warm_start: bool = True
    label_value: Optional[int] = None  # None: every labelled voxel is the structure
    seed: Optional[int] = None  # None: a new seed per run, recorded with the version's config
    device: str = "cpu"  # "cuda" for a GPU: training and validation run there
    threads: int = 1  # applied by the background job (see jobs), not by run_training; at most the cores
    nice: int = 10  # idem: the job's CPU priority below interactive inference (POSIX), 0 to MAX_NICE
    status_every_s: float = 0.5
    # the cases held in memory for the run (see traindata's "Memory"): the validation cases first, then
    # the most recently submitted training cases that fit; those left out are named in the status
    max_case_memory_gib: float = 6.0

    def check(self) -> AdapterTrainConfig:
        """This config, each setting checked (type and range, and whether the kind uses it) and each integer
        setting stored back as an ``int``; a bad one raises :class:`TrainingError` naming it, before a job
        starts rather than in its worker."""
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise TrainingError(f"unknown training kind {self.kind!r} (known: {', '.join(KINDS)})")
        bounded = (("batch_size", 1, MAX_TRAIN_BATCH_SIZE), ("val_clicks", 1, MAX_VAL_CLICKS),
                   ("max_val_cases", 1, MAX_VAL_CASES), ("max_steps", 1, None), ("threads", 1, max_threads()),
                   ("min_val_cases", 1, None), ("validate_every", 0, None), ("max_correction_rounds", 0, None),
                   ("nice", 0, MAX_NICE))  # fmt: skip
        for name, lowest, most in bounded:  # the bounds as the HTTP API's
            named = name in ("nice", "threads")
            setattr(self, name, _check_integer(name, getattr(self, name), lowest, most, name_range=named))
        if self.min_val_cases > self.max_val_cases:
            raise TrainingError(
                f"min_val_cases ({self.min_val_cases}) must not be above max_val_cases ({self.max_val_cases})"
            )
        if self.label_value is not None:  # labels are stored as 8-bit values; 0 is the background
            self.label_value = _check_integer("label_value", self.label_value, 1, 255, name_range=True)
        if self.seed is not None:
            if not is_seed(self.seed):
                raise TrainingError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
            self.seed = int(self.seed)  # numpy's integers too: recorded in JSON with the version
        self._check_numbers()
        self._check_kind_settings()
        if not isinstance(self.warm_start, bool):
            raise TrainingError(f"warm_start must be true or false, got {self.warm_start!r}")
        if not isinstance(self.device, str):
            raise TrainingError(f"device must be text such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            torch_device(self.device)
        except DeviceError as exc:
            raise TrainingError(str(exc)) from None
        return self

    def _check_kind_settings(self) -> None:
        """The adapter's ranks (1 to ``MAX_ADAPTER_RANK``, as the command line and the HTTP API take them),
        and none the kind does not use: it would be ignored, yet recorded in the version's config."""
        for name in ("rank", "lora_rank"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_integer(name, getattr(self, name), 1, MAX_ADAPTER_RANK, name_range=True))
        if self.kind == FULL:
            unused = [name for name in ("rank", "lora_rank", "alpha") if getattr(self, name) is not None]
            if unused:
                raise TrainingError(
                    f"{' and '.join(unused)} {'are adapter settings' if len(unused) > 1 else 'is an adapter setting'}"
                    f": kind 'full' trains every weight of the network; leave {'them' if len(unused) > 1 else 'it'} "
                    "out, or train kind 'salt' or 'lora'"
                )
        if self.kind == "lora" and self.lora_rank is not None:
            raise TrainingError(
                "lora_rank is a SALT setting (the rank of its low-rank update): for kind 'lora' give its rank as "
                "rank, and leave lora_rank out"
            )

    def _check_numbers(self) -> None:
        if not (_is_number(self.time_budget_s) and 0 < self.time_budget_s <= MAX_TRAIN_BUDGET_S):
            raise TrainingError(
                f"time_budget_s must be a positive number of seconds up to {MAX_TRAIN_BUDGET_S:.0f} (a week), "
                f"got {self.time_budget_s!r}"
            )
        if self.learning_rate is not None and not (_is_number(self.learning_rate) and self.learning_rate >= 0):
            raise TrainingError(f"learning_rate must be a non-negative number, got {self.learning_rate!r}")
        if not (_is_number(self.min_improvement) and -1.0 <= self.min_improvement <= 1.0):
            raise TrainingError(
                f"min_improvement must be a Dice difference in [-1, 1], got {self.min_improvement!r}"
            )
        if self.alpha is not None and not (_is_number(self.alpha) and self.alpha > 0):
            raise TrainingError(f"alpha must be a positive number, got {self.alpha!r}")
        ranges = (("weight_decay", 0.0, math.inf, "a non-negative number"),
                  ("status_every_s", 0.0, math.inf, "a non-negative number of seconds"),
                  ("corrupt_share", 0.0, 1.0, "a number in [0, 1]"))  # fmt: skip
        for name, lowest, highest, what in ranges:
            value = getattr(self, name)
            if not (_is_number(value) and lowest <= value <= highest):
                raise TrainingError(f"{name} must be {what}, got {value!r}")
        if not (_is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):  # as holdout_split
            raise TrainingError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        if not (_is_number(self.max_case_memory_gib) and self.max_case_memory_gib > 0):
            raise TrainingError(
                f"max_case_memory_gib must be a positive number of GiB, got {self.max_case_memory_gib!r}"
            )

    @property
    def lr(self) -> float:
        return float(self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.kind])

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> AdapterTrainConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise TrainingError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**data).check()


@dataclass
class TrainingResult:
    state: str  # "done" or "cancelled"
    version: Optional[VersionRecord] = None  # the registered candidate (None: cancelled / no step)
    promoted: bool = False
    current: Optional[str] = None  # the registry's current version after the run
    incumbent: Optional[str] = None
    incumbent_dice: Optional[float] = None
    val_dice: Optional[float] = None
    val_subjects: Optional[int] = None  # the subjects (patients) of the validation cases
    steps: int = 0
    train_seconds: float = 0.0
    total_seconds: float = 0.0
    reason: str = ""
    history: List[Dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["version"] = self.version.to_dict() if self.version is not None else None
        return out


class StatusWriter:
    """The job's status as a JSON file, replaced whole on each write (readers never see a partial one).

    Not fsynced: it is progress for a person or a poller, recreated by the next write; what must
    survive a crash (versions, the registry) is written with ``SegAssistLib.files``. ``lock``: held
    for each write of the file (a job's watchdog holds it to write its own final status, then ends
    the process: no write of this writer lands after that one).
    """

    def __init__(
        self,
        path: Optional[Path],
        min_interval_s: float = 0.5,
        callback: Optional[Callable[[Dict[str, Any]], None]] = None,
        lock: Optional[Any] = None,
        **initial: Any,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.min_interval_s = min_interval_s
        self.callback = callback
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.data: Dict[str, Any] = {"state": "starting", "pid": os.getpid(), "started_at": time.time()}
        self.data.update(initial)
        self._last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.data.update(fields)
        now = time.time()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.data["updated_at"] = now
        if self.path is not None:
            with self.lock:
                write_json_replace(self.path, self.data)
        if self.callback is not None:
            self.callback(dict(self.data))


def write_json_replace(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- steps


def _inputs(images, prevs, prompts: List[List[PatchPrompt]], patch: int) -> torch.Tensor:
    return torch.stack(
        [assemble_input(img, prev, draw_prompts(pp, patch)) for img, prev, pp in zip(images, prevs, prompts)]
    )


def sample_batch(
    cases: List[TrainCase], rng: np.random.Generator, patch: int, batch_size: int
) -> Tuple[List[torch.Tensor], List[np.ndarray]]:
    images, targets, tries = [], [], 0
    while len(images) < batch_size:
        tries += 1
        if tries > 100 * batch_size:
            raise TrainingError("no usable training patch found: are the labels almost empty?")
        case = cases[int(rng.integers(len(cases)))]
        sample = sample_patch(case, case.targets[int(rng.integers(len(case.targets)))], rng, patch)
        if sample is not None:
            images.append(sample[0])
            targets.append(sample[1])
    return images, targets


def simulate_prompts(
    network: torch.nn.Module,
    images: List[torch.Tensor],
    targets: List[np.ndarray],
    rng: np.random.Generator,
    patch: int,
    max_rounds: int,
    corrupt_share: float,
    mix: PromptMix = DEFAULT_MIX,
) -> Tuple[List[torch.Tensor], List[List[PatchPrompt]]]:
    """Previous masks and prompt lists for a batch: the simulated interaction the step learns from.

    The same scheme as the base model's training: a first prompt; for a share of the batch a
    corrupted previous mask (as an imperfect proposal would be) with a correction at its largest
    error; then 0..max_rounds rounds of the network's own answer plus a correction. Prompt kinds
    are drawn with ``mix``.
    """
    device = next(network.parameters()).device
    scribbles, lassos = mix.correction_scribble_share, mix.correction_lasso_share
    starts = [
        simulation.starting_point(gt, rng, corrupt_share=corrupt_share, weights=mix.first_kind_weights,
                                  scribble_share=scribbles, lasso_share=lassos)
        for gt in targets
    ]
    prompts = [start_prompts for start_prompts, _ in starts]
    prevs = [torch.zeros((patch,) * 3) if prior is None else torch.from_numpy(prior.astype(np.float32))
             for _, prior in starts]
    rounds = int(rng.integers(0, max_rounds + 1))
    if rounds:
        was_training = network.training
        network.eval()
        with torch.no_grad():
            for _ in range(rounds):
                pred = (network(_inputs(images, prevs, prompts, patch).to(device))[:, 0] > 0).cpu()
                for i, gt in enumerate(targets):
                    correction = simulation.correction_prompt(gt, pred[i].numpy(), rng, scribbles, lassos)
                    if correction is not None:
                        prompts[i].append(correction)
                    prevs[i] = pred[i].float()
        network.train(was_training)
    return prevs, prompts


class _Candidate:
    """The network being trained, its trainable parameters and how to save it."""

    def __init__(self, base: LoadedModel, registry: AdapterRegistry, incumbent: Optional[VersionRecord],
                 cfg: AdapterTrainConfig) -> None:
        self.base, self.cfg = base, cfg
        self.adapters: Optional[AdapterSet] = None
        self.warm_from: Optional[str] = None
        if cfg.kind == FULL:
            if cfg.warm_start and incumbent is not None:
                self.network = version_network(base, registry, incumbent, merge=True)
                self.warm_from = incumbent.id
            else:
                self.network = base_copy(base)
            for p in self.network.parameters():
                p.requires_grad_(True)
            self.network.to(cfg.device)
            self.parameters = list(self.network.parameters())
            self.undecayed: List[torch.nn.Parameter] = []
            self.trainable = sum(p.numel() for p in self.parameters)
            self.share = 1.0
            return
        self.network = base_copy(base)
        if cfg.warm_start and incumbent is not None and incumbent.kind == cfg.kind:
            adapters = load_adapter(self.network, registry.file_path(incumbent), merge=False)
            if self._same_shape(adapters):
                self.adapters, self.warm_from = adapters, incumbent.id
            else:
                adapters.remove()
        if self.adapters is None:
            self.adapters = apply_adapter(
                self.network,
                AdapterKind.parse(cfg.kind),
                cfg.rank,
                lora_rank=cfg.lora_rank if cfg.kind == "salt" else None,
                alpha=cfg.alpha,
                expected_identity=base.identity,
            )
        self.network.to(cfg.device)  # before the optimiser sees the parameters
        self.parameters = self.adapters.parameters()
        # weight decay pulls towards 0, which for SALT's singular-value scales (1 = unchanged) would
        # shrink the top singular values however little there is to learn: scales are not decayed
        named = list(self.adapters.named_parameters())
        self.undecayed = [p for name, p in named if name.rsplit(".", 1)[-1] == "scale"]
        self.trainable = self.adapters.trainable_parameter_count()
        self.share = self.adapters.trainable_share()

    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimiser's parameter groups: everything decayed but SALT's scales."""
        undecayed = {id(p) for p in self.undecayed}
        groups = [{"params": [p for p in self.parameters if id(p) not in undecayed]}]
        if self.undecayed:
            groups.append({"params": list(self.undecayed), "weight_decay": 0.0})
        return groups

    def _same_shape(self, adapters: AdapterSet) -> bool:
        """Continue from the incumbent only if the requested ranks are the incumbent's."""
        c = adapters.config
        return (
            (self.cfg.rank is None or self.cfg.rank == c.rank)
            and (self.cfg.lora_rank is None or self.cfg.kind != "salt" or self.cfg.lora_rank == c.lora_rank)
            and (self.cfg.alpha is None or self.cfg.alpha == c.alpha)
        )

    def save(self, path: Path, meta: Dict[str, Any]) -> None:
        if self.adapters is not None:
            self.adapters.save(path, meta=meta)
        else:
            save_full_version(path, self.network, self.base.config, self.base.identity, meta)


def train_step(
    candidate: _Candidate,
    optimiser: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    cases: List[TrainCase],
    rng: np.random.Generator,
    patch: int,
    cfg: AdapterTrainConfig,
    lr: float,
    mix: PromptMix = DEFAULT_MIX,
) -> float:
    """One optimiser step; the loss. A loss that is not finite raises :class:`NonFiniteLossError`
    before the step, so the parameters stay as they were."""
    network = candidate.network
    images, targets = sample_batch(cases, rng, patch, cfg.batch_size)
    prevs, prompts = simulate_prompts(
        network, images, targets, rng, patch, cfg.max_correction_rounds, cfg.corrupt_share, mix
    )
    network.train()
    device = next(network.parameters()).device
    x = _inputs(images, prevs, prompts, patch).to(device)
    y = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32)).to(device)
    for group in optimiser.param_groups:
        group["lr"] = lr
    loss = loss_fn(network(x), y)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the training loss became {value} (learning rate {lr:.3g})")
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return value


class _ValidationBudget:
    """The time kept for the final validation: its clicks at the measured cost per click, with a
    margin. The cost is the incumbent's until the candidate's own is measured (then the larger)."""

    def __init__(self, per_click: float, clicks: int) -> None:
        self.incumbent_per_click, self.clicks = per_click, clicks
        self.per_click, self.measured = per_click, False

    def measure(self, validation: ValidationResult) -> None:
        if validation.clicks:
            self.per_click = max(self.incumbent_per_click, validation.seconds_per_click)
            self.measured = True

    def reserve(self) -> float:
        return VALIDATION_MARGIN * self.per_click * self.clicks


def first_step_estimate(network: torch.nn.Module, cfg: AdapterTrainConfig, patch: int) -> float:
    """What the first training step may take, before any was taken: one forward pass of ``network`` on a
    batch of the step's shape, timed, for each pass a step makes at most (``max_correction_rounds`` and
    ``STEP_PASSES_BEYOND_ROUNDS``), with ``STEP_ESTIMATE_MARGIN``. Without gradients, in eval mode and
    on zeros: it draws nothing from a random generator, so a seeded run's weights stay the same."""
    device = next(network.parameters()).device
    zeros = [torch.zeros((patch,) * 3)] * cfg.batch_size
    x = _inputs(zeros, zeros, [[] for _ in zeros], patch).to(device)
    was_training = network.training
    network.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        network(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    network.train(was_training)
    return STEP_ESTIMATE_MARGIN * seconds * (cfg.max_correction_rounds + STEP_PASSES_BEYOND_ROUNDS)


class _StepCost:
    """What the next training step is expected to take: the estimate before the first one, then the
    slowest of the last ``RECENT_STEP_TIMES`` (not their median: a step runs 0 to ``max_correction_rounds``
    correction rounds, and one that starts with only a typical step's time left overruns)."""

    def __init__(self, estimate: float) -> None:
        self.estimate = estimate
        self.last = 0.0
        self._recent: deque = deque(maxlen=RECENT_STEP_TIMES)

    def done(self, seconds: float) -> None:
        self.last = seconds
        self._recent.append(seconds)

    def next(self) -> float:
        return max(self._recent) if self._recent else self.estimate


def _unfinished_reason(
    cfg: AdapterTrainConfig, validation: ValidationResult, steps: int, late: float, step_cost: _StepCost
) -> str:
    """Why the candidate's validation did not finish, and what to change: when training ran into the
    time kept for it (a step slower than expected), fewer validation clicks would not have helped."""
    said = (
        f"the candidate's validation did not finish within the time budget of {cfg.time_budget_s:.0f} s "
        f"({_scored(validation)} after {steps} training steps): not promoted, nothing registered; "
    )
    if late > 0:
        return said + (
            f"the last training step took {step_cost.last:.1f} s and ran {late:.1f} s into the time kept for the "
            f"validation; give a larger time_budget_s"
        )
    return said + "give a larger time_budget_s, or fewer val_clicks or max_val_cases"


def _scored(validation: ValidationResult) -> str:
    return f"{len(validation.per_case)} of {validation.cases} cases scored in {validation.seconds:.1f} s"


class NonFiniteLossError(TrainingError):
    """The loss or the parameters became NaN or infinite: the run cannot go on (usually a learning
    rate too high). Nothing is registered."""

    code = "training_diverged"


def _non_finite_parameters(candidate: _Candidate) -> int:
    """How many trainable tensors of the candidate hold NaN or infinity."""
    return sum(not bool(torch.isfinite(p).all()) for p in candidate.parameters)


# ---------------------------------------------------------------------------------------- the cases


@dataclass
class _Split:
    """The usable cases split for one run: training and validation pairs, and each validation case's subject key."""

    train: List[Tuple[CaseRecord, LabelVersion]]
    val: List[Tuple[CaseRecord, LabelVersion]]
    groups: Dict[str, str]


def _split(store: Datastore, registry: AdapterRegistry, cfg: AdapterTrainConfig) -> _Split:
    """The hold-out split of the usable cases (``traindata``), with the subjects of every case in the
    store: a subject whose trained-on case has left the usable set (rejected in review, reopened) keeps
    its other cases out of validation all the same."""
    pairs, too_small = usable_and_too_small(store, cfg.label_value)
    check_enough_cases(len(pairs), [case.name for case in too_small])
    trained_on = {c for version in registry.read().versions for c in version.train_cases}
    subjects = store.subjects()
    train_ids, val_ids = holdout_split(
        [c.id for c, _ in pairs], cfg.val_fraction, cfg.min_val_cases, cfg.max_val_cases,
        keys={c.id: c.content_hash for c, _ in pairs}, trained_on=trained_on, subjects=subjects,
    )  # fmt: skip
    by_id = {c.id: (c, lv) for c, lv in pairs}
    groups = {c: key for key, members in subject_groups(val_ids, subjects).items() for c in members}
    return _Split([by_id[i] for i in train_ids], [by_id[i] for i in val_ids], groups)


def _within_memory(
    store: Datastore, cfg: AdapterTrainConfig, train: List[Tuple[CaseRecord, LabelVersion]],
    val: List[Tuple[CaseRecord, LabelVersion]],
) -> Tuple[List[Tuple[CaseRecord, LabelVersion]], str]:
    """The training cases that fit in ``max_case_memory_gib`` beside the validation cases, and a note on
    those left out ("" when none was), both estimated before anything is read (``traindata``)."""
    budget = int(cfg.max_case_memory_gib * GIB)
    val_bytes = sum(validation_bytes(store, case) for case, _ in val)
    if val_bytes > budget:
        raise TrainingError(
            f"the {len(val)} validation case(s) alone would take about {val_bytes / GIB:.2f} GiB in memory, more "
            f"than max_case_memory_gib ({cfg.max_case_memory_gib:g} GiB): give a larger max_case_memory_gib, or "
            f"a smaller max_val_cases"
        )
    kept, left = fit_in_memory(train, budget - val_bytes)
    if not kept:
        smallest = min(training_bytes(case) for case, _ in train)
        raise TrainingError(
            f"no training case fits in max_case_memory_gib ({cfg.max_case_memory_gib:g} GiB) beside the "
            f"{len(val)} validation case(s) ({val_bytes / GIB:.2f} GiB): the smallest would take "
            f"{smallest / GIB:.2f} GiB; give a larger max_case_memory_gib"
        )
    if not left:
        return kept, ""
    return kept, (
        f"{len(left)} of the {len(train)} training cases left out (not trained on): they did not fit in "
        f"max_case_memory_gib ({cfg.max_case_memory_gib:g} GiB) beside the validation cases; trained on the "
        f"{len(kept)} most recently submitted that fit"
    )


def _load_cases(
    store: Datastore, cfg: AdapterTrainConfig, val: List[Tuple[CaseRecord, LabelVersion]],
    train: List[Tuple[CaseRecord, LabelVersion]], status: StatusWriter, stop: Callable[[], bool],
) -> Optional[Tuple[List[LabelledCase], List[TrainCase]]]:
    """The validation cases and the training cases, read one at a time (``progress`` in the status says
    which); ``None`` when ``stop()`` asked to stop before one of them. A training case keeps only what
    training needs (``LabelledCase.train_case``)."""
    total = len(val) + len(train)
    val_cases: List[LabelledCase] = []
    train_cases: List[TrainCase] = []
    for i, pair in enumerate([*val, *train]):
        if stop():
            status.update(progress=None)
            return None
        status.update(progress=f"loading case {i + 1} of {total}")
        case = load_labelled(store, [pair], cfg.label_value)[0]
        if i < len(val):
            val_cases.append(case)
        else:
            train_cases.append(case.train_case())
    status.update(progress=None)
    return val_cases, train_cases


# ---------------------------------------------------------------------------------------- the run


def run_training(
    store_root: Union[str, Path],
    checkpoint: Union[str, Path],
    config: Optional[AdapterTrainConfig] = None,
    *,
    job_id: Optional[str] = None,
    status_path: Optional[Path] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
    status_extra: Optional[Dict[str, Any]] = None,
    status_lock: Optional[Any] = None,
) -> TrainingResult:
    """One training run in this process (see the module docstring). ``jobs`` runs it in another.

    ``status_path``: where to keep the JSON status; ``on_progress(status)``: called with the same
    data (at most every ``status_every_s``, and at every phase change); ``should_stop()``: polled
    between case loads, steps and validation cases; ``status_extra``: fields added to the status.
    ``status_lock``: a re-entrant lock (``threading.RLock``) held for every write of the status file,
    and from just before the registration until the final status is written. ``jobs``' watchdog
    takes it before it judges the job: it never stops a job that is recording its version (the
    registry would name a version that the job's status calls failed), nor writes over its final
    status.
    """
    t_start = time.perf_counter()
    cfg = (config or AdapterTrainConfig()).check()
    stop = should_stop or (lambda: False)
    status = StatusWriter(
        status_path,
        cfg.status_every_s,
        on_progress,
        status_lock,
        job_id=job_id,
        kind=cfg.kind,
        max_steps=cfg.max_steps,
        time_budget_s=cfg.time_budget_s,
        step=0,
        **(status_extra or {}),
    )

    def elapsed() -> float:
        return time.perf_counter() - t_start

    if cfg.seed is None:  # a new seed per run: a retraining on the same labels draws new samples
        cfg = replace(cfg, seed=secrets.randbelow(MAX_SEED + 1))
    status.update(force=True, state="running", phase="loading", seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    store = open_datastore(store_root)
    try:
        registry = AdapterRegistry(store.root)
        base = load_checkpoint(checkpoint)
        split = _split(store, registry, cfg)
        train_pairs, memory_note = _within_memory(store, cfg, split.train, split.val)
        status.update(force=True, memory_note=memory_note or None)
        loaded = _load_cases(store, cfg, split.val, train_pairs, status, stop)
        if loaded is not None:
            mix = mix_from_logs(store.prompt_log(label.id) for _, label in train_pairs)
            # torch builds its first optimiser with an import of seconds: here, before the time is shared out
            torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    finally:
        store.close()
    if loaded is None:
        return _finish(status, TrainingResult(state="cancelled"), t_start, "cancelled while loading the cases")
    val_cases, train_cases = loaded
    train_ids, val_ids = [c.id for c, _ in train_pairs], [c.id for c, _ in split.val]
    val_groups, val_subjects = split.groups, len(set(split.groups.values()))
    if not train_cases or not val_cases:
        raise TrainingError("training needs at least one training and one validation case")
    status.update(force=True, train_cases=len(train_cases), val_cases=len(val_cases), val_subjects=val_subjects,
                  prompt_mix=mix.to_dict())

    # the incumbent: the current version if it belongs to these base weights
    state = registry.read()
    incumbent = state.current_record()
    expected_current = state.current
    notes = [memory_note] if memory_note else []
    if incumbent is not None and incumbent.base_identity != base.identity:
        notes.append(f"current version {incumbent.id} belongs to other base weights; compared with the base model")
        incumbent = None
    engine = BuiltinEngine(base, device=cfg.device)
    if incumbent is not None:
        engine.swap_network(version_network(base, registry, incumbent), f"incumbent {incumbent.id}")
    # the budget: validations stop before a click that would end past their deadline, training
    # before a step that would eat into the time kept for the final validation
    end_of_validation = t_start + cfg.time_budget_s - REGISTRATION_RESERVE_S
    status.update(force=True, phase="validating incumbent", incumbent=version_label(incumbent))
    now = time.perf_counter()
    inc_val = validate(engine, val_cases, cfg.val_clicks, stop, val_groups,
                       deadline=now + INCUMBENT_VALIDATION_SHARE * (end_of_validation - now))
    result = TrainingResult(state="cancelled", incumbent=version_label(incumbent), current=expected_current,
                            val_subjects=val_subjects)
    if inc_val is None:
        return _finish(status, result, t_start, "cancelled before training")
    if not inc_val.finished:
        result.state = "done"
        return _finish(
            status, result, t_start,
            f"the validation of {version_label(incumbent)} did not fit in its share of the time budget of "
            f"{cfg.time_budget_s:.0f} s ({_scored(inc_val)} after {elapsed():.1f} s): nothing trained or "
            f"registered; give a larger time_budget_s, or fewer val_clicks or max_val_cases",
        )
    result.incumbent_dice = inc_val.dice
    status.update(force=True, incumbent_dice=inc_val.dice, incumbent_first_click_dice=inc_val.first_click_dice)

    torch.manual_seed(cfg.seed)  # a new adapter's start: the same whether or not an incumbent was built
    candidate = _Candidate(base, registry, incumbent, cfg)
    optimiser = torch.optim.AdamW(candidate.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
    patch = int(base.config.patch_size)
    # what one click of validation costs: the incumbent's, until the candidate's own is measured (a
    # base model that segments nothing answers far faster than one that does)
    budget = _ValidationBudget(inc_val.seconds_per_click, len(val_cases) * cfg.val_clicks)

    def train_end() -> float:  # when training must stop to leave the final validation its time
        return end_of_validation - budget.reserve()

    t_train0 = time.perf_counter()
    probe_at = t_train0 + PROBE_AT * (train_end() - t_train0)
    step_cost = _StepCost(first_step_estimate(candidate.network, cfg, patch))
    schedule = CosineSchedule(cfg.lr, cfg.max_steps, floor=0.05)
    losses: List[float] = []
    step, cancelled, last_val, late = 0, False, None, 0.0
    status.update(force=True, phase="training", warm_start=candidate.warm_from,
                  trainable_parameters=candidate.trainable, trainable_share=candidate.share)
    while step < cfg.max_steps:
        if stop():
            cancelled = True
            break
        now = time.perf_counter()
        if step and not budget.measured and now >= probe_at:
            # halfway: the candidate answers one click on each case, to measure its cost per click
            engine.swap_network(candidate.network, "candidate")
            probe = validate(engine, val_cases, 1, stop, val_groups, deadline=train_end(),
                             click_estimate=budget.per_click)
            candidate.network.train()
            if probe is None:
                cancelled = True
                break
            budget.measure(probe)
            status.update(validation_seconds_per_click=budget.per_click)
            now = time.perf_counter()
        if now + step_cost.next() > train_end():  # the next step would eat into the final validation's time
            break
        lr = schedule.rate(now - t_train0, train_end() - t_train0)
        t_step = time.perf_counter()
        try:
            losses.append(train_step(candidate, optimiser, loss_fn, train_cases, rng, patch, cfg, lr, mix))
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"{exc} at step {step + 1}: the run stopped and registered nothing; try a lower learning_rate "
                f"(this run: {cfg.lr:g})"
            ) from None
        step += 1
        step_seconds = time.perf_counter() - t_step
        schedule.done(step_seconds)
        step_cost.done(step_seconds)
        late = time.perf_counter() - train_end()  # > 0: this step ate into the final validation's time
        status.update(step=step, loss=losses[-1], loss_avg=float(np.mean(losses[-20:])), lr=lr,
                      elapsed_s=elapsed(), train_seconds=time.perf_counter() - t_train0)
        due = bool(cfg.validate_every) and step % cfg.validate_every == 0 and step < cfg.max_steps
        if due and train_end() - time.perf_counter() > budget.reserve():  # room for this and the final one
            engine.swap_network(candidate.network, "candidate")
            status.update(force=True, phase="validating")
            last_val = validate(engine, val_cases, cfg.val_clicks, stop, val_groups, deadline=train_end(),
                                click_estimate=budget.per_click)
            candidate.network.train()
            if last_val is None:
                cancelled = True
                break
            budget.measure(last_val)
            if last_val.finished:  # one cut short by the budget scores only some cases: not a point of the curve
                loss_avg = float(np.mean(losses[-20:]))
                result.history.append({"step": step, "val_dice": last_val.dice, "loss_avg": loss_avg})
                status.update(force=True, phase="training", val_dice=last_val.dice)
            else:
                status.update(force=True, phase="training")
    train_seconds = time.perf_counter() - t_train0
    result.steps, result.train_seconds = step, train_seconds
    status.update(force=True, step=step, train_seconds=train_seconds)
    if cancelled:
        return _finish(status, result, t_start, "cancelled")
    if step == 0:
        result.state = "done"
        return _finish(
            status, result, t_start,
            f"the time budget of {cfg.time_budget_s:.0f} s was too small for even one training step (loading and "
            f"the validation of {version_label(incumbent)} took {elapsed():.1f} s; a step of batch_size "
            f"{cfg.batch_size} is expected to take about {step_cost.estimate:.1f} s, and "
            f"{max(0.0, train_end() - t_train0):.1f} s were left for training once the final validation's time "
            f"was kept): nothing registered; give a larger time_budget_s, or a smaller batch_size",
        )

    broken = _non_finite_parameters(candidate)
    if broken:
        raise NonFiniteLossError(
            f"after {step} steps {broken} trainable tensor(s) hold NaN or infinity: nothing registered; try a "
            f"lower learning_rate (this run: {cfg.lr:g})"
        )
    engine.swap_network(candidate.network, "candidate")
    status.update(force=True, phase="validating")
    cand_val: Optional[ValidationResult] = validate(engine, val_cases, cfg.val_clicks, stop, val_groups,
                                                    deadline=end_of_validation, click_estimate=budget.per_click)
    if cand_val is None:
        return _finish(status, result, t_start, "cancelled")
    if not cand_val.finished:
        result.state = "done"
        return _finish(status, result, t_start, _unfinished_reason(cfg, cand_val, step, late, step_cost))
    result.val_dice = cand_val.dice
    # from here to the final status the job records its result: the watchdog waits for it (status_lock)
    with status.lock:  # status_lock (or no lock), as for each status write
        status.update(force=True, phase="registering", val_dice=cand_val.dice,
                      val_first_click_dice=cand_val.first_click_dice)
        better = cand_val.dice > inc_val.dice + cfg.min_improvement
        reason = (
            f"validation Dice {cand_val.dice:.4f} vs {inc_val.dice:.4f} of {version_label(incumbent)}"
            f" ({'better' if better else 'not better'}"
            f"{f' by more than {cfg.min_improvement}' if cfg.min_improvement else ''})"
        )
        for note in notes:
            reason += f"; {note}"
        meta = {
            "job_id": job_id,
            "val_dice": cand_val.dice,
            "incumbent": version_label(incumbent),
            "incumbent_dice": inc_val.dice,
            "train_cases": train_ids,
            "val_cases": val_ids,
            "val_subjects": val_subjects,
            "steps": step,
            "config": cfg.to_dict(),
            "prompt_mix": mix.to_dict(),
        }

        def writer(path: Path, version_id: str) -> None:
            candidate.save(path, dict(meta, version=version_id))

        if stop():  # a cancel that arrived during the final validation still wins: nothing is registered
            return _finish(status, result, t_start, "cancelled")

        record = registry.add_version(
            cfg.kind,
            writer,
            {
                "base_identity": base.identity,
                "val_dice": cand_val.dice,
                "incumbent": incumbent.id if incumbent is not None else None,
                "incumbent_dice": inc_val.dice,
                "train_cases": train_ids,
                "val_cases": val_ids,
                "steps": step,
                "train_seconds": round(train_seconds, 3),
                "trainable_parameters": int(candidate.trainable),
                "trainable_share": float(candidate.share),
                "warm_start": candidate.warm_from,
                "reason": reason,
                "config": cfg.to_dict(),
                "prompt_mix": mix.to_dict(),
                "job_id": job_id,
            },
            promote=better,
            expected_current=expected_current,
        )
        result.state = "done"
        result.version = record
        result.promoted = record.status == "promoted"
        result.current = registry.read().current
        return _finish(status, result, t_start, record.reason)


def _finish(status: StatusWriter, result: TrainingResult, t_start: float, reason: str) -> TrainingResult:
    result.reason = reason
    result.total_seconds = time.perf_counter() - t_start
    status.update(
        force=True,
        state=result.state,
        phase="finished",
        message=reason,
        elapsed_s=result.total_seconds,
        result=result.to_dict(),
    )
    return result
