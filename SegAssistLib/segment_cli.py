"""``segassist segment``: segment an image from prompt files, headless, on a local or remote backend.

The command-line twin of the Slicer batch script (``Resources/Examples/batch_segment.py``), without
Slicer: SegAssist JSON prompts (voxel coordinates ``(i, j, k)``: a prompt log, an object with a
``prompts`` list, or a list) are applied in order, and the mask is written on the image's grid as a
label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or a Slicer segmentation (``.seg.nrrd``); any other
``--out`` is refused before the image is read.

The model runs in this process by default (the shipped weights, or ``--model``); ``--url`` sends
the image to a SegAssist server instead (``http(s)://host:port``), only with ``--send-images-to-remote``;
a token goes over plain http only to this computer, or with ``--allow-insecure-http``; the local model's
options are refused with it. Outputs are written whole or not at all (``--out`` and ``--log`` both or
neither), an existing file is replaced only with ``--overwrite``, and never the image or a ``--prompts``
file. Every prompt is checked against the image (one outside it named by its file and its number there)
before the model loads or the image is sent.

A prompt log that records the engine settings it was answered with (schema 1.4: ``segassist serve
--edge-band 0``, ``--refine-depth 2``, ...) is replayed with them, so that it gives the recorded mask;
``--refine-depth`` and ``--edge-band`` replace the log's (a note says so). Logs recorded with settings
that differ where no option replaces them are refused together (no one setting replays them both). A
server (``--url``) answers with its own settings: a warning says when they differ from a log's. A log
recorded on an image of the same grid with other voxel values (its ``image.sha256``: another scan of
the same protocol, a follow-up) is replayed, with a warning that the mask may differ; ``--log`` records
the image's digest (computed once for the whole replay).

A log recorded on the same scan stored with some axes in reverse order (a copy re-saved the other way)
is replayed on the image put back in the log's voxel order, and the mask turned back: the network is
not flip-symmetric, so this is what gives the recorded mask. ``--log`` then records the prompts and the
image in that order.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from SegAssistLib.cli_types import MASK_SUFFIXES, is_mask_path, non_negative_int
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.cli import edge_band, refine_depth
from SegAssistLib.files import output_problem

SEGMENTATION_SUFFIXES = (".seg.nrrd",)  # the rest of MASK_SUFFIXES are label maps
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
                   help="result: a label map (.nii.gz, .nii, .nrrd, .mha) or a Slicer segmentation (.seg.nrrd)")
    p.add_argument("--log", type=Path, default=None, help="also write the session's prompt log (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --log when they exist")
    p.add_argument("--segment-name", default="SegAssist", help="segment name in a .seg.nrrd (default SegAssist)")
    p.add_argument("--channel", type=non_negative_int, default=None,
                   help="volume of a 4D image or component of a vector image")
    local = p.add_argument_group("local model (default; not with --url)")
    local.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    local.add_argument("--device", default=None, help="cpu or cuda:N (default cpu)")
    local.add_argument("--threads", type=non_negative_int, default=None, help="CPU threads (default 0: torch's choice)")
    local.add_argument("--refine-depth", type=refine_depth, default=None, metavar="N",
                       help="re-predict zoomed-out answers this many levels finer (default: the prompt log's, "
                            "else 1)")
    local.add_argument("--edge-band", type=edge_band, default=None, metavar="B",
                       help="half-width in voxels of the band of each answer's surface snapped to the image's edges "
                            "(default: the prompt log's, else 2; 0: off)")
    remote = p.add_argument_group("remote server")
    remote.add_argument("--url", default="", help="SegAssist server URL with its scheme, for example https://host:8470")
    remote.add_argument("--token", default=None,
                        help=f"access token (default: ${TOKEN_VARIABLE}); give it as --token=TOKEN when it starts "
                             "with '-'")
    remote.add_argument("--send-images-to-remote", action="store_true",
                        help="consent to send the image to --url (required with --url)")
    remote.add_argument("--allow-insecure-http", action="store_true",
                        help="allow sending the token over plain http to a host that is not this computer")
    remote.add_argument("--ca-bundle", type=Path, default=None, metavar="PATH",
                        help="PEM file of the certificate authorities (or the self-signed certificate) an https "
                             "--url is verified with (default: the system's)")
    p.set_defaults(func=run_segment)
    return p


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: through ``..``, links and a folder's other names
    (``os.path.samefile`` when both exist, else the paths resolved)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a link that loops (RuntimeError before Python 3.13)
        return a.absolute() == b.absolute()


def check_output_files(
    outputs: Sequence[Tuple[str, Path]], image: Path, overwrite: bool, prompts: Sequence[Path] = ()
) -> None:
    """Refuse, before any work, an output (``(flag, path)`` pairs, named by their flag) that cannot be
    written (:func:`~SegAssistLib.files.output_problem`), that exists while ``overwrite`` is false, or
    that is the image itself or one of the ``prompts`` files (the inputs, never replaced, even with
    ``overwrite``); and two outputs that are one file. Shared by ``segassist segment`` and the Slicer
    batch script (``Resources/Examples/batch_segment.py``)."""
    for (flag, path), (other_flag, other) in itertools.combinations(outputs, 2):
        if same_file(path, other):
            raise SegAssistError(f"{other_flag} and {flag} are the same file: {path}")
    for flag, path in outputs:
        problem = output_problem(path)
        if problem:
            raise SegAssistError(f"{flag} {path}: {problem}")
        if same_file(path, image):  # through '..' or a link: --overwrite replaced the scan
            raise SegAssistError(f"{flag} is the image itself: {path}")
        if any(same_file(path, given) for given in prompts):  # the user's prompts replaced by the log
            raise SegAssistError(f"{flag} is one of the --prompts files: {path}; write it elsewhere")
        if path.exists() and not overwrite:
            raise SegAssistError(f"{flag} {path} exists: add --overwrite to replace it")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse before any work: an --out SimpleITK would write in another format than a mask, an output
    that cannot be written, or would replace a file (:func:`check_output_files`)."""
    # SimpleITK picks its writer by the suffix (.png was a slice); a path that cannot be written says that first
    if not is_mask_path(args.out) and not output_problem(args.out):
        raise SegAssistError(f"--out {args.out}: write the result as {', '.join(MASK_SUFFIXES)} "
                             "(a label map, or a Slicer segmentation with .seg.nrrd)")
    outputs = [("--out", args.out)] + ([("--log", args.log)] if args.log is not None else [])
    check_output_files(outputs, args.image, args.overwrite, args.prompts)


#: the options of the model in this process (flag: argparse name), refused with --url
LOCAL_OPTIONS = {"--model": "model", "--device": "device", "--threads": "threads", "--refine-depth": "refine_depth",
                 "--edge-band": "edge_band"}  # fmt: skip


def _remote_token(args: argparse.Namespace) -> Optional[str]:
    """The token for --url (``--token``, else ``$SEGASSIST_REMOTE_TOKEN``; None: none), refused with the
    flag to change when the client would refuse it: checked before the image is read."""
    from SegAssistLib.client.http import is_loopback_host

    if not args.url:
        if args.token is not None or args.send_images_to_remote or args.allow_insecure_http or args.ca_bundle:
            raise SegAssistError("--token, --send-images-to-remote, --allow-insecure-http and --ca-bundle need --url")
        return None
    local = [flag for flag, value in LOCAL_OPTIONS.items() if getattr(args, value) is not None]
    if local:
        flags = " and ".join([", ".join(local[:-1]), local[-1]] if len(local) > 1 else local)
        raise SegAssistError(f"{flags} {'sets' if len(local) == 1 else 'set'} the local model: a server (--url) "
                             "answers with its own model and settings (segassist serve --model, --device, "
                             "--refine-depth, --edge-band)")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SegAssistError(f"--url {args.url}: give the server as http(s)://host:port, for example "
                             f"https://{parts.netloc or args.url.split('://')[-1]}")
    _check_ca_bundle(args.ca_bundle, parts.scheme)
    if not args.send_images_to_remote:
        raise SegAssistError(f"sending the image to {args.url} needs your consent: add --send-images-to-remote")
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE, "")
    token = token.strip() or None  # a token read from a file keeps its newline
    source = "--token" if args.token is not None else f"${TOKEN_VARIABLE}"
    if token and any(ch.isspace() or not ch.isprintable() for ch in token):
        raise SegAssistError(f"the token ({source}) holds spaces or control characters")  # never echo it
    if token and parts.scheme == "http" and not is_loopback_host(parts.hostname or "") and not args.allow_insecure_http:
        raise SegAssistError(f"refusing to send the token ({source}) in clear text to {parts.hostname}: use an "
                             "https:// --url, or add --allow-insecure-http on a network you trust")
    return token


def _check_ca_bundle(ca_bundle: Optional[Path], scheme: str) -> None:
    """--ca-bundle names certificates to verify an https server with: refused for http, or when missing."""
    if ca_bundle is None:
        return
    if scheme != "https":
        raise SegAssistError("--ca-bundle verifies the certificate of an https:// --url: plain http has none")
    if not ca_bundle.exists():  # requests takes a PEM file, or a folder of hashed certificates
        raise SegAssistError(f"--ca-bundle {ca_bundle}: no such file")


def _tls_hint(exc: SegAssistError, ca_bundle: Optional[Path]) -> Optional[SegAssistError]:
    """When ``exc`` says the server's TLS certificate was not trusted: one line that says to give the
    certificate (or its authority's) with --ca-bundle; None for any other error."""
    from SegAssistLib.client.http import TLS_UNTRUSTED  # here: the command line starts without requests

    if getattr(exc, "code", None) != TLS_UNTRUSTED:
        return None
    url, reason = exc.details.get("url"), exc.details.get("reason") or "not trusted"
    if ca_bundle is not None:
        return SegAssistError(f"the TLS certificate of {url} did not verify with --ca-bundle {ca_bundle} ({reason})")
    return SegAssistError(f"the TLS certificate of {url} could not be verified ({reason}): give the server's "
                          "certificate, or its certificate authority's, with --ca-bundle PATH")


def _engine(args: argparse.Namespace, token: Optional[str]):
    if args.url:
        from SegAssistLib.client import SegAssistClient

        verify = str(args.ca_bundle) if args.ca_bundle is not None else True
        try:
            return SegAssistClient(args.url, token, verify=verify, allow_insecure_token=args.allow_insecure_http)
        except ValueError as exc:  # what _remote_token did not foresee: one line, not a traceback
            raise SegAssistError(f"--url {args.url}: {exc}") from exc
    from SegAssistLib.engine.builtin import load_default_engine
    from SegAssistLib.engine.edges import EdgeSnap

    options = {}
    if args.refine_depth is not None:
        options["refine_depth"] = args.refine_depth
    if args.edge_band is not None:
        options["edge_snap"] = EdgeSnap.from_band(args.edge_band)
    return load_default_engine(args.model, args.device or "cpu", args.threads or None, **options)


REFINE_FIELDS = ("refine_depth", "max_refine_tiles")  # the engine settings --refine-depth sets
EDGE_FIELDS = ("edge_band", "edge_beta", "edge_max_voxels")  # those --edge-band sets


def _replaced_fields(args: argparse.Namespace) -> List[str]:
    """The engine settings the options replace on the local model (those the logs may differ in)."""
    return [*(REFINE_FIELDS if args.refine_depth is not None else ()),
            *(EDGE_FIELDS if args.edge_band is not None else ())]  # fmt: skip


def _replay_settings(args: argparse.Namespace, engine, files, recorded):
    """The engine settings the prompts are answered with on the local model: the logs' (``recorded``,
    :func:`~SegAssistLib.headless.recorded_settings`, which refused logs that differ elsewhere; None:
    none recorded, the engine's own), but for those --refine-depth and --edge-band set (a note says
    which differ from each log's)."""
    from SegAssistLib.headless import distinct_settings

    if recorded is None:
        return None
    own, flags = engine.settings, []
    update = {name: getattr(own, name) for name in _replaced_fields(args)}
    if args.refine_depth is not None:
        flags.append(f"--refine-depth {args.refine_depth}")
    if args.edge_band is not None:
        flags.append(f"--edge-band {args.edge_band:g}")
    settings = recorded.model_copy(update=update)
    found = distinct_settings(files)
    for logged in found:
        if settings != logged:
            names = "" if len(found) == 1 else " of " + ", ".join(str(f.path) for f in files if f.settings == logged)
            print(f"note: {' and '.join(flags)} replace the engine settings the prompt log{names} was recorded "
                  f"with ({'; '.join(logged.differences(settings))}; recorded vs used): the mask may differ from "
                  "the recorded one", file=sys.stderr, flush=True)
    return settings


def _progress(fraction: float, message: str) -> None:
    print(f"[{100 * fraction:5.1f} %] {message}", flush=True)


def _write_outputs(args: argparse.Namespace, run, volume, voxels) -> List[Path]:
    """Write --out and --log, both or neither (each checked, then both renamed into place). The log
    records the image in the voxel order the engine saw it in (``run.flips``: a replayed log's), its
    prompts name voxels of that order; its digest is ``voxels``' (:class:`~SegAssistLib.headless.Voxels`,
    computed once for the whole replay)."""
    from SegAssistLib.errors import ImageError
    from SegAssistLib.files import atomic_write_many
    from SegAssistLib.io import save_mask_nifti, save_segmentation_nrrd
    from SegAssistLib.prompt_log import ImageInfo
    from SegAssistLib.prompt_mirror import reversed_volume

    if args.out.name.lower().endswith(SEGMENTATION_SUFFIXES):
        names = (args.segment_name,)
        files = [(args.out, lambda tmp: save_segmentation_nrrd(run.mask, volume, tmp, names))]
    else:
        files = [(args.out, lambda tmp: save_mask_nifti(run.mask, volume, tmp))]
    if args.log is not None:
        seen = volume if run.flips is None else reversed_volume(volume, run.flips, copy=False)  # its grid alone
        image = ImageInfo.from_volume(seen, digest=voxels.digest(run.flips))  # refused on another grid
        log = run.prompt_log.model_copy(update={"image": image})
        files.append((args.log, lambda tmp: log.save(tmp)))
    try:
        atomic_write_many(files, args.overwrite)
    except (ImageError, OSError) as exc:  # a full disk, a folder where the log goes, ...: neither file is kept
        reason = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] ..." reads as the strerror and the file
            reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        flags = " and ".join(f"{flag} {path}" for flag, path in zip(("--out", "--log"), (p for p, _ in files)))
        raise SegAssistError(f"{flags} not written, nothing replaced: {reason}") from exc
    return [path for path, _ in files]


def run_segment(args: argparse.Namespace) -> int:
    from SegAssistLib.headless import (
        check_prompts,
        image_of,
        model_note,
        read_prompts,
        recorded_settings,
        replay_prompts,
        run_prompts,
        settings_notes,
    )
    from SegAssistLib.io import load_volume

    _check_outputs(args)
    token = _remote_token(args)
    volume = load_volume(args.image, channel=args.channel)
    image = image_of(volume, f"image {args.image}")  # one digest for every log and --log
    files = [read_prompts(path, image) for path in args.prompts]
    # in the logs' voxel order (a copy stored the other way: the image is put back in it for the run)
    prompts, flips = replay_prompts(files, volume.array.shape)
    check_prompts(files, volume.array.shape)  # none, or one outside the image: before the model loads or the upload
    # applied here: logs of settings no one setting replays are refused before the model loads
    recorded = None if args.url else recorded_settings(files, _replaced_fields(args))
    engine = _engine(args, token)
    try:
        settings = None if args.url else _replay_settings(args, engine, files, recorded)
        run = run_prompts(engine, volume, prompts, _progress, settings, flips=flips)
    except SegAssistError as exc:
        hint = _tls_hint(exc, args.ca_bundle)
        if hint is None:
            raise
        raise hint from exc
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    if args.url:  # the server answered with its own settings: each log's that differ is told
        run.notes.extend(settings_notes(files, run.prompt_log.engine, run.model))
    written = _write_outputs(args, run, volume, image.voxels)
    median_ms = 1000 * statistics.median(run.latencies_s)
    print(f"{len(prompts)} prompts -> {run.voxel_count} voxels ({run.model}); median {median_ms:.0f} ms per prompt; "
          f"wrote {', '.join(str(p) for p in written)}", flush=True)
    # the log was recorded on other voxel values (another scan), a server answered with other engine settings,
    # another model answered
    other_model = model_note(files, run.prompt_log.model)
    for note in [note for file in files for note in file.notes] + run.notes + ([other_model] if other_model else []):
        print(f"warning: {note}", file=sys.stderr, flush=True)
    if not run.voxel_count:
        print("warning: the result is empty", file=sys.stderr, flush=True)
    return 0
