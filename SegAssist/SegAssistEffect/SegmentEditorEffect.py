"""The SegAssist segment editor effect: click, box, scribble and lasso prompts in any slice view.

Thin Qt layer. Decisions live in ``SegAssistLib.slicer``: gestures and keys in ``interaction``,
request numbering and stale replies in ``session_state``, the backend in ``backend``. Threads:
one worker thread talks to the backend (``worker.BackgroundWorker``); a 50 ms ``qt.QTimer`` polls
it and every MRML write happens here, on the main thread, through
``scriptedEffect.modifySegmentByLabelmap`` into the object's segment, limited to the reply's box,
after ``saveStateForUndo`` (so the editor's masking, overwrite settings and undo apply).

One *object* at a time: the prompts placed on the selected segment since the last accept or
reset. The segment's content when the first prompt is placed becomes the session's initial mask,
so prompts refine what is there. Reset (and undo of the first prompt) restores that content
exactly, on the segment's own grid; accept keeps the result and starts a new object. With the
editor's overwrite setting (by default: all segments) an answer takes its new voxels from other
segments; undoing the prompt, or reset, gives them back (``object_writes.ObjectWrites``).
Switching segment or volume, editing the segment by other means (including the editor's own
undo), or moving the volume or the segmentation (a transform changed), accepts the current
object; so does deactivating the effect, once the pending answers are in. After Accept (with
answers still pending) a switch does not drop them: the object writes into its own segment
(``modifySegmentByLabelmap``, not the selected one) until they are in (``PromptState.ends_on_reselect``);
another segmentation or source volume selected drops them (``PromptState.ends_on_switch``).
An answer takes no voxels from a segment edited outside SegAssist after its request was made (the
user paints the next segment while the last answers are on their way): ``SegmentChangeWatch.edited_since``.
An accept that ends an object whose last request failed says so (``PromptState.accepted_line``).
"""

import contextlib
import logging
import os
import time
from typing import List, Optional, Tuple

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

import SegAssistEffect  # noqa: F401  (makes SegAssistLib importable from a source checkout)
from SegAssistEffect.overlay import PromptOverlay, cursorFor
from SegAssistLib.slicer.dependencies import import_again
from SegAssistLib.slicer.shortcuts import TOOL_FOR_ACTION, TOOL_TITLES, Action, Tool, help_rows, mouse_help, tooltip


def _loadLibrary() -> None:
    """Import what needs the packages the SegAssist module installs (pydantic, ...) as this module's names."""
    global SegAssistError, coordinates, segments, volumes, REMOTE, BackendSettings, shared_manager
    global Gesture, GestureRecorder, gesture_to_prompt, project_to_slice, prompt_points_ijk, resolve_key
    global ObjectWrites, PlacementChanged, PlacementWatch, SegmentChangeWatch, BackgroundWorker, editing_segment
    global InteractiveSession, ObjectOutOfStep, Op, PromptState, Request, describe_error
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.slicer import coordinates, segments, volumes
    from SegAssistLib.slicer.backend import REMOTE, BackendSettings, shared_manager
    from SegAssistLib.slicer.interaction import (
        Gesture,
        GestureRecorder,
        gesture_to_prompt,
        project_to_slice,
        prompt_points_ijk,
        resolve_key,
    )
    from SegAssistLib.slicer.object_writes import ObjectWrites, PlacementChanged, PlacementWatch, editing_segment
    from SegAssistLib.slicer.segment_watch import SegmentChangeWatch
    from SegAssistLib.slicer.session_state import (
        InteractiveSession,
        ObjectOutOfStep,
        Op,
        PromptState,
        Request,
        describe_error,
    )
    from SegAssistLib.slicer.worker import BackgroundWorker


# needs those packages: report, do not fail to register; tried again on activation (installed meanwhile)
IMPORT_ERROR = import_again(_loadLibrary)

POLL_MS = 50


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Interactive AI segmentation: each prompt updates the selected segment."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SegAssist"  # not translated: modules find effects by name
        scriptedEffect.title = "SegAssist"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._recorder = GestureRecorder() if IMPORT_ERROR is None else None
        self._state = PromptState() if IMPORT_ERROR is None else None
        self._worker = None
        self._timer: Optional[qt.QTimer] = None
        self._session = None
        self._binding: Optional[Tuple] = None  # (segmentation node, segment ID, source volume node)
        self._writes = None  # the object's writes, and the voxels they took from other segments
        self._overlays = {}
        self._watch = None  # ends the object when the segment changes outside SegAssist
        self._requestMarks = {}  # request seq -> the watch's mark when it was made (edits after it are spared)
        self._placementWatch = None  # ends the object when the volume or the segmentation moves
        self._lastBusy = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons", "SegAssistEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        rows = "".join(f"<li><b>{keys}</b>: {what}</li>" for keys, what in help_rows())
        return (
            "<html>Interactive AI segmentation: prompt in any slice view and the selected segment updates.<br>"
            f"<ul style='margin: 0'>{rows}</ul>The backend is chosen in the SegAssist module.</html>"
        )

    # ---- options panel -------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.toolButtons = {}
        toolLayout = qt.QHBoxLayout()
        self.toolGroup = qt.QButtonGroup()
        for action, tool in TOOL_FOR_ACTION.items():
            button = qt.QToolButton()
            button.text = TOOL_TITLES[tool]
            button.checkable = True
            button.toolTip = tooltip(action, mouse_help(tool, True))
            button.objectName = f"SegAssist{TOOL_TITLES[tool]}Button"
            button.connect("clicked()", lambda a=action: self.performAction(a))
            self.toolGroup.addButton(button)
            toolLayout.addWidget(button)
            self.toolButtons[tool] = button
        self.scriptedEffect.addLabeledOptionsWidget("Tool:", toolLayout)

        polarityLayout = qt.QHBoxLayout()
        self.polarityGroup = qt.QButtonGroup()
        self.positiveButton = qt.QRadioButton("Positive (object)")
        self.positiveButton.toolTip = tooltip(Action.POSITIVE, "Prompts mark the object; hold Ctrl for the opposite")
        self.negativeButton = qt.QRadioButton("Negative (background)")
        self.negativeButton.toolTip = tooltip(Action.NEGATIVE, "Prompts mark background; hold Ctrl for the opposite")
        for button, action in ((self.positiveButton, Action.POSITIVE), (self.negativeButton, Action.NEGATIVE)):
            button.connect("clicked()", lambda a=action: self.performAction(a))
            self.polarityGroup.addButton(button)
            polarityLayout.addWidget(button)
        self.scriptedEffect.addLabeledOptionsWidget("Polarity:", polarityLayout)

        self.scribbleWidthSpinBox = qt.QDoubleSpinBox()
        self.scribbleWidthSpinBox.setRange(1.0, 20.0)
        self.scribbleWidthSpinBox.setSingleStep(0.5)
        self.scribbleWidthSpinBox.suffix = " voxels"
        self.scribbleWidthSpinBox.toolTip = "Width of scribble strokes"
        self.scribbleWidthSpinBox.connect("valueChanged(double)", self.updateMRMLFromGUI)
        self.scriptedEffect.addLabeledOptionsWidget("Scribble width:", self.scribbleWidthSpinBox)

        actionLayout = qt.QHBoxLayout()
        self.actionButtons = {}
        for action, text, description in (
            (Action.UNDO, "Undo prompt", "Undo the last prompt; voxels it took from other segments come back"),
            (Action.REDO, "Redo prompt", "Redo the last undone prompt"),
            (
                Action.RESET,
                "Reset",
                "Drop this object's prompts, restore the segment and give back the voxels its answers "
                "took from other segments",
            ),
            (Action.ACCEPT, "Accept", "Keep the result and start a new object"),
        ):
            button = qt.QPushButton(text)
            button.toolTip = tooltip(action, description)
            button.objectName = "SegAssist" + text.replace(" ", "") + "Button"
            button.connect("clicked()", lambda a=action: self.performAction(a))
            actionLayout.addWidget(button)
            self.actionButtons[action] = button
        self.scriptedEffect.addOptionsWidget(actionLayout)

        self.hintLabel = qt.QLabel()
        self.hintLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.hintLabel)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.statusLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        backendLayout = qt.QHBoxLayout()
        self.backendLabel = qt.QLabel()
        self.backendLabel.wordWrap = True
        backendButton = qt.QPushButton("Backend...")
        backendButton.toolTip = "Choose the local or a remote backend in the SegAssist module"
        backendButton.connect("clicked()", lambda: slicer.util.selectModule("SegAssist"))
        backendLayout.addWidget(self.backendLabel, 1)
        backendLayout.addWidget(backendButton)
        self.scriptedEffect.addOptionsWidget(backendLayout)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Tool", Tool.CLICK.value)
        self.scriptedEffect.setParameterDefault("Positive", 1)
        self.scriptedEffect.setParameterDefault("ScribbleWidth", 1.0)

    @property
    def _tool(self):
        value = self.scriptedEffect.parameter("Tool")
        return Tool(value) if value in {t.value for t in Tool} else Tool.CLICK

    @property
    def _positive(self) -> bool:
        return self.scriptedEffect.integerParameter("Positive") != 0

    def updateGUIFromMRML(self):
        tool, positive = self._tool, self._positive
        for t, button in self.toolButtons.items():
            wasBlocked = button.blockSignals(True)
            button.checked = t == tool
            button.blockSignals(wasBlocked)
        for button, checked in ((self.positiveButton, positive), (self.negativeButton, not positive)):
            wasBlocked = button.blockSignals(True)
            button.checked = checked
            button.blockSignals(wasBlocked)
        wasBlocked = self.scribbleWidthSpinBox.blockSignals(True)
        self.scribbleWidthSpinBox.value = self.scriptedEffect.doubleParameter("ScribbleWidth")
        self.scribbleWidthSpinBox.blockSignals(wasBlocked)
        self.scribbleWidthSpinBox.enabled = tool is Tool.SCRIBBLE
        self.hintLabel.text = mouse_help(tool, positive)
        self._checkBinding()
        self._updateActionButtons()
        self._updateCursors()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("ScribbleWidth", self.scribbleWidthSpinBox.value)

    def sourceVolumeNodeChanged(self):
        self._checkBinding()

    # ---- lifecycle -----------------------------------------------------------------------------
    def activate(self):
        global IMPORT_ERROR
        if IMPORT_ERROR is not None:  # installed from the SegAssist module since? then no restart is needed
            IMPORT_ERROR = import_again(_loadLibrary)
        if IMPORT_ERROR is not None:
            self._setStatus(
                f"SegAssist cannot run: {IMPORT_ERROR}. Open the SegAssist module to install its packages, "
                "then select the effect again.",
                True,
            )
            return
        if self._state is None:  # the packages came after this effect was made
            self._recorder, self._state = GestureRecorder(), PromptState()
        loaded = BackendSettings.read(qt.QSettings())  # a damaged token file: no token, and why
        settings = shared_manager(lambda: loaded.settings).settings
        if settings.mode == REMOTE:
            consent = "images are sent there" if settings.remote_opt_in else "not enabled: nothing is sent"
            self.backendLabel.text = f"Backend: remote {settings.remote_url or '(no URL)'} ({consent})"
        else:
            self.backendLabel.text = "Backend: local (starts with the first prompt)"
        if settings.mode == REMOTE and loaded.problem:
            self._setStatus(loaded.problem, True)
        else:
            self._setStatus("Ready: " + mouse_help(self._tool, self._positive))
        self._updateCursors()

    def deactivate(self):
        if IMPORT_ERROR is not None:
            return
        self._recorder.cancel()
        if self._session is not None:  # as Accept: pending answers are written first, then the object ends
            if self._state.ask_accept():
                self._acceptObject(leaving=True)
            else:
                count = len(self._state.pending)
                self._setStatus(
                    f"SegAssist deactivated: accepting once the {count} pending answer"
                    f"{'s are' if count > 1 else ' is'} in"
                )
        for overlay in self._overlays.values():
            overlay.remove()
        self._overlays = {}
        for sliceWidget in self._sliceWidgets():
            sliceWidget.sliceView().setToolTip("")

    def cleanup(self):
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._unwatchSegment()
        if self._worker is not None:
            if self._session is not None:
                self._session.abandon()
                self._worker.submit(None, self._session.close)
            self._worker.shutdown(wait=False, cancel_queued=False)  # the close still runs
            self._worker = None

    def createCursor(self, widget):
        busy = self._state is not None and self._state.busy
        return cursorFor(self._tool.value, self._positive, busy)

    # ---- events from the views -----------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if IMPORT_ERROR is not None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        shift, ctrl, alt = (
            bool(callerInteractor.GetShiftKey()),
            bool(callerInteractor.GetControlKey()),
            bool(callerInteractor.GetAltKey()),
        )
        if eventId == vtk.vtkCommand.KeyPressEvent:
            action = resolve_key(callerInteractor.GetKeySym() or "", shift, ctrl, alt)
            return action is not None and self.performAction(action)
        sliceNode = viewWidget.mrmlSliceNode()
        view = sliceNode.GetLayoutName()
        xy = callerInteractor.GetEventPosition()
        # A double-click's second press is a press: Slicer would maximize the view and lose the click.
        if eventId in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent):
            if shift or alt:
                return False  # Slicer's: translate slice, crosshair, slice intersections
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                return True  # as the Draw effect: a dialog took the matching release
            xyToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS())
            gesture = self._recorder.press(view, xy, self._tool, self._positive != ctrl, xyToRas)
            self._afterGesture(gesture, viewWidget)
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            if self._recorder.move(view, xy):
                self._drawGesture(viewWidget)
            return self._recorder.pressed
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            wasPressed = self._recorder.pressed
            gesture = self._recorder.release(view, xy)
            self._afterGesture(gesture, viewWidget)
            return wasPressed
        return False

    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        if IMPORT_ERROR is None and callerViewNode and callerViewNode.IsA("vtkMRMLSliceNode"):
            self._followView(viewWidget)
            self._drawPrompts(viewWidget)

    def _followView(self, viewWidget) -> None:
        """An open lasso follows zoom and pan; a new slice plane cancels it (saying so)."""
        sliceNode = viewWidget.mrmlSliceNode()
        xyToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetXYToRAS())
        if self._recorder.view_changed(sliceNode.GetLayoutName(), xyToRas):
            if self._recorder.hint:
                self._setStatus(self._recorder.hint)
            self._drawGesture(viewWidget)

    def _afterGesture(self, gesture, viewWidget) -> None:
        if gesture is not None:
            self._onGesture(gesture, viewWidget)
        elif self._recorder.hint:
            self._setStatus(self._recorder.hint)
        self._drawGesture(viewWidget)

    # ---- actions -------------------------------------------------------------------------------
    def performAction(self, action) -> bool:
        """Do what a key or button asks; True when something was done (the key is then consumed).

        ``action``: an :class:`Action` or its name ("undo", "click_tool", ...), for scripts and tests.
        """
        if IMPORT_ERROR is not None:
            return False
        action = Action(action)
        self._checkBinding()  # another segment selected meanwhile: undo, reset and accept act on nothing
        if action in TOOL_FOR_ACTION:
            self._recorder.cancel()
            self.scriptedEffect.setParameter("Tool", TOOL_FOR_ACTION[action].value)
        elif action in (Action.POSITIVE, Action.NEGATIVE):
            self.scriptedEffect.setParameter("Positive", 1 if action is Action.POSITIVE else 0)
        elif action is Action.UNDO:
            self._submitRequest(Op.UNDO)
        elif action is Action.REDO:
            self._submitRequest(Op.REDO)
        elif action is Action.RESET:
            self._reset()
        elif action is Action.ACCEPT:
            if self._recorder.drawing_lasso:
                view = self._lassoView()  # before finish(): it forgets the view
                if view is not None:
                    self._followView(view)  # in case the view moved since the last event
                gesture = self._recorder.finish()
                if view is not None:
                    self._afterGesture(gesture, view)
            elif self._session is not None and not self._state.ask_accept():
                count = len(self._state.pending)
                self._setStatus(f"Accepting once the {count} pending answer{'s are' if count > 1 else ' is'} in")
            else:
                self._acceptObject()
        elif action is Action.DROP_VERTEX:
            if not self._recorder.drop_last_vertex():
                return False
            view = self._lassoView()
            if view is not None:
                self._drawGesture(view)
        self.updateGUIFromMRML()
        return True

    def addPrompt(self, viewWidget, tool: str, xys, positive: bool = True) -> None:
        """Place a prompt as if drawn in ``viewWidget`` (slice-view XY pixels); for scripts and self-tests."""
        view = viewWidget.mrmlSliceNode().GetLayoutName()
        points = tuple((float(p[0]), float(p[1])) for p in xys)
        self._onGesture(Gesture(Tool(tool), bool(positive), view, points), viewWidget)

    def waitUntilIdle(self, timeout_s: float = 120.0) -> bool:
        """Process events until every reply is in (self-tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._worker is not None and self._worker.busy:
            if time.monotonic() > deadline:
                return False
            slicer.app.processEvents()
            time.sleep(0.02)
            self._poll()
        return True

    def statusText(self) -> str:
        return self.statusLabel.text

    # ---- the object being segmented ------------------------------------------------------------
    def _currentBinding(self):
        p = self.scriptedEffect.parameterSetNode()
        if p is None:
            return None
        segmentationNode, volumeNode = p.GetSegmentationNode(), p.GetSourceVolumeNode()
        segmentId = p.GetSelectedSegmentID()
        if segmentationNode is None or volumeNode is None or not segmentId:
            return None
        return (segmentationNode, segmentId, volumeNode)

    def _checkBinding(self) -> None:
        # while accepting, the object's last answers still go to its own segment (of the segmentation and
        # volume the editor still edits: it masks by them); it ends once they are in
        if self._session is None or self._currentBinding() == self._binding:
            return
        p = self.scriptedEffect.parameterSetNode()
        segmentationNode, _, volumeNode = self._binding
        same = p is not None and p.GetSegmentationNode() == segmentationNode and p.GetSourceVolumeNode() == volumeNode
        if self._state.ends_on_switch(same):
            self._endObject("Another segment or volume was selected: the previous result stays")

    def _onGesture(self, gesture, viewWidget) -> None:
        binding = self._currentBinding()
        if binding is None:
            self._setStatus("Select a source volume and a segment first", True)
            return
        segmentationNode, segmentId, volumeNode = binding
        self._checkBinding()  # another segment or volume: the object ends saying so (and what it drops)
        if self._session is not None:
            try:  # an accepted object's last answers are on their way: no new prompt, no new object yet
                self._state.check_open()
            except SegAssistError as exc:
                self._setStatus(str(exc).capitalize())
                return
        try:
            width = self.scriptedEffect.doubleParameter("ScribbleWidth")
            prompt = gesture_to_prompt(gesture, viewWidget.mrmlSliceNode(), volumeNode, scribble_width=width)
            if self._session is None or binding != self._binding:
                self._startObject(binding)
        except (SegAssistError, ValueError) as exc:
            self._setStatus(describe_error(exc), True)
            return
        self._submitRequest(Op.PROMPT, prompt)

    def _startObject(self, binding) -> None:
        self._endObject()
        segmentationNode, segmentId, volumeNode = binding
        volume = volumes.volume_from_node(volumeNode)
        baseline = segments.segment_to_array(segmentationNode, segmentId, volumeNode)
        writes = ObjectWrites(  # keeps the segment as it is now (its own voxels) for reset
            segmentationNode,
            segmentId,
            volumeNode,
            # into this segment, also once another is selected (an accepted object's last answers)
            lambda add, remove, extent: self._modifySegment(segmentationNode, segmentId, add, remove),
            save_undo=lambda: self.scriptedEffect.saveStateForUndo(),  # the editor's undo: one step per answer
        )
        worker = self._ensureWorker()
        manager = shared_manager()
        self._session = InteractiveSession(
            manager.client, volume, baseline, worker.note, settings_generation=lambda: manager.generation
        )
        self._binding, self._writes = binding, writes
        self._watchSegment(segmentationNode, binding[1])
        self._placementWatch = PlacementWatch(self._writes, self._onMoved)

    def _acceptObject(self, leaving: bool = False) -> None:
        """End the object as accepted; ``leaving``: the effect is being deactivated (its panel hides)."""
        message, error = self._state.accepted_line()
        self._endObject(message, error)
        if error and (leaving or not self.scriptedEffect.active()):  # the options panel is not shown
            slicer.util.showStatusMessage("SegAssist: " + message, 20000)

    def _endObject(self, message: str = "", error: bool = False) -> None:
        """Stop prompting on the current object; its result stays, its pending replies become stale."""
        if self._session is None:
            return
        dropped = len(self._state.pending)
        if message and dropped:
            message += f" ({dropped} pending prompt{'s' if dropped > 1 else ''} not applied)"
        self._state.new_epoch()
        self._session.abandon()
        self._worker.submit(None, self._session.close)
        self._startPolling()
        self._session, self._binding, self._writes = None, None, None
        self._requestMarks = {}
        self._unwatchSegment()
        self._drawAllPrompts()
        if message:
            self._setStatus(message, error)

    def _reset(self) -> None:
        if self._session is None:
            self._setStatus("Nothing to reset")
            return
        binding, writes = self._binding, self._writes
        self._endObject()
        if self._alive(binding):
            writes.reset()  # the segment as it was, on its own grid; and what the answers took from others
        self._setStatus("Reset: the segments are back to where this object started")

    def _submitRequest(self, op, prompt=None) -> None:
        if self._session is None:
            self._setStatus("Nothing to undo" if op is Op.UNDO else "Nothing to redo" if op is Op.REDO else "")
            return
        try:
            request = self._state.request(op, prompt)
        except SegAssistError as exc:
            self._setStatus(str(exc).capitalize())
            return
        self._requestMarks[request.seq] = self._watch.mark() if self._watch is not None else 0
        self._worker.submit(request, self._session.run, request)  # the request cleared the last error
        self._startPolling()
        self._drawAllPrompts()
        self._updateActionButtons()

    # ---- replies (main thread) -----------------------------------------------------------------
    def _ensureWorker(self):
        if self._worker is None:
            self._worker = BackgroundWorker("segassist-effect")
        return self._worker

    def _startPolling(self) -> None:
        if self._timer is not None and not self._timer.isActive():
            self._timer.start()
        self._updateBusy()

    def _poll(self) -> None:
        if self._worker is None:
            return
        self._checkBinding()  # another segment selected: the object ends (unless accepting: its answers go to it)
        for finished in self._worker.poll():
            if not isinstance(finished.tag, Request):
                continue  # closing a session: nothing to show
            try:  # one reply that cannot be written must not lose the replies after it
                current = self._state.is_current(finished.tag)  # else stale: accept drops it
                depth = len(self._state.confirmed_prompts)
                update = self._state.accept(finished.tag, finished.value, finished.error)
                error = self._state.last_error if current else None
                moved = current and len(self._state.confirmed_prompts) != depth  # the backend counted it
                if isinstance(error, ObjectOutOfStep):  # the backend and the segment disagree: the object is over
                    self._endObject()
                if error is not None:
                    self._state.error_text = describe_error(error)
                    logging.error("SegAssist: %s", self._state.error_text)
                elif moved and self._alive(self._binding):
                    self._writeOrEnd(update, finished.tag)
            except Exception as exc:
                self._state.error_text = describe_error(exc)
                logging.exception("SegAssist: a reply could not be applied")
        if self._state.accept_due:
            self._acceptObject()
        note = self._state.progress_note(self._worker.note.get())
        # an object's error stays until the next request or until the object ends (accept, reset)
        line = self._state.status_line(note, self._session is not None, mouse_help(self._tool, self._positive))
        if line is not None:
            self._setStatus(*line)
        self._updateBusy()
        self._drawAllPrompts()
        self._updateActionButtons()
        if not self._worker.busy and self._timer is not None:
            self._timer.stop()

    def _writeOrEnd(self, update, request) -> None:
        """Write the answer to ``request`` the backend has counted (None: the segment does not change);
        if it cannot be written, the segment and the backend's history no longer agree, so the object
        ends (the next prompt starts from the segment). Segments edited outside SegAssist since the
        request was made keep their voxels (a newer edit wins)."""
        mark = self._requestMarks.pop(request.seq, 0)
        try:
            with self._watch.writing() if self._watch is not None else contextlib.nullcontext():
                depth = len(self._state.confirmed_prompts)
                spare = self._watch.edited_since(mark) if self._watch is not None else ()
                self._writes.apply(update, depth, undo=request.op is Op.UNDO, spare=spare)
        except PlacementChanged as exc:  # the object is over; its message says so
            self._endObject()  # clears the object's error: this one is set after it
            self._state.error_text = describe_error(exc)
        except Exception as exc:
            logging.exception("SegAssist: an answer could not be written into the segment")
            self._endObject()
            self._state.error_text = (
                f"{describe_error(exc)}. The answer could not be written into the segment, so this object "
                "ended: the next prompt starts from the segment as it is"
            )

    def _modifySegment(self, segmentationNode, segmentId, add, remove) -> None:
        """The object's writes into its own segment, through the editor: its masking and overwrite
        settings apply (after ``saveStateForUndo``, which ``ObjectWrites`` calls). Not the selected
        segment: after Accept, the last answers land where they were asked for even if the user
        selected the next segment meanwhile, masked for their own segment (``editing_segment``: the
        editor masks for the selected one). Both labelmaps cover just the answer's box (their extent)."""
        effectClass = slicer.qSlicerSegmentEditorAbstractEffect
        with editing_segment(self.scriptedEffect.parameterSetNode(), segmentId):
            self.scriptedEffect.modifySegmentByLabelmap(
                segmentationNode, segmentId, add, effectClass.ModificationModeAdd
            )
            self.scriptedEffect.modifySegmentByLabelmap(
                segmentationNode, segmentId, remove, effectClass.ModificationModeRemove
            )

    @staticmethod
    def _alive(binding) -> bool:
        if binding is None:
            return False
        segmentationNode, segmentId, volumeNode = binding
        return (
            segmentationNode.GetScene() is not None
            and volumeNode.GetScene() is not None
            and segmentationNode.GetSegmentation().GetSegment(segmentId) is not None
        )

    def _watchSegment(self, segmentationNode, segmentId) -> None:
        self._unwatchSegment()
        self._watch = SegmentChangeWatch(segmentationNode, segmentId, self._onSegmentChangedOutside)

    def _unwatchSegment(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self._watch = None
        if self._placementWatch is not None:
            self._placementWatch.stop()
        self._placementWatch = None

    def _onSegmentChangedOutside(self) -> None:
        if self._session is not None:
            # undo in the editor, another effect, a script: prompts would no longer match the segment
            self._endObject("The segment was changed outside SegAssist: the next prompt starts from it")

    def _onMoved(self) -> None:
        if self._session is not None:
            # answers are on the volume's grid as it lay when the object started: they would land elsewhere
            self._endObject(
                "The volume or the segmentation moved (a transform changed): this object ended and what it "
                "wrote stays; the next prompt starts a new object"
            )

    # ---- display -------------------------------------------------------------------------------
    def _setStatus(self, text: str, error: bool = False) -> None:
        if not hasattr(self, "statusLabel"):
            return
        self.statusLabel.text = text
        self.statusLabel.setStyleSheet("color: #b00000" if error else "")

    def _updateActionButtons(self) -> None:
        if IMPORT_ERROR is not None or not hasattr(self, "actionButtons"):
            return
        active = self._session is not None
        self.actionButtons[Action.UNDO].enabled = active and self._state.can_undo
        self.actionButtons[Action.REDO].enabled = active and self._state.can_redo
        self.actionButtons[Action.RESET].enabled = active
        self.actionButtons[Action.ACCEPT].enabled = active

    def _updateBusy(self) -> None:
        busy = self._state.busy
        if busy != self._lastBusy:
            self._lastBusy = busy
            self._updateCursors()

    def _sliceWidgets(self) -> List:
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return []
        return [layoutManager.sliceWidget(name) for name in layoutManager.sliceViewNames()]

    def _updateCursors(self) -> None:
        if IMPORT_ERROR is not None or not self.scriptedEffect.active():
            return
        hint = mouse_help(self._tool, self._positive)
        for sliceWidget in self._sliceWidgets():
            cursor = self.createCursor(sliceWidget)
            sliceWidget.sliceView().setViewCursor(cursor)  # both, as qMRMLSegmentEditorWidget sets them
            sliceWidget.sliceView().setDefaultViewCursor(cursor)
            sliceWidget.sliceView().setToolTip(hint)

    def _overlay(self, sliceWidget):
        key = sliceWidget.mrmlSliceNode().GetLayoutName()
        if key not in self._overlays:
            self._overlays[key] = PromptOverlay(self.scriptedEffect, sliceWidget)
        return self._overlays[key]

    def _lassoView(self):
        feedback = self._recorder.feedback()
        if feedback is None:
            return None
        return slicer.app.layoutManager().sliceWidget(feedback.view)

    def _drawGesture(self, viewWidget) -> None:
        if viewWidget is None:
            return
        feedback = self._recorder.feedback()
        view = viewWidget.mrmlSliceNode().GetLayoutName()
        for key, overlay in list(self._overlays.items()):
            if feedback is None or key != feedback.view:
                overlay.clearGesture()
        if feedback is not None and feedback.view == view:
            self._overlay(viewWidget).showGesture(
                feedback.xy, feedback.closed, feedback.positive, feedback.tool is Tool.BOX
            )

    def _drawAllPrompts(self) -> None:
        for sliceWidget in self._sliceWidgets():
            self._drawPrompts(sliceWidget)

    def _drawPrompts(self, sliceWidget) -> None:
        if not self.scriptedEffect.active():
            return
        binding = self._binding
        positive, negative = [], []
        if binding is not None and self._alive(binding):
            volumeNode = binding[2]
            xyToRas = slicer.util.arrayFromVTKMatrix(sliceWidget.mrmlSliceNode().GetXYToRAS())
            tolerance = 0.5 * min(volumeNode.GetSpacing())
            for prompt in self._state.prompts:
                pointsIjk, closed = prompt_points_ijk(prompt)
                xy, near = project_to_slice(coordinates.ijk_to_ras(pointsIjk, volumeNode), xyToRas, tolerance)
                if not near.any():
                    continue
                shape = (xy.tolist(), closed, len(xy) == 1)
                (positive if getattr(prompt, "positive", True) else negative).append(shape)
        self._overlay(sliceWidget).showPrompts(positive, negative)
