"""The segment editor effect without Qt: shortcuts, gestures, prompts, bookkeeping, worker, region writes.

Everything the effect decides is exercised here on real MRML scenes (slicer-core) and a real
engine; only drawing, cursors and Qt timers are left to the in-Slicer self-tests.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mrml_fixtures import (
    add_linear_transform,
    add_volume,
    affine,
    oblique_ijk_to_ras,
    rotation,
    slicer_xy_to_voxel,
    voxel_world,
)
from test_server_fixtures import TOKENS

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import PromptError, SessionError
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt, to_slab

slicer = pytest.importorskip("slicer")
from SegAssistLib.slicer import coordinates, segments  # noqa: E402
from SegAssistLib.slicer.interaction import (  # noqa: E402
    SEGMENT_EDITOR_KEYS,
    SHORTCUTS,
    SLICE_VIEW_KEYS,
    Action,
    Gesture,
    GestureRecorder,
    Tool,
    check_inside,
    gesture_to_prompt,
    help_rows,
    mouse_help,
    project_to_slice,
    prompt_points_ijk,
    reserved_key,
    resolve_key,
    tooltip,
)
from SegAssistLib.slicer.scene import add_slice_node, create_headless_scene  # noqa: E402
from SegAssistLib.slicer.session_state import (  # noqa: E402
    NOTE_AFTER_S,
    InteractiveSession,
    Op,
    PromptState,
    describe_error,
)
from SegAssistLib.slicer.volumes import volume_from_node  # noqa: E402
from SegAssistLib.slicer.worker import BackgroundWorker  # noqa: E402

SHAPE = (20, 32, 36)  # [k, j, i]
DIMS, FOV, CENTER = (300, 200), (150.0, 100.0), (150.0, 100.0)
pytest_plugins = ["test_server_fixtures"]


class Clock:
    """A time source moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _blob(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = ((k / 0.6) ** 2 + (j / 0.5) ** 2 + (i / 0.45) ** 2) < 1
    return (blob * 200 + rng.normal(0, 20, shape)).astype(np.float32)


def _transformed_volume(scene, oblique: bool):
    parent = add_linear_transform(scene, affine(rotation((0, 1, 1), 20), (4.0, -6.0, 2.5)), "scanner")
    ijk_to_ras = oblique_ijk_to_ras((1.0, 0.9, 1.6)) if oblique else affine(np.diag([-1.0, -0.9, 1.6]), (30, 20, -10))
    return add_volume(scene, _blob(), ijk_to_ras, "blob", parent=parent)


# ---- shortcuts ----------------------------------------------------------------------------------
def test_every_action_has_a_key_and_no_key_is_taken_twice():
    assert {s.action for s in SHORTCUTS} == set(Action)
    keys = [(s.key, s.shift) for s in SHORTCUTS]
    assert len(keys) == len(set(keys))


def test_shortcuts_avoid_the_segment_editor_and_slice_view_keys():
    for shortcut in SHORTCUTS:
        assert not reserved_key(shortcut.key), shortcut
        assert shortcut.key.lower() not in {k.lower() for k in SEGMENT_EDITOR_KEYS | SLICE_VIEW_KEYS}
    for key in ("z", "Z", "y", "5", "Escape", "space", "i", "comma", "less", "r", "f", "b", "Up"):
        assert reserved_key(key)
        assert resolve_key(key) is None and resolve_key(key, shift=True) is None


def test_keys_resolve_with_shift_and_leave_ctrl_and_alt_to_slicer():
    assert resolve_key("c") is Action.CLICK_TOOL
    assert resolve_key("u") is Action.UNDO
    assert resolve_key("U", shift=True) is Action.REDO  # VTK reports Shift+u as "U", with the Shift flag
    assert resolve_key("u", shift=True) is Action.REDO
    assert resolve_key("x") is None and resolve_key("X", shift=True) is Action.RESET
    # Caps Lock: an upper-case keysym without the Shift flag is the plain key, never the shifted one
    assert resolve_key("X") is None and resolve_key("U") is Action.UNDO and resolve_key("C") is Action.CLICK_TOOL
    assert resolve_key("Return") is resolve_key("KP_Enter") is Action.ACCEPT
    assert resolve_key("c", ctrl=True) is None and resolve_key("u", alt=True) is None
    assert resolve_key("") is None and resolve_key("h") is None


def test_help_and_tooltips_name_every_shortcut():
    text = " ".join(f"{keys} {what}" for keys, what in help_rows())
    for shortcut in SHORTCUTS:
        assert shortcut.label in text
    assert tooltip(Action.UNDO, "Undo prompt") == "Undo prompt (U)"
    assert tooltip(Action.REDO, "Redo prompt") == "Redo prompt (Shift+U)"
    assert "Ctrl+click" in mouse_help(Tool.CLICK, True) and "negative" in mouse_help(Tool.CLICK, True)
    assert mouse_help(Tool.SCRIBBLE, False).startswith("Drag: draw a negative")


# ---- gestures -----------------------------------------------------------------------------------
def test_click_is_a_press_and_release_in_place():
    rec = GestureRecorder(click_tolerance_px=4)
    rec.press("Red", (10, 20), Tool.CLICK, positive=False)
    assert rec.active and not rec.move("Red", (12, 21))
    gesture = rec.release("Red", (12, 21))
    assert gesture == Gesture(Tool.CLICK, False, "Red", ((10.0, 20.0),))
    assert not rec.active

    rec.press("Red", (10, 20), Tool.CLICK, positive=True)
    assert rec.release("Red", (40, 20)) is None and "drag" in rec.hint
    rec.press("Red", (10, 20), Tool.CLICK, positive=True)
    assert rec.release("Yellow", (10, 20)) is None  # a release in another view is not ours


def test_box_needs_a_real_rectangle_and_is_always_positive():
    rec = GestureRecorder()
    rec.press("Green", (50, 60), Tool.BOX, positive=False)
    assert rec.move("Green", (90, 100))
    feedback = rec.feedback()
    assert feedback is not None and feedback.closed and len(feedback.xy) == 4
    gesture = rec.release("Green", (90, 100))
    assert gesture is not None and gesture.positive and gesture.xy == ((50.0, 60.0), (90.0, 100.0))

    rec.press("Green", (50, 60), Tool.BOX, positive=True)
    assert rec.release("Green", (90, 61)) is None and "too small" in rec.hint


def test_scribble_keeps_a_vertex_every_few_pixels():
    rec = GestureRecorder(min_step_px=2)
    rec.press("Red", (0, 0), Tool.SCRIBBLE, positive=True)
    for x in np.arange(0.5, 10.5, 0.5):
        rec.move("Red", (x, 0))
    gesture = rec.release("Red", (10, 0))
    assert gesture is not None and gesture.tool is Tool.SCRIBBLE
    xs = [p[0] for p in gesture.xy]
    assert xs[0] == 0 and xs[-1] == 10 and len(xs) == 6
    assert np.all(np.diff(xs) >= 2 - 1e-9)


def test_lasso_by_clicks_closes_on_the_first_corner_or_on_finish():
    rec = GestureRecorder(close_radius_px=8)
    for xy in [(0, 0), (50, 0), (50, 40)]:
        assert rec.press("Red", xy, Tool.LASSO, positive=False) is None
        assert rec.release("Red", xy) is None
    assert rec.drawing_lasso and rec.feedback().xy[-1] == (50.0, 40.0)
    gesture = rec.press("Red", (3, 2), Tool.LASSO, positive=False)  # near the first corner: close
    assert gesture is not None and gesture.tool is Tool.LASSO and not gesture.positive
    assert len(gesture.xy) == 3 and not rec.active

    for xy in [(0, 0), (50, 0)]:
        rec.press("Red", xy, Tool.LASSO, positive=True)
        rec.release("Red", xy)
    assert rec.finish() is None and "3 corners" in rec.hint
    rec.press("Red", (50, 40), Tool.LASSO, positive=True)
    rec.move("Red", (30, 45))  # a drag adds corners along the way
    rec.release("Red", (20, 50))
    assert rec.drop_last_vertex()
    gesture = rec.finish()
    assert gesture is not None and gesture.xy[-1] == (30.0, 45.0) and len(gesture.xy) == 4

    rec.press("Red", (0, 0), Tool.LASSO, positive=True)
    rec.release("Red", (0, 0))
    rec.press("Yellow", (5, 5), Tool.LASSO, positive=True)  # another view starts another lasso
    rec.release("Yellow", (5, 5))
    assert rec.feedback().view == "Yellow" and len(rec.feedback().xy) == 1
    assert rec.cancel() and not rec.cancel()


# ---- prompts from gestures on real slice views --------------------------------------------------
@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal", (0.3, -0.5, 0.8)])
def test_gesture_clicks_land_on_the_voxel_slicer_would_paint(ctx, orientation):
    volume = _transformed_volume(ctx.scene, oblique=True)
    target = (17, 12, 9)
    view = add_slice_node(ctx.scene, orientation, DIMS, FOV, center_ras=voxel_world(volume, target))
    prompt = gesture_to_prompt(Gesture(Tool.CLICK, False, "Red", (CENTER,)), view, volume)
    assert isinstance(prompt, PointPrompt) and not prompt.positive
    assert coordinates.voxel_index(prompt.position) == target == slicer_xy_to_voxel(view, CENTER, volume)


def _plain_volume(scene):
    """An axis-aligned LPS scan without transforms: axial views are aligned with its grid."""
    return add_volume(scene, _blob(), affine(np.diag([-1.0, -1.0, 1.6]), (30, 20, -10)), "plain")


def test_gesture_box_is_a_flat_box_on_an_aligned_slice_and_a_lasso_on_an_oblique_one(ctx):
    plain = _plain_volume(ctx.scene)
    axial = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=voxel_world(plain, (18, 16, 10)))
    corners = ((140.0, 90.0), (160.0, 112.0))
    box = gesture_to_prompt(Gesture(Tool.BOX, True, "Red", corners), axial, plain)
    assert isinstance(box, BoxPrompt) and box.is_2d
    assert box.min_corner[2] == box.max_corner[2] == pytest.approx(10.0)
    ijk = coordinates.xy_to_ijk(axial, corners, plain)
    assert np.allclose(box.min_corner[:2], ijk.min(axis=0)[:2]) and np.allclose(box.max_corner[:2], ijk.max(axis=0)[:2])

    volume = _transformed_volume(ctx.scene, oblique=True)
    oblique = add_slice_node(
        ctx.scene, (0.3, -0.5, 0.8), DIMS, FOV, center_ras=voxel_world(volume, (18, 16, 10)), layout_name="Oblique"
    )
    lasso = gesture_to_prompt(Gesture(Tool.BOX, True, "Oblique", corners), oblique, volume)
    assert isinstance(lasso, LassoPrompt) and len(lasso.points) == 4 and lasso.positive


def test_gesture_scribble_and_lasso_follow_the_view(ctx):
    volume = _transformed_volume(ctx.scene, oblique=True)
    view = add_slice_node(ctx.scene, "Coronal", DIMS, FOV, center_ras=voxel_world(volume, (18, 16, 10)))
    stroke = ((140.0, 95.0), (150.0, 100.0), (158.0, 104.0))
    scribble = gesture_to_prompt(Gesture(Tool.SCRIBBLE, False, "Red", stroke), view, volume, scribble_width=2.0)
    assert isinstance(scribble, ScribblePrompt) and not scribble.positive and scribble.width == 2.0
    assert np.allclose(scribble.points, coordinates.xy_to_ijk(view, stroke, volume))
    outline = ((140.0, 90.0), (160.0, 92.0), (155.0, 110.0), (142.0, 106.0))
    lasso = gesture_to_prompt(Gesture(Tool.LASSO, True, "Red", outline), view, volume)
    assert isinstance(lasso, LassoPrompt) and len(lasso.points) == 4


def test_prompts_outside_the_volume_are_refused_with_a_clear_message(ctx):
    volume = _transformed_volume(ctx.scene, oblique=True)
    view = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=voxel_world(volume, (18, 16, 10)))
    with pytest.raises(PromptError, match="click is outside the volume"):
        gesture_to_prompt(Gesture(Tool.CLICK, True, "Red", ((2.0, 2.0),)), view, volume)
    with pytest.raises(PromptError, match="scribble is outside"):
        check_inside(ScribblePrompt(points=[(1, 1, 1), (40, 1, 1)]), SHAPE)
    with pytest.raises(PromptError, match="scribble is outside"):  # a slab: every voxel is checked
        check_inside(to_slab(ScribblePrompt(points=[(1, 1, 1), (40, 1, 1)]), (20, 32, 50)), SHAPE)
    check_inside(PointPrompt(position=(-0.4, 31.4, 19.4)), SHAPE)


def test_placed_prompts_are_drawn_on_their_slice_only(ctx):
    volume = _transformed_volume(ctx.scene, oblique=True)
    center = voxel_world(volume, (18, 16, 10))
    view = add_slice_node(ctx.scene, (0.3, -0.5, 0.8), DIMS, FOV, center_ras=center)
    outline = ((140.0, 90.0), (160.0, 92.0), (155.0, 110.0))
    lasso = gesture_to_prompt(Gesture(Tool.LASSO, True, "Red", outline), view, volume)
    points, closed = prompt_points_ijk(lasso)
    assert closed
    xy_to_ras = slicer.util.arrayFromVTKMatrix(view.GetXYToRAS())
    xy, near = project_to_slice(coordinates.ijk_to_ras(points, volume), xy_to_ras, tolerance_mm=0.5)
    assert near.all() and np.allclose(xy, outline, atol=1e-6)

    normal = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    elsewhere = add_slice_node(
        ctx.scene, tuple(normal), DIMS, FOV, center_ras=center + 3.0 * normal, layout_name="Other"
    )
    _, near = project_to_slice(
        coordinates.ijk_to_ras(points, volume), slicer.util.arrayFromVTKMatrix(elsewhere.GetXYToRAS()), 0.5
    )
    assert not near.any()

    # a prompt in slab form (from a log) draws as a line through its voxels, a lasso closed
    slab_lasso = to_slab(LassoPrompt(points=[(5, 5, 4), (15, 5, 4), (15, 12, 4), (5, 12, 4)]), SHAPE)
    outline, closed = prompt_points_ijk(slab_lasso)
    assert closed and np.all(outline[:, 2] == 4) and outline[:, 0].min() == 5 and outline[:, 0].max() == 15
    stroke, closed = prompt_points_ijk(to_slab(ScribblePrompt(points=[(3, 7, 4), (12, 7, 4)]), SHAPE))
    assert not closed and stroke[:, 0].tolist() == list(range(3, 13))

    box = BoxPrompt(min_corner=(2, 3, 4), max_corner=(8, 9, 4))
    corners, closed = prompt_points_ijk(box)
    assert closed and corners.shape == (4, 3) and np.all(corners[:, 2] == 4)
    assert prompt_points_ijk(BoxPrompt(min_corner=(2, 3, 4), max_corner=(8, 9, 6)))[0].shape == (8, 3)


# ---- request bookkeeping ------------------------------------------------------------------------
def _update(value: int = 1) -> MaskUpdate:
    return MaskUpdate(offset=(0, 0, 0), voxels=np.full((1, 1, 1), value, np.uint8))


def test_requests_are_numbered_and_replies_of_a_past_object_are_dropped():
    state = PromptState()
    p1, p2 = PointPrompt(position=(1, 2, 3)), PointPrompt(position=(4, 5, 6), positive=False)
    r1 = state.request(Op.PROMPT, p1)
    r2 = state.request(Op.PROMPT, p2)
    assert (r1.seq, r2.seq) == (1, 2) and state.busy and state.prompts == [p1, p2]
    assert state.accept(r1, _update()) is not None
    assert state.confirmed_prompts == [p1]

    state.new_epoch()  # reset / accept / another segment while r2 is in flight
    assert not state.busy and state.prompts == []
    assert state.accept(r2, _update()) is None and state.dropped == 1
    assert state.accept(r1, _update()) is None and state.dropped == 2  # a duplicate is stale too
    r3 = state.request(Op.PROMPT, p1)
    assert r3.seq == 3 and r3.epoch == 1


def test_accepting_with_answers_pending_waits_for_them_instead_of_dropping_them():
    """Enter right after a click (or while the backend still loads the model) once ended the object at
    once and dropped the click's answer; now the accept waits until the pending answers are in."""
    state = PromptState()
    assert state.ask_accept() and not state.accepting  # nothing pending: accept now
    p1, p2 = PointPrompt(position=(1, 2, 3)), PointPrompt(position=(4, 5, 6))
    r1, r2 = state.request(Op.PROMPT, p1), state.request(Op.PROMPT, p2)
    assert not state.ask_accept() and state.accepting and not state.accept_due
    with pytest.raises(SessionError, match="being accepted"):  # the object is closing: no new request
        state.request(Op.UNDO)
    assert state.accept(r1, _update()) is not None and not state.accept_due
    assert state.accept(r2, _update(2)) is not None  # the last answer still lands in the segment
    assert state.accept_due and state.confirmed_prompts == [p1, p2]
    state.new_epoch()  # the effect ends the object
    assert not state.accepting and not state.accept_due
    state.request(Op.PROMPT, p1)  # the next object takes prompts again


@pytest.mark.parametrize("failure", ["unreachable", "busy", "refused"])
def test_an_accept_that_waited_for_a_failed_answer_keeps_its_error(failure):
    """Click, then Enter at once: the accept waits for the click's answer, which fails. The effect
    (``_poll``) stored the error, then ended the object as accepted in the same poll: the object's end
    cleared the error and the status line said only "Accepted", in black; the click was lost unsaid."""
    from SegAssistLib.client.errors import BackendUnavailableError, InvalidPromptError, ServerBusyError
    from SegAssistLib.slicer.session_state import ACCEPTED

    error = {
        "unreachable": BackendUnavailableError("connection refused at http://127.0.0.1:40000"),
        "busy": ServerBusyError("queue full", 503),
        "refused": InvalidPromptError("outside the image", 422),
    }[failure]
    state = PromptState()
    click = state.request(Op.PROMPT, PointPrompt(position=(5.0, 5.0, 5.0)))
    assert not state.ask_accept()  # Enter: waits for the answer
    assert state.accept(click, None, error) is None  # the answer is an error
    state.error_text = describe_error(state.last_error)  # as the effect's _poll records it
    assert state.accept_due
    line, is_error = state.accepted_line()  # what the effect shows as it ends the object
    state.new_epoch()
    assert is_error and line.startswith("Accepted, but a request failed")
    assert describe_error(error) in line

    # an accept with every answer in says just that
    state.request(Op.PROMPT, PointPrompt(position=(5.0, 5.0, 5.0)))  # a new request clears an old error
    assert state.accepted_line() == (ACCEPTED, False)


def test_an_object_being_accepted_ends_when_another_segmentation_or_volume_is_selected():
    """Its last answers still go to its own segment after another segment of the same segmentation
    is selected; but the editor masks a write by the segmentation and volume it edits now, so after
    a switch to another segmentation they would be masked by that one's segments (with "outside all
    segments", overwriting the object's neighbours): the object ends and they are dropped."""
    state = PromptState()
    assert state.ends_on_switch(True) and state.ends_on_switch(False)  # not accepting: any switch ends it
    state.request(Op.PROMPT, PointPrompt(position=(1.0, 2.0, 3.0)))
    assert not state.ask_accept()  # Enter: waits for the answer
    assert not state.ends_on_switch(True)  # the next segment of the same segmentation: it waits on
    assert state.ends_on_switch(False)  # another segmentation or source volume: it ends


def test_undo_and_redo_are_gated_by_the_expected_history():
    state = PromptState()
    with pytest.raises(SessionError, match="nothing to undo"):
        state.request(Op.UNDO)
    p = PointPrompt(position=(1, 2, 3))
    r1 = state.request(Op.PROMPT, p)
    assert state.can_undo and not state.can_redo  # queued behind the prompt: allowed at once
    r2 = state.request(Op.UNDO)
    assert not state.can_undo and state.can_redo and state.prompts == []
    with pytest.raises(ValueError):
        state.request(Op.PROMPT)
    assert state.accept(r1, _update()) is not None
    assert state.accept(r2, MaskUpdate((0, 0, 0), np.zeros((0, 0, 0), np.uint8))) is None  # nothing changed
    assert state.confirmed_prompts == [] and state.can_redo
    r3 = state.request(Op.REDO)
    assert state.accept(r3, _update()) is not None and state.confirmed_prompts == [p]


def test_a_failed_request_is_rolled_back_and_later_ones_replanned():
    state = PromptState()
    p1, p2 = PointPrompt(position=(1, 2, 3)), PointPrompt(position=(3, 2, 1))
    r1 = state.request(Op.PROMPT, p1)
    r2 = state.request(Op.PROMPT, p2)
    error = PromptError("outside")
    assert state.accept(r1, error=error) is None and state.last_error is error
    assert state.prompts == [p2] and state.busy
    assert state.accept(r2, _update()) is not None and state.last_error is None
    assert state.confirmed_prompts == [p2]


def test_a_progress_note_appears_only_when_a_reply_takes_long():
    clock = Clock()
    state = PromptState(clock=clock)
    assert state.progress_note() is None
    state.request(Op.PROMPT, PointPrompt(position=(1, 2, 3)))
    clock.now += NOTE_AFTER_S / 2
    assert state.progress_note() is None  # a wait cursor is enough
    clock.now += 2.0
    note = state.progress_note("Uploading the image (40 %)")
    assert note is not None and "1 request" in note and note.endswith("Uploading the image (40 %)")


def test_errors_are_described_for_the_user():
    from SegAssistLib.client.errors import AuthenticationError, BackendUnavailableError, InvalidPromptError

    assert "Start the local backend" in describe_error(BackendUnavailableError("cannot reach x"))
    assert "token" in describe_error(AuthenticationError("bad token", status=401, code="unauthorized"))
    assert describe_error(InvalidPromptError("outside", status=422)).startswith("The backend rejected the prompt")
    assert describe_error(RuntimeError("boom")) == "Unexpected error (RuntimeError): boom"


# ---- the worker thread --------------------------------------------------------------------------
def test_worker_returns_results_in_submission_order_with_errors_carried():
    worker: BackgroundWorker[int] = BackgroundWorker()
    release = threading.Event()
    main = threading.get_ident()
    threads = []

    def job(value):
        threads.append(threading.get_ident())
        release.wait(5)
        if value == 2:
            raise PromptError("bad prompt")
        return value * 10

    for tag in (1, 2, 3):
        worker.submit(tag, job, tag)
    assert worker.busy and worker.poll() == [] and worker.pending_tags == [1, 2, 3]
    release.set()
    done = worker.wait(timeout=10)
    assert [d.tag for d in done] == [1, 2, 3]
    assert done[0].value == 10 and done[0].ok
    assert isinstance(done[1].error, PromptError) and done[2].value == 30
    assert len(set(threads)) == 1 and main not in threads  # one worker thread, never the caller's
    worker.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        worker.submit(4, job, 4)


# ---- the effect's flow on a real scene and engine -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    from SegAssistLib.engine.builtin import BuiltinEngine

    return BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)


def _apply_replies(worker, state, editor, segment_id):
    written = 0
    for done in worker.wait(timeout=120):
        update = state.accept(done.tag, done.value, done.error)
        if update is not None:
            editor.write(segment_id, update)
            written += 1
    return written


def test_effect_flow_writes_replies_into_the_selected_segment_and_drops_stale_ones(ctx, tiny_engine):
    """Gestures -> prompts -> worker -> bookkeeping -> region writes with undo, as the effect does it."""
    volume_node = _transformed_volume(ctx.scene, oblique=True)
    seg = segments.create_segmentation(ctx.scene, volume_node, "seg")
    other = segments.add_segment(seg, "other", (0.0, 0.0, 1.0))
    other_mask = np.zeros(SHAPE, np.uint8)
    other_mask[0:3, 0:4, 0:5] = 1
    segments.array_to_segment(other_mask, seg, other, volume_node)
    target = segments.add_segment(seg, "target", (1.0, 0.0, 0.0))
    baseline = np.zeros(SHAPE, np.uint8)
    baseline[8:12, 14:18, 16:20] = 1  # painted before SegAssist was used: the session's initial mask
    segments.array_to_segment(baseline, seg, target, volume_node)
    editor = segments.SegmentEditor(seg, volume_node)

    view = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=voxel_world(volume_node, (18, 16, 10)))
    state, worker = PromptState(), BackgroundWorker()
    session = InteractiveSession(lambda: tiny_engine, volume_from_node(volume_node), baseline, worker.note)
    rec = GestureRecorder()
    try:
        for xy, positive in (((150, 100), True), ((156, 104), False)):
            rec.press("Red", xy, Tool.CLICK, positive)
            prompt = gesture_to_prompt(rec.release("Red", xy), view, volume_node)
            request = state.request(Op.PROMPT, prompt)
            worker.submit(request, session.run, request)
        assert _apply_replies(worker, state, editor, target) >= 1
        result = session.result()
        assert np.array_equal(segments.segment_to_array(seg, target, volume_node), result)
        assert np.array_equal(segments.segment_to_array(seg, other, volume_node), other_mask)

        # prompt undo goes through the backend and is written like any reply
        request = state.request(Op.UNDO)
        worker.submit(request, session.run, request)
        _apply_replies(worker, state, editor, target)
        assert len(state.confirmed_prompts) == 1
        assert np.array_equal(segments.segment_to_array(seg, target, volume_node), session.result())
        assert state.can_undo and state.can_redo

        # a reply that arrives after reset is stale: the segment goes back to the baseline and stays there
        request = state.request(Op.REDO)
        worker.submit(request, session.run, request)
        state.new_epoch()
        session.abandon()
        current = segments.segment_to_array(seg, target, volume_node)
        editor.write(target, MaskUpdate.between(current, baseline))
        assert _apply_replies(worker, state, editor, target) == 0 and state.dropped == 1
        assert np.array_equal(segments.segment_to_array(seg, target, volume_node), baseline)
        assert np.array_equal(segments.segment_to_array(seg, other, volume_node), other_mask)

        # the segment editor's own undo steps back through the writes
        editor.undo()
        assert np.array_equal(segments.segment_to_array(seg, target, volume_node), current)
    finally:
        worker.submit(None, session.close)
        worker.wait(timeout=30)
        worker.shutdown(wait=True)
        editor.close()


def test_an_abandoned_session_does_no_more_work(tiny_engine):
    calls = []

    def factory():
        calls.append(time.monotonic())
        return tiny_engine

    volume = _blob()
    from SegAssistLib.image import Volume

    session = InteractiveSession(factory, Volume(volume), None)
    session.abandon()
    state = PromptState()
    assert session.run(state.request(Op.PROMPT, PointPrompt(position=(18, 16, 10)))) is None
    assert calls == [] and session.result() is None


def test_an_undo_queued_behind_a_failed_prompt_never_reaches_the_backend(tiny_engine):
    """The segment had content, so the backend's history starts with it as an initial mask. A click
    fails while an undo waits behind it: the undo must not take the initial mask away (it did, and the
    effect's bookkeeping then raised IndexError, leaving every later reply pending)."""
    from SegAssistLib.image import Volume

    baseline = np.zeros(SHAPE, np.uint8)
    baseline[8:12, 14:18, 16:20] = 1
    state, worker = PromptState(), BackgroundWorker()
    session = InteractiveSession(lambda: tiny_engine, Volume(_blob()), baseline, worker.note)
    try:
        outside = state.request(Op.PROMPT, PointPrompt(position=(500.0, 16.0, 10.0)))
        undo = state.request(Op.UNDO)
        for request in (outside, undo):
            worker.submit(request, session.run, request)
        replies = worker.wait(timeout=60)
        assert type(replies[0].error).__name__ == "PromptError"
        assert replies[1].ok and replies[1].value.voxels.size == 0  # moot: nothing sent to the backend
        assert all(state.accept(r.tag, r.value, r.error) is None for r in replies)
        assert not state.busy and state.prompts == [] and not state.can_undo
        assert type(state.last_error).__name__ == "PromptError"  # the user sees why the click failed
        assert np.array_equal(session.result(), baseline)  # the initial mask is still there

        click = state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0)))
        undo = state.request(Op.UNDO)
        for request in (click, undo):
            worker.submit(request, session.run, request)
        for reply in worker.wait(timeout=60):
            assert reply.ok and state.accept(reply.tag, reply.value, reply.error) is not None
        assert np.array_equal(session.result(), baseline) and state.can_redo
    finally:
        worker.submit(None, session.close)
        worker.shutdown(wait=True, cancel_queued=False)


def test_an_undo_meant_for_a_prompt_that_failed_leaves_the_earlier_prompt_alone(tiny_engine):
    """Click 1 lands; click 2 is refused while an undo (meant for click 2) waits behind it. The undo
    was re-planned onto click 1, which the backend then undid: the user's good click was lost. It is
    moot now; so is a redo whose undo failed."""
    from SegAssistLib.image import Volume

    state, worker = PromptState(), BackgroundWorker()
    session = InteractiveSession(lambda: tiny_engine, Volume(_blob()), None, worker.note)
    try:
        good = PointPrompt(position=(18.0, 16.0, 10.0))
        requests = [
            state.request(Op.PROMPT, good),
            state.request(Op.PROMPT, PointPrompt(position=(500.0, 16.0, 10.0))),
            state.request(Op.UNDO),
        ]
        for request in requests:
            worker.submit(request, session.run, request)
        replies = worker.wait(timeout=60)
        assert [r.ok for r in replies] == [True, False, True]
        written = [state.accept(r.tag, r.value, r.error) for r in replies]
        assert written[0] is not None and written[1] is None and written[2] is None
        after_good_click = session.result().copy()
        assert after_good_click.any()
        assert state.prompts == state.confirmed_prompts == [good] and state.can_undo and not state.can_redo
        assert type(state.last_error).__name__ == "PromptError"

        undo, redo = state.request(Op.UNDO), state.request(Op.REDO)
        assert state.accept(undo, error=SessionError("lost on the way")) is None  # the undo failed
        assert state.prompts == [good] and state.busy and not state.can_redo  # the redo waits, moot now
        moot = session.run(redo)
        assert moot.voxels.size == 0 and state.accept(redo, moot) is None
        assert state.prompts == state.confirmed_prompts == [good] and not state.busy
        assert np.array_equal(session.result(), after_good_click)
    finally:
        worker.submit(None, session.close)
        worker.shutdown(wait=True, cancel_queued=False)


def test_a_close_queued_on_the_way_out_still_runs():
    worker: BackgroundWorker[int] = BackgroundWorker()
    release, closed = threading.Event(), threading.Event()
    worker.submit(1, release.wait, 5)  # a request still running
    worker.submit(None, closed.set)  # the session's close
    worker.shutdown(wait=False, cancel_queued=False)
    release.set()
    assert closed.wait(5)
    cancelled: BackgroundWorker[int] = BackgroundWorker()
    release.clear()
    cancelled.submit(1, release.wait, 5)
    skipped = cancelled.submit(None, closed.clear)
    cancelled.shutdown(wait=False)
    release.set()
    assert skipped.cancelled() and closed.is_set()


def test_a_session_opened_under_other_backend_settings_sends_nothing_more(tiny_engine):
    """The user withdrew consent to send images to a server (or switched backend) while an object was
    open: its next prompt is refused instead of going to that server (and never re-uploads the image)."""
    from SegAssistLib.errors import SessionError
    from SegAssistLib.image import Volume
    from SegAssistLib.slicer.backend import BackendManager, BackendSettings

    manager = BackendManager(BackendSettings())
    opened = []
    session = InteractiveSession(
        lambda: opened.append(1) or tiny_engine, Volume(_blob()), None, settings_generation=lambda: manager.generation
    )
    state = PromptState()
    first = state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0)))
    assert session.run(first) is not None and opened == [1]
    manager.update_settings(manager.settings)  # the same settings: nothing changes
    manager.update_settings(manager.settings.with_changes(remote_url="https://elsewhere.example.org"))
    again = state.request(Op.PROMPT, PointPrompt(position=(20.0, 16.0, 10.0)))
    assert session.run(again) is not None  # a remote address typed in while working locally changes nothing
    before = session.result()
    manager.update_settings(manager.settings.with_changes(mode="remote", remote_opt_in=True))
    late = state.request(Op.PROMPT, PointPrompt(position=(12.0, 16.0, 10.0), positive=False))
    with pytest.raises(SessionError, match="settings changed"):
        session.run(late)
    assert opened == [1] and np.array_equal(session.result(), before)  # not sent, nothing reopened
    session.close()


def test_an_object_goes_on_with_the_backend_that_replaced_a_stopped_one(server_factory):
    """The local backend was stopped (or died) and another runs now on another port: the object's
    next prompt reopens it there with its prompts replayed, instead of failing at the old address
    until the user accepts or resets."""
    from SegAssistLib.client import SegAssistClient
    from SegAssistLib.client.errors import BackendUnavailableError
    from SegAssistLib.image import Volume

    first = server_factory.start()
    current = {"client": SegAssistClient(first.url, TOKENS["alice"])}
    volume = Volume(_blob())
    initial = np.zeros(SHAPE, np.uint8)
    initial[8:10, 10:14, 12:16] = 1  # the segment held something: the session's initial mask
    session = InteractiveSession(lambda: current["client"], volume, initial)
    state = PromptState()
    requests = [state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0)))]
    first_update = session.run(requests[0])
    assert first_update is not None and state.accept(requests[0], first_update) is not None
    first.stop()
    lost = state.request(Op.PROMPT, PointPrompt(position=(19.0, 16.0, 10.0)))
    with pytest.raises(BackendUnavailableError) as unreachable:  # nothing else runs: the same address
        session.run(lost)
    assert state.accept(lost, error=unreachable.value) is None and len(state.prompts) == 1
    second = server_factory.start()
    current["client"] = SegAssistClient(second.url, TOKENS["alice"])
    late = state.request(Op.PROMPT, PointPrompt(position=(20.0, 16.0, 10.0)))
    update = session.run(late)
    assert update is not None and state.accept(late, update) is not None
    remote = session._session
    assert remote.client.url == second.url
    kinds = [p.kind for p in remote.prompt_log().prompts]
    assert kinds == ["mask", "point", "point"]  # the initial mask and both prompts that took effect
    np.testing.assert_array_equal(session.result(), remote.fetch_result())
    undone = session.run(state.request(Op.UNDO))  # the replayed steps are undo steps there too
    assert undone is not None and [p.kind for p in remote.prompt_log().prompts] == ["mask", "point"]
    session.close()


def test_withdrawn_consent_stops_an_upload_under_way_and_sends_no_prompt(server_factory):
    """The user unticked 'Send images to this server' (or changed the backend) while the object's first
    prompt uploaded the image: the upload went on to the end and the prompt was sent after it."""
    from SegAssistLib.client import SegAssistClient
    from SegAssistLib.client.errors import ImageNotFoundError
    from SegAssistLib.image import Volume
    from SegAssistLib.slicer.backend import BackendManager, BackendSettings
    from SegAssistLib.transport import wire_volume

    server = server_factory.start()
    client = SegAssistClient(server.url, TOKENS["alice"])
    manager = BackendManager(BackendSettings(mode="remote", remote_url=server.url, remote_opt_in=True))
    volume = Volume(_blob())

    def withdrawn_once_the_upload_runs():  # the user unticks consent right after the upload began
        generation = manager.generation
        if opened:
            manager.update_settings(manager.settings.with_changes(remote_opt_in=False))
        opened.append(generation)
        return generation

    opened: list = []
    session = InteractiveSession(lambda: client, volume, None, settings_generation=withdrawn_once_the_upload_runs)
    state = PromptState()
    first = state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0)))
    with pytest.raises(SessionError, match="upload stopped"):
        session.run(first)
    assert manager.generation != opened[0] and session.result() is None
    with pytest.raises(ImageNotFoundError):  # the image never arrived whole: nothing was kept, no session opened
        client.image(wire_volume(volume).content_hash())
    assert state.accept(first, error=SessionError("upload stopped")) is None and state.prompts == []
    client.close()


def test_settings_changed_while_the_session_opened_send_no_prompt(tiny_engine):
    """The settings changed while the object's session opened (a local backend starting, an upload
    that ended before a progress report saw it): the first prompt was sent right after the open."""
    from SegAssistLib.image import Volume

    values = iter([0] + [1] * 10)  # the generation when the open began, then after the change
    session = InteractiveSession(lambda: tiny_engine, Volume(_blob()), None, settings_generation=lambda: next(values))
    state = PromptState()
    with pytest.raises(SessionError, match="settings changed"):
        session.run(state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0))))
    assert not session.result().any()  # opened, but the prompt was not sent
    with pytest.raises(SessionError, match="settings changed"):  # nor any later one
        session.run(state.request(Op.PROMPT, PointPrompt(position=(20.0, 16.0, 10.0))))
    session.close()


def test_an_accepted_objects_last_answer_lands_in_its_segment_after_another_is_selected(ctx, tiny_engine):
    """Click, Enter, next segment (the usual way through a list of structures): the Enter waited for the
    click's answer, but selecting the next segment then ended the object and dropped it ("1 pending
    prompt not applied"). Now the answer lands in the segment it was asked for, not the selected one."""
    from SegAssistLib.slicer.object_writes import ObjectWrites

    volume_node = add_volume(ctx.scene, _blob(), affine(np.eye(3), (0.0, 0.0, 0.0)), "blob")
    seg = segments.create_segmentation(ctx.scene, volume_node, "seg")
    segments.add_segment(seg, "tumor", segment_id="tumor")
    segments.add_segment(seg, "liver", segment_id="liver")
    liver = np.zeros(SHAPE, np.uint8)
    liver[0:3, 0:4, 0:5] = 1  # away from the blob the click is on
    segments.array_to_segment(liver, seg, "liver", volume_node)
    editor_node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(ctx.scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(seg)
    logic.SetSourceVolumeNode(volume_node)
    editor_node.SetSelectedSegmentID("tumor")

    def modify(add, remove, extent):  # the effect's write: into the object's segment, through the editor
        logic.ModifySegmentByLabelmap(seg, writes.segment_id, add, logic.ModificationModeAdd, extent, True, False)
        logic.ModifySegmentByLabelmap(seg, writes.segment_id, remove, logic.ModificationModeRemove, extent, True, False)

    writes = ObjectWrites(seg, editor_node.GetSelectedSegmentID(), volume_node, modify, logic.SaveStateForUndo)
    state, worker = PromptState(), BackgroundWorker()
    session = InteractiveSession(lambda: tiny_engine, volume_from_node(volume_node), None, worker.note)
    try:
        click = state.request(Op.PROMPT, PointPrompt(position=(18.0, 16.0, 10.0)))
        worker.submit(click, session.run, click)
        assert not state.ask_accept()  # Enter: the answer is still on its way, the accept waits for it
        editor_node.SetSelectedSegmentID("liver")  # the next structure, before the answer is in
        assert not state.ends_on_reselect  # the effect keeps the object until its answer is in
        with pytest.raises(SessionError, match="being accepted"):  # a prompt on the liver waits till then
            state.check_open()
        for done in worker.wait(timeout=60):
            update = state.accept(done.tag, done.value, done.error)
            assert update is not None, done.error
            writes.apply(update, len(state.confirmed_prompts))
        assert state.accept_due  # the effect now ends the object
        answer = session.result()
        assert answer.any()
        assert np.array_equal(segments.segment_to_array(seg, "tumor", volume_node), answer)  # where it was asked for
        assert np.array_equal(segments.segment_to_array(seg, "liver", volume_node), liver & ~answer)  # not here
        assert editor_node.GetSelectedSegmentID() == "liver"
        state.new_epoch()
        assert state.ends_on_reselect  # the next object (on the liver) ends at a switch as before
        state.check_open()
    finally:
        worker.submit(None, session.close)
        worker.shutdown(wait=True, cancel_queued=False)


def test_a_lasso_reaching_past_the_edge_keeps_its_part_in_the_image_as_the_engine_does(ctx):
    """The engine and the server accept a lasso drawn around an object at the edge of the field of
    view (its part in the image counts); the effect refused any with a corner past the edge, and so
    every box dragged on an oblique slice near the edge (a 4-vertex lasso there). Clicks, boxes and
    scribbles stay strict."""
    from SegAssistLib.prompts import check_prompt_inside, lasso_in_image

    shape = (20, 24, 28)  # [k, j, i]
    volume = add_volume(ctx.scene, np.zeros(shape, np.int16), affine(np.diag([-1.0, -1.0, 2.0]), (0, 0, 0)), "v")
    at_edge = voxel_world(volume, (1, 12, 10))  # 1 px = 0.5 voxel along i and j
    axial = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=at_edge)
    oblique = add_slice_node(ctx.scene, (0.3, -0.5, 0.8), DIMS, FOV, center_ras=at_edge, layout_name="Yellow")
    outline = ((144.0, 94.0), (158.0, 94.0), (158.0, 106.0), (144.0, 106.0))  # i from -2 to 5
    drawn = [
        gesture_to_prompt(Gesture(Tool.LASSO, True, "Red", outline), axial, volume),
        gesture_to_prompt(Gesture(Tool.BOX, True, "Yellow", ((140.0, 90.0), (160.0, 110.0))), oblique, volume),
    ]
    for prompt in drawn:
        assert isinstance(prompt, LassoPrompt)
        assert np.asarray(prompt.points)[:, 0].min() < -0.5  # a corner past the edge: accepted
        check_prompt_inside(prompt, shape)  # the engine's and the server's rule agree
        lo, hi = lasso_in_image(prompt, shape).slab.bounds()  # what the engine draws: its part inside
        assert np.all(lo >= 0) and np.all(hi <= np.asarray(shape)) and lo[2] == 0

    with pytest.raises(PromptError, match="box is outside the volume"):  # an aligned view: a flat box, strict
        gesture_to_prompt(Gesture(Tool.BOX, True, "Red", ((140.0, 90.0), (160.0, 110.0))), axial, volume)
    with pytest.raises(PromptError, match="scribble is outside the volume"):
        gesture_to_prompt(Gesture(Tool.SCRIBBLE, True, "Red", ((140.0, 100.0), (160.0, 100.0))), axial, volume)
    gone = tuple((x - 40.0, y) for x, y in outline)  # wholly past the edge
    with pytest.raises(PromptError, match="lasso is outside the volume"):
        gesture_to_prompt(Gesture(Tool.LASSO, True, "Red", gone), axial, volume)
    by_a_corner = LassoPrompt(points=[(-3.0, 2.0, 5.0), (2.0, -3.0, 5.0), (-3.0, -3.0, 5.0)])  # misses voxel (0, 0)
    with pytest.raises(PromptError, match="lasso lies outside the image"):
        check_inside(by_a_corner, shape)
