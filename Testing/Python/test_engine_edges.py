"""Edge snap: the random walk that re-decides a thin band around the network's answer."""

import argparse

import numpy as np
import pytest
from scipy import ndimage

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.engine.edges import EdgeSnap, band_around_surface, seeds_from_prompts, snap_to_edges
from SegAssistLib.evaluation import cli as eval_cli
from SegAssistLib.image import Volume
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _box_image(shape=(30, 40, 40), box=(slice(8, 22), slice(10, 30), slice(12, 28)), noise=0.3, seed=0):
    """A bright box in noise: the true object and its image."""
    truth = np.zeros(shape, bool)
    truth[box] = True
    image = truth * 2.0 + np.random.default_rng(seed).normal(0, noise, shape)
    return image.astype(np.float32), truth


@pytest.mark.parametrize("grow", [True, False])
def test_a_boundary_a_voxel_off_snaps_to_the_image_edge(grow):
    image, truth = _box_image()
    step = ndimage.binary_dilation if grow else ndimage.binary_erosion
    answer = step(truth)  # the network's answer: a voxel too far out (or in) on every side
    after = snap_to_edges(image, answer, (1.0, 1.0, 1.0), EdgeSnap())
    assert _dice(answer, truth) < 0.9
    assert _dice(after, truth) > 0.99
    unknown, _, _ = band_around_surface(answer, (1.0, 1.0, 1.0), 2.0)
    assert np.array_equal(after[~unknown], answer[~unknown])  # beyond the band: the network's word


def test_the_band_spans_two_fine_voxels_and_stays_in_plane_across_coarse_slices():
    mask = np.zeros((10, 30, 30), bool)
    mask[3:7, 10:20, 10:20] = True
    unknown, object_shell, background_shell = band_around_surface(mask, (5.0, 1.0, 1.0), 2.0)
    row = unknown[5, 15, :]
    assert np.flatnonzero(row).tolist() == [8, 9, 10, 11, 18, 19, 20, 21]  # two voxels each side, in plane
    assert not unknown[:, 15, 15].any()  # at 5 mm the band does not reach across slices
    assert object_shell[5, 15, 12] and background_shell[5, 15, 7]
    assert not (unknown & (object_shell | background_shell)).any()
    iso_unknown, _, _ = band_around_surface(mask, (1.0, 1.0, 1.0), 2.0)
    assert iso_unknown[1:3, 15, 15].all() and iso_unknown[3:5, 15, 15].all()


def test_voxels_the_user_marked_keep_their_sign():
    image, truth = _box_image(noise=0.05)
    positive = np.zeros_like(truth)
    negative = np.zeros_like(truth)
    negative[15, 20, 12] = True  # on the object's edge, inside: the user says background
    positive[15, 20, 11] = True  # just outside: the user says object
    out = snap_to_edges(image, truth, (1.0, 1.0, 1.0), EdgeSnap(), positive, negative)
    assert not out[15, 20, 12] and out[15, 20, 11]
    assert _dice(out, truth) > 0.99


@pytest.mark.parametrize("case", ["empty", "full", "thin", "too large"])
def test_nothing_to_decide_comes_back_as_it_was(case):
    image, truth = _box_image()
    mask = {
        "empty": np.zeros_like(truth),
        "full": np.ones_like(truth),
        "thin": np.zeros_like(truth),
        "too large": truth,
    }[case]
    if case == "thin":
        mask[15, 20, 20] = True  # no interior beyond the band
    settings = EdgeSnap(max_voxels=truth.size - 1) if case == "too large" else EdgeSnap()
    assert np.array_equal(snap_to_edges(image, mask, (1.0, 1.0, 1.0), settings), mask)


@pytest.mark.parametrize(
    "kwargs", [{"band": 0.5}, {"band": float("nan")}, {"beta": 0.0}, {"beta": -1.0}, {"max_voxels": 0}]
)
def test_settings_are_checked(kwargs):
    with pytest.raises(ValueError, match="edge snap"):
        EdgeSnap(**kwargs)


def test_an_edge_band_option_of_zero_means_no_snap():
    assert EdgeSnap.from_band(0.0) is None
    assert EdgeSnap.from_band(3.0) == EdgeSnap(band=3.0)
    with pytest.raises(ValueError, match="edge snap"):
        EdgeSnap.from_band(0.5)


def test_image_and_mask_must_agree_in_shape():
    with pytest.raises(ValueError, match="differ in shape"):
        snap_to_edges(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), bool), (1.0, 1.0, 1.0), EdgeSnap())


def test_seeds_come_from_clicks_scribbles_and_erasing_lassos_not_boxes_or_outlines():
    shape = (10, 20, 20)
    crop = (slice(2, 8), slice(5, 15), slice(5, 15))
    prompts = [
        PointPrompt(position=(6, 7, 3)),  # (i, j, k)
        PointPrompt(position=(8, 9, 4), positive=False),
        PointPrompt(position=(1, 1, 1)),  # outside the crop
        ScribblePrompt(points=[(6, 12, 5), (10, 12, 5)], positive=False),
        LassoPrompt(points=[(10, 6, 6), (13, 6, 6), (13, 9, 6), (10, 9, 6)], positive=False),
        LassoPrompt(points=[(5, 5, 7), (14, 5, 7), (14, 14, 7), (5, 14, 7)]),  # an outline: holds background
        BoxPrompt(min_corner=(5, 5, 2), max_corner=(14, 14, 7)),
    ]
    positive, negative = seeds_from_prompts(prompts, crop, shape)
    assert positive.shape == negative.shape == (6, 10, 10)
    assert positive[3 - 2, 7 - 5, 6 - 5] and negative[4 - 2, 9 - 5, 8 - 5]
    assert negative[5 - 2, 12 - 5, (6 - 5) : (11 - 5)].all()  # the scribble's voxels
    assert negative[6 - 2, (6 - 5) : (10 - 5), (10 - 5) : (14 - 5)].all()  # the erasing lasso's filled square
    assert positive.sum() == 1 and negative.sum() == 1 + 5 + 16  # nothing from the box, outline or far click


def test_strokes_and_erasing_lassos_far_from_the_answer_are_not_drawn(monkeypatch):
    """Every earlier negative lasso was drawn in full on every click, wherever it lay (25 whole-slice
    lassos far from the click: 0.8 s a click). Those whose box misses the answer's are skipped; the
    seeds are the same."""
    from SegAssistLib.engine import edges
    from SegAssistLib.prompts import to_slab

    shape = (40, 64, 64)
    crop = (slice(2, 12), slice(10, 30), slice(10, 30))
    near = [
        ScribblePrompt(points=[(12, 15, 5), (20, 15, 5)], positive=False, width=3),
        LassoPrompt(points=[(14, 12, 8), (18, 12, 8), (18, 16, 8), (14, 16, 8)], positive=False),
        ScribblePrompt(points=[(30, 12, 6), (40, 12, 6)], width=4),  # starts past the crop, reaches in
    ]
    far = [LassoPrompt(points=[(0, 0, k), (63, 0, k), (63, 63, k), (0, 63, k)], positive=False) for k in range(25, 35)]
    far += [to_slab(ScribblePrompt(points=[(40, 50, 20), (60, 50, 20)], positive=False), shape)]
    drawn = []
    monkeypatch.setattr(
        edges, "to_slab", lambda prompt, image_shape: drawn.append(prompt) or to_slab(prompt, image_shape)
    )
    with_far = edges.seeds_from_prompts(near + far, crop, shape)
    assert drawn == [near[0], near[2]]  # the scribbles; the near lasso is filled on the crop's grid
    alone = edges.seeds_from_prompts(near, crop, shape)
    assert all(np.array_equal(a, b) for a, b in zip(with_far, alone)) and with_far[1].sum() > 0
    assert with_far[0].any()  # the wide stroke just past the crop reaches into it


def test_the_engine_snaps_only_near_the_networks_surface(tiny_checkpoint):
    image, truth = _box_image(shape=(24, 40, 40), box=(slice(6, 18), slice(10, 30), slice(12, 28)))
    volume = Volume(image * 100.0, spacing=(1.0, 1.0, 1.0))
    click = PointPrompt(position=(20, 20, 12))
    raw = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, edge_snap=None).open_session(volume)
    snapped = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1).open_session(volume)
    raw.add_prompt(click)
    update = snapped.add_prompt(click)
    network, answer = raw.result().astype(bool), snapped.result().astype(bool)
    assert network.any() and not network.all()  # the random network still answers something
    unknown, _, _ = band_around_surface(network, (1.0, 1.0, 1.0), 2.0)
    assert np.array_equal(answer[~unknown], network[~unknown])
    mirror = np.zeros(truth.shape, np.uint8)
    update.apply_to(mirror)  # the update holds the snapped answer
    assert np.array_equal(mirror.astype(bool), answer)


@pytest.mark.parametrize(
    "text, ok", [("0", True), ("2", True), ("1.5", True), ("0.5", False), ("nan", False), ("11", False), ("x", False)]
)
def test_the_command_line_edge_band(text, ok, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    argv = ["eval", "data", "--edge-band", text, "--json", "out.json"]
    if ok:
        assert parser.parse_args(argv).edge_band == float(text)
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "--edge-band" in capsys.readouterr().err


def test_the_server_builds_its_engine_with_the_edge_band(tiny_checkpoint):
    from pydantic import ValidationError

    from SegAssistLib.server.settings import ServerSettings
    from SegAssistLib.server.state import default_engine_factory

    assert default_engine_factory(tiny_checkpoint, edge_band=0)("cpu").edge_snap is None
    assert default_engine_factory(tiny_checkpoint, edge_band=1.5)("cpu").edge_snap == EdgeSnap(band=1.5)
    with pytest.raises(ValidationError, match="edge_band"):
        ServerSettings(edge_band=0.5)


def test_the_server_defaults_to_the_engines_edge_snap(tiny_checkpoint):
    import argparse

    from SegAssistLib.server.cli import add_serve_arguments
    from SegAssistLib.server.settings import ServerSettings
    from SegAssistLib.server.state import default_engine_factory

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert ServerSettings().edge_band == EdgeSnap().band
    assert parser.parse_args([]).edge_band == EdgeSnap().band
    assert default_engine_factory(tiny_checkpoint)("cpu").edge_snap == EdgeSnap()


def test_an_outline_around_the_object_does_not_pull_the_surface_out_to_it():
    """A positive lasso drawn a little outside the object: its rim is background, in the very band the
    snap re-decides. Taken as object seeds (as it once was), it grew the answer out to the outline."""
    image, truth = _box_image(shape=(30, 40, 40), box=(slice(8, 22), slice(10, 30), slice(12, 28)))
    k = 15
    outline = LassoPrompt(points=[(10, 8, k), (29, 8, k), (29, 31, k), (10, 31, k)])  # (i, j, k), 2 voxels out
    crop = tuple(slice(0, n) for n in image.shape)
    object_seeds, background_seeds = seeds_from_prompts([outline], crop, image.shape)
    snapped = snap_to_edges(image, truth, (1.0, 1.0, 1.0), EdgeSnap(), object_seeds, background_seeds)
    assert not object_seeds.any()
    assert abs(int(snapped[k].sum()) - int(truth[k].sum())) <= 0.02 * truth[k].sum()


def test_an_erasing_lasso_is_filled_on_the_crop_alone_with_the_voxels_of_its_slab(monkeypatch):
    """Each click filled every erasing lasso on the whole image grid again (seconds for one 2000 voxels
    across); filled on the crop's grid it marks the same voxels as its slab form there."""
    from SegAssistLib import prompts as prompts_module
    from SegAssistLib.engine import edges

    rng = np.random.default_rng(3)
    shape = (12, 60, 70)
    lassos = []
    for _ in range(12):
        k = int(rng.integers(0, shape[0]))
        centre, radius = rng.uniform((10, 10), (60, 50)), rng.uniform(4, 25)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
        lassos.append(LassoPrompt(points=[(centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a), k)
                                          for a in angles], positive=False))  # fmt: skip
    slabs = [prompts_module.to_slab(lasso, shape) for lasso in lassos]
    for _ in range(20):
        lo = rng.integers(0, (shape[0] - 2, 40, 40))
        crop = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(lo, rng.integers((2, 10, 10), (12, 30, 30))))
        crop = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(crop, shape))
        from_slabs = seeds_from_prompts(slabs, crop, shape)[1]
        with monkeypatch.context() as patch:
            patch.setattr(edges, "to_slab", lambda *a: pytest.fail("a points-form lasso went through to_slab"))
            from_points = seeds_from_prompts(lassos, crop, shape)[1]
        assert np.array_equal(from_points, from_slabs)
