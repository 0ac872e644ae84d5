"""The built-in engine: the shipped promptable U-Net behind the :class:`Engine` interface.

Answering a prompt:

1. Look at a window around the newest prompt, at the finest zoom level that holds the prompt and
   spans at least ``min_view_mm`` (64 mm).
2. While the predicted object touches a window side that is not the image's edge, zoom out
   (double the window) and predict again: structures larger than the patch come out whole. On a
   side the mask already crossed (a correction of a large object), only a change of more than a
   small share of the side counts; otherwise the answer stays at the finer level.
3. If the answer came from a zoomed-out window, refine it with tiles at a finer level over the
   object's bounding box (each tile sees the coarse answer as its previous mask).
4. Snap the answer's surface to the image's edges (:mod:`SegAssistLib.engine.edges`: a random
   walker re-decides a band two voxels wide around it).
5. A negative scribble or lasso then clears its own voxels (its slab's: a lasso's inside, a
   scribble's stroke), whatever the network answered: "erase" is an edit, not a hint. Later
   prompts may set them again.
6. Paste into the full mask; only the changed box is returned and kept for undo.

Every prompt of the session's history is drawn into the windows it falls in, so corrections keep
the effect of earlier prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from SegAssistLib.engine import patching
from SegAssistLib.engine.base import Capabilities, Engine, EngineSession, MaskUpdate
from SegAssistLib.engine.edges import EdgeSnap, seeds_from_prompts, snap_to_edges
from SegAssistLib.engine.encoding import assemble_input, draw_prompts, prompts_in_window
from SegAssistLib.engine.network import LoadedModel, load_checkpoint
from SegAssistLib.errors import PromptError, SessionError
from SegAssistLib.files import check_bundled
from SegAssistLib.image import Volume, guess_modality, validate_image
from SegAssistLib.prompt_log import EngineSettings, ImageInfo, PromptLog
from SegAssistLib.prompts import (
    PROMPT_KINDS,
    LassoPrompt,
    MaskPrompt,
    Prompt,
    ScribblePrompt,
    check_prompt_inside,
    lasso_in_image,
    prompt_vertices_kji,
    require_prompt,
)
from SegAssistLib.stroke_voxels import stroke_voxels_in_image

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = REPO_ROOT / "Resources" / "Models" / "segassist_unet.pt"
COMMIT_CHUNK_VOXELS = 8 * 1024 * 1024  # window voxels decided at once when pasting an answer (32 MB of float32)


@dataclass
class _Step:
    """One undoable change: the prompt list before and after, the changed box of the mask,
    bit-packed (a long session on a large organ keeps its history in a few MB), the model version
    that made the mask before and after (None: no model, as for an empty or reset mask), and the
    versions that answered the prompts of the list before and after (:attr:`BuiltinSession.answered_by`)."""

    prompts_before: List[Prompt]
    prompts_after: List[Prompt]
    offset: Tuple[int, int, int]
    shape: Tuple[int, int, int]
    before_bits: np.ndarray
    after_bits: np.ndarray
    version_before: Optional[str] = None
    version_after: Optional[str] = None
    answered_before: Tuple[str, ...] = ()
    answered_after: Tuple[str, ...] = ()

    @classmethod
    def make(cls, prompts_before, prompts_after, offset, before: np.ndarray, after: np.ndarray,
             version_before: Optional[str], version_after: Optional[str],
             answered_before: Tuple[str, ...] = (), answered_after: Tuple[str, ...] = ()) -> _Step:
        return cls(list(prompts_before), list(prompts_after), offset, before.shape,
                   np.packbits(before.ravel()), np.packbits(after.ravel()), version_before, version_after,
                   answered_before, answered_after)  # fmt: skip

    def _unpack(self, bits: np.ndarray) -> np.ndarray:
        n = int(np.prod(self.shape))
        return np.unpackbits(bits, count=n).reshape(self.shape)

    @property
    def before(self) -> np.ndarray:
        return self._unpack(self.before_bits)

    @property
    def after(self) -> np.ndarray:
        return self._unpack(self.after_bits)

    @property
    def nbytes(self) -> int:
        """What the step holds: its bits, its two prompt lists (the prompts themselves are shared
        with the session and the other steps: a reference each) and a fixed overhead, so a step that
        changes no voxel (a reset of an empty mask) still counts against the history budget."""
        refs = len(self.prompts_before) + len(self.prompts_after)
        return int(self.before_bits.nbytes + self.after_bits.nbytes) + STEP_OVERHEAD_BYTES + 8 * refs


_NOTHING = (slice(0, 0),) * 3  # an empty box: the answer changes no voxel

#: Least memory one session's undo history may keep, whatever the image's size.
MIN_HISTORY_BYTES = 64 << 20
#: The history may also keep this many whole-image changes (bit-packed, before and after).
HISTORY_WHOLE_IMAGES = 8
#: Most steps the undo history keeps, however small: a step that changes no voxel still costs its
#: object and prompt lists, and thousands of resets of an empty mask were all kept.
MAX_HISTORY_STEPS = 1000
#: What one step is counted to hold besides its bits and prompt references (its objects; measured
#: about 600 bytes).
STEP_OVERHEAD_BYTES = 1024


def history_budget_bytes(shape: Tuple[int, ...]) -> int:
    """How much one session's undo history may hold: the oldest steps are forgotten past it, so a
    client sending whole-image masks (or resets) cannot grow a session's memory without bound."""
    packed_image = (int(np.prod(shape)) + 7) // 8
    return max(MIN_HISTORY_BYTES, HISTORY_WHOLE_IMAGES * 2 * packed_image)


def _says_where_the_structure_is(prompt: Prompt) -> bool:
    """A positive prompt; an initial mask counts when it has a voxel set (an empty one, a cleared
    result sent back, says nothing of where the structure is)."""
    if isinstance(prompt, MaskPrompt):
        return bool(prompt.to_box().any())
    return bool(getattr(prompt, "positive", True))


def edge_snap_of(settings: EngineSettings) -> Optional[EdgeSnap]:
    """The edge snap ``settings`` describe (None: none, an edge band of 0)."""
    if settings.edge_band == 0:
        return None
    return EdgeSnap(band=settings.edge_band, beta=settings.edge_beta, max_voxels=settings.edge_max_voxels)


class BuiltinSession(EngineSession):
    """``settings``: how this session answers (the engine's own when None): a replayed log's."""

    def __init__(self, engine: BuiltinEngine, volume: Volume, settings: Optional[EngineSettings] = None):
        validate_image(volume)
        self.engine = engine
        self.settings = engine.settings if settings is None else settings
        self.edge_snap = edge_snap_of(self.settings)
        self.volume = volume
        self.array = volume.array
        self.shape = tuple(volume.array.shape)
        self.spacing_kji = tuple(volume.spacing[::-1])
        self.modality = guess_modality(volume)
        self.mask = np.zeros(self.shape, np.uint8)
        self.prompts: List[Prompt] = []
        self._version: Optional[str] = None  # the model version that made the current mask
        #: the model versions whose network answered a prompt of ``prompts``, in order of first use: more
        #: than one when a version went live while the session was open (the prompt log names them all)
        self.answered_by: Tuple[str, ...] = ()
        self._undo: List[_Step] = []
        self._redo: List[_Step] = []
        self._history_budget = history_budget_bytes(self.shape)
        self._closed = False
        self._refine_level: Optional[int] = None  # the level the last answer was refined at
        self._image_info: Optional[ImageInfo] = None  # computed when first asked for (the digest takes time)
        # the slab form of each points-form lasso reaching past the image (see _drawn), by id(prompt)
        # with the prompt itself, so that the id stays its own while it is held
        self._clipped: Dict[int, Tuple[Prompt, Prompt]] = {}

    # ----- public API ---------------------------------------------------------------------------
    def add_prompt(self, prompt: Prompt) -> MaskUpdate:
        """Answer one prompt. A dict or JSON text is refused (parse it with
        :func:`~SegAssistLib.prompts.parse_prompt`); a lasso reaching past the image's edge is drawn
        as its part in the image (:func:`~SegAssistLib.prompts.lasso_in_image`) and kept as given. A
        negative scribble or lasso clears its own voxels in the answer (:meth:`_erase`)."""
        self._check_open()
        prompt = require_prompt(prompt)
        t0 = time.perf_counter()
        answered = self.answered_by  # the versions whose network answered the prompts, with this one's
        # the version credited with the mask: the one answering, when the network ran
        if isinstance(prompt, MaskPrompt):  # to_array checks the box before it decodes (once)
            # the caller's mask: credited to the model that made it (a proposal), else to none (a segment)
            box, new_region, info, version = self._whole(), prompt.to_array(self.shape), {"levels": []}, prompt.made_by
        else:
            check_prompt_inside(prompt, self.shape)
            self._drawn(prompt)  # a lasso with nothing in the image is refused before anything changes
            if self._marks_background_only(prompt):  # nothing drawn: the mask's maker is unchanged
                box, new_region, info, version = _NOTHING, np.zeros((0, 0, 0), np.uint8), {"levels": []}, self._version
            else:
                (box, new_region, info), version = self._predict(prompt), self.engine.version
                answered = self.answered_by + (() if version in self.answered_by else (version,))
        update = self._commit(self.prompts + [prompt], box, new_region, version, answered)
        update.latency_s = time.perf_counter() - t0
        update.info = info
        return update

    def undo(self) -> MaskUpdate:
        self._check_open()
        if not self._undo:
            raise SessionError("nothing to undo")
        step = self._undo.pop()
        self._redo.append(step)
        before = step.before
        self._write(step.offset, before)
        self.prompts = list(step.prompts_before)
        self._version = step.version_before
        self.answered_by = step.answered_before
        return MaskUpdate(step.offset, before)

    def redo(self) -> MaskUpdate:
        self._check_open()
        if not self._redo:
            raise SessionError("nothing to redo")
        step = self._redo.pop()
        self._undo.append(step)
        after = step.after
        self._write(step.offset, after)
        self.prompts = list(step.prompts_after)
        self._version = step.version_after
        self.answered_by = step.answered_after
        return MaskUpdate(step.offset, after)

    def reset(self) -> MaskUpdate:
        self._check_open()
        return self._commit([], self._whole(), np.zeros(self.shape, np.uint8), None, ())

    def result(self) -> np.ndarray:
        self._check_open()
        return self.mask.copy()

    def prompt_log(self) -> PromptLog:
        """The prompts of the current mask; ``model`` names the version that made it (not the one
        answering now: a version swapped in since did not); ``models``, every version that answered its
        prompts when more than one did (a version promoted mid-session: no one model replays the log to
        its mask); ``engine``: the session's settings, which a replay needs as much as the prompts (an edge
        band of 0 or a deeper refinement answers otherwise)."""
        name = self.engine.capabilities().name
        model = None if self._version is None else f"{name}@{self._version}"
        models = [f"{name}@{v}" for v in self.answered_by] if len(self.answered_by) > 1 else None
        return PromptLog(model=model, models=models, engine=self.settings, prompts=list(self.prompts))

    def image_info(self) -> ImageInfo:
        """The session's image (grid and voxel digest, about 0.15 s for a CT the first time; the volume
        does not change while the session is open)."""
        if self._image_info is None:
            self._image_info = ImageInfo.from_volume(self.volume)
        return self._image_info

    def close(self) -> None:
        self._closed = True
        self.mask = np.zeros((0, 0, 0), np.uint8)
        self._undo.clear()
        self._redo.clear()
        self._clipped.clear()

    @property
    def model_version(self) -> Optional[str]:
        return self._version

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    # ----- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("session is closed")

    def _write(self, offset, voxels: np.ndarray) -> None:
        sl = tuple(slice(o, o + n) for o, n in zip(offset, voxels.shape))
        self.mask[sl] = voxels

    def _commit(
        self,
        prompts_after: List[Prompt],
        box: Tuple[slice, ...],
        new_region: np.ndarray,
        version: Optional[str],
        answered: Tuple[str, ...],
    ) -> MaskUpdate:
        """Make ``new_region`` (the mask inside ``box``, made by model ``version``) current, and ``answered``
        the versions that answered ``prompts_after``; record the change for undo."""
        old_region = self.mask[box]
        changed = old_region != new_region
        offset0 = tuple(s.start for s in box)
        if changed.any():
            lo, hi = [], []
            for axis in range(3):
                hit = np.flatnonzero(changed.any(axis=tuple(a for a in range(3) if a != axis)))
                lo.append(int(hit[0]))
                hi.append(int(hit[-1]) + 1)
            sub = tuple(slice(a, b) for a, b in zip(lo, hi))
            offset = tuple(int(o + a) for o, a in zip(offset0, lo))
            before, after = old_region[sub].copy(), np.ascontiguousarray(new_region[sub])
        else:
            offset, before = (0, 0, 0), np.zeros((0, 0, 0), np.uint8)
            after = before
        self._undo.append(_Step.make(self.prompts, prompts_after, offset, before, after, self._version, version,
                                     self.answered_by, answered))  # fmt: skip
        self._redo.clear()
        self._forget_oldest_steps()
        if after.size:
            self._write(offset, after)
        self.prompts = list(prompts_after)
        self._version = version
        self.answered_by = answered
        return MaskUpdate(offset, after.copy())

    def _forget_oldest_steps(self) -> None:
        """Keep the undo history within its budget and :data:`MAX_HISTORY_STEPS` steps (the latest
        step is always kept)."""
        held = sum(step.nbytes for step in self._undo)
        while (held > self._history_budget or len(self._undo) > MAX_HISTORY_STEPS) and len(self._undo) > 1:
            held -= self._undo.pop(0).nbytes

    def _marks_background_only(self, prompt: Prompt) -> bool:
        """A negative prompt in a session with no positive prompt and an empty mask says only what
        is not the structure: the answer adds nothing (the network, asked with no positive prompt,
        can draw a blob near a negative click). The prompt is kept and is drawn into later answers."""
        if getattr(prompt, "positive", True):
            return False
        if any(_says_where_the_structure_is(p) for p in self.prompts):
            return False
        return not self.mask.any()

    def _drawn(self, prompt: Prompt) -> Prompt:
        """The form of ``prompt`` the network and the edge snap are given (:func:`lasso_in_image`): a
        points-form lasso reaching past the image as its slab, cropped to the image, as the remote
        client sends it (the same lasso answers the same either way); made once per prompt."""
        held = self._clipped.get(id(prompt))
        if held is not None and held[0] is prompt:
            return held[1]
        drawn = lasso_in_image(prompt, self.shape)
        if drawn is not prompt:
            self._clipped[id(prompt)] = (prompt, drawn)
        return drawn

    def _whole(self) -> Tuple[slice, ...]:
        return tuple(slice(0, n) for n in self.shape)

    def _forward(self, window: patching.Window, prompts: List[Prompt]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, previous-mask patch) for one window."""
        patch = window.patch
        image = patching.extract_image_patch(self.array, window, self.modality)
        previous = patching.extract_mask_patch(self.mask, window)
        channels = draw_prompts(prompts_in_window(prompts, window, self.shape), patch)
        x = assemble_input(image, previous, channels)[None].to(self.engine.device)
        with torch.inference_mode():
            return self.engine.network(x)[0, 0].float().cpu(), previous

    def _first_level(self, prompt: Prompt) -> int:
        """The finest level that holds the prompt and spans at least ``min_view_mm`` on every axis.

        The floor matters on fine images (0.6 mm): there the finest view is 40 mm, too narrow to
        show a large object's edges, and the network answers a click inside the left atrium with
        a small blob that never reaches the window side, so the engine would never zoom out.
        """
        pts = prompt_vertices_kji(prompt)
        extent = pts.max(0) - pts.min(0) + 1
        top = patching.max_level(self.shape, self.spacing_kji, self.engine.patch)
        spacing = np.asarray(self.spacing_kji)
        for level in range(top + 1):
            size = np.asarray(patching.window_size(self.spacing_kji, self.engine.patch, level))
            if np.all(size >= extent * 1.25) and np.min(size * spacing) >= self.settings.min_view_mm * 0.99:
                return level
        return top

    def _change_reaches_open_side(self, logits: torch.Tensor, previous: torch.Tensor, window) -> bool:
        """Does the prediction change the mask on a window side inside the image?

        Only then is the answer cut by the window. Where the mask did not reach a side before, one
        changed voxel there is enough: something new (a new object, or a part the mask lacked)
        crosses it. Where the mask already crossed the side (a correction of an object larger than
        the window), more than ``correction_zoom_share`` of the side's voxels must change: redrawing
        that object's boundary a voxel differently where it crosses the side is no reason to predict
        the whole object again at a coarser level, which would undo the finer answers of earlier
        corrections (measured in the model card).
        """
        held = previous > 0.5
        changed = (logits > 0) != held
        at_edge = window.touches_image_border(self.shape)
        for axis in range(3):
            for side, index in ((0, 0), (1, changed.shape[axis] - 1)):
                if at_edge[side, axis]:
                    continue
                face = changed.select(axis, index)
                crossed_before = bool(held.select(axis, index).any())
                allowed = self.settings.correction_zoom_share * face.numel() if crossed_before else 0.0
                if int(face.sum()) > allowed:
                    return True
        return False

    def _predict(self, prompt: Prompt) -> Tuple[Tuple[slice, ...], np.ndarray, dict]:
        """(box of the image, new mask inside it, info). The session mask is left as it was."""
        patch = self.engine.patch
        prompts = [self._drawn(p) for p in self.prompts + [prompt]]
        pts = prompt_vertices_kji(prompts[-1])
        anchor = (pts.min(0) + pts.max(0)) / 2.0
        top = patching.max_level(self.shape, self.spacing_kji, patch)
        level = first = self._first_level(prompts[-1])
        while True:
            window = patching.window_around(anchor, self.spacing_kji, patch, level)
            logits, previous = self._forward(window, prompts)
            if not self._change_reaches_open_side(logits, previous, window):
                break
            if level >= top:  # no coarser view left: shifted to hold the whole image, it sees the rest
                covering = patching.covering(window, self.shape)
                if covering != window:
                    window = covering
                    logits, previous = self._forward(window, prompts)
                break
            level += 1
        box, _ = window.image_slices(self.shape)
        old = self.mask[box].copy()
        try:  # work in the session mask (it is the next windows' prior), then put the old box back
            self._paste(window, logits)
            self._refine_level = None
            tiles = self._refine(window, prompts, first, level) if level > first else 0
            new = self._snap(box, self.mask[box].copy(), prompts)
        finally:
            self.mask[box] = old
        box, new = self._erase(prompts[-1], box, new)
        info = {"levels": list(range(first, level + 1)), "refine_tiles": tiles, "refine_level": self._refine_level}
        return box, new, info

    def _erase(self, prompt: Prompt, box: Tuple[slice, ...], new: np.ndarray) -> Tuple[Tuple[slice, ...], np.ndarray]:
        """(box, new mask inside it): ``new`` (the answer inside ``box``) with the voxels of ``prompt``
        (the newest prompt, as drawn) cleared when it is a negative scribble or lasso, as the prompt
        kinds promise (a lasso: everything inside is background; a scribble: its stroke is). The
        network's answer and the edge snap only take them as a hint. Where the stroke reaches past
        ``box`` (a window smaller than the lasso) the box grows to hold it, so the returned update
        covers every voxel that changes."""
        if not isinstance(prompt, (ScribblePrompt, LassoPrompt)) or prompt.positive:
            return box, new
        voxels = stroke_voxels_in_image(prompt, self.shape)  # the voxels of its slab, in the image
        if len(voxels) == 0:
            return box, new
        start, stop = np.array([s.start for s in box]), np.array([s.stop for s in box])
        first, last = np.minimum(start, voxels.min(0)), np.maximum(stop, voxels.max(0) + 1)
        if np.any(first < start) or np.any(last > stop):
            grown_box = tuple(slice(int(a), int(b)) for a, b in zip(first, last))
            grown = self.mask[grown_box].copy()
            grown[tuple(slice(int(a - f), int(b - f)) for a, b, f in zip(start, stop, first))] = new
            box, new = grown_box, grown
        new[tuple((voxels - first).T)] = 0
        return box, new

    def _snap(self, box: Tuple[slice, ...], new: np.ndarray, prompts: List[Prompt]) -> np.ndarray:
        """``new`` (the answer inside ``box``) with its surface snapped to the image's edges, within
        ``box`` (the rest of the mask is earlier answers, already snapped)."""
        settings = self.edge_snap
        if settings is None or not new.any():
            return new
        margin = int(np.ceil(settings.band)) + 2
        lo, hi = [], []
        for axis in range(3):
            hit = np.flatnonzero(new.any(axis=tuple(a for a in range(3) if a != axis)))
            lo.append(max(0, int(hit[0]) - margin))
            hi.append(min(new.shape[axis], int(hit[-1]) + 1 + margin))
        if int(np.prod(np.subtract(hi, lo))) > settings.max_voxels:
            return new  # left as the network gave it: do not build seeds for nothing
        local = tuple(slice(a, b) for a, b in zip(lo, hi))
        crop = tuple(slice(s.start + a, s.start + b) for s, a, b in zip(box, lo, hi))
        marked_object, marked_background = seeds_from_prompts(prompts, crop, self.shape)
        new[local] = snap_to_edges(self.array[crop], new[local] > 0, self.spacing_kji, settings,
                                   marked_object, marked_background)
        return new

    def _paste(self, window: patching.Window, logits: torch.Tensor, cell=None) -> None:
        """Write the window's prediction into the session mask: all of the window's overlap with
        the image, or only ``cell`` (image voxel box lo, hi) when given."""
        start = np.asarray(window.start)
        if cell is None:
            img_sl, win_sl = window.image_slices(self.shape)
            self.mask[img_sl] = 0
            found = patching.positive_box(logits, window)
            if found is None:
                return
            lo = np.maximum(found[0], [s.start for s in win_sl])
            hi = np.minimum(found[1], [s.stop for s in win_sl])
        else:
            lo, hi = np.asarray(cell[0]) - start, np.asarray(cell[1]) - start
        if np.any(hi <= lo):
            return
        # slab by slab along the first axis: the float temporaries of a whole-body answer on a
        # 600 x 512 x 512 CT would take gigabytes at once
        rows = max(1, COMMIT_CHUNK_VOXELS // int((hi[1] - lo[1]) * (hi[2] - lo[2])))
        for a in range(int(lo[0]), int(hi[0]), rows):
            b = min(a + rows, int(hi[0]))
            values = patching.logits_in_box(logits, window, (a, lo[1], lo[2]), (b, hi[1], hi[2])) > 0
            target = (slice(a + int(start[0]), b + int(start[0])),
                      *(slice(int(x + t), int(y + t)) for x, y, t in zip(lo[1:], hi[1:], start[1:])))  # fmt: skip
            self.mask[target] = values.numpy()

    def _refine(self, window: patching.Window, prompts, first: int, level: int) -> int:
        """Re-predict the object's bounding box with finer tiles (at most the engine's max_refine_tiles)."""
        img_sl, _ = window.image_slices(self.shape)
        region = self.mask[img_sl]
        if not region.any():
            return 0
        offset = np.asarray([s.start for s in img_sl])
        lo_hi = []
        for axis in range(3):
            hit = np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis)))
            lo_hi.append((hit[0], hit[-1] + 1))
        # within the answer's box: a tile pasted beyond it would change the session mask where the
        # returned update (and undo) does not look, and _predict only restores the box
        lo = np.maximum(np.array([a for a, _ in lo_hi]) + offset - 2, offset)
        hi = np.minimum(np.array([b for _, b in lo_hi]) + offset + 2, [s.stop for s in img_sl])
        extent = hi - lo
        # refine_depth levels finer than the answer (default one: halves the blur at a bounded cost)
        r = max(0, level - self.settings.refine_depth)
        size = np.asarray(patching.window_size(self.spacing_kji, self.engine.patch, r))
        counts = np.maximum(1, np.ceil(extent / (size * 0.8)).astype(int))
        if counts.prod() > self.settings.max_refine_tiles:
            return 0
        self._refine_level = r
        edges = [np.linspace(a, b, n + 1).round().astype(int) for a, b, n in zip(lo, hi, counts)]
        cells = []
        for ci in range(counts[0]):
            for cj in range(counts[1]):
                for ck in range(counts[2]):
                    c_lo = np.array([edges[0][ci], edges[1][cj], edges[2][ck]])
                    c_hi = np.array([edges[0][ci + 1], edges[1][cj + 1], edges[2][ck + 1]])
                    cell = self.mask[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))]
                    if cell.any() and not cell.all():  # only cells the object's surface crosses
                        cells.append((c_lo, c_hi))
        # every tile sees the coarse answer as its prior: predict all, then paste
        results = []
        for c_lo, c_hi in cells:
            tile = patching.window_around((c_lo + c_hi - 1) / 2.0, self.spacing_kji, self.engine.patch, r)
            results.append((tile, self._forward(tile, prompts)[0], (c_lo, c_hi)))
        for tile, logits, cell in results:
            self._paste(tile, logits, cell=cell)
        return len(cells)


class BuiltinEngine(Engine):
    """The shipped network. Not thread-safe: one worker thread per device owns an engine."""

    def __init__(
        self,
        model: LoadedModel,
        device: str = "cpu",
        threads: Optional[int] = None,
        refine_depth: int = 1,
        max_refine_tiles: Optional[int] = None,
        min_view_mm: float = 64.0,
        correction_zoom_share: float = 0.025,
        edge_snap: Optional[EdgeSnap] = EdgeSnap(),
    ):
        """``refine_depth``: how many zoom levels finer than a zoomed-out answer its surface is
        re-predicted (1: the default; 2 sharpens large structures at about twice the latency of
        such clicks); ``max_refine_tiles``: no refinement when more tiles would be needed (default
        ``(refine_depth + 1) ** 3`` up to 64: 8 at depth 1, 27 at depth 2, as a finer level needs
        more tiles for the same surface); ``min_view_mm``: the narrowest view a prompt is first
        looked at (64 mm: what the shipped network sees at level 0 on 1 mm images; 0 turns the floor
        off); ``correction_zoom_share``: on a window side inside the image that the mask already
        crossed, a change zooms out only when it covers more than this share of the side (0.025:
        about 100 voxels of a 64^2 side; 0: any change, as on a side the mask did not reach);
        ``edge_snap``: how each answer's surface is snapped to the image's edges (None: not at all,
        the network's answer as it is)."""
        if max_refine_tiles is None:
            max_refine_tiles = min(64, (int(refine_depth) + 1) ** 3)
        snap = edge_snap or EdgeSnap()  # no snap: the default beta and max_voxels are recorded, unused
        #: what a prompt log records (:class:`~SegAssistLib.prompt_log.EngineSettings`); a session may be
        #: opened with others (a replayed log's). Out of its range (a refine depth of 17): a SettingsError
        #: (a ValueError) that says which, before anything else is set up
        self.settings = EngineSettings.checked(
            refine_depth=int(refine_depth),
            max_refine_tiles=int(max_refine_tiles),
            min_view_mm=float(min_view_mm),
            correction_zoom_share=float(correction_zoom_share),
            edge_band=0.0 if edge_snap is None else float(edge_snap.band),
            edge_beta=float(snap.beta),
            edge_max_voxels=int(snap.max_voxels),
        )
        if threads:
            torch.set_num_threads(threads)
        self.correction_zoom_share = float(correction_zoom_share)
        self.edge_snap = edge_snap
        self.refine_depth = int(refine_depth)
        self.min_view_mm = float(min_view_mm)
        self.max_refine_tiles = int(max_refine_tiles)
        self.model = model
        self.device = torch.device(device)
        self.network = model.network.to(self.device).eval()
        self.patch = int(model.config.patch_size)
        self.version = str(model.meta.get("version", model.identity))

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "cpu", threads: Optional[int] = None, **options):
        """``options``: ``refine_depth``, ``max_refine_tiles``, ``min_view_mm``, ``correction_zoom_share``,
        ``edge_snap`` (see the constructor)."""
        return cls(load_checkpoint(path, device), device, threads, **options)

    def swap_network(self, network: torch.nn.Module, version: str) -> None:
        """Switch weights (for example a merged adapter) without reopening sessions."""
        self.network = network.to(self.device).eval()
        self.version = version

    def capabilities(self) -> Capabilities:
        meta = self.model.meta
        return Capabilities(
            name=str(meta.get("name", "segassist-unet")),
            version=self.version,
            licence=str(meta.get("licence", "Apache-2.0")),
            prompt_kinds=PROMPT_KINDS,
            patch_size=(self.patch,) * 3,
            device=str(self.device),
            description=str(meta.get("description", "promptable 3D U-Net (MONAI), prompts as input channels")),
        )

    def open_session(
        self, volume: Volume, prompts: Optional[List[Prompt]] = None, settings: Optional[EngineSettings] = None
    ) -> BuiltinSession:
        """``settings``: the session's (None: this engine's, :attr:`settings`), such as a replayed
        log's, so that its prompts answer as they did; the weights are the engine's either way.
        ``prompts``: a list of prompt models (a log's ``PromptLog.prompts``; a dict or JSON text is
        refused with a :class:`PromptError`: parse it with :func:`~SegAssistLib.prompts.parse_prompt`)."""
        if prompts is not None and not isinstance(prompts, (list, tuple)):
            raise PromptError(
                f"prompts must be a list of prompts, got {type(prompts).__name__} (a JSON prompt log: "
                "read it with PromptLog.from_json and pass its .prompts)"
            )
        session = BuiltinSession(self, volume, settings)
        for prompt in prompts or []:
            session.add_prompt(prompt)
        return session


def load_default_engine(
    checkpoint: Optional[Union[str, Path]] = None, device: str = "cpu", threads: Optional[int] = None, **options
) -> BuiltinEngine:
    """The engine with the shipped weights (or ``checkpoint``); ``options`` as for :class:`BuiltinEngine`."""
    if checkpoint is None:
        check_bundled(DEFAULT_CHECKPOINT, "model")
    return BuiltinEngine.from_checkpoint(checkpoint or DEFAULT_CHECKPOINT, device, threads, **options)

