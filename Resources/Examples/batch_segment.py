"""Segment an image from a prompt file, headless, and save the result as ``.seg.nrrd``.

In 3D Slicer (with the SegAssist extension installed, or its source folder as a module path)::

    Slicer --no-main-window --python-script batch_segment.py \\
        --image Resources/Samples/hippocampus_001_image.nii.gz \\
        --prompts Resources/Examples/hippocampus_001_prompts.json \\
        --out hippocampus_001.seg.nrrd

``--prompts`` takes SegAssist JSON (voxel coordinates (i, j, k) of the image: a prompt log, an
object with a ``prompts`` list, or a list) or a Slicer markups file (``.mrk.json``: point lists
are clicks, a label starting with ``-`` makes a point negative; an ROI is a box; a closed curve
a lasso; an open curve a scribble). Several ``--prompts`` files are applied in order.

A prompt log records the engine settings its answers came from (edge band, refine depth: schema 1.4).
``--in-process`` runs the model in this Python (it needs torch and MONAI there) and answers with
those settings, giving the recorded mask (logs recorded with different settings are then refused
together: no one setting replays them both). A backend answers with its own settings: the script warns
when they differ from a log's (the mask may differ), as it does for another model. A log recorded on
the image file as SimpleITK reads it (``segassist segment --log``) is replayed on the voxels in that
order, also where Slicer holds them in another (a left-handed file), so that it gives its mask.

The backend: by default a local one on this computer's CPU with the shipped model (``--model``,
``--device``, ``--threads``, ``--server-python`` change it). ``--url`` sends the image to a remote SegAssist
server instead, and only with ``--send-images-to-remote`` (explicit consent); its token comes
from ``--token`` or the environment variable ``SEGASSIST_REMOTE_TOKEN``. The local backend's options
are refused with ``--url`` (a server answers with its own model). Every prompt is checked against the
image (one outside it is named with its file and its number there) before a backend starts.

``--out`` is a ``.seg.nrrd`` (or ``.nrrd``) file, written whole or not at all: under a temporary name
beside it, then renamed into place, so that a failed write (a full disk) replaces nothing and leaves
nothing. A detached header (``.nhdr``, ``.seg.nhdr``) is refused: its data file, another name, could be
neither checked nor replaced as one with it. An existing ``--out`` is replaced only with
``--overwrite`` (also one that appears while the script runs), and never when it is the image itself or
one of the ``--prompts`` files (checked before the image is read).

The same script runs in any Python with slicer-core (``pip install slicer-core``): then it uses a
scene of its own. Exit status: 0 on success, 1 on an error (the message says why; an unexpected
one prints its traceback), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional


def _ensure_library_path() -> None:
    """From a source checkout: SegAssistLib is two folders up (an installed extension has it on sys.path)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "SegAssistLib" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nrrd")  # one file: a detached .nhdr header writes its data beside it


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, type=Path, help="image file (NRRD, NIfTI, MHA, ...)")
    p.add_argument("--prompts", required=True, type=Path, action="append", help="SegAssist JSON or .mrk.json")
    p.add_argument("--out", required=True, type=Path, help="result .seg.nrrd")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (never the image)")
    p.add_argument("--segment-name", default="SegAssist", help="name of the segment (default SegAssist)")
    from SegAssistLib.cli_types import non_negative_int

    local = p.add_argument_group("local backend (default; not with --url)")
    local.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    local.add_argument("--device", default=None, help="cpu or cuda:N (default cpu)")
    local.add_argument("--threads", type=non_negative_int, default=None,
                       help="CPU threads of the model (default 0: torch's choice)")
    local.add_argument("--server-python", default=None, help="a Python with torch, MONAI and FastAPI")
    local.add_argument(
        "--in-process",
        action="store_true",
        help="run the model in this Python (needs torch and MONAI), no backend: a prompt log is answered with "
        "the engine settings it records",
    )
    remote = p.add_argument_group("remote backend")
    remote.add_argument("--url", default="", help="SegAssist server URL, for example https://host:8470")
    remote.add_argument("--token", default=os.environ.get("SEGASSIST_REMOTE_TOKEN", ""),
                        help="access token (give it as --token=TOKEN when it starts with '-')")
    remote.add_argument(
        "--send-images-to-remote", action="store_true", help="consent to send the image to --url (required)"
    )
    remote.add_argument("--allow-insecure-http", action="store_true", help="allow the token over plain http")
    remote.add_argument("--ca-bundle", type=Path, default=None, metavar="PATH",
                        help="PEM file of the certificates to trust for an https --url (a self-signed server's own)")
    args = p.parse_args(argv)
    if not args.out.name.lower().endswith(SEGMENTATION_SUFFIXES):  # Slicer would write NRRD under any name
        p.error(f"--out {args.out}: a segmentation is written as {' or '.join(SEGMENTATION_SUFFIXES)} (one file; "
                "not a detached .nhdr header)")
    if args.ca_bundle is not None and not args.url:
        p.error("--ca-bundle verifies the certificate of an https --url: give --url")
    if args.in_process and (args.url or args.server_python):
        p.error("--in-process runs the model in this Python: not with --url or --server-python")
    local = [flag for flag, name in LOCAL_OPTIONS.items() if getattr(args, name) is not None]
    if args.url and local:
        p.error(f"{', '.join(local)}: the local backend's, not --url: a server answers with its own model")
    return args


#: the local backend's options (flag: argparse name), refused with --url
LOCAL_OPTIONS = {"--model": "model", "--device": "device", "--threads": "threads", "--server-python": "server_python"}


def backend_settings(args: argparse.Namespace):
    from SegAssistLib.slicer.backend import BackendSettings

    if args.url:
        return BackendSettings(
            mode="remote",
            remote_url=args.url,
            remote_token=args.token,
            remote_opt_in=bool(args.send_images_to_remote),
            allow_insecure_http=bool(args.allow_insecure_http),
            remote_ca_bundle=str(args.ca_bundle or ""),
        )
    return BackendSettings(
        mode="local",
        local_model=str(args.model or ""),
        local_device=args.device or "cpu",
        local_threads=int(args.threads or 0),
        local_python=args.server_python or "",
    )


def in_process_engine(args: argparse.Namespace):
    """The model in this Python (--in-process): a session of it answers with a log's engine settings."""
    from SegAssistLib.errors import SegAssistError

    try:
        from SegAssistLib.engine.builtin import load_default_engine
    except ImportError as exc:  # Slicer's Python has no torch unless it was installed there
        raise SegAssistError(
            f"--in-process needs torch and MONAI in this Python ({exc}): install them, or leave it out to use a backend"
        ) from exc
    return load_default_engine(args.model, args.device or "cpu", args.threads or None)


def write_segmentation(node, out: Path, overwrite: bool) -> None:
    """Write ``node`` as ``out`` whole or not at all: under a temporary name beside it, then renamed into
    place (without ``overwrite`` published as a hard link, which fails on a file that appeared meanwhile),
    so that a failed write (a full disk) replaces nothing and leaves no partial file."""
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.files import atomic_write
    from SegAssistLib.slicer import segments

    try:
        atomic_write(out, lambda tmp: segments.save_segmentation(node, tmp), overwrite=overwrite)
    except FileExistsError:
        raise SegAssistError(f"--out {out} appeared while the script ran: not replaced (add --overwrite to "
                             "replace it)") from None  # fmt: skip
    except (SegAssistError, OSError) as exc:  # the temporary file is gone: name the one asked for
        reason = "Slicer's segmentation writer failed (a full disk?)" if isinstance(exc, SegAssistError) else (
            exc.strerror or str(exc))  # fmt: skip
        raise SegAssistError(f"--out {out} not written, nothing replaced: {reason}") from exc
    storage = node.GetStorageNode()
    if storage is not None:  # the node's file is the one published, not the temporary name
        storage.SetFileName(str(out))


def run(args: argparse.Namespace, scene, markups_logic):
    """Load, segment, save; returns the SegmentationResult. Raises SegAssistError with the reason."""
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.headless import check_prompts, distinct_settings, model_note, replay_order, settings_notes
    from SegAssistLib.segment_cli import check_output_files
    from SegAssistLib.slicer import volumes
    from SegAssistLib.slicer.backend import BackendManager
    from SegAssistLib.slicer.logic import load_prompt_files, recorded_settings, segment_volume

    # as segassist segment: an existing --out only with --overwrite, never the image itself nor a prompt file
    check_output_files([("--out", args.out)], args.image, args.overwrite, args.prompts)
    if args.url and not args.send_images_to_remote:
        raise SegAssistError(f"sending the image to {args.url} needs your consent: add --send-images-to-remote")
    volume_node = volumes.load_volume_file(scene, args.image)
    files = load_prompt_files(args.prompts, volume_node, markups_logic)  # the voxel digest once for all
    prompts = [prompt for file in files for prompt in file.prompts]
    replay_order(files)  # logs recorded in different voxel orders of the image: refused before any model loads
    check_prompts(files, volume_node.GetImageData().GetDimensions()[::-1])  # none, or outside: before a backend
    # in process the logs' settings are applied: logs recorded with different ones are refused here; a
    # backend answers with its own, and each log's that differ is told after the run
    recorded = distinct_settings(files)
    settings = recorded_settings(files) if args.in_process else (recorded[0] if len(recorded) == 1 else None)
    manager = None if args.in_process else BackendManager(backend_settings(args))
    try:
        result = segment_volume(
            in_process_engine(args) if manager is None else manager.client(),
            volume_node,
            files,  # whole: each log replayed in the voxel order it was recorded in
            segment_name=args.segment_name,
            progress=lambda fraction, message: print(f"[{100 * fraction:5.1f} %] {message}", flush=True),
            settings=settings,
        )
    finally:
        if manager is not None:
            manager.close()
    if settings is None and len(recorded) > 1:  # a backend, logs of several settings
        result.notes.extend(settings_notes(files, result.prompt_log.engine, result.model))
    write_segmentation(result.segmentation_node, args.out, args.overwrite)
    print(f"{len(prompts)} prompts -> {result.voxel_count} voxels ({result.model}); wrote {args.out}", flush=True)
    for file in files:  # a log recorded on another scan of this grid (same geometry, other voxel values)
        for note in file.notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    for note in result.notes:  # the backend answered with other engine settings than the log's
        print(f"warning: {note}", file=sys.stderr, flush=True)
    other_model = model_note(files, result.prompt_log.model)
    if other_model:
        print(f"warning: {other_model}", file=sys.stderr, flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    _ensure_library_path()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return int(exc.code or 0)
    import slicer

    from SegAssistLib.errors import SegAssistError

    in_slicer = hasattr(slicer, "app")
    context = None
    if in_slicer:
        scene, markups_logic = slicer.mrmlScene, slicer.modules.markups.logic()
    else:
        from SegAssistLib.slicer.scene import create_headless_scene

        context = create_headless_scene()
        scene, markups_logic = context.scene, context.markups_logic
    try:
        run(args, scene, markups_logic)
    except (SegAssistError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception:  # a bug: the traceback, and an exit status (Slicer would otherwise keep running)
        traceback.print_exc()
        return 1
    finally:
        if context is not None:
            context.close()
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:  # before main's own handling (SegAssistLib not found, ...): Slicer must still exit
        traceback.print_exc()
        status = 1
    try:
        import slicer

        if hasattr(slicer, "app"):
            slicer.util.exit(status)
    except ImportError:
        pass
    sys.exit(status)
