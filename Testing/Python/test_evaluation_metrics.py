"""Evaluation metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from SegAssistLib.evaluation.metrics import dice, dice_auc, hd95, normalised_dice_auc, number_of_clicks, surface
from SegAssistLib.evaluation.stats import bootstrap_mean, latency_summary


def test_dice_hand_computed():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels
    b[1:3, 0:2, 0:2] = 1  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_dice_of_two_empty_masks_is_one():
    empty = np.zeros((3, 3, 3), bool)
    assert dice(empty, empty) == 1.0


def test_dice_rejects_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_noc_first_interaction_reaching_the_threshold():
    curve = [0.5, 0.82, 0.86, 0.91]
    assert number_of_clicks(curve, 0.80) == (2, True)
    assert number_of_clicks(curve, 0.85) == (3, True)
    assert number_of_clicks(curve, 0.90) == (4, True)
    assert number_of_clicks([0.95], 0.90) == (1, True)


def test_noc_not_reached_is_capped_at_the_number_allowed():
    curve = [0.3, 0.5, 0.7]
    assert number_of_clicks(curve, 0.9) == (3, False)
    assert number_of_clicks(curve, 0.9, max_clicks=10) == (10, False)
    # a value reached only after the allowed clicks does not count
    assert number_of_clicks([0.1, 0.2, 0.95], 0.9, max_clicks=2) == (2, False)


def test_surface_of_a_cube_is_its_shell():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    shell = surface(cube)
    assert shell.sum() == 27 - 1 and not shell[2, 2, 2]


def test_hd95_single_voxels_with_anisotropic_spacing():
    a = np.zeros((4, 3, 6), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[2, 0, 0] = True  # two slices apart along k
    assert hd95(a, b, spacing=(0.5, 0.5, 3.0)) == pytest.approx(6.0)
    c = np.zeros_like(a)
    c[0, 0, 4] = True  # four voxels apart along i
    assert hd95(a, c, spacing=(0.5, 0.5, 3.0)) == pytest.approx(2.0)


def test_hd95_parallel_planes():
    a = np.zeros((6, 5, 5), bool)
    b = np.zeros_like(a)
    a[0] = True
    b[3] = True
    assert hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)


def test_hd95_ignores_a_small_outlier_that_the_full_hausdorff_sees():
    a = np.zeros((10, 5, 5), bool)
    a[0] = True  # 25 surface voxels
    b = a.copy()
    b[9, 2, 2] = True  # one stray voxel 9 slices away: 51 pooled distances, one non-zero
    assert hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(0.0)


def test_hd95_empty_conventions():
    empty = np.zeros((3, 3, 3), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert hd95(empty, empty) == 0.0
    assert math.isinf(hd95(one, empty))
    assert hd95(one, one) == 0.0


def test_hd95_interpolates_between_pooled_distances_with_anisotropic_spacing():
    spacing = (0.5, 1.0, 3.0)  # (i, j, k): slices 3 mm apart
    a = np.zeros((3, 1, 4), bool)
    a[0, 0, 0:4] = True  # a row of 4 voxels along i
    b = a.copy()
    b[2, 0, 0] = True  # one voxel two slices up: 6 mm from a
    # pooled distances: 4 zeros (a -> b) + 4 zeros and 6.0 (b -> a); 95th percentile of 9 sorted
    # values sits at position 0.95 * 8 = 7.6, between 0 and 6: 0.6 * 6 = 3.6 mm
    assert hd95(a, b, spacing=spacing) == pytest.approx(3.6)
    assert hd95(b, a, spacing=spacing) == pytest.approx(3.6)


def test_noc_counts_the_box_or_scribble_as_an_interaction():
    # box, then clicks: the box reaching 0.85 is one interaction
    assert number_of_clicks([0.86, 0.9, 0.95], 0.85) == (1, True)
    # a user who stopped on a perfect mask repeats the last value: NoC is unchanged
    assert number_of_clicks([0.5, 1.0, 1.0, 1.0], 0.9) == (2, True)


def test_dice_auc_is_the_challenge_trapezoid_over_the_clicks():
    assert dice_auc([0.2, 0.5, 0.9]) == pytest.approx((0.2 + 0.5) / 2 + (0.5 + 0.9) / 2)  # 1.05
    assert normalised_dice_auc([0.2, 0.5, 0.9]) == pytest.approx(1.05 / 2)
    five = [0.6, 0.7, 0.8, 0.85, 0.9]  # five clicks after the box: the AUC is at most 4
    assert dice_auc(five) == pytest.approx(0.65 + 0.75 + 0.825 + 0.875)
    assert dice_auc([1.0] * 5) == pytest.approx(4.0)
    assert dice_auc([0.7]) == 0.0 and normalised_dice_auc([0.7]) == 0.7


def test_bootstrap_interval_of_two_values_covers_both():
    # resampling two values gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the central 95 %
    # spans from 0 to 1
    e = bootstrap_mean([0.0, 1.0], seed=3)
    assert e.mean == 0.5 and e.low == 0.0 and e.high == 1.0 and e.n == 2


def test_bootstrap_resamples_cases_not_values():
    # case a has three structures at 1.0, case b one at 0.0: the pooled mean is 0.75, and resampling
    # two cases gives 1.0 (a, a), 0.75 (a, b) or 0.0 (b, b)
    e = bootstrap_mean([1.0, 1.0, 1.0, 0.0], groups=["a", "a", "a", "b"], seed=1)
    assert e.mean == pytest.approx(0.75)
    assert (e.low, e.high) == (0.0, 1.0)
    single = bootstrap_mean([0.2, 0.4], groups=["a", "a"])
    assert (single.mean, single.low, single.high) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_is_seeded_drops_non_finite_values_and_matches_the_normal_width():
    rng = np.random.default_rng(0)
    values = rng.normal(0.8, 0.1, 400)
    a, b = bootstrap_mean(values, seed=7), bootstrap_mean(values, seed=7)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.low < a.mean < a.high
    expected = 2 * 1.96 * values.std() / np.sqrt(len(values))
    assert a.high - a.low == pytest.approx(expected, rel=0.15)
    with_inf = bootstrap_mean([1.0, float("inf"), 3.0])
    assert with_inf.mean == 2.0 and with_inf.n == 2
    empty = bootstrap_mean([float("inf")])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.format() == "–"


def test_latency_summary_median_and_p95():
    s = latency_summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_s"] == 3.0
    assert s["p95_s"] == pytest.approx(4.0 + 0.8 * 96.0)  # position 0.95 * 4 = 3.8
    assert latency_summary([]) == {"median_s": None, "p95_s": None, "n": 0}


def test_peak_memory_of_the_engine_leaves_out_what_the_harness_allocates_between_calls():
    import time

    from SegAssistLib.evaluation.runner import PeakMemory

    with PeakMemory(engine_only=True) as memory:
        harness = np.ones(64 * 2**20, np.uint8)  # 64 MiB touched outside any engine call
        time.sleep(0.05)
        del harness
        with memory.engine_call():
            time.sleep(0.02)
    assert memory.peak_bytes - memory.start_bytes < 32 * 2**20
    with PeakMemory(engine_only=True) as memory, memory.engine_call():
        engine = np.ones(64 * 2**20, np.uint8)  # inside the engine call: counted
        time.sleep(0.25)  # several sampling periods, even on a busy machine
        del engine
    assert memory.peak_bytes - memory.start_bytes >= 60 * 2**20


def test_the_memory_convention_says_how_this_system_measured(monkeypatch):
    """The results said "sampled from /proc/self/statm" on macOS too, where the figure is the
    process's lifetime peak (it never falls between records); Windows has neither."""
    import builtins
    import os

    from SegAssistLib.evaluation import runner

    assert runner.memory_convention() == runner.MEMORY_CONVENTION  # Linux, as CI runs
    real_exists, real_import = os.path.exists, builtins.__import__
    monkeypatch.setattr(os.path, "exists", lambda p: False if p == "/proc/self/statm" else real_exists(p))
    assert runner.memory_convention() == runner.LIFETIME_MEMORY_CONVENTION

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("no resource module on Windows")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    assert runner.memory_convention() == runner.UNMEASURED_MEMORY_CONVENTION
