"""Corrections drawn as lassos: the engine erases inside a negative lasso (prompt channel 3) and
adds inside a positive one (channel 4), so both trainers simulate them: negative around the
largest spill, positive around the largest missed part, on a slice of a random orientation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy import ndimage

from SegAssistLib.engine.encoding import draw_prompts
from SegAssistLib.engine.network import NetworkConfig, build_network
from SegAssistLib.learning.prompt_mix import DEFAULT_MIX, mix_from_logs
from SegAssistLib.learning.trainer import simulate_prompts
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import LassoPrompt, PointPrompt
from SegAssistLib.training import simulation
from SegAssistLib.training.train import TrainConfig, _correction_job, start_sample

P = 32


def box(lo, hi) -> np.ndarray:
    mask = np.zeros((P,) * 3, bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


TARGET = box((8, 10, 9), (24, 22, 25))


def lassos(target, prediction, n=40, seed=0):
    rng = np.random.default_rng(seed)
    drawn = [
        simulation.correction_prompt(target, prediction, rng, scribble_share=0.0, lasso_share=1.0) for _ in range(n)
    ]
    return [p for p in drawn if p.kind == "lasso"]


def test_a_spill_is_corrected_with_a_negative_lasso_drawn_into_the_erasing_channel_inside_the_spill():
    spill = box((1, 1, 1), (6, 9, 12))  # a spill apart from the object, the largest error
    prediction = TARGET | spill
    drawn = lassos(TARGET, prediction)
    assert len(drawn) >= 30 and all(not p.positive for p in drawn)
    axes = set()
    for lasso in drawn:
        flat = np.flatnonzero(np.ptp(lasso.coords, axis=0) < 1e-9)
        assert len(flat) == 1  # on one slice
        axes.add(int(flat[0]))
        channels = draw_prompts([lasso], P)
        ink = channels[3]
        assert ink.any() and not channels[[0, 1, 2, 4]].any()  # the negative lasso's channel only
        assert (ink & spill).sum() >= 0.6 * ink.sum()  # inside the spill but for its outline
        assert (ink & ~ndimage.binary_dilation(spill, iterations=2)).sum() <= 0.05 * ink.sum()
    assert len(axes) >= 2  # slices of several orientations


def test_a_missed_part_is_corrected_with_a_positive_lasso_inside_it():
    prediction = TARGET.copy()
    prediction[8:24, 10:22, 9:15] = False  # a missed slab
    missed = TARGET & ~prediction
    drawn = lassos(TARGET, prediction)
    assert len(drawn) >= 30 and all(p.positive for p in drawn)
    for lasso in drawn:
        channels = draw_prompts([lasso], P)
        assert channels[4].any() and not channels[[0, 1, 2, 3]].any()
        assert (channels[4] & missed).sum() >= 0.6 * channels[4].sum()
        assert (channels[4] & ~ndimage.binary_dilation(missed, iterations=2)).sum() <= 0.05 * channels[4].sum()


def test_the_outline_of_a_shell_shaped_spill_never_erases_the_object():
    """A mask grown all round spills as a shell: its outline on a slice through the object would
    enclose the object too. Those slices get a click instead."""
    prediction = ndimage.binary_dilation(TARGET, iterations=2)
    drawn = lassos(TARGET, prediction, n=60)
    assert drawn  # the shell's caps are outlined
    for lasso in drawn:
        assert not lasso.positive and not (draw_prompts([lasso], P)[3] & TARGET).any()


def test_both_trainers_draw_correction_lassos():
    rng = np.random.default_rng(3)
    kinds = Counter()
    # the adapter trainer: with the prompt mix's share, in the start and in the rounds
    mix = DEFAULT_MIX.__class__(DEFAULT_MIX.first_kind_weights, 0.0, 0, 1.0)
    network = build_network(NetworkConfig(channels=(4, 8), strides=(2,), patch_size=P))
    images = [torch.zeros((P,) * 3) for _ in range(6)]
    targets = [TARGET] * 6
    for _ in range(3):
        _, prompts = simulate_prompts(network, images, targets, rng, P, 1, 1.0, mix)
        kinds.update((p.kind, p.positive) for pp in prompts for p in pp[1:] if p.kind == "lasso")
    assert kinds[("lasso", False)] and kinds[("lasso", True)]
    # the base trainer: the loader's start and the pool's correction jobs
    assert TrainConfig().correction_lasso_share == simulation.CORRECTION_LASSO_SHARE > 0
    spill = TARGET | box((1, 1, 1), (6, 9, 12))
    job = _correction_job((TARGET, spill, 5, 1.0))
    assert job.kind == "lasso" and not job.positive
    started = [start_sample(torch.zeros((P,) * 3), TARGET, simulation.FIRST_KINDS, rng, 1.0, 1.0) for _ in range(20)]
    assert any(p.kind == "lasso" and not p.positive for s in started for p in s.prompts)


def test_lassos_later_in_a_session_count_as_corrections_in_the_prompt_mix():
    lasso = LassoPrompt(points=[(1, 2, 3), (6, 2, 3), (4, 7, 3)], positive=False)
    logs = [PromptLog(prompts=[PointPrompt(position=(5, 5, 5)), lasso, PointPrompt(position=(6, 5, 5))])]
    mix = mix_from_logs(logs)
    keep = 1 - 0.2
    assert mix.correction_lasso_share == keep * 0.5 + 0.2 * simulation.CORRECTION_LASSO_SHARE
    assert DEFAULT_MIX.correction_lasso_share == simulation.CORRECTION_LASSO_SHARE
    assert mix.to_dict()["correction_lasso_share"] == mix.correction_lasso_share
