"""Simulated scribbles: on a slice of every orientation, from the skeleton or the outline, with jitter,
always inside the object."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SegAssistLib.evaluation.scribbles import OBLIQUE_TILT_DEG, ORIENTATIONS, SOURCES, ScribbleSpec, simulate_scribble
from SegAssistLib.evaluation.simulator import scribble_prompt
from SegAssistLib.prompts import ScribblePrompt
from SegAssistLib.rasterize import polyline_samples

SPACING = (0.8, 0.8, 2.5)  # (i, j, k): thick slices, as in clinical MRI


@pytest.fixture(scope="module")
def ellipsoid():
    """An ellipsoid with semi-axes 14, 10 and 10 mm along i, j and k on an anisotropic grid."""
    k, j, i = np.mgrid[:14, :40, :50]
    x, y, z = (i - 25) * SPACING[0], (j - 20) * SPACING[1], (k - 7) * SPACING[2]
    return ((x / 14) ** 2 + (y / 10) ** 2 + (z / 10) ** 2 <= 1).astype(np.uint8)


@pytest.fixture(scope="module")
def banana():
    """A curved tube (a half torus) on an isotropic grid: its centre of mass lies outside it."""
    k, j, i = np.mgrid[:30, :40, :40]
    r = np.hypot(i - 20.0, j - 20.0)
    tube = (r - 12.0) ** 2 + (k - 15.0) ** 2 <= 16.0
    return (tube & (j >= 20)).astype(np.uint8)


def _samples_kji(scribble: ScribblePrompt) -> np.ndarray:
    """Voxels the engines rasterise: the polyline every half voxel, rounded."""
    return np.rint(polyline_samples(np.asarray(scribble.points, float)[:, ::-1])).astype(int)


def _assert_inside(scribble: ScribblePrompt, target: np.ndarray) -> None:
    voxels = _samples_kji(scribble)
    assert np.all(voxels >= 0) and np.all(voxels < np.asarray(target.shape))
    assert target[tuple(voxels.T)].all(), "the scribble leaves the object"


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("shape", ["ellipsoid", "banana"])
def test_scribble_lands_inside_the_object_in_every_orientation(orientation, source, shape, request):
    target = request.getfixturevalue(shape)
    spacing = SPACING if shape == "ellipsoid" else (1.0, 1.0, 1.0)
    for seed in range(3):
        scribble = simulate_scribble(target, spacing, orientation, source, jitter_mm=1.5, seed=seed)
        assert scribble.positive and scribble.kind == "scribble"
        assert len(scribble.points) >= 3
        _assert_inside(scribble, target)


@pytest.mark.parametrize("orientation,axis", [("axial", 2), ("coronal", 1), ("sagittal", 0)])
def test_axis_aligned_scribbles_stay_on_one_image_slice(orientation, axis, ellipsoid):
    scribble = simulate_scribble(ellipsoid, SPACING, orientation, "skeleton", jitter_mm=1.0, seed=0)
    pts = np.asarray(scribble.points)  # (i, j, k)
    assert np.ptp(pts[:, axis]) == 0.0
    assert pts[0, axis] == round(pts[0, axis])
    others = [a for a in range(3) if a != axis]
    assert np.ptp(pts[:, others], axis=0).max() > 5  # a real stroke, not a dot


def test_oblique_scribble_lies_on_a_tilted_plane(ellipsoid):
    scribble = simulate_scribble(ellipsoid, SPACING, "oblique", "contour", jitter_mm=1.0, seed=5)
    mm = np.asarray(scribble.points) * np.asarray(SPACING)  # physical (x, y, z)
    centred = mm - mm.mean(0)
    _, sv, vt = np.linalg.svd(centred)
    assert sv[2] < 1e-6 * sv[0]  # planar
    normal = vt[2]
    tilt = np.degrees(np.arccos(abs(normal[2])))  # angle between the plane's normal and the slice axis
    assert tilt == pytest.approx(OBLIQUE_TILT_DEG, abs=0.5)
    assert not np.allclose(np.asarray(scribble.points), np.round(scribble.points))  # off the voxel grid


def test_oblique_plane_can_be_given(ellipsoid):
    normal = (1.0, 0.0, 1.0)  # physical (x, y, z): 45 degrees between i and k
    scribble = simulate_scribble(ellipsoid, SPACING, "oblique", "skeleton", normal=normal)
    mm = np.asarray(scribble.points) * np.asarray(SPACING)
    offsets = (mm - mm.mean(0)) @ (np.asarray(normal) / np.sqrt(2))
    assert np.abs(offsets).max() < 1e-6
    _assert_inside(scribble, ellipsoid)


def test_jitter_is_seeded_and_moves_the_stroke(ellipsoid):
    a = simulate_scribble(ellipsoid, SPACING, "axial", "skeleton", jitter_mm=1.5, seed=4)
    b = simulate_scribble(ellipsoid, SPACING, "axial", "skeleton", jitter_mm=1.5, seed=4)
    c = simulate_scribble(ellipsoid, SPACING, "axial", "skeleton", jitter_mm=1.5, seed=5)
    still = simulate_scribble(ellipsoid, SPACING, "axial", "skeleton", jitter_mm=0.0, seed=4)
    assert a.points == b.points
    assert a.points != c.points
    shift = np.abs(np.asarray(a.points) - np.asarray(still.points)).max()
    assert 0.0 < shift * 0.8 <= 2 * 1.5 + 1e-9  # mm: a wobble of at most twice the jitter


def test_contour_scribble_runs_near_the_border_and_skeleton_through_the_middle(ellipsoid):
    depth = ndimage.distance_transform_edt(np.pad(ellipsoid, 1), sampling=SPACING[::-1])[1:-1, 1:-1, 1:-1]

    def mean_depth(source):
        s = simulate_scribble(ellipsoid, SPACING, "coronal", source)
        return float(depth[tuple(_samples_kji(s).T)].mean())

    assert mean_depth("contour") < 0.75 * mean_depth("skeleton")


def test_a_plate_one_voxel_thick_still_gets_a_scribble_inside():
    plate = np.zeros((10, 30, 30), np.uint8)
    plate[5, 5:25, 5:25] = 1
    for orientation in ORIENTATIONS[:3]:
        for source in SOURCES:
            scribble = simulate_scribble(plate, (1, 1, 1), orientation, source, jitter_mm=2.0)
            _assert_inside(scribble, plate)


def test_default_scribble_prompt_is_the_original_protocol(ellipsoid):
    assert scribble_prompt(ellipsoid, SPACING).points == simulate_scribble(ellipsoid, SPACING).points


def test_bad_arguments_are_explained(ellipsoid):
    with pytest.raises(ValueError, match="orientation"):
        simulate_scribble(ellipsoid, SPACING, "diagonal")
    with pytest.raises(ValueError, match="source"):
        ScribbleSpec(source="outline")
    with pytest.raises(ValueError, match="jitter"):
        ScribbleSpec(jitter_mm=-1)
    with pytest.raises(ValueError, match="normal"):
        simulate_scribble(ellipsoid, SPACING, "oblique", normal=(0, 0, 0))
    with pytest.raises(ValueError, match="empty"):
        simulate_scribble(np.zeros_like(ellipsoid), SPACING)


def test_an_oblique_plane_that_misses_the_object_skips_the_target_not_the_run():
    """Two blobs on either side of their common centre of mass: the plane through it holds neither.
    A ValueError once ended the whole evaluation with a traceback (the runners skip a PromptError)."""
    from SegAssistLib.errors import PromptError

    target = np.zeros((30, 20, 20), np.uint8)
    target[2:6, 8:12, 8:12] = 1
    target[24:28, 8:12, 8:12] = 1
    with pytest.raises(PromptError, match="misses it"):
        simulate_scribble(target, (1.0, 1.0, 1.0), "oblique", normal=(0.0, 0.0, 1.0))
