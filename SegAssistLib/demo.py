"""``segassist demo``: an interactive session driven by a simulated user, on the bundled sample.

Two short sessions on the same image and target:

1. clicks: a first click at the object's most interior voxel, then correction clicks at the
   largest error (the evaluation protocol's user);
2. a 2D box on the axial slice through the object, then a scribble, then a correction click.

Each interaction prints the Dice against the reference and the latency. The better final mask is
written as ``.nii.gz`` and ``.seg.nrrd`` with a PNG of three orthogonal slices and the prompt log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.cli_types import non_negative_int
from SegAssistLib.datasets import REPO_ROOT
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.runner import label_on_image_grid
from SegAssistLib.evaluation.simulator import first_click, next_click, scribble_prompt
from SegAssistLib.files import atomic_write_many, check_bundled, output_problem
from SegAssistLib.io import load_mask, load_volume, save_mask_nifti, save_segmentation_nrrd
from SegAssistLib.learning.sources import image_stem
from SegAssistLib.prompt_log import ImageInfo
from SegAssistLib.prompts import BoxPrompt, Prompt
from SegAssistLib.segment_cli import same_file

SAMPLE_IMAGE = REPO_ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_LABEL = REPO_ROOT / "Resources" / "Samples" / "hippocampus_001_label.nii.gz"
OUTPUT_NAMES = ("segmentation.nii.gz", "segmentation.seg.nrrd", "overlay.png", "prompts.json", "summary.json")


def check_output_folder(out: Path, overwrite: bool, inputs: Sequence[Tuple[str, Optional[Path]]] = ()) -> None:
    """Refuse, before the model runs, an output folder that cannot be written, one where an output would
    be one of the ``inputs`` (``(flag, path)``: the image and the label, never replaced, even with
    ``overwrite``), or that holds an earlier run's files (replaced only with ``overwrite``)."""
    problem = output_problem(out, folder=True)
    if problem:
        raise SegAssistError(f"--out {out}: {problem}")
    for name in OUTPUT_NAMES:
        for flag, given in inputs:
            if given is not None and same_file(out / name, Path(given)):  # through '..' or a link as well
                raise SegAssistError(f"--out {out}: its {name} is the {flag} file {given}, which the demo never "
                                     "replaces (even with --overwrite): choose another --out")
    held = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if held and not overwrite:
        raise SegAssistError(f"--out {out} already holds {', '.join(held)} of an earlier run: "
                             "pass --overwrite to replace them, or choose another --out")


def check_extras() -> None:
    """The model needs the engine's packages and the PNG of the result matplotlib: what this install lacks
    is said at once, in one line naming every extra that brings it, before the model loads (not after
    both sessions ran)."""
    from SegAssistLib.cli import EXTRA_OF

    missing = [name for name, extra in EXTRA_OF.items() if extra in ("engine", "evaluation") and not _importable(name)]
    if missing:
        extras = ",".join(sorted({EXTRA_OF[name] for name in missing}))
        raise SegAssistError(f"segassist demo needs {', '.join(missing)}, which this install lacks: "
                             f"pip install 'segassist[{extras}]'")


def _importable(module: str) -> bool:
    """Whether ``module`` can be found (not imported: torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module without a spec
        return False


def segment_name(label: Optional[Path], label_values: Sequence[int]) -> str:
    """The segment's name in ``segmentation.seg.nrrd``: the bundled sample's structure, else the label
    file's name and the label values of the target (``liver_seg label 5``)."""
    if label is None:
        return "SegAssist"
    if Path(label).resolve() == SAMPLE_LABEL.resolve():
        return "hippocampus"
    stem = image_stem(Path(label))
    values = "+".join(str(v) for v in label_values)
    return f"{stem} label{'s' if len(label_values) > 1 else ''} {values}"


def axial_box(target: np.ndarray) -> BoxPrompt:
    """The bounding box of the target on its largest axial slice, as a 2D box. A cross-section one voxel
    wide (a thin structure) is widened by a voxel on each side, within the image: a box flat along two
    axes is no box."""
    k = int(np.argmax(target.sum(axis=(1, 2))))
    nz = np.argwhere(target[k])
    lo, hi = nz.min(0), nz.max(0)
    for axis, size in enumerate(target.shape[1:]):
        if lo[axis] == hi[axis]:
            lo[axis], hi[axis] = max(lo[axis] - 1, 0), min(hi[axis] + 1, size - 1)
    (j0, i0), (j1, i1) = lo, hi
    try:
        return BoxPrompt(min_corner=(i0, j0, k), max_corner=(i1, j1, k))
    except ValueError as exc:  # an image one voxel wide: no box fits
        raise SegAssistError(f"the target's axial cross-section cannot be sent as a box: {exc}") from exc


def _run(session, target, spacing, prompts: List[Prompt], n_clicks: int, label: str, rows: list):
    for prompt in prompts:
        update = session.add_prompt(prompt)
        rows.append(
            (
                label,
                prompt.kind + ("+" if getattr(prompt, "positive", True) else "-"),
                dice(session.result(), target),
                update.latency_s,
            )
        )
        print(f"  {label:8s} {rows[-1][1]:10s} Dice {rows[-1][2]:.3f}   {1000 * update.latency_s:7.1f} ms", flush=True)
    for _ in range(n_clicks):
        click = next_click(target, session.result(), spacing)
        if click is None:
            break
        update = session.add_prompt(click)
        rows.append(
            (label, "click" + ("+" if click.positive else "-"), dice(session.result(), target), update.latency_s)
        )
        print(f"  {label:8s} {rows[-1][1]:10s} Dice {rows[-1][2]:.3f}   {1000 * update.latency_s:7.1f} ms", flush=True)


def run_demo(
    out: Path,
    image: Path = SAMPLE_IMAGE,
    label: Optional[Path] = SAMPLE_LABEL,
    label_values: tuple = (1, 2),
    model: Optional[Path] = None,
    channel: Optional[int] = None,
    overwrite: bool = True,
) -> dict:
    """Run the two sessions and write the outputs into ``out``; ``overwrite=False`` refuses, before the
    model runs, a folder that holds an earlier run's files (the command line's default)."""
    from SegAssistLib.engine.builtin import load_default_engine
    from SegAssistLib.visualize import save_overlay_png

    check_output_folder(out, overwrite, (("--image", image), ("--label", label)))  # before the model runs
    check_extras()
    volume = load_volume(image, channel=channel)
    # the check of segassist eval (Dice of a moved label lies); a label stored with an axis reversed is turned back
    labels, problem = label_on_image_grid(label, load_mask(label), volume)
    if problem:
        raise SegAssistError(f"label {label}: {problem}")
    target = np.isin(labels, label_values)
    if not target.any():
        raise SegAssistError(f"label {label} holds none of the values {', '.join(map(str, label_values))} (--labels)")
    # the simulated user's first prompts, from the target alone: one it cannot make is refused before the model loads
    clicks = [first_click(target, volume.spacing)]
    box = [axial_box(target), scribble_prompt(target, volume.spacing)]
    engine = load_default_engine(model)
    caps = engine.capabilities()
    print(
        f"model {caps.name} {caps.version} ({caps.licence}) on {caps.device}; image {image.name} "
        f"{volume.shape_ijk} voxels, spacing {tuple(round(s, 3) for s in volume.spacing)}"
    )
    rows: list = []
    finals = []
    session = engine.open_session(volume)
    _run(session, target, volume.spacing, clicks, 4, "clicks", rows)
    finals.append((dice(session.result(), target), session.result(), session.prompt_log()))
    session = engine.open_session(volume)
    _run(session, target, volume.spacing, box, 1, "box", rows)
    finals.append((dice(session.result(), target), session.result(), session.prompt_log()))
    best_dice, mask, log = max(finals, key=lambda f: f[0])
    name = segment_name(label, label_values)
    title = f"SegAssist demo: Dice {best_dice:.3f} (orange: result, green: reference)"
    # with the image it was made on, as `segassist segment --log` writes it: replayed on another image, refused
    log = log.model_copy(update={"image": ImageInfo.from_volume(volume)})
    latencies = [r[3] for r in rows]
    summary = {
        "image": str(image),
        "model": f"{caps.name}@{caps.version}",
        "interactions": [
            {"session": r[0], "prompt": r[1], "dice": round(r[2], 4), "latency_s": round(r[3], 4)} for r in rows
        ],
        "final_dice": round(best_dice, 4),
        "median_latency_s": round(float(np.median(latencies)), 4),
    }
    files = [
        ("segmentation.nii.gz", lambda p: save_mask_nifti(mask, volume, p)),
        ("segmentation.seg.nrrd", lambda p: save_segmentation_nrrd(mask, volume, p, segment_names=(name,))),
        ("overlay.png",
         lambda p: save_overlay_png(volume, mask, p, reference=target, prompts=log.prompts, title=title)),
        ("prompts.json", lambda p: log.save(p)),
        ("summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1), encoding="utf-8")),
    ]
    _write_all(out, files, overwrite)
    print(f"final Dice {best_dice:.3f}; median latency {1000 * summary['median_latency_s']:.1f} ms")
    print(f"wrote {out}/segmentation.nii.gz, segmentation.seg.nrrd, overlay.png, prompts.json, summary.json")
    return summary


def _write_all(out: Path, files: list, overwrite: bool) -> None:
    """Write the demo's files into ``out`` all or none, each whole (an interrupted run leaves no half-written
    one); without ``overwrite`` none replaces a file, also one that appeared since the folder was checked
    (another run into the same folder): the run is refused, and nothing of it is kept."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_many([(out / name, writer) for name, writer in files], overwrite=overwrite)
    except FileExistsError:
        held = [name for name, _ in files if (out / name).exists()]
        raise SegAssistError(f"--out {out}: {', '.join(held)} appeared while the demo ran (another run?): nothing "
                             "written; pass --overwrite to replace them, or choose another --out") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="interactive session with a simulated user on the bundled sample")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--image", type=Path, help="image file or DICOM folder (default: the bundled sample)")
    p.add_argument("--label", type=Path, help="reference label map on the image's grid (needed with --image)")
    p.add_argument("--labels", default="1,2", help="label values that make the target (default 1,2)")
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    p.add_argument("--channel", type=non_negative_int, help="volume of a 4D image or component of a vector image")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if (args.image is None) != (args.label is None):
        given, missing = ("--image", "--label") if args.image is not None else ("--label", "--image")
        raise SegAssistError(f"{given} needs {missing}: the simulated user clicks where the reference label says")
    image, label = (args.image, args.label) if args.image is not None else (SAMPLE_IMAGE, SAMPLE_LABEL)
    if args.image is None:
        check_bundled(SAMPLE_IMAGE, "sample image")
        check_bundled(SAMPLE_LABEL, "sample label")
    try:
        values = tuple(int(v) for v in args.labels.split(","))
    except ValueError:
        raise SegAssistError(f"--labels {args.labels!r}: give label values separated by commas, e.g. 1,2") from None
    if any(v < 1 for v in values):
        raise SegAssistError(f"--labels {args.labels!r}: label values are 1 or more (0 is the background)")
    run_demo(args.out, image, label, values, args.model, args.channel, overwrite=args.overwrite)
    return 0
