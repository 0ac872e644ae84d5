"""The built-in engine's mechanics: sessions, undo/redo, replay, bad input, zoom, checkpoints.

These use a small randomly initialised network in the real checkpoint format; segmentation quality
is tested with the shipped model in test_engine_quality.py.
"""

import numpy as np
import pytest
import torch

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.engine.network import NetworkConfig, build_network, load_checkpoint, save_checkpoint
from SegAssistLib.errors import DeviceError, ImageError, ModelError, PromptError, SessionError
from SegAssistLib.image import Volume
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, ScribblePrompt


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)


def _blob_volume(shape=(24, 40, 40), spacing=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(1)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.asarray(shape) / 2
    blob = ((k - c[0]) / 6) ** 2 + ((j - c[1]) / 9) ** 2 + ((i - c[2]) / 9) ** 2 <= 1
    arr = (blob * 100 + rng.normal(0, 5, shape)).astype(np.float32)
    return Volume(arr, spacing=spacing), blob


def _all_kinds(shape_kji):
    k, j, i = (n // 2 for n in shape_kji)
    return [
        PointPrompt(position=(i, j, k)),
        PointPrompt(position=(i + 5, j, k), positive=False),
        BoxPrompt(min_corner=(i - 5, j - 5, k), max_corner=(i + 5, j + 5, k)),
        BoxPrompt(min_corner=(i - 5, j - 5, k - 3), max_corner=(i + 5, j + 5, k + 3)),
        ScribblePrompt(points=[(i - 3, j, k), (i + 3, j + 1, k)]),
        ScribblePrompt(points=[(i, j - 3, k + 1), (i, j + 3, k + 1)], positive=False),
        LassoPrompt(points=[(i - 6, j - 6, k), (i + 6, j - 6, k), (i + 6, j + 6, k), (i - 6, j + 6, k)]),
        LassoPrompt(points=[(i - 2, j - 2, k), (i + 2, j - 2, k), (i, j + 2, k)], positive=False),
    ]


def test_every_prompt_kind_and_updates_reassemble_the_result(engine):
    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    mirror = np.zeros(vol.array.shape, np.uint8)
    for prompt in _all_kinds(vol.array.shape):
        update = session.add_prompt(prompt)
        assert update.latency_s > 0
        update.apply_to(mirror)
        assert np.array_equal(mirror, session.result())
    assert len(session.prompt_log().prompts) == 8


def test_undo_history_is_bounded_and_keeps_the_latest_steps(engine, monkeypatch):
    """Whole-image mask prompts and resets each stored two whole-image bit masks for undo, without
    bound: 600 of each grew a server by 310 MB on a 96^3 image (90 GiB at the prompt limit on a
    512x512x300 CT). The history keeps the most recent steps within its budget."""
    from SegAssistLib.engine import builtin

    monkeypatch.setattr(builtin, "MIN_HISTORY_BYTES", 0)  # the image's own share only: a small test
    vol, _ = _blob_volume()
    shape = vol.array.shape
    budget = builtin.history_budget_bytes(shape)
    assert budget == builtin.HISTORY_WHOLE_IMAGES * 2 * ((int(np.prod(shape)) + 7) // 8)
    assert builtin.history_budget_bytes((512, 512, 300)) > 64 << 20  # grows with the image
    session = engine.open_session(vol)
    rng = np.random.default_rng(0)
    states = []
    for n in range(30):
        if n % 3 == 2:
            session.reset()
        else:
            session.add_prompt(MaskPrompt.from_array((rng.random(shape) < 0.5).astype(np.uint8)))
        states.append(session.result())
        assert sum(step.nbytes for step in session._undo) <= budget
    kept = len(session._undo)
    assert 1 < kept < 30
    for expected in reversed(states[-kept - 1 : -1]):  # every step it kept undoes exactly
        session.undo()
        assert np.array_equal(session.result(), expected)
    with pytest.raises(SessionError, match="nothing to undo"):
        session.undo()
    session.redo()
    assert np.array_equal(session.result(), states[-kept])


def test_undo_redo_reset(engine):
    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    with pytest.raises(SessionError, match="nothing to undo"):
        session.undo()
    states = [session.result()]
    for prompt in _all_kinds(vol.array.shape)[:3]:
        session.add_prompt(prompt)
        states.append(session.result())
    mirror = states[-1].copy()
    for expected in reversed(states[:-1]):
        session.undo().apply_to(mirror)
        assert np.array_equal(session.result(), expected) and np.array_equal(mirror, expected)
    assert session.prompt_log().prompts == []
    with pytest.raises(SessionError, match="nothing to undo"):
        session.undo()
    for expected in states[1:]:
        session.redo().apply_to(mirror)
        assert np.array_equal(session.result(), expected) and np.array_equal(mirror, expected)
    with pytest.raises(SessionError, match="nothing to redo"):
        session.redo()
    session.reset()
    assert not session.result().any() and session.prompt_log().prompts == []
    session.undo()  # a reset can itself be undone
    assert np.array_equal(session.result(), states[-1])
    session.undo()
    session.add_prompt(_all_kinds(vol.array.shape)[0])  # a new prompt clears the redo stack
    with pytest.raises(SessionError, match="nothing to redo"):
        session.redo()


def test_replaying_a_log_gives_the_same_mask(engine):
    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    for prompt in _all_kinds(vol.array.shape):
        session.add_prompt(prompt)
    log = PromptLog.from_json(session.prompt_log().to_json())
    replayed = engine.open_session(vol, log.prompts)
    assert np.array_equal(replayed.result(), session.result())


def test_answers_pasted_slab_by_slab_are_the_answers_pasted_at_once(engine, monkeypatch):
    """A whole-body answer on a 600 x 512 x 512 CT is decided a slab at a time (bounded memory): the
    same voxels as all at once, here with slabs of a few rows."""
    from SegAssistLib.engine import builtin

    vol, _ = _blob_volume()
    prompts = _all_kinds(vol.array.shape)
    whole = engine.open_session(vol, prompts).result()
    monkeypatch.setattr(builtin, "COMMIT_CHUNK_VOXELS", 3 * 40 * 40)
    assert np.array_equal(engine.open_session(vol, prompts).result(), whole) and whole.any()


def test_initial_mask_becomes_the_result(engine):
    vol, blob = _blob_volume()
    session = engine.open_session(vol)
    session.add_prompt(MaskPrompt.from_array(blob))
    assert np.array_equal(session.result(), blob.astype(np.uint8))


@pytest.mark.parametrize(
    "prompt",
    [
        PointPrompt(position=(40, 5, 5)),
        PointPrompt(position=(-1, 5, 5)),
        BoxPrompt(min_corner=(0, 0, 0), max_corner=(50, 10, 10)),
        ScribblePrompt(points=[(1, 1, 1), (1, 1, 30)]),
    ],
)
def test_prompts_outside_the_image_are_refused_and_change_nothing(engine, prompt):
    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    session.add_prompt(PointPrompt(position=(20, 20, 12)))
    before = session.result()
    with pytest.raises(PromptError, match="outside the image"):
        session.add_prompt(prompt)
    assert np.array_equal(session.result(), before) and len(session.prompt_log().prompts) == 1


def test_bad_images_are_refused(engine):
    with pytest.raises(ImageError, match="NaN"):
        engine.open_session(Volume(np.full((8, 8, 8), np.nan, np.float32)))
    with pytest.raises(ImageError, match="3D"):
        vol = Volume(np.zeros((8, 8, 8), np.float32))
        vol.array = np.zeros((8, 8), np.float32)
        engine.open_session(vol)


def test_closed_session_refuses_work(engine):
    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    session.close()
    with pytest.raises(SessionError, match="closed"):
        session.add_prompt(PointPrompt(position=(5, 5, 5)))


def test_large_anisotropic_ct_zooms_out_and_pastes_within_bounds(engine):
    """A 5 mm-slice CT-like volume bigger than the patch: the window grows and the result stays on the grid."""
    rng = np.random.default_rng(0)
    shape = (40, 160, 160)
    arr = rng.normal(-100, 20, shape).astype(np.float32)
    arr[:, :, :] -= 900 * (np.hypot(*np.ogrid[-80:80, -80:80]) > 75)[None]
    vol = Volume(arr, spacing=(0.8, 0.8, 5.0))
    session = engine.open_session(vol)
    update = session.add_prompt(BoxPrompt(min_corner=(10, 10, 5), max_corner=(150, 150, 35)))
    assert update.info["levels"][0] >= 1  # the box does not fit a level-0 window
    assert session.result().shape == shape
    assert all(o + n <= s for o, n, s in zip(update.offset, update.voxels.shape, shape))


def test_mask_update_between():
    a = np.zeros((5, 5, 5), np.uint8)
    b = a.copy()
    b[1:3, 2, 3:5] = 1
    up = MaskUpdate.between(a, b)
    assert up.offset == (1, 2, 3) and up.voxels.shape == (2, 1, 2)
    assert MaskUpdate.between(a, a).voxels.size == 0


def test_capabilities(engine):
    caps = engine.capabilities()
    assert caps.patch_size == (32, 32, 32)
    assert set(caps.prompt_kinds) == {"point", "box", "scribble", "lasso", "mask"}
    assert caps.licence and caps.device == "cpu"


def test_checkpoint_errors_name_the_problem(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot read"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ModelError, match="not a SegAssist checkpoint"):
        load_checkpoint(other)
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(ModelError, match="newer"):
        load_checkpoint(newer)
    payload["format_version"] = 1
    payload["config"]["channels"] = [4, 8, 16]
    mismatch = tmp_path / "mismatch.pt"
    torch.save(payload, mismatch)
    with pytest.raises(ModelError, match="does not match"):
        load_checkpoint(mismatch)
    with pytest.raises(ModelError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    pointer = tmp_path / "lfs.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(ModelError, match="not a torch file .*Git LFS pointer"):
        load_checkpoint(pointer)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "hook": SessionError}, pickled)  # a class: only a full unpickler loads it
    with pytest.raises(ModelError, match="holds Python objects beyond tensors") as refused:
        load_checkpoint(pickled)
    assert "weights_only=False" not in str(refused.value) and "\n" not in str(refused.value)
    # tagged as a checkpoint, with fields of the wrong kind: once AttributeError, TypeError, ValueError
    for field, value, message in (
        ("config", [1, 2], "malformed network config"),
        ("meta", [1], "malformed"),
        ("state_dict", [1], "does not match"),
        ("format_version", "x", "not a number"),
    ):
        broken = {**torch.load(tiny_checkpoint, weights_only=True), field: value}
        path = tmp_path / f"broken_{field}.pt"
        torch.save(broken, path)
        with pytest.raises(ModelError, match=message):
            load_checkpoint(path)
    with pytest.raises(DeviceError, match="invalid device 'bogus'"):
        load_checkpoint(tiny_checkpoint, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
            load_checkpoint(tiny_checkpoint, device="cuda")


def test_checkpoint_round_trip_preserves_outputs(tmp_path):
    config = NetworkConfig(channels=(4, 8), strides=(2,), patch_size=16)
    net = build_network(config).eval()
    path = save_checkpoint(tmp_path / "m.pt", net, config, {"name": "x"})
    loaded = load_checkpoint(path)
    x = torch.randn(1, 7, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.network(x))
    assert loaded.meta["name"] == "x" and len(loaded.identity) == 16
    # stored in float16, the same weights (as loaded) are the same base model for adapters
    from SegAssistLib.engine.network import weights_identity

    half = torch.load(path, weights_only=True)
    half["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in half["state_dict"].items()}
    torch.save(half, tmp_path / "half.pt")
    as_half = load_checkpoint(tmp_path / "half.pt")
    assert as_half.identity == weights_identity(as_half.network.state_dict())
    assert load_checkpoint(path).identity == weights_identity(net.state_dict())  # float32: as before


@pytest.mark.parametrize("depth, tiles_limit, expected_level", [(1, 8, 1), (2, 64, 0), (2, 1, None)])
def test_refine_depth_chooses_how_fine_a_zoomed_out_answer_is_redrawn(
    tiny_checkpoint, depth, tiles_limit, expected_level
):
    """An answer from a level-2 window is refined ``refine_depth`` levels finer, over the tiles its
    surface crosses, unless that needs more than ``max_refine_tiles`` tiles (then it stays as it is)."""
    from SegAssistLib.engine import patching

    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, refine_depth=depth, max_refine_tiles=tiles_limit)
    vol, _ = _blob_volume(shape=(96, 96, 96))
    session = engine.open_session(vol)
    session.mask[30:66, 30:66, 30:66] = 1  # what the coarse level-2 answer painted
    window = patching.window_around((48, 48, 48), session.spacing_kji, engine.patch, 2)
    session._refine_level = None
    tiles = session._refine(window, [PointPrompt(position=(48, 48, 48))], 0, 2)
    assert session._refine_level == expected_level
    assert (tiles > 0) == (expected_level is not None)
    assert session.mask.shape == (96, 96, 96)


def test_refinement_stays_inside_the_answers_box(tiny_checkpoint):
    """The refine tiles cover the object's box plus a margin, but never beyond the window's box: the
    session mask outside it is what the returned update and undo do not cover (a leak there made
    a client's region-by-region mask differ from the server's result)."""
    from SegAssistLib.engine import patching

    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)
    vol, _ = _blob_volume(shape=(96, 96, 96))
    session = engine.open_session(vol)
    window = patching.window_around((48, 48, 48), session.spacing_kji, engine.patch, 1)
    box, _ = window.image_slices(session.shape)
    inside = np.zeros(session.shape, bool)
    inside[box] = True
    session.mask[box] = 0
    session.mask[tuple(slice(s.stop - 16, s.stop) for s in box)] = 1  # the answer reaches the box's sides
    before = session.mask.copy()
    session._refine_level = None
    assert session._refine(window, [PointPrompt(position=(48, 48, 48))], 0, 1) > 0
    assert np.array_equal(session.mask[~inside], before[~inside])
    assert not np.array_equal(session.mask[inside], before[inside])  # the tiles did redraw inside


def test_refine_depth_must_be_positive(tiny_checkpoint):
    with pytest.raises(ValueError, match="at least 1"):
        BuiltinEngine.from_checkpoint(tiny_checkpoint, refine_depth=0)


@pytest.mark.parametrize("spacing, min_view_mm, expected_level", [(0.6, 64.0, 2), (0.6, 0.0, 0), (2.0, 64.0, 0)])
def test_the_first_view_spans_at_least_min_view_mm(tiny_checkpoint, spacing, min_view_mm, expected_level):
    """On a fine image the finest window (32 voxels of 0.6 mm here) is too narrow to show a large
    object's edges: a click starts at the first level whose window spans ``min_view_mm``."""
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, min_view_mm=min_view_mm)
    vol, _ = _blob_volume(shape=(160, 160, 160), spacing=(spacing,) * 3)
    update = engine.open_session(vol).add_prompt(PointPrompt(position=(80, 80, 80)))
    assert update.info["levels"][0] == expected_level


@pytest.mark.parametrize("share", [0.025, 0.0])
def test_a_side_the_mask_crossed_zooms_out_only_for_more_than_a_share_of_it(tiny_checkpoint, share):
    """Where the mask did not reach a window side, one new voxel there zooms out (something new is
    cut by the window); where it already crossed the side (a correction of a large object), only a
    change of more than ``correction_zoom_share`` of the side does; a side at the image's edge never."""
    from SegAssistLib.engine import patching

    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, correction_zoom_share=share)
    vol, _ = _blob_volume(shape=(96, 96, 96))
    session = engine.open_session(vol)
    inside = patching.window_around((48, 48, 48), session.spacing_kji, engine.patch, 0)  # 32^3 of 96^3
    corner = patching.window_around((10, 10, 10), session.spacing_kji, engine.patch, 0)  # reaches the edge
    empty = torch.zeros((32, 32, 32))
    held = empty.clone()
    held[8:32, 8:24, 8:24] = 1  # an object that crosses the window's far side along k
    logits = torch.where(held > 0.5, 5.0, -5.0)

    def with_change(voxels: int, k: int = 31) -> torch.Tensor:
        out = logits.clone()
        out[k, 4, 2 : 2 + voxels] = 5.0  # new voxels on side k, away from the other sides
        return out

    allowed = int(share * 32 * 32)  # 25 voxels of a 32^2 side at 0.025
    assert session._change_reaches_open_side(logits, empty, inside)  # a new object, cut by the side
    assert not session._change_reaches_open_side(logits, held, inside)  # nothing changed
    assert session._change_reaches_open_side(with_change(allowed + 1), held, inside)
    assert session._change_reaches_open_side(with_change(max(allowed, 1)), held, inside) == (share == 0.0)
    assert session._change_reaches_open_side(with_change(1, k=0), held, inside)  # a side the mask never reached
    assert corner.start[0] < 0 and corner.start[0] + corner.size[0] < 96
    near, far = torch.full((32, 32, 32), -5.0), torch.full((32, 32, 32), -5.0)
    near[0, 4:28, 4:28] = 5.0
    far[31, 4:28, 4:28] = 5.0
    assert not session._change_reaches_open_side(near, empty, corner)
    assert session._change_reaches_open_side(far, empty, corner)


@pytest.mark.parametrize("share, expected_levels", [(0.025, [0]), (0.0, [0, 1])])
def test_a_correction_that_redraws_a_large_object_by_a_few_voxels_stays_at_its_level(
    tiny_checkpoint, share, expected_levels
):
    """The whole answer path: a click on an object larger than the window, whose answer differs from
    the mask by a few voxels where the object crosses a side, is answered at the first level (no
    coarse re-prediction), unless the share is 0. The network's answer is fixed here (the mask plus
    those voxels), so the test is about the engine, not the weights."""
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, correction_zoom_share=share, min_view_mm=0)
    vol, _ = _blob_volume(shape=(96, 96, 96))
    session = engine.open_session(vol)
    session.mask[20:76, 20:76, 20:76] = 1  # an earlier answer, larger than a 32^3 window

    def forward(window, prompts):
        from SegAssistLib.engine import patching

        previous = patching.extract_mask_patch(session.mask, window)
        logits = torch.where(previous > 0.5, 5.0, -5.0)
        if previous[-1, 10, 10:14].all():  # where the object crosses the side: 4 of its voxels redrawn
            logits[-1, 10, 10:14] = -5.0
        return logits, previous

    session._forward = forward
    update = session.add_prompt(PointPrompt(position=(48, 48, 48)))
    assert update.info["levels"] == expected_levels


@pytest.mark.parametrize("share", [1.5, 1.0, -0.1, float("nan")])
def test_correction_zoom_share_must_be_a_share(tiny_checkpoint, share):
    with pytest.raises(ValueError, match="correction_zoom_share"):
        BuiltinEngine.from_checkpoint(tiny_checkpoint, correction_zoom_share=share)


@pytest.mark.parametrize("text", ["1", "-0.5", "nan", "half"])
def test_the_command_line_refuses_a_share_outside_0_to_1(text, capsys):
    from SegAssistLib.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "somewhere", "--json", "out.json", "--correction-zoom-share", text])
    assert exit_info.value.code == 2
    assert "--correction-zoom-share" in capsys.readouterr().err


def test_a_ct_image_is_read_never_written(engine):
    """Clipping to the CT range worked on a view of the image when the window lay inside it: the
    caller's float32 array (the server's cached image, shared by sessions) lost its bright voxels,
    and a read-only array (memory-mapped) made every prompt fail."""
    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 30.0, (96, 96, 96)).astype(np.float32)  # larger than the first window
    array[44:52, 44:52, 44:52] = 3500.0  # above the clip range: dense bone or metal
    array[0, 0, 0] = -1024.0
    original = array.copy()
    for writable in (True, False):
        image = original.copy()
        image.setflags(write=writable)
        volume = Volume(image, spacing=(1.0, 1.0, 1.0), modality="CT")
        session = engine.open_session(volume)
        session.add_prompt(PointPrompt(position=(48.0, 48.0, 48.0)))
        session.add_prompt(PointPrompt(position=(40.0, 40.0, 40.0), positive=False))
        np.testing.assert_array_equal(volume.array, original)


def test_a_click_near_the_image_edge_still_gets_the_whole_object():
    """At the coarsest level the window, centred on a click near an edge, hung out over that edge and
    stopped short of the other: a large object came back cut off (slices 8-75 of 8-92 here). A stand-in
    network that answers "the bright voxels in view" isolates the engine's windows from any weights."""
    from SegAssistLib.engine.network import LoadedModel

    class BrightVoxelsInView(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] * 10.0  # the normalised image: positive on the bright object

    k, j, i = np.ogrid[:100, :100, :100]
    ball = (k - 50) ** 2 + (j - 50) ** 2 + (i - 50) ** 2 <= 42**2
    volume = Volume((ball * 100.0 + 1.0).astype(np.float32))
    engine = BuiltinEngine(LoadedModel(BrightVoxelsInView(), NetworkConfig()), edge_snap=None)  # 64^3 patches
    for click in [(50.0, 50.0, 50.0), (50.0, 50.0, 12.0), (88.0, 50.0, 50.0)]:  # (i, j, k)
        session = engine.open_session(volume)
        update = session.add_prompt(PointPrompt(position=click))
        answer = session.result() > 0
        extent = [(int(a.min()), int(a.max())) for a in np.nonzero(answer)]
        assert extent == [(8, 92)] * 3, (click, extent, update.info)
        assert 2 * (answer & ball).sum() / (answer.sum() + ball.sum()) > 0.99


def test_an_image_in_tiny_units_is_segmented_like_the_same_image_in_ordinary_ones(engine):
    """Patches were z-scored only when their spread exceeded 1e-6 in absolute terms: an ADC map in
    m^2/s (values near 1e-9) reached the network nearly blank (Dice 0.35 instead of 1.0 with the
    shipped model). The test for a constant patch is relative now; so is the edge snap's scaling."""
    from SegAssistLib.image import scaled_to_unit

    vol, _ = _blob_volume()
    tiny = Volume((vol.array.astype(np.float64) * 1e-9).astype(np.float32), spacing=vol.spacing)
    assert np.allclose(scaled_to_unit(tiny.array), scaled_to_unit(vol.array), atol=1e-5)
    k, j, i = (n // 2 for n in vol.array.shape)
    results = []
    for volume in (vol, tiny):
        session = engine.open_session(volume)
        session.add_prompt(PointPrompt(position=(i, j, k)))
        session.add_prompt(BoxPrompt(min_corner=(i - 5, j - 5, k), max_corner=(i + 5, j + 5, k)))
        results.append(session.result())
    agree = 2 * np.logical_and(*results).sum() / max(1, results[0].sum() + results[1].sum())
    assert results[0].any() and agree > 0.99


def test_steps_that_change_no_voxel_keep_the_history_bounded(engine, monkeypatch):
    """Each reset of an empty mask kept a step counted as 0 bytes: 3000 resets kept 3000 steps. A step
    counts a fixed overhead and its prompt lists, and the history keeps at most MAX_HISTORY_STEPS."""
    from SegAssistLib.engine import builtin

    vol, _ = _blob_volume()
    session = engine.open_session(vol)
    for _ in range(builtin.MAX_HISTORY_STEPS + 200):
        session.reset()
    assert len(session._undo) == builtin.MAX_HISTORY_STEPS
    assert all(step.nbytes >= builtin.STEP_OVERHEAD_BYTES for step in session._undo)
    for _ in range(5):  # the latest steps still undo and redo
        session.undo()
    session.redo()
    assert session.can_undo and not session.result().any()

    monkeypatch.setattr(builtin, "MIN_HISTORY_BYTES", 0)  # the image's own share only: a small budget
    session = engine.open_session(vol)
    budget = builtin.history_budget_bytes(vol.array.shape)
    n = budget // builtin.STEP_OVERHEAD_BYTES + 50
    assert n < builtin.MAX_HISTORY_STEPS  # the byte budget, not the step cap, bounds these
    for _ in range(n):
        session.reset()
    assert sum(step.nbytes for step in session._undo) <= budget
    assert 1 < len(session._undo) < n
    session.undo()


def test_a_session_records_its_engine_settings_and_answers_with_a_logs_when_opened_with_them(tiny_checkpoint):
    """What shaped the answers besides the weights is in the log; a session opened with a log's settings
    answers as an engine built with them does, and the engine keeps its own for other sessions."""
    from SegAssistLib.prompt_log import EngineSettings

    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)
    assert engine.settings == EngineSettings(refine_depth=1, max_refine_tiles=8, min_view_mm=64.0,
                                             correction_zoom_share=0.025, edge_band=2.0, edge_beta=500.0,
                                             edge_max_voxels=200_000)  # fmt: skip
    other = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, min_view_mm=0.0, refine_depth=2, edge_snap=None)
    assert other.settings.model_dump() == {**engine.settings.model_dump(), "min_view_mm": 0.0, "refine_depth": 2,
                                           "max_refine_tiles": 27, "edge_band": 0.0}  # fmt: skip
    vol, _ = _blob_volume(shape=(160, 160, 160), spacing=(0.6, 0.6, 0.6))  # min_view_mm decides the first level
    click = PointPrompt(position=(80, 80, 80))
    session = engine.open_session(vol, settings=other.settings)
    assert session.add_prompt(click).info["levels"][0] == 0  # the engine's own 64 mm would start at level 2
    assert np.array_equal(session.result(), other.open_session(vol, [click]).result())
    log = PromptLog.from_json(session.prompt_log().to_json())
    assert log.engine == other.settings and log.prompts == [click]
    assert engine.open_session(vol).prompt_log().engine == engine.settings
