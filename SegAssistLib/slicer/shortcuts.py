"""The SegAssist effect's tools and keys: what each key and mouse gesture does, and which keys are Slicer's.

Plain Python (no Qt, no pydantic), so the module's help text can be built from it at load time,
before SegAssist's dependencies are installed. Keys are VTK keysyms, as
``vtkRenderWindowInteractor.GetKeySym()`` reports them in ``processInteractionEvents``.

Mouse: a left click or drag in any slice view uses the active tool with the active polarity;
holding Ctrl gives the opposite polarity for that one prompt. Shift- and Alt- drags, right-button
and wheel events are left to Slicer (crosshair, panning, zoom, slice browsing).

Keys: :data:`SHORTCUTS`. They avoid the keys the Segment Editor already takes
(:data:`SEGMENT_EDITOR_KEYS`) and the slice views' own keys (:data:`SLICE_VIEW_KEYS`), with any
modifier, and never use Ctrl or Alt (Slicer's application shortcuts).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Optional, Tuple


class Tool(str, Enum):
    CLICK = "click"
    BOX = "box"
    SCRIBBLE = "scribble"
    LASSO = "lasso"


TOOL_TITLES: Dict[Tool, str] = {
    Tool.CLICK: "Click",
    Tool.BOX: "Box",
    Tool.SCRIBBLE: "Scribble",
    Tool.LASSO: "Lasso",
}


class Action(str, Enum):
    CLICK_TOOL = "click_tool"
    BOX_TOOL = "box_tool"
    SCRIBBLE_TOOL = "scribble_tool"
    LASSO_TOOL = "lasso_tool"
    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNDO = "undo"
    REDO = "redo"
    RESET = "reset"
    ACCEPT = "accept"
    DROP_VERTEX = "drop_vertex"


TOOL_FOR_ACTION: Dict[Action, Tool] = {
    Action.CLICK_TOOL: Tool.CLICK,
    Action.BOX_TOOL: Tool.BOX,
    Action.SCRIBBLE_TOOL: Tool.SCRIBBLE,
    Action.LASSO_TOOL: Tool.LASSO,
}

_KEY_NAMES = {"Return": "Enter", "KP_Enter": "Keypad Enter", "BackSpace": "Backspace"}


@dataclass(frozen=True)
class Shortcut:
    """One key of the effect: a VTK keysym (letters in lower case), with or without Shift."""

    key: str
    action: Action
    description: str
    shift: bool = False

    @property
    def label(self) -> str:
        name = _KEY_NAMES.get(self.key, self.key.upper() if len(self.key) == 1 else self.key)
        return f"Shift+{name}" if self.shift else name


SHORTCUTS: Tuple[Shortcut, ...] = (
    Shortcut("c", Action.CLICK_TOOL, "click tool: each click adds a point"),
    Shortcut("o", Action.BOX_TOOL, "box tool: drag a rectangle around the object on a slice"),
    Shortcut("s", Action.SCRIBBLE_TOOL, "scribble tool: drag to draw a stroke"),
    Shortcut("l", Action.LASSO_TOOL, "lasso tool: click the outline's corners (or drag); close it at the first one"),
    Shortcut("p", Action.POSITIVE, "positive: the next prompts mark the object"),
    Shortcut("n", Action.NEGATIVE, "negative: the next prompts mark background"),
    Shortcut("u", Action.UNDO, "undo the last prompt"),
    Shortcut("u", Action.REDO, "redo the last undone prompt", shift=True),
    Shortcut("x", Action.RESET, "reset: drop this object's prompts and restore the segment", shift=True),
    Shortcut("Return", Action.ACCEPT, "accept the result and start a new object (while drawing a lasso: close it)"),
    Shortcut("KP_Enter", Action.ACCEPT, "accept, as Enter"),
    Shortcut("BackSpace", Action.DROP_VERTEX, "remove the last lasso corner"),
)

_DIGITS = [str(d) for d in range(10)]
#: Keys the Segment Editor takes (../shared/docs/SLICER.md): effect selection 0-9 and Shift+0-9 (the shifted
#: digits' keysyms on a US layout too), Esc, Space, Z/Y (undo/redo), Q/W, / and *, comma and
#: period, < and >, I. Blocked with any modifier.
SEGMENT_EDITOR_KEYS = frozenset(
    _DIGITS
    + [f"KP_{d}" for d in _DIGITS]
    + ["exclam", "at", "numbersign", "dollar", "percent", "asciicircum", "ampersand", "parenleft", "parenright"]
    + ["Escape", "space", "z", "y", "q", "w", "slash", "asterisk", "KP_Divide", "KP_Multiply"]
    + ["comma", "period", "less", "greater", "i"]
)
#: Keys Slicer's slice views handle themselves (vtkMRMLSliceIntersectionWidget): slice browsing,
#: reset field of view, label/foreground opacity, slice visibility, volume switching.
SLICE_VIEW_KEYS = frozenset(
    ["f", "b", "r", "g", "t", "v", "Left", "Right", "Up", "Down"]
    + ["bracketleft", "bracketright", "braceleft", "braceright", "Prior", "Next"]
)


def normalize_key(keysym: str) -> str:
    """Letters in lower case (VTK reports Shift+u as ``U``); other keysyms as they are."""
    return keysym.lower() if len(keysym) == 1 else keysym


def reserved_key(keysym: str) -> bool:
    """True when Slicer already uses this key (with any modifier) in the Segment Editor or slice views."""
    key = normalize_key(keysym)
    return key in SEGMENT_EDITOR_KEYS or key in SLICE_VIEW_KEYS


def resolve_key(keysym: str, shift: bool = False, ctrl: bool = False, alt: bool = False) -> Optional[Action]:
    """The effect's action for a key press, or None to leave the key to Slicer.

    Shift is the interactor's Shift flag only: a letter's case also follows Caps Lock, so an
    upper-case keysym does not mean Shift (with Caps Lock on, ``X`` without Shift is not Reset).
    """
    if ctrl or alt or not keysym:
        return None
    key = normalize_key(keysym)
    for shortcut in SHORTCUTS:
        if shortcut.key == key and shortcut.shift == bool(shift):
            return shortcut.action
    return None


def shortcut_labels(action: Action) -> str:
    """The keys of an action as shown in tooltips: ``"Enter, Keypad Enter"``."""
    return ", ".join(s.label for s in SHORTCUTS if s.action == action)


def tooltip(action: Action, text: str) -> str:
    keys = shortcut_labels(action)
    return f"{text} ({keys})" if keys else text


def mouse_help(tool: Tool, positive: bool) -> str:
    """What a left click or drag does now, for the options panel and the cursor's tooltip."""
    sign, other = ("positive (object)", "negative (background)") if positive else ("negative (background)", "positive")
    if tool is Tool.CLICK:
        return f"Click: add a {sign} point. Ctrl+click: a {other} point."
    if tool is Tool.BOX:
        return "Drag: draw a box around the object on this slice (boxes are always positive)."
    if tool is Tool.SCRIBBLE:
        return f"Drag: draw a {sign} scribble. Ctrl+drag: a {other} scribble."
    return (
        f"Click the corners of a {sign} lasso (or drag); click the first corner or press Enter to close it. "
        f"Ctrl: {other}. Backspace removes the last corner."
    )


def help_rows() -> List[Tuple[str, str]]:
    """(keys, what they do) for the help text, mouse first."""
    rows = [
        ("Left click / drag", "use the active tool with the active polarity"),
        ("Ctrl + left click / drag", "the same with the opposite polarity (a box is always positive)"),
    ]
    return rows + [(s.label, s.description) for s in SHORTCUTS]
