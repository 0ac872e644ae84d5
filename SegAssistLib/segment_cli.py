"""``segassist segment``: segment an image from prompt files, headless, on a local or remote backend.

The command-line twin of the Slicer batch script (``Resources/Examples/batch_segment.py``), without
Slicer: SegAssist JSON prompts (voxel coordinates ``(i, j, k)``: a prompt log, an object with a
``prompts`` list, or a list) are applied in order, and the mask is written on the image's grid as a
label map (``.nii.gz``, ``.nrrd``, ``.mha``, ...) or a Slicer segmentation (``.seg.nrrd``).

The model runs in this process by default (the shipped weights, or ``--model``); ``--url`` sends
the image to a SegAssist server instead, only with ``--send-images-to-remote``. Outputs are written
whole or not at all, and an existing file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import List

from SegAssistLib.cli_types import non_negative_int
from SegAssistLib.errors import SegAssistError
from SegAssistLib.files import output_problem

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".seg.nhdr")
TOKEN_VARIABLE = "SEGASSIST_REMOTE_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="segment an image from prompt files (local model or remote server)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("image", metavar="IMAGE", type=Path, help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder")
    p.add_argument("--prompts", required=True, type=Path, action="append", metavar="FILE",
                   help="SegAssist JSON prompts in voxel coordinates; repeat to apply several files in order")
    p.add_argument("--out", required=True, type=Path,
                   help="result: a label map (.nii.gz, .nrrd, .mha, ...) or a Slicer segmentation (.seg.nrrd)")
    p.add_argument("--log", type=Path, default=None, help="also write the session's prompt log (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --log when they exist")
    p.add_argument("--segment-name", default="SegAssist", help="segment name in a .seg.nrrd (default SegAssist)")
    p.add_argument("--channel", type=non_negative_int, default=None,
                   help="volume of a 4D image or component of a vector image")
    local = p.add_argument_group("local model (default)")
    local.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    local.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    local.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads (0: torch's choice)")
    remote = p.add_argument_group("remote server")
    remote.add_argument("--url", default="", help="SegAssist server URL, for example https://host:8470")
    remote.add_argument("--token", default=None, help=f"access token (default: ${TOKEN_VARIABLE})")
    remote.add_argument("--send-images-to-remote", action="store_true",
                        help="consent to send the image to --url (required with --url)")
    remote.add_argument("--allow-insecure-http", action="store_true",
                        help="allow sending the token over plain http to a host that is not this computer")
    p.set_defaults(func=run_segment)
    return p


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse before any work: an output that cannot be written, or would replace a file."""
    outputs = [("--out", args.out)] + ([("--log", args.log)] if args.log is not None else [])
    if args.log is not None and args.log.absolute() == args.out.absolute():
        raise SegAssistError(f"--log and --out are the same file: {args.out}")
    for flag, path in outputs:
        problem = output_problem(path)
        if problem:
            raise SegAssistError(f"{flag} {path}: {problem}")
        if path.exists() and not args.overwrite:
            raise SegAssistError(f"{flag} {path} exists: add --overwrite to replace it")
    if args.out.absolute() == args.image.absolute():
        raise SegAssistError(f"--out is the image itself: {args.out}")


def _engine(args: argparse.Namespace):
    if args.url:
        if not args.send_images_to_remote:
            raise SegAssistError(f"sending the image to {args.url} needs your consent: add --send-images-to-remote")
        from SegAssistLib.client import SegAssistClient

        token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE, "")
        return SegAssistClient(args.url, token or None, allow_insecure_token=args.allow_insecure_http)
    if args.token is not None or args.send_images_to_remote or args.allow_insecure_http:
        raise SegAssistError("--token, --send-images-to-remote and --allow-insecure-http need --url")
    from SegAssistLib.engine.builtin import load_default_engine

    return load_default_engine(args.model, args.device, args.threads or None)


def _progress(fraction: float, message: str) -> None:
    print(f"[{100 * fraction:5.1f} %] {message}", flush=True)


def _write_outputs(args: argparse.Namespace, run, volume) -> List[Path]:
    from SegAssistLib.files import atomic_write
    from SegAssistLib.io import save_mask_nifti, save_segmentation_nrrd
    from SegAssistLib.prompts import ImageInfo

    if args.out.name.lower().endswith(SEGMENTATION_SUFFIXES):
        names = (args.segment_name,)
        atomic_write(args.out, lambda tmp: save_segmentation_nrrd(run.mask, volume, tmp, names), args.overwrite)
    else:
        atomic_write(args.out, lambda tmp: save_mask_nifti(run.mask, volume, tmp), args.overwrite)
    written = [args.out]
    if args.log is not None:
        log = run.prompt_log.model_copy(update={"image": ImageInfo(shape_ijk=volume.shape_ijk, spacing=volume.spacing)})
        atomic_write(args.log, lambda tmp: log.save(tmp), args.overwrite)
        written.append(args.log)
    return written


def run_segment(args: argparse.Namespace) -> int:
    from SegAssistLib.headless import read_prompt_file, run_prompts
    from SegAssistLib.io import load_volume

    _check_outputs(args)
    volume = load_volume(args.image, channel=args.channel)
    image = (volume.shape_ijk, volume.spacing, f"image {args.image}")
    prompts = [prompt for path in args.prompts for prompt in read_prompt_file(path, image)]
    engine = _engine(args)
    try:
        run = run_prompts(engine, volume, prompts, _progress)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    written = _write_outputs(args, run, volume)
    median_ms = 1000 * statistics.median(run.latencies_s)
    print(f"{len(prompts)} prompts -> {run.voxel_count} voxels ({run.model}); median {median_ms:.0f} ms per prompt; "
          f"wrote {', '.join(str(p) for p in written)}", flush=True)
    if not run.voxel_count:
        print("warning: the result is empty", file=sys.stderr, flush=True)
    return 0
