"""What the SegAssist effect draws in slice views: placed prompts, the gesture in progress, the cursor.

VTK 2D actors in slice-view XY pixels (the effect recomputes XY when a slice moves), and Qt
cursors. Which prompts to show where is decided in ``SegAssistLib.slicer.interaction``.
"""

from typing import List, Sequence, Tuple

import qt
import vtk

POSITIVE_COLOR = (0.2, 0.9, 0.3)
NEGATIVE_COLOR = (1.0, 0.3, 0.25)
BOX_COLOR = (1.0, 0.85, 0.2)
CROSS_PX = 5.0

# (xy points (n, 2), closed outline, a single point drawn as a cross)
Shape = Tuple[Sequence[Sequence[float]], bool, bool]


def _polyData(shapes: List[Shape]) -> vtk.vtkPolyData:
    points = vtk.vtkPoints()
    lines = vtk.vtkCellArray()
    for xy, closed, isPoint in shapes:
        if isPoint:
            x, y = float(xy[0][0]), float(xy[0][1])
            for (x0, y0), (x1, y1) in (
                ((x - CROSS_PX, y), (x + CROSS_PX, y)),
                ((x, y - CROSS_PX), (x, y + CROSS_PX)),
            ):
                line = vtk.vtkIdList()
                line.InsertNextId(points.InsertNextPoint(x0, y0, 0.0))
                line.InsertNextId(points.InsertNextPoint(x1, y1, 0.0))
                lines.InsertNextCell(line)
            continue
        if len(xy) < 2:
            continue
        ids = vtk.vtkIdList()
        for x, y in xy:
            ids.InsertNextId(points.InsertNextPoint(float(x), float(y), 0.0))
        if closed:
            ids.InsertNextId(ids.GetId(0))
        lines.InsertNextCell(ids)
    polyData = vtk.vtkPolyData()
    polyData.SetPoints(points)
    polyData.SetLines(lines)
    return polyData


class _Layer:
    def __init__(self, color: Tuple[float, float, float], width: float) -> None:
        self.mapper = vtk.vtkPolyDataMapper2D()
        self.mapper.SetInputData(_polyData([]))
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetColor(*color)
        self.actor.GetProperty().SetLineWidth(width)

    def show(self, shapes: List[Shape], color=None) -> None:
        self.mapper.SetInputData(_polyData(shapes))
        if color is not None:
            self.actor.GetProperty().SetColor(*color)


class PromptOverlay:
    """The actors of one slice view: positive prompts, negative prompts, and the gesture in progress."""

    def __init__(self, scriptedEffect, sliceWidget) -> None:
        self.scriptedEffect = scriptedEffect
        self.sliceWidget = sliceWidget
        self.positive = _Layer(POSITIVE_COLOR, 2.0)
        self.negative = _Layer(NEGATIVE_COLOR, 2.0)
        self.band = _Layer(BOX_COLOR, 1.5)
        for layer in (self.positive, self.negative, self.band):
            scriptedEffect.addActor2D(sliceWidget, layer.actor)

    def showPrompts(self, positive: List[Shape], negative: List[Shape]) -> None:
        self.positive.show(positive)
        self.negative.show(negative)
        self._render()

    def showGesture(self, xy: Sequence[Sequence[float]], closed: bool, positive: bool, isBox: bool) -> None:
        color = BOX_COLOR if isBox else (POSITIVE_COLOR if positive else NEGATIVE_COLOR)
        self.band.show([(xy, closed, False)] if len(xy) else [], color)
        self._render()

    def clearGesture(self) -> None:
        self.band.show([])
        self._render()

    def remove(self) -> None:
        for layer in (self.positive, self.negative, self.band):
            self.scriptedEffect.removeActor2D(self.sliceWidget, layer.actor)
        self._render()

    def _render(self) -> None:
        self.sliceWidget.sliceView().scheduleRender()


def cursorFor(tool: str, positive: bool, busy: bool) -> qt.QCursor:
    """A crosshair with the polarity sign and the tool's glyph; a busy arrow while waiting for the backend."""
    if busy:
        return qt.QCursor(qt.Qt.BusyCursor)
    size = 32
    pixmap = qt.QPixmap(size, size)
    pixmap.fill(qt.Qt.transparent)
    painter = qt.QPainter(pixmap)
    painter.setRenderHint(qt.QPainter.Antialiasing)
    center = 11
    for color, width in ((qt.QColor(0, 0, 0), 3), (qt.QColor(255, 255, 255), 1)):
        painter.setPen(qt.QPen(color, width))
        painter.drawLine(center, 2, center, center - 3)
        painter.drawLine(center, center + 3, center, 20)
        painter.drawLine(2, center, center - 3, center)
        painter.drawLine(center + 3, center, 20, center)
    signColor = qt.QColor(40, 200, 70) if positive else qt.QColor(230, 60, 50)
    painter.setPen(qt.QPen(signColor, 3))
    painter.drawLine(21, 26, 29, 26)
    if positive:
        painter.drawLine(25, 22, 25, 30)
    painter.setPen(qt.QPen(qt.QColor(255, 220, 60), 2))
    if tool == "box":
        painter.drawRect(14, 14, 7, 6)
    elif tool == "scribble":
        painter.drawLine(13, 19, 16, 15)
        painter.drawLine(16, 15, 19, 19)
    elif tool == "lasso":
        painter.drawEllipse(13, 13, 8, 6)
    painter.end()
    return qt.QCursor(pixmap, center, center)
