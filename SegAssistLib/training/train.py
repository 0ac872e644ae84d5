"""Training the built-in promptable network.

Each step: cut a batch of patches (real training-split cases and synthetic volumes), give each a
simulated first prompt (or a corrupted previous mask and a correction of it) and draw it (both in
the loader processes), optionally run the network a few rounds without gradients and add a
correction at the largest error each round, then learn from the final round. The schedule is a
cosine over a wall-clock budget, so a run of any length ends at a low learning rate; checkpoints
are written atomically and a run resumes from them.

Usage: ``segassist train --out runs/v1 --minutes 120 [--resume runs/v1/state.pt] [--config cfg.json]``
(the subcommand lives in ``training/cli.py`` so that ``segassist --help`` needs no torch).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.losses import DiceCELoss

from SegAssistLib.engine.encoding import PatchPrompt, assemble_input, draw_prompts
from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint
from SegAssistLib.errors import ModelError, SegAssistError
from SegAssistLib.files import atomic_write
from SegAssistLib.machine import machine_info
from SegAssistLib.training import simulation
from SegAssistLib.training.data import (
    CLICK_UNION_DATASETS,
    TrainCase,
    load_training_cases,
    sample_patch,
    synthetic_train_case,
)

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
    image: torch.Tensor, target: np.ndarray, kinds: Sequence[str], rng: np.random.Generator, corrupt_share: float
) -> Sample:
    prompts, prior = simulation.starting_point(target, rng, kinds, corrupt_share)
    previous = torch.zeros(target.shape) if prior is None else torch.from_numpy(prior.astype(np.float32))
    channels = torch.from_numpy(draw_prompts(prompts, target.shape[0]))
    return Sample(image, target, prompts, previous, channels)


class PatchStream(torch.utils.data.IterableDataset):
    """An endless stream of :class:`Sample`: real or synthetic patches, each with its start (a first
    prompt, or a corrupted previous mask and its correction) simulated and drawn."""

    def __init__(self, cfg: TrainConfig, patch: int, offset: int = 0):
        self.cfg, self.patch, self.offset = cfg, patch, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:  # a loader process; in the training process cfg.threads holds
            torch.set_num_threads(1)
        rng = np.random.default_rng([self.cfg.seed, self.offset, info.id if info else 0])
        real = (
            load_training_cases(Path(self.cfg.data_root), self.cfg.datasets, self.cfg.click_union_datasets, self.patch)
            if self.cfg.data_root
            else {}
        )
        print(f"training cases: { {k: len(v) for k, v in real.items()} }", flush=True)
        names = sorted(real)
        pool: List[TrainCase] = []
        while True:
            if not real or rng.random() < self.cfg.synthetic_share:
                # synthetic volumes are costly to make: keep a small pool and refresh it slowly
                if len(pool) < 12 or rng.random() < 0.1:
                    pool = (pool + [synthetic_train_case(rng)])[-12:]
                case = pool[int(rng.integers(len(pool)))]
            else:
                cases = real[names[int(rng.integers(len(names)))]]
                case = cases[int(rng.integers(len(cases)))]
            target = case.targets[int(rng.integers(len(case.targets)))]
            cut = sample_patch(case, target, rng, self.patch)
            if cut is not None:
                yield start_sample(cut[0], cut[1], case.first_prompt_kinds(target), rng, self.cfg.corrupt_share)


def training_hardware(device: torch.device) -> str:
    """What a run trains on, for the model card: the GPU's name, or the CPU's and its cores."""
    info = machine_info(str(device))
    if "gpu" in info:
        return f"{info['gpu']} (CUDA), {info['cpu_count']} CPU cores"
    return f"{info['cpu']}, {info['cpu_count']} cores, CPU only"


def _correction_job(job: Tuple[np.ndarray, np.ndarray, int]) -> Optional[PatchPrompt]:
    target, prediction, seed = job
    return simulation.correction_prompt(target, prediction, np.random.default_rng(seed))


def _batch_inputs(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.stack([assemble_input(s.image, s.previous, s.channels.numpy()) for s in samples])


STATE_KEYS = ("model", "optimizer", "step", "elapsed")


def read_training_state(path: Path) -> dict:
    """A run's ``state.pt`` for ``--resume``: loaded as plain data (no pickled objects run) and
    checked; SegAssistError naming the file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, or objects beyond plain data
        raise SegAssistError(f"--resume {path}: not a readable training state ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        hint = " (model.pt holds the weights only: resume from the run's state.pt)" if isinstance(state, dict) else ""
        raise SegAssistError(f"--resume {path}: not a training state, it lacks {', '.join(missing)}{hint}")
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
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        try:
            self.net_cfg = NetworkConfig.from_dict(cfg.network, strict=True)
        except (ModelError, TypeError, ValueError) as exc:
            raise SegAssistError(f"the training config's network: {exc}") from exc
        self.device = torch.device(cfg.device)
        self.net = build_network(self.net_cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.loss = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.step, self.elapsed = 0, 0.0
        self.skipped_steps = 0  # steps whose loss was not finite: the optimiser never saw them
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
            self.rng = np.random.default_rng(cfg.seed + self.step)
            print(f"resumed at step {self.step}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
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
            )
        )

    def corrections(
        self, targets: Sequence[np.ndarray], predictions: Sequence[np.ndarray]
    ) -> List[Optional[PatchPrompt]]:
        """The simulated user's next click (or scribble) on each sample, from one seed per sample, so
        the answer is the same whether the pool or this process finds it."""
        jobs = [(t, p, int(s)) for t, p, s in zip(targets, predictions, self.rng.integers(2**62, size=len(targets)))]
        if self.pool is None:
            return [_correction_job(job) for job in jobs]
        return list(self.pool.map(_correction_job, jobs))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _lr(self) -> float:
        frac = min(1.0, self.elapsed / (self.cfg.minutes * 60.0))
        return self.cfg.learning_rate * max(0.03, 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self) -> dict:
        samples: List[Sample] = next(self.stream)
        rounds = int(self.rng.integers(0, self.cfg.max_correction_rounds + 1))
        self.net.eval()
        with torch.no_grad():
            targets = [s.target for s in samples]
            for _ in range(rounds):
                pred = (self.net(_batch_inputs(samples).to(self.device))[:, 0] > 0).cpu()
                found = self.corrections(targets, [mask.numpy() for mask in pred])
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
            self.skipped_steps += 1
            print(f"step {self.step + 1}: loss {float(loss.detach())}, not finite: step skipped "
                  f"({self.skipped_steps} so far)", flush=True)
            return {"loss": float("nan"), "dice": float("nan"), "rounds": rounds, "skipped": True}
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (y > 0)).sum((1, 2, 3, 4)).float()
            dice = (2 * inter / (pred.sum((1, 2, 3, 4)) + (y > 0).sum((1, 2, 3, 4)) + 1e-6)).mean()
        return {"loss": float(loss.detach()), "dice": float(dice), "rounds": rounds}

    def save(self, final: bool = False) -> None:
        state = {
            "model": {k: v.cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "config": asdict(self.cfg),
        }
        # a kill mid-write keeps the previous state whole; scripts/package_model.py refuses a
        # model.pt and state.pt of different steps (a kill between these two writes)
        atomic_write(self.out / "state.pt", lambda tmp: torch.save(state, tmp), overwrite=True)
        meta = {"name": "segassist-unet", "steps": self.step, "train_seconds": round(self.elapsed),
                "train_config": asdict(self.cfg), "final": final, "hardware": self.hardware}
        save_checkpoint(self.out / "model.pt", self.net, self.net_cfg, meta)

    def run(self) -> None:
        """Train until the budget or ``max_steps``; a Ctrl-C saves the state of the last finished step
        (as the periodic checkpoint does), says how to resume, and is raised again (exit 130)."""
        log = (self.out / "log.jsonl").open("a")
        try:
            try:
                self._train(log)
            except KeyboardInterrupt:
                self._save_interrupted()
                raise
        finally:
            log.close()
        self.save(final=True)
        self.close()
        skipped = f" ({self.skipped_steps} skipped: loss not finite)" if self.skipped_steps else ""
        print(f"done: {self.step} steps{skipped} in {self.elapsed:.0f} s -> {self.out / 'model.pt'}", flush=True)

    def _save_interrupted(self) -> None:
        """After a Ctrl-C: the state of the last finished step, saved as the periodic checkpoint saves it
        (the step under way is dropped), and the --resume that continues it."""
        try:
            if self.step == 0:
                print("interrupted before the first step: nothing to save", flush=True)
                return
            try:
                self.save()
            except KeyboardInterrupt:  # asked again: the previous state.pt stays whole (written atomically)
                print("interrupted again while saving: the previous checkpoint, if any, is kept", flush=True)
                return
            print(f"interrupted at step {self.step}: saved {self.out / 'state.pt'}; continue with "
                  f"--resume {self.out / 'state.pt'}", flush=True)
        finally:
            with contextlib.suppress(Exception):
                self.close()

    def _train(self, log) -> None:
        """The steps, with the periodic checkpoints and the log lines."""
        budget = self.cfg.minutes * 60.0
        last_ckpt = time.time()
        history = []
        while self.step < self.cfg.max_steps and self.elapsed < budget:
            t0 = time.time()
            stats = self.train_step()
            self.step += 1
            self.elapsed += time.time() - t0
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
