"""Training runs of the base network that can be reproduced: a run stopped by Ctrl-C and resumed
gives the weights of the run that went on; the same seed gives the same weights on a slower
machine; a Ctrl-C during the update saves a step count that matches the weights; the loader's
start is not training time; the ``deterministic`` option. Tiny network, synthetic data only (small
volumes: the real ones take most of a second each to make), no loader processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from SegAssistLib.training import train as train_module
from SegAssistLib.training.data import TrainCase, _targets
from SegAssistLib.training.synthetic import synthetic_case
from SegAssistLib.training.train import PatchStream, TrainConfig, Trainer

NETWORK = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "patch_size": 16}


@pytest.fixture(autouse=True)
def small_synthetic_volumes(monkeypatch):
    def small(rng: np.random.Generator) -> TrainCase:
        syn = synthetic_case(rng, size=int(rng.integers(24, 32)))
        return TrainCase("synthetic", syn.image, syn.labels, syn.spacing_kji, "MR", _targets(syn.labels, False))

    monkeypatch.setattr(train_module, "synthetic_train_case", small)
    threads = torch.get_num_threads()  # a Trainer sets its own
    yield
    torch.set_num_threads(threads)


def config(**kw) -> TrainConfig:
    base = dict(
        data_root="",
        network=NETWORK,
        batch_size=2,
        max_steps=4,
        minutes=10,
        loader_workers=0,
        max_correction_rounds=2,
        corrupt_share=0.5,
        checkpoint_minutes=100,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.net.parameters()])


def trained(cfg: TrainConfig, out: Path, resume=None) -> Trainer:
    trainer = Trainer(cfg, out, resume)
    trainer.run()
    return trainer


def test_a_run_stopped_by_ctrl_c_and_resumed_gives_the_weights_of_the_run_that_went_on(tmp_path, capsys):
    """The state kept no random state: a resumed run reseeded from seed + step and drew other patches,
    prompts and correction rounds than the run would have (5.9e-3 apart after 2 + 2 steps)."""
    whole = trained(config(), tmp_path / "whole")
    cut = Trainer(config(), tmp_path / "cut")
    step = cut.train_step

    def ctrl_c_after_two():
        if cut.step == 2:
            raise KeyboardInterrupt
        return step()

    cut.train_step = ctrl_c_after_two
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["step"] == 2
    resumed = trained(config(), tmp_path / "cut", tmp_path / "cut" / "state.pt")
    assert resumed.step == whole.step == 4
    assert torch.equal(weights(resumed), weights(whole))
    assert "resumed at step 2" in capsys.readouterr().out


def test_batch_n_of_the_patch_stream_is_the_same_whenever_the_stream_starts(monkeypatch):
    """Batches are numbered from the step a run starts at; loader process w of W makes every W-th."""
    cfg = config(loader_workers=2)

    def batches(offset: int, worker: int, count: int):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=2))
        stream = iter(PatchStream(cfg, 16, offset))
        return [[next(stream) for _ in range(cfg.batch_size)] for _ in range(count)]

    from_start = batches(0, 1, 3)  # batches 1, 3, 5
    resumed = batches(3, 0, 2)  # a run resumed at step 3: its first process makes 3, 5
    for a, b in zip(from_start[1:], resumed):
        for x, y in zip(a, b):
            assert torch.equal(x.image, y.image) and np.array_equal(x.target, y.target)
            assert torch.equal(x.channels, y.channels) and torch.equal(x.previous, y.previous)
    other_seed = iter(PatchStream(config(loader_workers=2, seed=1), 16, 3))
    assert not torch.equal(next(other_seed).image, resumed[0][0].image)


def test_the_same_seed_gives_the_same_weights_on_a_slower_machine(tmp_path):
    """The learning rate followed the time spent: a slower machine trained at other rates."""
    fast = trained(config(), tmp_path / "fast")
    slow = Trainer(config(), tmp_path / "slow")
    loss = slow.loss
    slow.loss = lambda logits, y: (time.sleep(0.2), loss(logits, y))[1]  # each step 0.2 s slower
    slow.run()
    assert slow.elapsed > fast.elapsed + 0.6
    assert torch.equal(weights(fast), weights(slow))


@pytest.fixture
def ctrl_c_raises():
    """SIGINT delivered and turned into KeyboardInterrupt, whatever the test runner set."""
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def test_a_ctrl_c_during_the_update_saves_a_step_count_that_matches_the_weights(tmp_path, ctrl_c_raises):
    """A Ctrl-C between the optimiser's step and the count's saved the weights of step n as step n - 1."""
    trainer = Trainer(config(), tmp_path / "run")

    def ctrl_c(optimizer, args, kwargs):
        if trainer.step == 1:  # during the second update
            os.kill(os.getpid(), signal.SIGINT)

    trainer.opt.register_step_post_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    updates = {int(s["step"]) for s in state["optimizer"]["state"].values()}  # AdamW's own count
    assert state["step"] == 2 and updates == {2}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_the_loaders_start_is_not_training_time(tmp_path):
    """The first batch waited for the loader to read the cases (minutes for the real training set),
    counted as training time: the time-based schedule and the budget lost it."""
    trainer = Trainer(config(max_steps=1, max_correction_rounds=0), tmp_path / "run")
    stream = trainer.stream

    class SlowStart:
        first = True

        def __next__(self):
            if self.first:
                time.sleep(2.0)
                self.first = False
            return next(stream)

    trainer.stream = SlowStart()
    trainer.run()
    assert trainer.step == 1 and 0 < trainer.elapsed < 2.0


def test_the_deterministic_option_asks_for_deterministic_kernels(tmp_path):
    workspace = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        Trainer(config(deterministic=True), tmp_path / "run").close()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if workspace is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
    assert not TrainConfig().deterministic  # off unless asked for
