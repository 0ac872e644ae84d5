"""Training the built-in promptable network.

Each step: cut a batch of patches (real training-split cases and synthetic volumes), give each a
simulated first prompt (or a corrupted previous mask and a correction of it) and draw it (both in
the loader processes), optionally run the network a few rounds without gradients and add a
correction at the largest error each round, then learn from the final round. The learning rate is
a cosine over ``max_steps`` or over the wall-clock budget, whichever is projected to end the run
(``training.schedule``), so a run of any length ends at a low rate. Each batch's randomness comes
from the seed and the batch's number (:func:`batch_rng`), so a seed gives the same weights at any
speed when ``max_steps`` ends the run; checkpoints are written atomically and a run resumed from
one goes on exactly as the run would have (given the same seed, batch_size and loader_workers, which
the draws depend on, and on a CPU the same threads: ``segassist train`` warns when a resume changes them).

Usage: ``segassist train --out runs/v1 --minutes 120 [--resume runs/v1/state.pt] [--config cfg.json]``
(the subcommand lives in ``training/cli.py`` so that ``segassist --help`` needs no torch).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.losses import DiceCELoss

from SegAssistLib.engine.encoding import PatchPrompt, assemble_input, draw_prompts
from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint
from SegAssistLib.engine.network import config_problem as network_problem
from SegAssistLib.errors import ModelError, SegAssistError
from SegAssistLib.files import atomic_write, plain_data
from SegAssistLib.machine import machine_info
from SegAssistLib.stop_signals import STOP_SIGNALS, Stopped, restore_handlers, signal_name
from SegAssistLib.training import simulation
from SegAssistLib.training.data import (
    CLICK_UNION_DATASETS,
    TrainCase,
    load_training_cases,
    sample_patch,
    synthetic_train_case,
)
from SegAssistLib.training.schedule import CosineSchedule

# the command line reads this default as $SEGASSIST_SHARED_DATA, else the folder beside the repository
DEFAULT_DATA_ROOT = "../shared/data"


@dataclass
class TrainConfig:
    data_root: str = DEFAULT_DATA_ROOT
    datasets: Optional[List[str]] = None
    network: dict = field(default_factory=lambda: asdict(NetworkConfig()))
    batch_size: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    minutes: float = 60.0
    max_steps: int = 1_000_000
    synthetic_share: float = 0.35
    click_union_datasets: List[str] = field(default_factory=lambda: list(CLICK_UNION_DATASETS))
    max_correction_rounds: int = 3
    corrupt_share: float = 0.2
    checkpoint_minutes: float = 5.0
    device: str = "cpu"  # "cuda" trains on a GPU; patches are still cut on the CPU by the loader
    threads: int = 1  # see ../shared/docs/ARCHITECTURE.md: 2 threads beside other work are 4-7x slower than 1
    # processes that cut patches and simulate and draw their first prompts while the network trains
    # (0: the training process does it)
    loader_workers: int = 1
    # processes that find the correction clicks between rounds (0: the training process does it).
    # On a GPU the network is fast and this CPU work is what a step waits for.
    simulation_workers: int = 0
    seed: int = 0
    # corrections drawn as a lasso around the largest error region (negative around a spill)
    correction_lasso_share: float = simulation.CORRECTION_LASSO_SHARE
    # GPU runs: deterministic kernels (torch.use_deterministic_algorithms, cuDNN's deterministic
    # choice), so a seed gives the same weights on the same machine, somewhat slower. CPU runs are
    # deterministic without it (same machine and threads).
    deterministic: bool = False


# whole-number settings and their least values
_WHOLE_AT_LEAST = {"batch_size": 1, "max_steps": 1, "threads": 1, "loader_workers": 0, "simulation_workers": 0,
                   "max_correction_rounds": 0}
_SHARES = ("synthetic_share", "corrupt_share", "correction_lasso_share")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_problem(cfg: TrainConfig) -> Optional[str]:
    """What makes ``cfg`` a run that cannot train, or whose ``model.pt`` the engine would refuse to load
    (None: nothing). Checked before anything is written: torch found most of these only at its first
    use, after the run folder was made (a seed out of range in the loader, a patch its strides do not
    divide at the first step), and a network the engine refuses trained to the end."""
    for name, least in _WHOLE_AT_LEAST.items():
        value = getattr(cfg, name)
        if not _whole(value) or value < least:
            return f"{name} must be a whole number of at least {least}, got {value!r}"
    if not _whole(cfg.seed) or not 0 <= cfg.seed <= MAX_SEED:
        return f"seed must be a whole number from 0 to {MAX_SEED}, got {cfg.seed!r}"
    if not _number(cfg.minutes) or not cfg.minutes > 0:
        return f"the training budget must be more than 0 minutes, got {cfg.minutes}"
    if not _number(cfg.checkpoint_minutes) or not cfg.checkpoint_minutes > 0:
        return f"checkpoint_minutes must be more than 0, got {cfg.checkpoint_minutes!r}"
    if not _number(cfg.learning_rate) or not 0 < cfg.learning_rate < math.inf:
        return f"learning_rate must be a finite number above 0, got {cfg.learning_rate!r}"
    if not _number(cfg.weight_decay) or not 0 <= cfg.weight_decay < math.inf:
        return f"weight_decay must be a finite number of at least 0, got {cfg.weight_decay!r}"
    for name in _SHARES:
        if not _number(getattr(cfg, name)) or not 0 <= getattr(cfg, name) <= 1:
            return f"{name} must be from 0 to 1, got {getattr(cfg, name)!r}"
    try:
        network = NetworkConfig.from_dict(cfg.network, strict=True)
    except (ModelError, TypeError, ValueError, AttributeError) as exc:
        return f"network: {exc}"
    problem = network_problem(network)
    return f"network: {problem} (the engine would not load the trained model)" if problem else None


def nothing_left(cfg: TrainConfig, step: int, elapsed: float) -> Optional[str]:
    """Why a run at ``step`` after ``elapsed`` seconds has no time left to train (None: it has): it would
    train no step and save its weights as final. ``minutes`` is the run's whole budget, earlier
    sessions included."""
    if elapsed < cfg.minutes * 60.0:
        return None
    used = f"{elapsed / 60.0:.4g}"
    return (f"the state has used {used} of the run's {cfg.minutes:g} minutes: give --minutes above {used} (the "
            "total budget, including earlier sessions of the run) to continue it")


@dataclass
class Sample:
    """A training patch and how its simulated session starts (made where patches are cut: in the
    loader processes when there are any, so the training process only runs the network and the
    correction rounds). Tensors, not arrays, for the big parts: from a loader process they travel
    through shared memory instead of being pickled."""

    image: torch.Tensor  # (P, P, P) normalised intensities
    target: np.ndarray  # (P, P, P) bool
    prompts: List[PatchPrompt]
    previous: torch.Tensor  # (P, P, P) float: empty, or a corrupted mask to correct
    channels: torch.Tensor  # the prompts drawn, (5, P, P, P) bool; corrections are added in place

    def add_correction(self, correction: PatchPrompt) -> None:
        self.prompts.append(correction)
        draw_prompts([correction], self.target.shape[0], out=self.channels.numpy())


def start_sample(
    image: torch.Tensor,
    target: np.ndarray,
    kinds: Sequence[str],
    rng: np.random.Generator,
    corrupt_share: float,
    lasso_share: float = simulation.CORRECTION_LASSO_SHARE,
) -> Sample:
    prompts, prior = simulation.starting_point(target, rng, kinds, corrupt_share, lasso_share=lasso_share)
    previous = torch.zeros(target.shape) if prior is None else torch.from_numpy(prior.astype(np.float32))
    channels = torch.from_numpy(draw_prompts(prompts, target.shape[0]))
    return Sample(image, target, prompts, previous, channels)


class LoaderFailure(NamedTuple):
    """What a loader process hands over in place of samples when the training data cannot be read (a
    pack file damaged in transfer): the message alone, told in one line by the training process, not
    torch's re-raised worker traceback."""

    message: str


# the random streams of a run, each drawn for one batch from (seed, stream, batch index): a resumed run
# replays exactly what the uninterrupted one would have drawn, and no two seeds share a stream
LOADER_STREAM, ROUNDS_STREAM, SYNTHETIC_STREAM = 0, 1, 2


def batch_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    """The generator of one batch's draws in one of the run's streams."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream, *(int(i) for i in index)]))


class _SyntheticPool:
    """Synthetic volumes are costly to make: each loader process draws from a pool of ``SLOTS``, each
    slot replaced after ``lifetime`` of the process's batches (the slots staggered, so one is renewed
    every ``lifetime / SLOTS`` batches). What a slot holds is a function of (seed, lane, slot, its
    generation), made when first drawn: the pool at a batch is the same on a resumed run."""

    SLOTS = 12
    USES = 120  # synthetic patches cut from a slot's volume before it is renewed, on average

    def __init__(self, seed: int, lane: int, draws_per_batch: float):
        self.seed, self.lane = seed, lane
        self.lifetime = max(1, round(self.USES / max(draws_per_batch, 1e-9)))
        self.held: dict = {}  # slot -> (generation, case)

    def draw(self, rng: np.random.Generator, lane_batch: int) -> TrainCase:
        slot = int(rng.integers(self.SLOTS))
        generation = (lane_batch + slot * self.lifetime // self.SLOTS) // self.lifetime
        held = self.held.get(slot)
        if held is None or held[0] != generation:
            made = synthetic_train_case(batch_rng(self.seed, SYNTHETIC_STREAM, self.lane, slot, generation))
            held = self.held[slot] = (generation, made)
        return held[1]


class PatchStream(torch.utils.data.IterableDataset):
    """An endless stream of :class:`Sample`: real or synthetic patches, each with its start (a first
    prompt, or a corrupted previous mask and its correction) simulated and drawn.

    Batch by batch: the stream's batches are numbered from ``offset`` (the step a run resumes at),
    and with ``W`` loader processes process ``w`` makes batches ``offset + w``, ``offset + w + W``, ...
    (the order in which the loader hands them out), each of ``batch_size`` samples drawn with
    :func:`batch_rng` of the batch's number. So batch ``n`` is the same whenever the stream starts
    (given the same ``loader_workers``: a volume of the synthetic pool depends on its process's lane).
    """

    def __init__(self, cfg: TrainConfig, patch: int, offset: int = 0):
        self.cfg, self.patch, self.offset = cfg, patch, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:  # a loader process; in the training process cfg.threads holds
            torch.set_num_threads(1)
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            real = self._real_cases()
        except SegAssistError as exc:
            if info is None:  # the training process: the error is its own
                raise
            yield LoaderFailure(str(exc))
            return
        print(f"training cases: { {k: len(v) for k, v in real.items()} }", flush=True)
        names = sorted(real)
        batch = self.offset + worker
        share = self.cfg.synthetic_share if real else 1.0
        pool = _SyntheticPool(self.cfg.seed, batch % workers, self.cfg.batch_size * share)
        while True:
            rng = batch_rng(self.cfg.seed, LOADER_STREAM, batch)
            for _ in range(self.cfg.batch_size):
                yield self._sample(rng, real, names, pool, batch // workers)
            batch += workers

    def _real_cases(self) -> Dict[str, List[TrainCase]]:
        if not self.cfg.data_root:
            return {}
        return load_training_cases(Path(self.cfg.data_root), self.cfg.datasets, self.cfg.click_union_datasets,
                                   self.patch)

    def _sample(self, rng: np.random.Generator, real: dict, names: List[str], pool: _SyntheticPool,
                lane_batch: int) -> Sample:
        while True:
            if not real or rng.random() < self.cfg.synthetic_share:
                case = pool.draw(rng, lane_batch)
            else:
                cases = real[names[int(rng.integers(len(names)))]]
                case = cases[int(rng.integers(len(cases)))]
            target = case.targets[int(rng.integers(len(case.targets)))]
            cut = sample_patch(case, target, rng, self.patch)
            if cut is not None:
                return start_sample(cut[0], cut[1], case.first_prompt_kinds(target), rng, self.cfg.corrupt_share,
                                    self.cfg.correction_lasso_share)


def use_deterministic_kernels() -> None:
    """Deterministic GPU kernels for this process (``TrainConfig.deterministic``): cuBLAS's fixed
    workspace (before CUDA starts), torch's deterministic algorithms (an operation without one
    warns rather than stopping the run) and cuDNN's deterministic, not benchmarked, choice."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def training_hardware(device: torch.device) -> str:
    """What a run trains on, for the model card: the GPU's name, or the CPU's and its cores."""
    info = machine_info(str(device))
    if "gpu" in info:
        return f"{info['gpu']} (CUDA), {info['cpu_count']} CPU cores"
    return f"{info['cpu']}, {info['cpu_count']} cores, CPU only"


def _correction_job(job: Tuple[np.ndarray, np.ndarray, int, float]) -> Optional[PatchPrompt]:
    target, prediction, seed, lasso_share = job
    return simulation.correction_prompt(target, prediction, np.random.default_rng(seed), lasso_share=lasso_share)


def _batch_inputs(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.stack([assemble_input(s.image, s.previous, s.channels.numpy()) for s in samples])


STATE_KEYS = ("model", "optimizer", "step", "elapsed")


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    """A signal held back, given to the handler that was set for it: a Python handler is called; by
    default Ctrl-C raises KeyboardInterrupt and another signal ends the process as it would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # SIG_DFL, or None (not set in Python): the default
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)  # its handler is back: the default action


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP arriving inside is given to its handler when it ends: an optimiser step
    and the step count that goes with it happen together or not at all (outside the main thread:
    nothing deferred)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[Tuple[int, object]] = []
    previous: Dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            previous[sig] = signal.signal(sig, lambda signum, frame: arrived.append((signum, frame)))
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        restore_handlers(previous)
        yield
        return
    try:
        yield
    finally:
        restore_handlers(previous)
        if arrived:
            _deliver(previous[arrived[0][0]], *arrived[0])


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise :class:`Stopped` (a KeyboardInterrupt), so that a run saves its
    state as on Ctrl-C; one set to be ignored (``nohup``) stays ignored. On the way out the previous
    handlers come back and the signal that stopped the run is given to its previous handler: by default
    the process then ends by it (exit status 128 + its number in a shell: 143, 129), once what was
    inside has cleaned up. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous: Dict[int, Any] = {}
    try:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        restore_handlers(previous)
        previous = {}
    try:
        yield
    except Stopped as exc:
        restore_handlers(previous)
        _deliver(previous.get(exc.signum), exc.signum, None)
        raise  # a handler of the caller's took it: the run still ended early
    finally:
        restore_handlers(previous)


def _quiet_when_the_trainer_leaves(_worker_id: int) -> None:
    """In a loader process: a trainer stopped (Ctrl-C, SIGTERM) while it fetched a batch's shared memory
    resets the connection multiprocessing's handle sharer is serving, whose thread then printed a
    traceback through ``sys.excepthook``; a connection the trainer dropped is no error to report."""
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, ConnectionError):
            previous(kind, value, traceback)

    sys.excepthook = hook


def _say(text: str) -> None:
    """A line that must not stop what follows: after SIGHUP (the terminal closed) writing may fail."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def read_training_state(path: Path, what: Optional[str] = None) -> dict:
    """A run's ``state.pt`` for ``--resume``: loaded as plain data (no pickled objects run) and
    checked; SegAssistError naming the file when it is not one, as ``what`` (default ``--resume PATH``:
    a caller without that option names it its own way)."""
    what = what or f"--resume {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, or objects beyond plain data
        raise SegAssistError(f"{what}: not a readable training state ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        hint = " (model.pt holds the weights only: resume from the run's state.pt)" if isinstance(state, dict) else ""
        raise SegAssistError(f"{what}: not a training state, it lacks {', '.join(missing)}{hint}")
    return state


def _check_resumed_network(state: dict, net_cfg: NetworkConfig) -> None:
    """Weights of another network can fit this one (other strides or patch size: same tensors):
    a state is resumed only with the network settings it was trained with."""
    saved = state.get("config")
    if not isinstance(saved, dict) or not isinstance(saved.get("network"), dict):
        return  # a state without its config (an older one): the weights' fit is all there is to check
    try:
        saved_cfg = NetworkConfig.from_dict(saved["network"])
    except (TypeError, ValueError) as exc:
        raise SegAssistError(f"the state's saved network settings are malformed: {exc}") from exc
    if saved_cfg != net_cfg:
        changed = [f"{name} {getattr(saved_cfg, name)} in the state, {getattr(net_cfg, name)} in the config"
                   for name in NetworkConfig.__dataclass_fields__ if getattr(saved_cfg, name) != getattr(net_cfg, name)]
        raise SegAssistError(f"the state was trained with other network settings ({'; '.join(changed)}): resume "
                             "with the run's own network settings")


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: Union[None, Path, dict] = None):
        self.cfg, self.out = cfg, out
        problem = config_problem(cfg)
        if problem:
            raise SegAssistError(f"the training config: {problem}")
        torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            use_deterministic_kernels()
        torch.manual_seed(cfg.seed)
        self.net_cfg = NetworkConfig.from_dict(cfg.network, strict=True)
        self._plain_config()  # what state.pt and model.pt could not hold is refused now, not after training
        self.device = torch.device(cfg.device)
        self.net = build_network(self.net_cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.loss = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.step, self.elapsed = 0, 0.0
        self.skipped_steps = 0  # steps whose loss was not finite: the optimiser never saw them
        time_limited = False  # the schedule follows the time budget (see training.schedule)
        if resume is not None:  # checked before anything is written (out is made below)
            state = resume if isinstance(resume, dict) else read_training_state(Path(resume))
            _check_resumed_network(state, self.net_cfg)
            try:
                self.net.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise SegAssistError(f"the state's weights do not fit this network ({self.net_cfg}): resume with "
                                     f"the run's own network settings ({str(exc).splitlines()[0]})") from exc
            self.opt.load_state_dict(state["optimizer"])
            for group in self.opt.param_groups:  # the state brings back its own; the config says (lr: per step)
                group["weight_decay"] = cfg.weight_decay
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
            self.skipped_steps = int(state.get("skipped_steps", 0))  # a state saved before it was kept: 0
            # a state saved before the schedule could follow the steps followed the time
            time_limited = bool(state.get("time_limited", True))
            spent = nothing_left(cfg, self.step, self.elapsed)
            if spent:
                raise SegAssistError(spent)
            if self.step >= cfg.max_steps:
                print(f"warning: the state is at step {self.step}, the run's max_steps: nothing is left to train "
                      "(a --config with a larger max_steps continues it)", file=sys.stderr, flush=True)
            print(f"resumed at step {self.step}", flush=True)
        self.schedule = CosineSchedule(cfg.learning_rate, cfg.max_steps, floor=0.03, step=self.step,
                                       time_limited=time_limited)
        self._pending: Optional[List[Sample]] = None  # a batch drawn before the clock started
        self.hardware = training_hardware(self.device)
        # spawned, not forked: by the first correction this process runs torch's and the loader's threads
        self.pool = (
            ProcessPoolExecutor(cfg.simulation_workers, mp_context=multiprocessing.get_context("spawn"))
            if cfg.simulation_workers > 0
            else None
        )
        self.stream = iter(
            torch.utils.data.DataLoader(
                PatchStream(cfg, self.net_cfg.patch_size, self.step),
                batch_size=cfg.batch_size,
                num_workers=cfg.loader_workers,
                collate_fn=list,
                persistent_workers=cfg.loader_workers > 0,
                prefetch_factor=4 if cfg.loader_workers > 0 else None,
                worker_init_fn=_quiet_when_the_trainer_leaves,
            )
        )

    def corrections(
        self,
        targets: Sequence[np.ndarray],
        predictions: Sequence[np.ndarray],
        rng: Optional[np.random.Generator] = None,
    ) -> List[Optional[PatchPrompt]]:
        """The simulated user's next click (or scribble, or lasso) on each sample, from one seed per
        sample drawn from ``rng`` (default: this step's), so the answer is the same whether the
        pool or this process finds it."""
        rng = rng if rng is not None else self._step_rng()
        share = self.cfg.correction_lasso_share
        jobs = [(t, p, int(s), share) for t, p, s in zip(targets, predictions, rng.integers(2**62, size=len(targets)))]
        if self.pool is None:
            return [_correction_job(job) for job in jobs]
        return list(self.pool.map(_correction_job, jobs))

    def close(self) -> None:
        """Stop the helper processes, the correction pool's and the loader's (a loader process outliving
        this one waits on its queue for good); calling it again does nothing."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        shutdown = getattr(self.stream, "_shutdown_workers", None)  # torch's iterator of loader processes
        if shutdown is not None:
            shutdown()

    def _lr(self) -> float:
        """This step's rate: a cosine over ``max_steps``, or over the time budget once that is
        projected to end the run first (see ``training.schedule``)."""
        return self.schedule.rate(self.elapsed, self.cfg.minutes * 60.0)

    def _step_rng(self) -> np.random.Generator:
        return batch_rng(self.cfg.seed, ROUNDS_STREAM, self.step)

    def next_batch(self) -> List[Sample]:
        if self._pending is not None:
            samples, self._pending = self._pending, None
            return samples
        return self._fetch()

    def _fetch(self) -> List[Sample]:
        batch = next(self.stream)
        if batch and isinstance(batch[0], LoaderFailure):
            raise SegAssistError(batch[0].message)
        return batch

    def start(self) -> None:
        """Wait for the loader's first batch (reading the cases: not training time) unless there is nothing
        to train: a data problem the loader finds is raised here, before the caller replaces anything."""
        if self._pending is None and self.step < self.cfg.max_steps and self.elapsed < self.cfg.minutes * 60.0:
            self._pending = self._fetch()

    def _step_done(self, t0: float) -> None:
        seconds = time.time() - t0
        self.step += 1
        self.schedule.done(seconds)
        self.elapsed += seconds

    def train_step(self) -> dict:
        """One step on the next batch; the step count and the training time are updated with the
        weights (a Ctrl-C inside the update is raised after both)."""
        t0 = time.time()
        samples = self.next_batch()
        rng = self._step_rng()  # this batch's correction rounds: the same on a resumed run
        rounds = int(rng.integers(0, self.cfg.max_correction_rounds + 1))
        self.net.eval()
        with torch.no_grad():
            targets = [s.target for s in samples]
            for _ in range(rounds):
                pred = (self.net(_batch_inputs(samples).to(self.device))[:, 0] > 0).cpu()
                found = self.corrections(targets, [mask.numpy() for mask in pred], rng)
                for sample, mask, correction in zip(samples, pred, found):
                    if correction is not None:
                        sample.add_correction(correction)
                    sample.previous = mask.float()
        self.net.train()
        x = _batch_inputs(samples).to(self.device)
        y = torch.from_numpy(np.stack([s.target for s in samples])[:, None].astype(np.float32)).to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        logits = self.net(x)
        loss = self.loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):  # one step of NaN gradients would make the weights NaN for good
            with _signals_deferred():
                self.skipped_steps += 1
                self._step_done(t0)
            print(f"step {self.step}: loss {float(loss.detach())}, not finite: step skipped "
                  f"({self.skipped_steps} so far)", flush=True)
            return {"loss": float("nan"), "dice": float("nan"), "rounds": rounds, "skipped": True}
        loss.backward()
        with _signals_deferred():
            self.opt.step()
            self._step_done(t0)
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (y > 0)).sum((1, 2, 3, 4)).float()
            dice = (2 * inter / (pred.sum((1, 2, 3, 4)) + (y > 0).sum((1, 2, 3, 4)) + 1e-6)).mean()
        return {"loss": float(loss.detach()), "dice": float(dice), "rounds": rounds}

    def _plain_config(self) -> dict:
        """The config as plain data (a path as its text), which ``weights_only`` loading reads back."""
        return plain_data(asdict(self.cfg), "the training config", SegAssistError)

    def save(self, final: bool = False) -> None:
        config = self._plain_config()
        state = {
            "model": {k: v.cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "time_limited": self.schedule.time_limited,
            "skipped_steps": self.skipped_steps,
            "config": config,
        }
        # a kill mid-write keeps the previous state whole; scripts/package_model.py refuses a
        # model.pt and state.pt of different steps (a kill between these two writes)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp), overwrite=True)
        meta = {"name": "segassist-unet", "steps": self.step, "train_seconds": round(self.elapsed),
                "train_config": config, "final": final, "hardware": self.hardware}
        save_checkpoint(self.out / "model.pt", self.net, self.net_cfg, meta)

    def run(self) -> None:
        """Train until the budget or ``max_steps``. Ctrl-C, SIGTERM or SIGHUP (``timeout``, ``kill``, a batch
        system, a closed terminal) save the state of the last finished step (as the periodic checkpoint
        does) and say how to resume; then the loader's and the pool's processes are stopped and the
        interrupt goes on (Ctrl-C: KeyboardInterrupt, exit 130; SIGTERM, SIGHUP: to the handler set
        before, by default the process ends by that signal, 143 or 129)."""
        with _stop_signals_interrupt():  # the signal goes on once the helper processes are stopped
            try:
                self._train_and_save()
            except BaseException:  # Ctrl-C, a signal, a failure: what ended the run is told, not a failed stop
                with contextlib.suppress(Exception):
                    self.close()
                raise
            self.close()
        skipped = f" ({self.skipped_steps} skipped: loss not finite)" if self.skipped_steps else ""
        print(f"done: {self.step} steps{skipped} in {self.elapsed:.0f} s -> {self.out / 'model.pt'}", flush=True)

    def _train_and_save(self) -> None:
        """The run's steps, then its final save; an interrupted run saves its last finished step."""
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "log.jsonl").open("a") as log:
            try:
                self._train(log)
            except KeyboardInterrupt as exc:  # Ctrl-C, or Stopped
                self._save_interrupted(exc)
                raise
        self.save(final=True)

    def _save_interrupted(self, interrupt: KeyboardInterrupt) -> None:
        """After Ctrl-C, SIGTERM or SIGHUP: the state of the last finished step, saved as the periodic
        checkpoint saves it (the step under way is dropped), and the --resume that continues it. Its lines
        never stop it: after SIGHUP the terminal may be gone."""
        why = f"stopped by {signal_name(interrupt.signum)}" if isinstance(interrupt, Stopped) else "interrupted"
        if self.step == 0:
            _say(f"{why} before the first step: nothing to save")
            return
        try:
            self.save()
        except KeyboardInterrupt:  # asked again: the previous state.pt stays whole (written atomically)
            _say(f"{why} again while saving: the previous checkpoint, if any, is kept")
            return
        state = self.out / "state.pt"
        _say(f"{why} at step {self.step}: saved {state}; continue with --resume {state}")

    def _train(self, log) -> None:
        """The steps, with the periodic checkpoints and the log lines."""
        budget = self.cfg.minutes * 60.0
        history = []
        self.start()  # the loader's start (reading the cases) is not training time
        last_ckpt = time.time()
        while self.step < self.cfg.max_steps and self.elapsed < budget:
            stats = self.train_step()
            history.append(stats)
            if self.step % 25 == 0:
                recent = [h for h in history[-25:] if not h.get("skipped")]
                line = {"step": self.step, "elapsed_s": round(self.elapsed), "lr": self._lr(),
                        "loss": float(np.mean([h["loss"] for h in recent])) if recent else None,
                        "dice": float(np.mean([h["dice"] for h in recent])) if recent else None}
                if self.skipped_steps:
                    line["skipped_steps"] = self.skipped_steps
                print(json.dumps(line), flush=True)
                log.write(json.dumps(line) + "\n")
                log.flush()
            if time.time() - last_ckpt > self.cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
