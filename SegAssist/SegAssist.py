"""SegAssist: interactive AI segmentation in 3D Slicer (module, panel, batch logic, self-tests).

The panel chooses the backend (a local one started for the user, or a remote server used only
after the user opts in), shows the model and its licence, and segments a volume from markups.
The interactive tools are the "SegAssist" segment editor effect (``SegAssistEffect/``).

Everything that computes lives in ``SegAssistLib.slicer`` (Qt-free, tested on slicer-core in CI);
this file is the thin Qt layer. SegAssistLib is imported lazily: the module must load, and
offer to install its dependencies, even before they are there.
"""

import logging
import sys
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

HOMEPAGE = "https://github.com/SegAssist/SlicerSegAssist"
DOCS_URL = HOMEPAGE + "/blob/main/docs/slicer.md"
EFFECT_NAME = "SegAssist"
_MODULE_DIR = Path(__file__).resolve().parent


def ensureLibraryPath() -> None:
    """Make ``SegAssistLib`` importable when SegAssist runs from a source checkout.

    An installed extension has it beside this file (an install rule puts it into
    qt-scripted-modules); a checkout added through "Additional module paths" has it one folder up.
    """
    for candidate in (_MODULE_DIR, _MODULE_DIR.parent):
        if (candidate / "SegAssistLib" / "__init__.py").is_file():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return


ensureLibraryPath()


def _helpText() -> str:
    try:
        from SegAssistLib.slicer.shortcuts import help_rows

        rows = "".join(f"<li><b>{keys}</b>: {what}</li>" for keys, what in help_rows())
    except ImportError:  # a broken installation: still load, and point to the documentation
        rows = ""
    return _(
        "Interactive AI segmentation of CT and MRI. In the Segment Editor, pick the <b>SegAssist</b> effect, "
        "choose a tool (click, box, scribble, lasso) and prompt in any slice view; the selected segment "
        "updates after each prompt.<ul>{rows}</ul>"
        'See the <a href="{docs}">SegAssist documentation</a> for installing, backends and batch use.'
    ).format(rows=rows, docs=DOCS_URL)


def registerEditorEffect() -> None:
    """Register the SegAssist segment editor effect once (at startup, or when the module loads late)."""
    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    if any(effect.name == EFFECT_NAME for effect in factory.registeredEffects()):
        return
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    scriptedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
    scriptedEffect.setPythonSource(str(_MODULE_DIR / "SegAssistEffect" / "SegmentEditorEffect.py").replace("\\", "/"))
    scriptedEffect.self().register()


#
# SegAssist
#


class SegAssist(ScriptedLoadableModule):
    """Module metadata; the effect is registered once Slicer has started."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegAssist")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor", "Markups"]
        self.parent.contributors = ["SegAssist contributors"]
        self.parent.helpText = _helpText()
        self.parent.acknowledgementText = _(
            "SegAssist's built-in model is a MONAI U-Net trained on synthetic volumes and public data "
            "(see the model card). The bundled sample is case hippocampus_001 of the Medical Segmentation "
            "Decathlon (CC-BY-SA 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerEditorEffect)


#
# Parameter node: scene data of the "Segment from markups" section (backend settings are not scene data)
#


@parameterNodeWrapper
class SegAssistParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    points: vtkMRMLMarkupsFiducialNode
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    segmentName: str = "SegAssist"


#
# SegAssistWidget
#


class SegAssistWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Backend calls run on one worker thread; a timer applies their results here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SegAssistLogic] = None
        self._parameterNode: Optional[SegAssistParameterNode] = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._stopWorker = None  # Stop runs beside the worker: it overtakes a start that may last minutes
        self._timer: Optional[qt.QTimer] = None
        self._cancel = threading.Event()
        self._batchRunning = False
        self._progress = (0.0, "")
        self._batchTarget = None
        self._backendFormFilled = False  # from the saved settings; until then no edit may save the blank form
        self._batchGeneration = 0
        self._cancellingText = _("Cancelling after the current step...")
        self._settingsChangedText = _(  # translated here: the worker thread raises it
            "The backend settings changed while segmenting: nothing more is sent; run it again"
        )

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegAssist.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegAssistLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.installBackendButton.connect("clicked(bool)", self.onInstallBackendPackages)
        self.ui.localRadioButton.connect("toggled(bool)", self.onSettingsEdited)
        self.ui.remoteRadioButton.connect("toggled(bool)", self.onSettingsEdited)
        self.ui.localModelPathLineEdit.connect("currentPathChanged(QString)", self.onSettingsEdited)
        self.ui.localDeviceLineEdit.connect("editingFinished()", self.onSettingsEdited)
        self.ui.localThreadsSpinBox.connect("valueChanged(int)", self.onSettingsEdited)
        self.ui.serverPythonPathLineEdit.connect("currentPathChanged(QString)", self.onSettingsEdited)
        self.ui.remoteUrlLineEdit.connect("editingFinished()", self.onSettingsEdited)
        self.ui.remoteTokenLineEdit.connect("editingFinished()", self.onSettingsEdited)
        self.ui.remoteOptInCheckBox.connect("toggled(bool)", self.onOptInToggled)
        self.ui.allowInsecureCheckBox.connect("toggled(bool)", self.onSettingsEdited)
        self.ui.remoteCaBundlePathLineEdit.connect("currentPathChanged(QString)", self.onSettingsEdited)
        self.ui.startLocalButton.connect("clicked(bool)", self.onStartLocal)
        self.ui.stopLocalButton.connect("clicked(bool)", self.onStopLocal)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.openEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setVisible(False)

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

        self.updateDependenciesGui()
        self.updateBackendGuiFromSettings()
        self.initializeParameterNode()
        registerEditorEffect()  # the module may have been loaded after startup

    def cleanup(self) -> None:
        """Remove observers, the timer and the worker (the local backend stops with Slicer)."""
        self.removeObservers()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        for worker in (self._worker, self._stopWorker):
            if worker is not None:
                worker.shutdown(wait=False)
        self._worker = self._stopWorker = None

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateDependenciesGui()
        if self._backendFormFilled and self.logic.manager().settings.mode == "local":
            # the SegAssist effect may have started the local backend (or it stopped) meanwhile
            self._showBackendStatus(self.logic.manager().local_status(), quiet=True)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    # ---- parameter node ------------------------------------------------------------------------
    def onSceneStartClose(self, caller, event) -> None:
        if self._batchRunning:  # its nodes go with the scene: the run stops and nothing is written
            self._cancel.set()
        self._batchTarget = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SegAssistParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume and (p.points or p.roi)) and not self._batchRunning
        self.ui.applyButton.enabled = ready and self.logic.dependenciesMissing() == []
        self.ui.applyButton.toolTip = (
            _("Segment the volume from these markups") if ready else _("Select a volume and a point list or an ROI")
        )

    # ---- dependencies --------------------------------------------------------------------------
    def updateDependenciesGui(self) -> None:
        missing = self.logic.dependenciesMissing()
        self.ui.dependenciesFrame.setVisible(bool(missing))
        if missing:
            self.ui.dependenciesLabel.text = _("SegAssist needs these Python packages: {names}").format(
                names=", ".join(missing)
            )
        for widget in (self.ui.backendCollapsibleButton, self.ui.batchCollapsibleButton, self.ui.openEditorButton):
            widget.enabled = not missing
        if not missing and not self._backendFormFilled:  # installed meanwhile (console, another extension)
            self.updateBackendGuiFromSettings()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install SegAssist's dependencies."), waitCursor=True):
            self.logic.installDependencies(self.resourcePath("requirements.txt"))
        self.updateDependenciesGui()
        self.updateBackendGuiFromSettings()
        self._checkCanApply()

    def onInstallBackendPackages(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "Install torch, MONAI, FastAPI and uvicorn into Slicer's Python so the local backend runs there? "
                "This is a large download. Alternatively set 'Server Python' to a Python that has them "
                "(see the documentation)."
            )
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to install the backend packages."), waitCursor=True):
            self.logic.installDependencies(self.resourcePath("requirements-backend.txt"))

    # ---- backend settings ----------------------------------------------------------------------
    def updateBackendGuiFromSettings(self) -> None:
        if self.logic.dependenciesMissing():
            return
        loaded = self.logic.readBackendSettings()  # a damaged token file: no token, and why
        settings = loaded.settings
        widgets = [
            self.ui.localRadioButton,
            self.ui.remoteRadioButton,
            self.ui.localModelPathLineEdit,
            self.ui.localDeviceLineEdit,
            self.ui.localThreadsSpinBox,
            self.ui.serverPythonPathLineEdit,
            self.ui.remoteUrlLineEdit,
            self.ui.remoteTokenLineEdit,
            self.ui.remoteOptInCheckBox,
            self.ui.allowInsecureCheckBox,
            self.ui.remoteCaBundlePathLineEdit,
        ]
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            self.ui.localRadioButton.checked = settings.mode == "local"
            self.ui.remoteRadioButton.checked = settings.mode == "remote"
            self.ui.localModelPathLineEdit.currentPath = settings.local_model
            self.ui.localDeviceLineEdit.text = settings.local_device
            self.ui.localThreadsSpinBox.value = settings.local_threads
            self.ui.serverPythonPathLineEdit.currentPath = settings.local_python
            self.ui.remoteUrlLineEdit.text = settings.remote_url
            self.ui.remoteTokenLineEdit.text = settings.remote_token
            self.ui.remoteOptInCheckBox.checked = settings.remote_opt_in
            self.ui.allowInsecureCheckBox.checked = settings.allow_insecure_http
            self.ui.remoteCaBundlePathLineEdit.currentPath = settings.remote_ca_bundle
        finally:
            for widget, wasBlocked in zip(widgets, blocked):
                widget.blockSignals(wasBlocked)
        self._backendFormFilled = True
        self._updateBackendModeGui(settings.mode)
        self._showBackendStatus(self.logic.manager().local_status() if settings.mode == "local" else None)
        if loaded.problem:
            self.setStatus(loaded.problem, error=True)

    def _updateBackendModeGui(self, mode: str) -> None:
        self.ui.localGroupBox.setVisible(mode == "local")
        self.ui.remoteGroupBox.setVisible(mode == "remote")

    def _settingsFromGui(self, previous):
        return previous.with_changes(
            mode="remote" if self.ui.remoteRadioButton.checked else "local",
            local_model=self.ui.localModelPathLineEdit.currentPath.strip(),
            local_device=self.ui.localDeviceLineEdit.text.strip() or "cpu",
            local_threads=int(self.ui.localThreadsSpinBox.value),
            local_python=self.ui.serverPythonPathLineEdit.currentPath.strip(),
            remote_url=self.ui.remoteUrlLineEdit.text.strip(),
            remote_token=self.ui.remoteTokenLineEdit.text.strip(),
            remote_opt_in=bool(self.ui.remoteOptInCheckBox.checked),
            allow_insecure_http=bool(self.ui.allowInsecureCheckBox.checked),
            remote_ca_bundle=self.ui.remoteCaBundlePathLineEdit.currentPath.strip(),
        )

    def _editedSettings(self, showConsent: bool = True):
        """The settings the form holds now (``settings_from_form``: a new server address takes its own
        saved token, never the previous server's, and needs consent again); the form shows them."""
        from SegAssistLib.slicer.backend import settings_from_form

        previous = self.logic.backendSettings()
        settings = settings_from_form(previous, self._settingsFromGui(previous))
        widgets = [self.ui.remoteTokenLineEdit] + ([self.ui.remoteOptInCheckBox] if showConsent else [])
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            if self.ui.remoteTokenLineEdit.text.strip() != settings.remote_token:
                self.ui.remoteTokenLineEdit.text = settings.remote_token
            if showConsent:
                self.ui.remoteOptInCheckBox.checked = settings.remote_opt_in
        finally:
            for widget, wasBlocked in zip(widgets, blocked):
                widget.blockSignals(wasBlocked)
        return settings

    def onSettingsEdited(self, *args) -> None:
        if not self._backendFormFilled:  # the form still holds its blank defaults, not the user's settings
            return
        self._saveBackendSettings(self._editedSettings())

    def _saveBackendSettings(self, settings) -> None:
        manager = self.logic.manager()
        generation = manager.generation
        problem = self.logic.saveBackendSettings(settings)
        self._updateBackendModeGui(settings.mode)
        if manager.generation != generation:  # another backend: what the panel showed was about the old one
            self._showBackendStatus(manager.local_status() if settings.mode == "local" else None, quiet=True)
        if problem:  # the token file cannot take the token: the rest is saved, the token used until exit
            self.setStatus(problem, error=True)

    def onOptInToggled(self, checked: bool) -> None:
        if checked and self._backendFormFilled:
            # a URL typed but not committed yet is the one the user is asked about: saved first, without consent
            self._saveBackendSettings(self._editedSettings(showConsent=False).with_changes(remote_opt_in=False))
        if checked:
            url = self.ui.remoteUrlLineEdit.text.strip() or _("(no URL yet)")
            unencrypted = url.lower().startswith("http://")
            warning = (
                _(" The address starts with http://: the images travel unencrypted, readable on the way.")
                if unencrypted
                else ""
            )
            agreed = slicer.util.confirmOkCancelDisplay(
                _(
                    "Images you segment with SegAssist will be sent to {url}. Only agree if you may share "
                    "these images with that server."
                ).format(url=url)
                + warning,
                windowTitle=_("Send images to a remote server?"),
            )
            if not agreed:
                wasBlocked = self.ui.remoteOptInCheckBox.blockSignals(True)
                self.ui.remoteOptInCheckBox.checked = False
                self.ui.remoteOptInCheckBox.blockSignals(wasBlocked)
                return
        self.onSettingsEdited()

    # ---- backend actions (worker thread) -------------------------------------------------------
    def _submit(self, tag: str, function: Callable, *args, note: str = "") -> None:
        from SegAssistLib.slicer.worker import BackgroundWorker

        if tag == "stopped":  # not behind a start on the panel's worker (BackendManager lets a stop overtake it)
            self._stopWorker = self._stopWorker or BackgroundWorker("segassist-panel-stop")
            worker = self._stopWorker
        else:
            self._worker = worker = self._worker or BackgroundWorker("segassist-panel")
        self.onSettingsEdited()
        worker.submit(tag, function, *args)
        if note:
            self.setStatus(note)
        self._timer.start()

    def onStartLocal(self) -> None:
        self._submit(
            "status", self.logic.manager().start_local, note=_("Starting the local backend (loading the model)...")
        )

    def onStopLocal(self) -> None:
        self._submit("stopped", self.logic.manager().stop_local, note=_("Stopping the local backend..."))

    def onTestConnection(self) -> None:
        self._submit("status", self.logic.manager().test_connection, note=_("Contacting the backend..."))

    def _poll(self) -> None:
        workers = [worker for worker in (self._worker, self._stopWorker) if worker is not None]
        for finished in [finished for worker in workers for finished in worker.poll()]:
            try:  # one result that fails must neither drop the others nor escape the timer
                self._onJobFinished(finished)
            except Exception as exc:
                logging.exception("SegAssist: handling the result of %r failed", finished.tag)
                self.setStatus(self._describe(exc), error=True)
        if self._batchRunning:
            from SegAssistLib.slicer.worker import progress_status

            self.ui.progressBar.value = int(100 * self._progress[0])
            # a cancel pressed is not hidden by the progress of the step it waits for
            self.setStatus(
                progress_status(self._progress[1], self._cancel.is_set(), self._cancellingText, _(" (cancelling)"))
            )
        if not any(worker.busy for worker in workers):
            self._timer.stop()

    def _onJobFinished(self, finished) -> None:
        if finished.tag == "batch":
            self._onBatchFinished(finished)
        elif finished.error is not None:
            self.setStatus(self._describe(finished.error), error=True)
        elif finished.tag == "status":
            self._showBackendStatus(finished.value)
        elif finished.tag == "stopped":
            self._showBackendStatus(self.logic.manager().local_status())

    def _showBackendStatus(self, status, quiet: bool = False) -> None:
        """Show a backend's state (None: a remote one not tested); ``quiet``: not in the status line."""
        from SegAssistLib.slicer.backend import model_labels

        labels = model_labels(status)  # None: no model named; those shown were another backend's
        self.ui.modelNameLabel.text = _("(not connected)") if labels is None else labels[0]
        self.ui.modelLicenceLabel.text = "-" if labels is None else labels[1]
        if status is None:
            self.ui.backendStatusLabel.text = _("Remote backend: press 'Test connection' to check it")
            self.ui.backendStatusLabel.setStyleSheet("")
            return
        summary = status.summary()
        if status.connected and not status.model:  # a running local backend, not asked which model it has
            summary = _("{mode} backend: {state}").format(mode=status.mode, state=status.message)
        self.ui.backendStatusLabel.text = summary
        self.ui.backendStatusLabel.setStyleSheet("" if status.connected else "color: #b00000")
        if not quiet:
            self.setStatus(summary, error=not status.connected and status.message not in ("stopped", ""))

    @staticmethod
    def _describe(error: BaseException) -> str:
        from SegAssistLib.slicer.session_state import describe_error

        return describe_error(error)

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #b00000" if error else "")
        if error:
            logging.error(text)

    def onOpenSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor."), waitCursor=True):
            registerEditorEffect()
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            p = self._parameterNode
            if p and p.inputVolume:
                editor.setSourceVolumeNode(p.inputVolume)
            editor.setActiveEffectByName(EFFECT_NAME)

    # ---- segment from markups ------------------------------------------------------------------
    def onApply(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            sources = [node for node in (p.points, p.roi) if node is not None]
            prepared = self.logic.prepare(p.inputVolume, sources)
            self._cancel.clear()
            self.onSettingsEdited()  # a field typed but not committed yet: part of the settings this run uses
            self._batchGeneration = self.logic.manager().generation  # the backend settings this run may use
            self._progress = (0.0, _("Starting"))
            self._batchRunning = True
            self._batchTarget = (p.inputVolume, p.outputSegmentation, p.segmentName or "SegAssist")
            self.ui.progressBar.setVisible(True)
            self.ui.cancelButton.enabled = True
            self._checkCanApply()
            self._submit("batch", self.logic.runPrepared, prepared, self._reportProgress, self.logic.manager().client)

    def _reportProgress(self, fraction: float, message: str) -> None:
        """Called on the worker thread: only store (the timer shows it); raising cancels the job."""
        self._progress = (fraction, message)
        if self._cancel.is_set():
            from SegAssistLib.slicer.logic import Cancelled

            raise Cancelled("cancelled by the user")
        if self.logic.manager().generation != self._batchGeneration:
            from SegAssistLib.errors import SessionError

            # another server, or consent withdrawn, while this run sends its image and prompts
            raise SessionError(self._settingsChangedText)

    def onCancel(self) -> None:
        self._cancel.set()
        self.setStatus(self._cancellingText)

    def _onBatchFinished(self, finished) -> None:
        from SegAssistLib.slicer.logic import Cancelled

        target, self._batchTarget = self._batchTarget, None  # no node held after the run (a closed scene frees them)
        self._batchRunning = False
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        if target is None:  # the scene was closed meanwhile
            self.setStatus(_("Cancelled: the scene was closed"))
        elif self._cancel.is_set() or isinstance(finished.error, Cancelled):  # also pressed during the last step
            self.setStatus(_("Cancelled"))
        elif finished.error is not None:
            self.setStatus(self._describe(finished.error), error=True)
        else:
            try:  # tryWithErrorDisplay shows the error, then raises it again: not out of the timer
                with slicer.util.tryWithErrorDisplay(_("Failed to write the segment."), waitCursor=True):
                    self._writeBatchResult(finished.value, *target)
            except Exception as exc:
                self.setStatus(_("The segment was not written: {error}").format(error=self._describe(exc)), error=True)

    def _writeBatchResult(self, run, volumeNode, segmentationNode, segmentName: str) -> None:
        chosen, note = segmentationNode, ""
        if chosen is not None and not self.logic.isSegmentationOnVolumeGrid(chosen, volumeNode):
            # written there it would be resampled (a thin object even lost): a segmentation of this volume instead
            segmentationNode = None
            note = _(" in a new segmentation: '{name}' is on another grid").format(name=chosen.GetName())
        # a segment of that name that holds voxels (a previous run, maybe edited) is kept
        result = self.logic.writeResult(run, volumeNode, segmentationNode, segmentName, keepExisting=True)
        p, made = self._parameterNode, result.segmentationNode
        if p and p.inputVolume is volumeNode and p.outputSegmentation is chosen and chosen is not made:
            p.outputSegmentation = made  # the selector was empty (or on another grid) and still shows this volume
        written = result.segmentationNode.GetSegmentation().GetSegment(result.segmentId).GetName()
        self.setStatus(
            _("Segment '{name}'{note}: {voxels} voxels ({model})").format(
                name=written, note=note, voxels=result.voxelCount, model=result.model
            )
        )


#
# SegAssistLogic
#


class SegAssistResult:
    """A batch result in Slicer's naming style (wraps SegAssistLib's SegmentationResult)."""

    def __init__(self, result) -> None:
        self.result = result
        self.segmentationNode = result.segmentation_node
        self.segmentId = result.segment_id
        self.mask = result.mask
        self.promptLog = result.prompt_log
        self.model = result.model
        self.voxelCount = result.voxel_count
        #: one line each for the user: the prompt log was recorded on other voxel values of this grid (another
        #: scan?), or the backend answered with engine settings other than the log's
        self.notes = list(result.notes)
        #: the axes [k, j, i] along which promptLog's voxels are the volume node's reversed (a prompt log of a
        #: left-handed file replayed in its own order; None or all False: the node's order)
        self.flips = result.flips


class SegAssistLogic(ScriptedLoadableModuleLogic):
    """Blocking, batch-friendly API: nodes and plain values in, nodes out, exceptions instead of dialogs.

    >>> logic = SegAssistLogic()                                               # doctest: +SKIP
    >>> result = logic.segment(volumeNode, [pointListNode, roiNode])            # doctest: +SKIP
    >>> result.segmentationNode, result.segmentId                              # doctest: +SKIP

    The backend is the one configured in the module panel (``qt.QSettings``), or the one given:
    a ``BackendSettings`` object (``segment`` starts a backend for that call and stops it when the
    call returns, unless the panel uses these very settings), or an engine/client.
    """

    REQUIRED_MODULES = {"pydantic": "pydantic>=2.6", "requests": "requests>=2.28"}

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # runPrepared's progress texts, translated here: it runs on a worker thread
        self._connectingText = _("Connecting to the backend (a local one starts first)")
        self._connectedText = _("Connected")

    def getParameterNode(self) -> SegAssistParameterNode:
        return SegAssistParameterNode(super().getParameterNode())

    # ---- dependencies --------------------------------------------------------------------------
    def dependenciesMissing(self) -> List[str]:
        """The packages still missing, looked up afresh (installed meanwhile: found, no restart needed)."""
        from SegAssistLib.slicer.dependencies import missing_packages

        return missing_packages(self.REQUIRED_MODULES)

    def installDependencies(self, requirementsPath: str) -> None:
        """Install a requirements file into Slicer's Python (with the user's confirmation)."""
        from SegAssistLib.slicer.dependencies import pip_ensure_installer

        install = pip_ensure_installer()  # slicer.packaging.pip_ensure (Slicer >= 5.12)
        if install is not None:
            install(requirementsPath, "SegAssist")
            return
        lines = [ln.strip() for ln in Path(requirementsPath).read_text().splitlines()]
        requirements = [ln for ln in lines if ln and not ln.startswith("#")]
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
            _("SegAssist will install these Python packages: {names}").format(names=", ".join(requirements))
        ):
            raise RuntimeError(_("installation cancelled"))
        slicer.util.pip_install(["-r", requirementsPath])

    # ---- backend -------------------------------------------------------------------------------
    def backendSettings(self):
        return self.readBackendSettings().settings

    def readBackendSettings(self):
        """The saved settings and why their token is missing ("" when nothing went wrong: a damaged
        token file gives settings without a token rather than an error)."""
        from SegAssistLib.slicer.backend import BackendSettings

        return BackendSettings.read(qt.QSettings())

    def saveBackendSettings(self, settings) -> str:
        """Save and use ``settings``; returns "" or why the token could not be saved (used until exit)."""
        problem = settings.save(qt.QSettings())
        self.manager().update_settings(settings)
        return problem

    def manager(self):
        """The backend manager shared with the SegAssist effect (created with the saved settings)."""
        from SegAssistLib.slicer.backend import shared_manager

        return shared_manager(self.backendSettings)

    def engine(self, backend: Any = None):
        """A client or engine for ``backend`` (None: the panel's settings; or BackendSettings, whose
        manager is kept until Slicer exits, since the client is the caller's; or an engine).
        ``segment`` does not use it for BackendSettings: its backend is stopped when the call ends."""
        from SegAssistLib.slicer.backend import BackendSettings, manager_for

        if backend is None:
            return self.manager().client()
        if isinstance(backend, BackendSettings):
            return manager_for(backend).client()
        return backend

    # ---- segmentation --------------------------------------------------------------------------
    def prepare(self, volumeNode, prompts: Sequence[Any]):
        """(main thread) The volume's voxels and the prompts in its voxel coordinates."""
        from SegAssistLib.slicer.logic import collect_prompts
        from SegAssistLib.slicer.volumes import volume_from_node

        if volumeNode is None:
            raise ValueError(_("Select a volume to segment"))
        return volume_from_node(volumeNode), collect_prompts(list(prompts), volumeNode)

    def runPrepared(
        self,
        prepared,
        progress: Optional[Callable[[float, str], None]] = None,
        engineFactory: Optional[Callable[[], Any]] = None,
    ):
        """(any thread) Run prepared prompts; no MRML and no Qt is touched.

        ``engineFactory`` (for example ``logic.manager().client``, taken on the main thread) gives
        the engine; it may block while a local backend starts.
        """
        from SegAssistLib.slicer.logic import run_prompts

        volume, prompts = prepared
        if progress is not None:  # a cancel pressed before the backend answers takes effect here
            progress(0.0, self._connectingText)
        engine = engineFactory() if engineFactory is not None else self.engine()
        if progress is not None:
            progress(0.0, self._connectedText)
        return run_prompts(engine, volume, prompts, progress)

    def writeResult(
        self, run, volumeNode, segmentationNode=None, segmentName: str = "SegAssist", keepExisting: bool = False
    ) -> SegAssistResult:
        """(main thread) Replace (or add) the named segment with an engine run's mask; with
        ``keepExisting`` a segment of that name that holds voxels is kept and a new one is added.
        ``voxelCount`` is read back from the segment, on the volume's grid."""
        from SegAssistLib.slicer.logic import write_result
        from SegAssistLib.slicer.segments import segment_to_array

        # write_result saves the Segment Editor's undo state first: its Ctrl+Z undoes this write, not the one before
        result = SegAssistResult(
            write_result(
                run,
                volumeNode,
                segmentation_node=segmentationNode,
                segment_name=segmentName,
                keep_existing=keepExisting,
            )
        )
        result.voxelCount = int(segment_to_array(result.segmentationNode, result.segmentId, volumeNode).sum())
        return result

    @staticmethod
    def isSegmentationOnVolumeGrid(segmentationNode, volumeNode) -> bool:
        """Whether the segmentation keeps its segments on the volume's voxels (else a write is resampled)."""
        from SegAssistLib.slicer.segments import on_volume_grid

        return on_volume_grid(segmentationNode, volumeNode)

    def segment(
        self,
        volumeNode,
        prompts: Sequence[Any],
        segmentationNode=None,
        segmentName: str = "SegAssist",
        progress: Optional[Callable[[float, str], None]] = None,
        backend: Any = None,
        settings: Any = None,
    ) -> SegAssistResult:
        """Segment ``volumeNode`` from prompts (SegAssist prompts, their dicts, markups nodes, or prompt files
        as ``load_prompts`` reads them). Blocks.

        ``settings``: the engine settings the prompts were recorded with (a prompt log's, see
        ``segmentFromFile``); an in-process engine answers with them, a backend with its own, and the
        result's ``notes`` then say the mask may differ from the recorded one."""
        from SegAssistLib.slicer.backend import engine_for_call
        from SegAssistLib.slicer.logic import segment_volume

        # BackendSettings other than the panel's: a backend for this call, stopped when it ends
        with engine_for_call(backend, self.manager) as engine:
            result = segment_volume(
                engine,
                volumeNode,
                list(prompts),
                segmentation_node=segmentationNode,
                segment_name=segmentName,
                progress=progress,
                settings=settings,
            )
        return SegAssistResult(result)

    def segmentFromFile(self, volumeNode, promptFile: str, **kwargs) -> SegAssistResult:
        """Segment from a prompt file: SegAssist JSON (voxel coordinates) or a ``.mrk.json`` markups file.
        A prompt log is replayed with the engine settings it records (see ``segment``), on the voxels in
        the order it was recorded in (a log of a left-handed file as SimpleITK reads it names them in
        another order than the node holds them): the recorded mask."""
        from SegAssistLib.headless import model_note
        from SegAssistLib.slicer.logic import load_prompts

        markupsLogic = slicer.modules.markups.logic()
        file = load_prompts(promptFile, volumeNode, markupsLogic)
        kwargs.setdefault("settings", file.settings)
        result = self.segment(volumeNode, [file], **kwargs)  # the file whole: see segment_volume
        other_model = model_note([file], result.promptLog.model)  # another model answered than recorded it
        # a log recorded on another scan of this grid first
        result.notes = [*file.notes, *result.notes, *([other_model] if other_model else [])]
        return result

    @staticmethod
    def sampleFiles() -> tuple:
        """The bundled sample (image, label), beside SegAssistLib (source checkout or installed)."""
        import SegAssistLib

        samples = Path(SegAssistLib.__file__).resolve().parents[1] / "Resources" / "Samples"
        return samples / "hippocampus_001_image.nii.gz", samples / "hippocampus_001_label.nii.gz"


#
# SegAssistTest
#


class SegAssistTest(ScriptedLoadableModuleTest):
    """Self-tests in a real Slicer (``Slicer --testing``): the local CPU backend and the shipped model.

    The local backend needs a Python with torch, MONAI and FastAPI: Slicer's own (install the
    backend packages) or the one in ``SEGASSIST_SERVER_PYTHON``.
    """

    MIN_DICE = 0.7  # the shipped model, given a click and the object's box, on the bundled sample

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_Logic_MarkupsToSegment()
        self.setUp()
        self.test_Effect_ClickUpdatesSelectedSegment()

    # ---- helpers -------------------------------------------------------------------------------
    def _loadSample(self):
        imagePath, labelPath = SegAssistLogic.sampleFiles()
        self.assertTrue(imagePath.is_file(), f"bundled sample missing: {imagePath}")
        volumeNode = slicer.util.loadVolume(str(imagePath))
        labelNode = slicer.util.loadLabelVolume(str(labelPath))
        target = (slicer.util.arrayFromVolume(labelNode) > 0).astype("uint8")
        return volumeNode, target

    def _localSettings(self):
        from SegAssistLib.slicer.backend import BackendSettings

        return BackendSettings(mode="local", local_device="cpu", local_threads=2)

    @staticmethod
    def _dice(a, b) -> float:
        import numpy as np

        a, b = a > 0, b > 0
        return 2.0 * float(np.count_nonzero(a & b)) / max(float(np.count_nonzero(a) + np.count_nonzero(b)), 1.0)

    @staticmethod
    def _interiorVoxel(target):
        """The object's voxel nearest its centroid, as (i, j, k)."""
        import numpy as np

        voxels = np.argwhere(target > 0)
        k, j, i = voxels[int(np.argmin(np.linalg.norm(voxels - voxels.mean(axis=0), axis=1)))]
        return (int(i), int(j), int(k))

    # ---- tests ---------------------------------------------------------------------------------
    def test_Logic_MarkupsToSegment(self) -> None:
        """Markups placed in RAS -> local backend -> segment; Dice against the sample's label."""
        import numpy as np

        from SegAssistLib.slicer import coordinates, segments

        self.delayDisplay("Loading the bundled sample")
        volumeNode, target = self._loadSample()
        click = self._interiorVoxel(target)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPointWorld(*coordinates.ijk_to_ras(click, volumeNode), "inside")
        nz = np.argwhere(target)
        corners = coordinates.ijk_to_ras([nz.min(0)[::-1], nz.max(0)[::-1]], volumeNode)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenterWorld(*corners.mean(axis=0))
        roi.SetSize(*np.abs(corners[1] - corners[0]))

        self.delayDisplay("Segmenting on the local CPU backend (starts it: the model loads)")
        progress: List[float] = []
        logic = SegAssistLogic()
        result = logic.segment(
            volumeNode,
            [points, roi],
            segmentName="hippocampus",
            progress=lambda f, m: progress.append(f),
            backend=self._localSettings(),
        )
        self.assertEqual(progress[-1], 1.0)
        written = segments.segment_to_array(result.segmentationNode, result.segmentId, volumeNode)
        self.assertTrue(np.array_equal(written, result.mask))
        dice = self._dice(written, target)
        self.delayDisplay(f"Dice {dice:.3f} ({result.model})")
        self.assertGreaterEqual(dice, self.MIN_DICE)

    def test_Effect_ClickUpdatesSelectedSegment(self) -> None:
        """The SegAssist effect in a segment editor: a click in the Red view updates the selected segment."""
        from SegAssistLib.slicer.backend import shared_manager

        registerEditorEffect()
        volumeNode, target = self._loadSample()
        shared_manager().update_settings(self._localSettings())
        try:
            self._clickUndoRedoReset(volumeNode, target)
        finally:  # the user's settings again, also when the test fails
            shared_manager().update_settings(SegAssistLogic().backendSettings())
        self.delayDisplay("Effect test passed")

    def _clickUndoRedoReset(self, volumeNode, target) -> None:
        import numpy as np

        from SegAssistLib.slicer import coordinates, segments

        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)

        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("hippocampus")
        # another segment where the answer lands: the editor's default overwrite mode takes voxels from it
        otherId = segmentationNode.GetSegmentation().AddEmptySegment("other")
        segments.array_to_segment(target, segmentationNode, otherId, volumeNode)
        other = segments.segment_to_array(segmentationNode, otherId, volumeNode)

        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode)
        editorWidget.setCurrentSegmentID(segmentId)
        editorWidget.setActiveEffectByName(EFFECT_NAME)
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the SegAssist effect is not registered")

        click = self._interiorVoxel(target)
        redWidget = slicer.app.layoutManager().sliceWidget("Red")
        redNode = redWidget.mrmlSliceNode()
        ras = coordinates.ijk_to_ras(click, volumeNode)
        redNode.JumpSliceByCentering(*ras)
        xy = effect.self().rasToXy(ras, redWidget)

        self.delayDisplay("Clicking in the Red view")
        effect.self().addPrompt(redWidget, "click", [xy], positive=True)
        self.assertTrue(effect.self().waitUntilIdle(timeout_s=300), effect.self().statusText())
        mask = segments.segment_to_array(segmentationNode, segmentId, volumeNode)
        self.assertGreater(int(mask.sum()), 0, effect.self().statusText())
        self.assertGreater(self._dice(mask, target), 0.3)

        self.delayDisplay("Undo, redo, reset")
        effect.self().performAction("undo")
        self.assertTrue(effect.self().waitUntilIdle(timeout_s=120))
        self.assertEqual(int(segments.segment_to_array(segmentationNode, segmentId, volumeNode).sum()), 0)
        self.assertTrue(np.array_equal(segments.segment_to_array(segmentationNode, otherId, volumeNode), other))
        effect.self().performAction("redo")
        self.assertTrue(effect.self().waitUntilIdle(timeout_s=120))
        self.assertTrue(np.array_equal(segments.segment_to_array(segmentationNode, segmentId, volumeNode), mask))
        effect.self().performAction("reset")
        self.assertEqual(int(segments.segment_to_array(segmentationNode, segmentId, volumeNode).sum()), 0)
        self.assertTrue(np.array_equal(segments.segment_to_array(segmentationNode, otherId, volumeNode), other))
        editorWidget.setActiveEffect(None)
