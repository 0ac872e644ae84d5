"""``segassist learn ...``: the human-in-the-loop learning loop from a terminal.

    segassist learn import SOURCE --store DIR --user NAME     images (folder, file, DICOM series) -> cases;
                      [--include-label-maps]                 label maps beside their images passed over
                      [--subject-pattern REGEX]              ... with each case's subject (patient) from its name
    segassist learn status --store DIR                       cases by status, current version, last job
    segassist learn cases --store DIR [--status new]         list cases (by status)
    segassist learn subject (CASE SUBJECT | CASE --none | --pattern REGEX) --store DIR   set subjects later
    segassist learn lock CASE --store DIR --user NAME        lock a case to an annotator (unlock: release)
    segassist learn save CASE MASK --store DIR --user NAME   a label version from a mask file (--draft)
    segassist learn review CASE (--accept | --reject) --store DIR --user NAME   review the submitted label
    segassist learn export OUT --store DIR                   MSD layout + .seg.nrrd of the submitted labels
    segassist learn verify --store DIR [--recover]           check every stored file; tidy old leftovers
    segassist learn train --store DIR [--kind salt] [--minutes 5] [--detach]
    segassist learn cancel --store DIR [--job ID]
    segassist learn versions --store DIR
    segassist learn rollback --store DIR [--to v2|base] [--from v3|base]
    segassist learn next --store DIR [--strategy uncertainty] [--user NAME --lock] [--out proposal.nii.gz]

``train`` follows the job's progress until it ends, unless ``--detach``, and exits 0 when the job
registered a version (promoted or not), 5 when it ended without one (its time budget too small for the
validation or a step, or cancelled from elsewhere: ``learn cancel``, the server; the reason on stderr),
1 when it failed. Ctrl-C (or SIGTERM, or the terminal closing: SIGHUP) cancels it cleanly: the command
waits for the job to stop, prints how it ended and exits 128 + the signal's number (130 for Ctrl-C) when
it was cancelled, 3 when the job had got too far to cancel (it finished and may have made a new current
version), 1 when it failed or is still stopping.
``unlock`` exits 4 when the case is not locked (nothing released); ``verify`` exits 1 when a stored file
is missing or damaged.
Every subcommand takes ``--json`` for machine-readable output (progress lines then go to stderr).
Register with :func:`register`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from SegAssistLib.api_learning import MAX_LOCK_TTL_S, VERSION_ID_PATTERN
from SegAssistLib.cli_types import MASK_SUFFIXES, is_mask_path, number, positive_int
from SegAssistLib.errors import SegAssistError
from SegAssistLib.learning.datastore import (
    DEFAULT_LOCK_TTL_S,
    Datastore,
    import_sources,
    open_datastore,
)
from SegAssistLib.learning.errors import AdapterError, CaseLockedError, DatastoreError, NotLockedError
from SegAssistLib.learning.records import (
    CaseRecord,
    CaseStatus,
    ImportReport,
    LabelVersion,
    RecoveryReport,
    check_user,
    printable_text,
)
from SegAssistLib.learning.registry import BASE, AdapterRegistry, VersionRecord, adapter_id_of, version_label
from SegAssistLib.learning.store_db import DB_NAME
from SegAssistLib.learning.store_files import DEFAULT_RECOVER_AGE_S
from SegAssistLib.learning.subjects import compile_subject_pattern, subjects_from_names
from SegAssistLib.stop_signals import STOP_SIGNALS, Stopped, restore_handlers, signal_name


def lock_hours(text: str) -> float:
    """argparse type of ``--hours``: a lock duration, more than 0 and at most the longest lock."""
    value = number(text)
    longest = MAX_LOCK_TTL_S / 3600
    if not 0 < value <= longest:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {longest:g} hours, got {text}")
    return value


def version_or_base(text: str) -> str:
    """argparse type of ``rollback --from``: a version id (v3) or ``base``, as the server takes it."""
    if not re.fullmatch(VERSION_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"a version id such as v3, or 'base', got {text!r}")
    return text


def label_value(text: str) -> int:
    value = positive_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"label values are 1-255, got {value}")
    return value


def register(subparsers) -> None:
    """Add ``learn`` and its subcommands to the ``segassist`` parser."""
    learn = subparsers.add_parser("learn", help="human-in-the-loop learning: datastore, adapters, next case")
    sub = learn.add_subparsers(dest="learn_command", required=True)

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--store", required=True, type=Path, help="datastore folder")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    p = add("import", "import images as new cases (creates the store if needed, never in a folder of other files)",
            cmd_import)
    p.add_argument("source", type=Path,
                   help="an image file, a DICOM series folder or a folder of images. In a folder, at any depth, "
                   "label maps are passed over (each one named): a folder holding imagesTr/imagesTs (an MSD or "
                   "nnU-Net dataset, an earlier learn export) is read only there; folders named labelsTr, labelsTs "
                   "or segmentations are not entered; .seg.nrrd files are not images; and a file named STEM_label, "
                   "_labels, _seg, _mask, _segmentation or _gt (any image suffix, case ignored) is not imported "
                   "when an image file named STEM or STEM_image, or a DICOM series folder STEM, lies in the same "
                   "folder (hippocampus_001_label beside hippocampus_001_image, ACDC's patient001_frame01_gt). "
                   "A SOURCE that is itself a label folder or a .seg.nrrd is refused; any other file given alone "
                   "is imported")
    p.add_argument("--include-label-maps", action="store_true",
                   help="import label maps as images to annotate too: a file named as the label map of an image "
                   "beside it, and a label folder or .seg.nrrd given as SOURCE")
    p.add_argument("--user", required=True)
    p.add_argument("--channel", type=int, help="channel of multi-channel / 4D images")
    p.add_argument("--no-recursive", action="store_true")
    p.add_argument("--subject-pattern", metavar="REGEX",
                   help="the subject (patient) of each case, found in its name by this Python regular expression: "
                   "its first group, or the whole match; training never splits a subject's cases between "
                   r"training and validation. ACDC: '^(patient\d+)_'. A name it does not match stops the "
                   "import (add '|^.+' to make such a case its own subject). Default: each case is its own subject. "
                   "Images already in the store keep theirs (learn subject changes it)")

    p = add("subject", "set the subject (patient) of a case, or of every case from its name", cmd_subject)
    p.add_argument("case", nargs="?", help="case id (with SUBJECT)")
    p.add_argument("subject", nargs="?", help="the case's subject")
    p.add_argument("--none", action="store_true", dest="no_subject",
                   help="make CASE its own subject again (instead of SUBJECT)")
    p.add_argument("--pattern", metavar="REGEX",
                   help="every case's subject from its name, as import's --subject-pattern (instead of CASE SUBJECT)")

    add("status", "cases by status, the current adapter version, the last training job", cmd_status)

    p = add("cases", "list cases, optionally of some statuses", cmd_cases)
    p.add_argument("--status", action="append", choices=[s.value for s in CaseStatus], help="repeatable")

    for name, func, text in (("lock", cmd_lock, "lock a case to an annotator"),
                             ("unlock", cmd_unlock, "release an annotator's lock on a case (exit 4: the case is "
                              "not locked, nothing released)")):
        p = add(name, text, func)
        p.add_argument("case", help="case id")
        p.add_argument("--user", required=True)
        if name == "lock":
            p.add_argument("--hours", type=lock_hours, default=DEFAULT_LOCK_TTL_S / 3600,
                           help="lock duration (default 4)")
        else:
            p.add_argument("--force", action="store_true", help="release another user's lock (administrator)")

    p = add("save", "save a label version of a case from a mask file on the case's grid", cmd_save)
    p.add_argument("case", help="case id")
    p.add_argument("mask", type=Path, help=".nii.gz, .nrrd or .seg.nrrd with the case's voxel grid")
    p.add_argument("--user", required=True)
    p.add_argument("--draft", action="store_true",
                   help="save a draft, not submitted: a new case stays in_progress; a submitted or reviewed case "
                   "(locked to correct it) keeps its status and its submitted label until a new one is submitted")
    p.add_argument("--prompt-log", type=Path,
                   help="the prompt log that produced the mask (JSON), recorded with the label: one recorded on "
                   "another image than the case's (shape, spacing, placement) is refused")
    p.add_argument("--model", help="model version that produced it (provenance; default: the one the prompt log "
                   "records; its adapter version, 0.3.0+v3 -> v3, is recorded too)")
    p.add_argument("--seconds", type=float,
                   help="annotation time spent (default: not measured, recorded as unknown, not as 0)")
    p.add_argument("--interactions", type=int, dest="n_interactions",
                   help="prompts it took (default: the prompt log's count of prompts; without a log, unknown, "
                   "not 0)")

    p = add("review", "accept or reject the latest submitted label of a case (accepted: reviewed; rejected: back "
            "to in_progress)", cmd_review)
    p.add_argument("case", help="case id")
    p.add_argument("--user", required=True, help="the reviewer")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--accept", action="store_true", help="the label is right: the case becomes reviewed")
    verdict.add_argument("--reject", action="store_true",
                         help="the label needs work: the case goes back to in_progress (it leaves the training set; "
                         "learn next hands it out again)")
    p.add_argument("--note", help="the reviewer's note (at most 2000 characters)")
    p.add_argument("--label", metavar="ID",
                   help="the label version reviewed: refused if it is no longer the latest submitted one")

    p = add("export", "export the submitted and reviewed cases (MSD layout, .seg.nrrd)", cmd_export)
    p.add_argument("out", type=Path, help="a new or empty folder, outside the store or under its exports/ folder; "
                   "it appears complete or not at all")
    p.add_argument("--label-name", action="append", help="name of label 1, 2, ... (default: foreground)")
    p.add_argument("--no-seg-nrrd", action="store_true")
    p.add_argument("--skip-damaged", action="store_true",
                   help="leave out the cases whose stored image or label is missing or damaged (each named, and "
                   "listed in dataset.json); without it such a case stops the export before anything is written")

    p = add("verify", "check every stored image and label against its checksum; list leftovers of interrupted "
            "writes and files no record names (exit 1 when a file is missing or damaged)", cmd_verify)
    p.add_argument("--recover", action="store_true",
                   help=f"also tidy what is older than {DEFAULT_RECOVER_AGE_S / 60:g} minutes (younger may be a "
                   "write in progress): delete the temporary files of interrupted writes, and move each complete "
                   "image or label file no record names to the store's quarantine/ folder (it may be the only "
                   "copy of an annotation: never deleted); damaged files are never touched")

    p = add("train", "train an adapter on the submitted labels in a background process", cmd_train)
    p.epilog = ("Exit status: 0 when the job registered a version (promoted or not); 5 when it ended without one "
                "(its time budget too small, or cancelled from elsewhere: learn cancel, the server; the reason on "
                "stderr); 1 when it failed. Ctrl-C, SIGTERM and SIGHUP cancel the job: 128 + the signal's number "
                "(130 for Ctrl-C), or 3 when it had finished first (a new version may be current).")
    p.add_argument("--checkpoint", type=Path, help="base model (default: the shipped one)")
    p.add_argument("--kind", choices=("lora", "salt", "full"), default="salt",
                   help="what is trained: salt (the top singular values of each layer plus a low-rank "
                   "update; default), lora (low-rank updates) or full (every weight)")
    p.add_argument("--rank", type=positive_int,
                   help="salt: how many top singular values per layer are adapted (default 8); lora: its rank "
                   "(default 4); not for kind full")
    p.add_argument("--lora-rank", type=positive_int,
                   help="salt only: rank of its low-rank update, 1 to 256 (default 4)")
    p.add_argument("--alpha", type=float,
                   help="scale of the low-rank update (default: its rank, a scale of 1); not for kind full")
    p.add_argument("--lr", type=float, dest="learning_rate",
                   help="learning rate (default 0.01 for salt and lora, 0.0003 for full)")
    p.add_argument("--steps", type=int, dest="max_steps",
                   help="most training steps; the time budget may end the run sooner (default 2000)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float,
                        help="time budget of the whole run, validation and registration included (default 5): "
                        "a validation that cannot finish in it stops, and its candidate is not registered")
    budget.add_argument("--seconds", type=float, help="the time budget in seconds instead (default 300)")
    p.add_argument("--batch-size", type=int, help="patches per step, 1 to 64 (default 2)")
    p.add_argument("--val-clicks", type=int, help="simulated clicks per validation case, 1 to 20 (default 3)")
    p.add_argument("--max-val-cases", type=int,
                   help="most submitted cases held back for validation, 1 to 200 (default 8; fewer: a shorter "
                   "validation, less reliable); whole subjects (patients) only, so a subject's cases are never "
                   "split between training and validation")
    p.add_argument("--max-case-memory-gib", type=float,
                   help="most memory the job's loaded cases may hold, in GiB (default 6): beyond it the job trains "
                   "on the most recently submitted cases that fit and says how many it left out")
    p.add_argument("--validate-every", type=int,
                   help="steps between progress validations (default 0: only before and after training)")
    p.add_argument("--min-improvement", type=float,
                   help="promote only when the validation Dice beats the current version's by more (default 0)")
    p.add_argument("--label-value", type=label_value, help="learn one label value (default: every labelled voxel)")
    p.add_argument("--threads", type=int, help="torch threads of the job, 1 to this machine's cores (default 1)")
    p.add_argument("--seed", type=int, help="seed of the training run (default: a new one per run, recorded)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--no-warm-start", action="store_true", help="start from the base model, not the current version")
    p.add_argument("--detach", action="store_true",
                   help="start the job and return at once (`learn status` follows it, `learn cancel` stops it)")

    p = add("cancel", "ask a running training job to stop", cmd_cancel)
    p.add_argument("--job", help="job id (default: the newest)")

    add("versions", "the adapter version history", cmd_versions)

    p = add("rollback", "make an earlier adapter version (or the base model) current", cmd_rollback)
    p.add_argument(
        "--to",
        help="version id or 'base' (default: one step back, to the previous version made for the same base "
        "model as the current one, or to the base model). A target already current is refused (exit 2, nothing "
        "changed), as one step back from the base model is; --to base after a damaged registry sets it aside",
    )
    p.add_argument("--from", dest="expected_current", metavar="VERSION", type=version_or_base,
                   help="the version you mean to replace (a version id or 'base'): if another is current by the "
                   "time the rollback runs (a training job promoted one since you looked), nothing changes and "
                   "the command fails (exit 2) naming both. Without it, the rollback starts from whatever is "
                   "current then, and says which version it replaced")
    p.add_argument("--user", help="who rolls back (recorded)")
    p.add_argument("--checkpoint", type=Path,
                   help="the base model the version must belong to (default: the shipped one)")

    p = add("next", "the case to annotate next, with the model's proposal", cmd_next)
    p.add_argument("--checkpoint", type=Path, help="base model (default: the shipped one)")
    p.add_argument("--strategy", choices=("first", "random", "uncertainty", "diversity"), default="uncertainty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--user", help="lock the case to this user (only with --lock)")
    p.add_argument("--lock", action="store_true")
    p.add_argument("--hours", type=lock_hours, default=DEFAULT_LOCK_TTL_S / 3600,
                   help="lock duration with --lock (default 4)")
    p.add_argument("--no-proposal", action="store_true")
    p.add_argument("--diversity-weight", type=float, default=0.5)
    p.add_argument("--max-candidates", type=positive_int, default=16)
    p.add_argument("--out", type=Path, help="write the proposal mask here (.nii.gz or .seg.nrrd; an existing "
                   "file is kept: it may be an annotation in progress)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the proposal")


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text)


def _progress(args: argparse.Namespace, text: str) -> None:
    """A line of progress while a command works: on stdout, or on stderr with ``--json`` (stdout is
    then the JSON alone)."""
    _say(text, err=args.json)


def _say(text: str, err: bool = False) -> None:
    """A line that must not stop what follows: after SIGHUP (the terminal closed) writing may fail."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _open(args: argparse.Namespace) -> Datastore:
    return open_datastore(args.store)


def _checkpoint(path: Optional[Path]) -> Path:
    if path is not None:
        return path
    from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def _none_reads(sources: List[Tuple[Path, str]], channel: Optional[int]) -> Optional[List[Tuple[str, str]]]:
    """Before a new store is made: each source with the reason it is no image to segment, when none is;
    None as soon as one is (the import reads that one again: one image read twice, no empty store made)."""
    from SegAssistLib.errors import ImageError
    from SegAssistLib.image import validate_image
    from SegAssistLib.io import load_volume

    reasons = []
    for path, _ in sources:
        try:
            validate_image(load_volume(path, channel=channel))
        except ImageError as exc:  # as the import itself would skip it
            reasons.append((str(path), str(exc)))
        else:
            return None
    return reasons


def cmd_import(args: argparse.Namespace) -> int:
    """Import image by image, one line each as it comes in (a large image takes seconds to convert and
    hash). The sources are found before the store is opened: a source that is missing, holds no image
    or only files that do not read as one leaves no new empty store behind."""
    check_user(args.user)
    pattern = compile_subject_pattern(args.subject_pattern) if args.subject_pattern is not None else None
    passed_over: list = []
    sources = import_sources(args.source, args.store, recursive=not args.no_recursive, passed_over=passed_over,
                             include_label_maps=args.include_label_maps)
    for path, why in passed_over:  # labels (folders and label-map files): not imported as images to annotate
        _progress(args, f"not read: {path} ({why})")
    subject_of: Dict[Path, str] = {}
    if pattern is not None:  # a name the pattern finds no subject in: refused before the store is made
        found = subjects_from_names([printable_text(name) or "?" for _, name in sources], pattern)
        subject_of = {path: subject for (path, _), subject in zip(sources, found)}

    def shown(done: int, total: int, path: Path, result) -> None:
        line = f"  + {result.id}  {result.name}" if isinstance(result, CaseRecord) else f"  - {path}: {result}"
        if isinstance(result, CaseRecord) and path in subject_of:
            line += f"  (subject {subject_of[path]})"
        _progress(args, f"[{done}/{total}]{line}")

    report = ImportReport()
    data = report.to_dict()
    not_read = [{"file" if path.is_file() else "folder": str(path), "reason": why} for path, why in passed_over]
    unread = None if (args.store / DB_NAME).is_file() or not sources else _none_reads(sources, args.channel)
    if unread is not None:  # no store is made for nothing
        report.skipped.extend(unread)
        for done, ((path, _), (_, why)) in enumerate(zip(sources, unread), 1):
            shown(done, len(sources), path, why)
        data = report.to_dict()
    elif sources:
        with Datastore(args.store, create=True) as store:
            report = store.import_images(args.source, args.user, args.channel, sources=sources, on_image=shown,
                                         subject_pattern=pattern)
            subjects = store.subjects(c.id for c in report.added)
        data = report.to_dict()
        for case in data["added"]:
            case["subject"] = subjects[case["id"]]
    data["not_read"] = not_read
    _print(args, data, f"imported {len(report.added)} case(s), skipped {len(report.skipped)}")
    if report.failed or not (report.added or report.skipped):
        print("learn import: " + (f"{len(report.failed)} image(s) could not be imported" if report.failed else
                                  f"no image found in {args.source}"), file=sys.stderr)
        return 1
    return 0


def _case_line(c: CaseRecord, subject: Optional[str] = None) -> str:
    lock = f", locked by {c.locked_by}" if c.locked_by else ""
    rework = ", rejected in review" if c.needs_rework else ""
    of = f"  (subject {subject})" if subject is not None else ""
    return f"{c.id}  {c.status.value:<11} {c.n_labels} label(s){rework}{lock}  {c.name}{of}"


def cmd_cases(args: argparse.Namespace) -> int:
    with _open(args) as store:
        cases = store.list_cases(status=args.status)
        subjects = store.subjects()
    text = "\n".join(_case_line(c, subjects.get(c.id)) for c in cases) or "no case"
    _print(args, [dict(c.to_dict(), subject=subjects.get(c.id)) for c in cases], text)
    return 0


def cmd_subject(args: argparse.Namespace) -> int:
    """One case's subject (``CASE SUBJECT``; ``CASE --none``: its own again), or every case's from its
    name (``--pattern``)."""
    if args.pattern is not None:
        valid = args.case is None and not args.no_subject
    else:
        valid = args.case is not None and (args.subject is not None) != args.no_subject
    if not valid:
        raise SegAssistError(
            "learn subject: give CASE SUBJECT, CASE --none (the case its own subject), or --pattern REGEX for "
            "every case"
        )
    with _open(args) as store:
        if args.pattern is not None:
            changed = store.set_subjects(pattern=args.pattern)
        else:
            changed = store.set_subjects({args.case: None if args.no_subject else args.subject})
        names = {c.id: c.name for c in store.list_cases()}
    text = "\n".join(
        f"{case_id}  {names.get(case_id, '?')}  " + (f"subject {subject}" if subject is not None else "its own subject")
        for case_id, subject in changed.items()
    )
    _print(args, changed, text or "no case")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    with _open(args) as store:
        case = store.lock(args.case, args.user, ttl_s=args.hours * 3600.0)
    _print(args, case.to_dict(), _case_line(case))
    return 0


NOT_LOCKED = 4  # exit code of unlock: the case is not locked, nothing was released


def cmd_unlock(args: argparse.Namespace) -> int:
    with _open(args) as store:
        before = store.get_case(args.case)
        try:
            case = store.unlock(args.case, args.user, force=args.force, require_lock=True)
        except NotLockedError as exc:
            print(f"segassist learn unlock: {exc}", file=sys.stderr)
            return NOT_LOCKED
        except CaseLockedError as exc:
            raise CaseLockedError(f"{exc} (an administrator can release it: add --force)") from exc
    text = f"released the lock of {before.locked_by or 'its holder'} on case {case.id}"
    if before.status != case.status:
        text += (f": it has no label yet, so it is {case.status.value} again" if case.n_labels == 0 else
                 f": back to {case.status.value}, as its latest submitted label left it (the drafts saved "
                 "since stay stored; a new submission replaces that label)")
    _print(args, case.to_dict(), f"{text}\n{_case_line(case)}")
    return 0


def _prompt_log_of(args: argparse.Namespace, store: Datastore, case: CaseRecord) -> Optional[Any]:
    """The ``--prompt-log`` file checked against the case: a log recorded on another image (shape,
    spacing, or, where the log records them, origin and direction) is refused, as a replay refuses it;
    one of the case's image held with its axes reversed (Slicer's copy of a left-handed image) is taken."""
    from SegAssistLib.headless import ReplayImage, read_prompts
    from SegAssistLib.prompt_log import PromptLog

    reference = store.reference_geometry(case.id)
    image = ReplayImage(tuple(case.shape)[::-1], case.spacing, f"case {case.id} ({case.name})", reference.origin,
                        reference.direction)  # fmt: skip
    read_prompts(args.prompt_log, image)  # the checks: a PromptError naming both images
    try:
        return PromptLog.from_json(args.prompt_log.read_text())
    except SegAssistError:
        raise
    except Exception as exc:  # a bare list of prompts: no log to record
        raise SegAssistError(f"{args.prompt_log}: not a prompt log (a list of prompts records no model, no image): "
                             f"{exc}") from exc


def cmd_save(args: argparse.Namespace) -> int:
    from SegAssistLib.image import geometry_difference
    from SegAssistLib.io import load_mask, read_geometry
    from SegAssistLib.prompt_mirror import reversed_back

    mask = load_mask(args.mask)
    with _open(args) as store:
        case = store.get_case(args.case)
        log = _prompt_log_of(args, store, case) if args.prompt_log is not None else None
        model = args.model
        if log is not None and log.model is not None:
            if model is not None and model != log.model:
                raise SegAssistError(f"--model {model}, but the prompt log records model {log.model}: leave "
                                     "--model out to record the log's")
            model = log.model
        difference = (
            f"shape {list(mask.shape)} (k, j, i) instead of {list(case.shape)}"
            if tuple(mask.shape) != tuple(case.shape)
            else geometry_difference(read_geometry(args.mask), store.reference_geometry(case.id))
        )
        if difference is not None and tuple(mask.shape) == tuple(case.shape):
            # the case's grid stored with axes reversed (Slicer's labelmap of a left-handed image)?
            back = reversed_back(mask, read_geometry(args.mask), store.reference_geometry(case.id))
            mask, difference = (mask, difference) if back is None else (back, None)
        if difference is not None:  # same shape on another grid: stored as is, it would lie misplaced
            raise DatastoreError(
                f"{args.mask} is not on the case's voxel grid: {difference}. Export the segmentation on the "
                "image's geometry (in Slicer: a labelmap with the volume as reference)"
            )
        label = store.save_label(case.id, mask, user=args.user, prompt_log=log, model=model,
                                 adapter_version=adapter_id_of(model), n_interactions=args.n_interactions,
                                 seconds_spent=args.seconds, submit=not args.draft)
    what = "draft" if args.draft else "submitted"
    _print(args, label.to_dict(), f"saved label version {label.version} ({label.id}) of {case.name}, {what}; "
           f"{_label_effort(label)}")
    return 0


def _label_effort(label: LabelVersion) -> str:
    """A label version's count of prompts and annotation time as text, "unknown" where it is (never 0)."""
    prompts = "unknown" if label.n_interactions is None else str(label.n_interactions)
    seconds = "not measured" if label.seconds_spent is None else f"{label.seconds_spent:.1f} s"
    return f"interactions: {prompts}, time spent: {seconds}"


def cmd_review(args: argparse.Namespace) -> int:
    with _open(args) as store:
        review = store.review(args.case, args.user, accepted=args.accept, note=args.note, label_id=args.label)
        case = store.get_case(args.case)
        label = store.get_label(review.label_id)
    verdict = "accepted" if review.accepted else "rejected"
    data = dict(review.to_dict(), case=case.to_dict())
    text = (f"{verdict} label version {label.version} ({label.id}) of case {case.id} ({case.name}) by "
            f"{label.user}: the case is {case.status.value}")
    _print(args, data, text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as store:
        report = store.verify()
        recovery = store.recover() if args.recover else RecoveryReport()
        quarantine = store.quarantine_folder()
        in_quarantine = len(store.quarantined_files())
    moved = {old for old, _ in recovery.quarantined}
    leftovers = [o for o in report.temporary if o not in recovery.removed]
    unrecorded = [o for o in report.unrecorded if o not in moved]
    data = {"ok": report.ok, "damaged": list(report.corrupt), "leftovers": leftovers, "unrecorded": unrecorded,
            **recovery.to_dict(), "quarantine": str(quarantine), "files_in_quarantine": in_quarantine}
    lines = [f"damaged: {what}" for what in report.corrupt]
    if report.corrupt:
        lines.append(f"{len(report.corrupt)} stored file(s) missing or damaged: restore them from a backup (an export "
                     "stops at such a case unless --skip-damaged)")
    lines += [f"removed temporary file: {name}" for name in recovery.removed]
    lines += [f"moved to quarantine: {old} -> {new}" for old, new in recovery.quarantined]
    if leftovers:
        lines.append(f"{len(leftovers)} temporary file(s) of interrupted (or running) writes: " + _shown(leftovers)
                     + ("" if args.recover else f"; --recover deletes those older than "
                        f"{DEFAULT_RECOVER_AGE_S / 60:g} minutes"))
    if unrecorded:
        lines.append(f"{len(unrecorded)} complete image or label file(s) that no record names: {_shown(unrecorded)}. "
                     "Each is a write killed just before its record was saved, or an annotation whose record "
                     "the database lost (restored from an older backup?): nothing deletes them"
                     + ("" if args.recover else f"; --recover moves those older than {DEFAULT_RECOVER_AGE_S / 60:g} "
                        f"minutes to {quarantine}"))
    if in_quarantine:
        lines.append(f"{in_quarantine} file(s) in {quarantine} (moved there by --recover; delete them once you "
                     "know they are not needed)")
    if report.ok:
        lines.append("every image and label the database records matches its checksum")
    _print(args, data, "\n".join(lines))
    return 0 if report.ok else 1


def _shown(names: Any, most: int = 5) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def cmd_export(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.export import export_msd

    skipped = []

    def damaged(case: CaseRecord, problem: str) -> None:
        skipped.append({"case_id": case.id, "case_name": case.name, "problem": problem})
        _say(f"warning: case {case.id} ({case.name}) not exported: {problem}", err=True)

    with _open(args) as store:
        _progress(args, f"exporting the submitted and reviewed cases to {args.out} ...")
        out = export_msd(store, args.out, label_names=args.label_name or ("foreground",),
                         seg_nrrd=not args.no_seg_nrrd, skip_damaged=args.skip_damaged, on_damaged=damaged,
                         on_case=lambda done, total, case: _progress(args, f"[{done}/{total}]  {case.id}  {case.name}"))
    n = len(json.loads((out / "dataset.json").read_text())["training"])
    text = f"exported {n} case(s) to {out}"
    if skipped:
        text += f"; {len(skipped)} damaged case(s) left out (see `segassist learn verify --store {args.store}`)"
    _print(args, {"folder": str(out), "cases": n, "skipped_damaged": skipped}, text)
    return 0


def _job_line(status: Dict[str, Any]) -> str:
    parts = [f"job {status.get('job_id')}: {status.get('state')}"]
    if status.get("phase"):
        parts.append(str(status["phase"]))
    if status.get("progress"):
        parts.append(str(status["progress"]))  # "loading case 3 of 40"
    if status.get("step") is not None:
        parts.append(f"step {status['step']}/{status.get('max_steps', '?')}")
    if status.get("loss_avg") is not None:
        parts.append(f"loss {status['loss_avg']:.4f}")
    if status.get("incumbent_dice") is not None:
        parts.append(f"incumbent Dice {status['incumbent_dice']:.4f}")
    if status.get("val_dice") is not None:
        parts.append(f"val Dice {status['val_dice']:.4f}")
    if status.get("elapsed_s") is not None:
        parts.append(f"{status['elapsed_s']:.0f}/{status.get('time_budget_s', 0):.0f} s")
    line = ", ".join(parts)
    if status.get("memory_note"):
        line += f"\n  {status['memory_note']}"
    if status.get("message"):
        line += f"\n  {status['message']}"
    if status.get("error"):
        line += f"\n  error: {status['error']}"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.jobs import list_jobs

    with _open(args) as store:
        counts = store.count_by_status()
        root = store.root
    current = AdapterRegistry(root).current()
    jobs = list_jobs(root)
    data = {"cases": counts, "current_version": current.to_dict() if current else None,
            "last_job": jobs[0] if jobs else None}
    text = "cases: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    text += f"\ncurrent version: {version_label(current)}"
    if current is not None:
        text += f" ({current.kind}, validation Dice {current.val_dice:.4f})"
    text += "\n" + (_job_line(jobs[0]) if jobs else "no training job yet")
    _print(args, data, text)
    return 0


CANCEL_WAIT_S = 120.0  # how long a cancelled job is waited for before the command stops watching it
POLL_S = 0.5  # between reads of an attached job's status
FINISHED_DESPITE_CANCEL = 3  # exit code: cancelled too late, the job finished (and may have made a version)
NOTHING_REGISTERED = 5  # exit code: the job ended without a version (budget too small, cancelled from elsewhere)
@contextlib.contextmanager
def _stop_signals_cancel() -> Iterator[None]:
    """While ``train`` follows its job, SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal or
    SSH session) cancel it as Ctrl-C does: the worker runs in its own session and would otherwise go on,
    watched by nobody. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(signum)

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, stop)
        yield
    finally:
        restore_handlers(previous)


def _finished_despite_cancel(status: Dict[str, Any], store: Path) -> str:
    result = status.get("result") or {}
    version = (result.get("version") or {}).get("id")
    if version and result.get("promoted"):
        what = (f"version {version} was promoted and is now the current version (undo: segassist learn "
                f"rollback --store {store})")
    elif version:
        what = f"version {version} was registered but not promoted: the current version is unchanged"
    else:
        what = "no version was registered"
    return f"job {status.get('job_id')} finished before the cancel reached it: {what}"


def cmd_train(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.jobs import start_training

    settings: Dict[str, Any] = {"kind": args.kind}
    for name in ("rank", "lora_rank", "alpha", "learning_rate", "max_steps", "batch_size", "val_clicks",
                 "max_val_cases", "max_case_memory_gib", "validate_every", "min_improvement", "label_value",
                 "threads", "seed", "device"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.minutes is not None:
        settings["time_budget_s"] = args.minutes * 60.0
    elif args.seconds is not None:
        settings["time_budget_s"] = args.seconds
    if args.no_warm_start:
        settings["warm_start"] = False
    _open(args).close()  # a clear error for a missing store before anything starts
    if args.detach:
        job = start_training(args.store, _checkpoint(args.checkpoint), settings)
        _print(args, {"job_id": job.job_id, "folder": str(job.folder)}, f"started job {job.job_id}")
        return 0
    with _stop_signals_cancel():
        job = None
        try:  # one try from the start on: a signal at any point cancels the job once its worker has started
            job = start_training(args.store, _checkpoint(args.checkpoint), settings)
            return _follow(args, job)  # it handles a signal in its loop itself (knowing what it printed)
        except KeyboardInterrupt as exc:  # Ctrl-C or Stopped: during the start, or before _follow's own try
            signum = getattr(exc, "signum", signal.SIGINT)
            if job is None:  # interrupted start: a worker that had started has its cancel flag and comes along
                job = getattr(exc, "training_job", None)
            if job is None:  # no worker started: nothing to cancel
                _say(f"stopped by {signal_name(signum)}", err=True)
                return 128 + signum
            return _stop_and_report(args, job, signum, last="")


def _follow(args: argparse.Namespace, job: Any) -> int:
    """Print the job's progress until it ends and its worker has exited (the datastore is then free for
    the next job); Ctrl-C, SIGTERM or SIGHUP cancel it and wait for it to stop. Returns the exit code."""
    from SegAssistLib.learning.jobs import FINAL_STATES

    last = ""
    try:  # from the job's start on: a Ctrl-C cancels it, it never runs on unseen
        while True:
            status = job.status()
            line = _job_line(status)
            if line != last:  # with --json on stderr: stdout is the final status's JSON alone
                _progress(args, line)
                last = line
            if status.get("state") in FINAL_STATES:
                break
            time.sleep(POLL_S)
        status = job.wait()  # final: its worker exits at once, and the training lock goes with it
    except KeyboardInterrupt as exc:  # Ctrl-C, or Stopped
        return _stop_and_report(args, job, getattr(exc, "signum", signal.SIGINT), last)
    return _report(args, job, status, last, None)


def _stop_and_report(args: argparse.Namespace, job: Any, signum: int, last: str) -> int:
    """Ctrl-C, SIGTERM or SIGHUP reached ``train`` while its job runs (or starts): cancel the job, wait
    for it to stop, say how it ended. ``last``: the progress line printed last."""
    try:
        job.cancel()  # first: after SIGHUP even a message may fail
    except KeyboardInterrupt:  # a second signal at once: the flag must still be written
        job.cancel()
    _say(f"cancelling job {job.job_id} ({signal_name(signum)}) ...", err=True)
    try:
        status = job.wait(timeout=CANCEL_WAIT_S)
    except KeyboardInterrupt:  # asked again: stop watching (the job has been asked to stop)
        status = job.status()
    return _report(args, job, status, last, signum)


def _report(args: argparse.Namespace, job: Any, status: Dict[str, Any], last: str, signum: Optional[int]) -> int:
    """Print how the job ended and return the exit code (``signum``: the signal that cancelled it, if any)."""
    from SegAssistLib.learning.jobs import FINAL_STATES

    state = status.get("state")
    if args.json:
        _say(json.dumps(status, indent=1, default=str))
    elif _job_line(status) != last:
        _say(_job_line(status))
    if signum is None:
        return _ended_code(job, status, args.store)
    if state not in FINAL_STATES:
        _say(f"job {job.job_id} is still stopping; see `segassist learn status --store {args.store}`", err=True)
        return 1
    if state == "cancelled":
        return 128 + signum
    if state == "done":
        _say(_finished_despite_cancel(status, args.store), err=True)
        return FINISHED_DESPITE_CANCEL
    return 1


def _registered_version(status: Dict[str, Any]) -> Optional[str]:
    """The id of the version a finished job registered (promoted or not); None when it registered none."""
    result = status.get("result")
    version = result.get("version") if isinstance(result, dict) else None
    return version.get("id") if isinstance(version, dict) else None


def _ended_code(job: Any, status: Dict[str, Any], store: Path) -> int:
    """The exit code of a job that ended on its own, watched to its end (no signal here): 0 when it
    registered a version (promoted or not), NOTHING_REGISTERED when it ended without one (the time
    budget too small, or cancelled by `learn cancel` from elsewhere: the reason in one line on stderr),
    1 when it failed."""
    state = status.get("state")
    if state == "done" and _registered_version(status) is not None:
        return 0
    if state == "done":
        result = status.get("result")
        why = status.get("message") or (result.get("reason") if isinstance(result, dict) else None) or "no reason given"
        _say(f"learn train: job {job.job_id} ended without registering a version: {why}", err=True)
        return NOTHING_REGISTERED
    if state == "cancelled":
        _say(f"learn train: job {job.job_id} was cancelled from elsewhere (`segassist learn cancel --store {store}`, "
             "or through the server): nothing registered", err=True)
        return NOTHING_REGISTERED
    return 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.jobs import FINAL_STATES, cancel_job

    _open(args).close()  # a missing store says so, as for the other subcommands
    status = cancel_job(args.store, args.job)
    if status.get("state") not in FINAL_STATES:
        _print(args, status, f"asked job {status.get('job_id')} to stop ({status.get('state')})")
        return 0
    _print(args, status, f"job {status.get('job_id')} had already ended ({status.get('state')}): nothing to stop")
    return 1


def cmd_versions(args: argparse.Namespace) -> int:
    _open(args).close()
    state = AdapterRegistry(args.store).read()
    lines = [f"current: {state.current or 'base'}"]
    for r in state.versions:
        mark = "*" if r.id == state.current else " "
        lines.append(
            f"{mark} {r.id:<5} {r.kind:<5} {r.status:<11} val Dice {r.val_dice:.4f} vs {r.incumbent_dice:.4f} "
            f"({r.incumbent or 'base'}), {r.steps} steps, {r.train_seconds:.0f} s, "
            f"{len(r.train_cases)}+{len(r.val_cases)} cases, {100 * r.trainable_share:.2f}% trainable"
        )
    data = {"current": state.current, "versions": [r.to_dict() for r in state.versions], "events": state.events}
    _print(args, data, "\n".join(lines))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.loop_errors import OtherBaseModelError

    _open(args).close()
    base_identity, loads = None, None
    if args.to != BASE:  # a version made for other base weights cannot answer with this one
        from SegAssistLib.engine.network import load_checkpoint
        from SegAssistLib.learning.deploy import version_network

        base = load_checkpoint(_checkpoint(args.checkpoint))
        base_identity = base.identity

        def loads(record: VersionRecord) -> None:
            """Build the target's network as a server's swap would, before the registry changes: a damaged
            file is refused here, not made current for every server to fail on."""
            try:
                version_network(base, registry, record)
            except AdapterError as exc:
                raise AdapterError(f"version {record.id} cannot be loaded ({exc}): nothing was rolled back") from exc

    registry = AdapterRegistry(args.store)
    try:  # one step back goes to the previous version of the current one's base weights, or refuses
        done = registry.rollback_detailed(
            args.to, user=args.user, base_identity=base_identity, expected_current=args.expected_current,
            require_change=True,  # --to the version already current: nothing to roll back (exit 2), as one step back
            check=loads,
        )
    except OtherBaseModelError as exc:
        if args.checkpoint is None:
            raise OtherBaseModelError(
                f"{exc} (the shipped model: give the base model the version was trained with, --checkpoint)"
            ) from exc
        raise
    record = done.record
    # which version it replaced, read under the registry's lock: without --from, a version a job promoted
    # just before the rollback ran is the one replaced, and the operator must see that
    data = {"current": record.id if record else None, "previous": done.previous}
    replaced = f"rolled back from {done.previous or BASE}"
    if done.set_aside is not None:  # the damaged registry named a current version nobody can read now
        data["set_aside"] = done.set_aside
        replaced = f"the damaged registry set aside as adapters/{done.set_aside}; the version it named is unknown"
    _print(args, data, f"current version: {version_label(record)} ({replaced})")
    return 0


_KEEP_EXISTING = (
    "{path} exists and is kept (it may be a proposal being corrected): give another --out, or --overwrite"
)


def check_mask_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, a mask output path that could not be written or would replace a file."""
    from SegAssistLib.files import output_problem

    if not is_mask_path(path):
        raise SegAssistError(f"--out {path}: write the proposal as {', '.join(MASK_SUFFIXES)}")
    problem = output_problem(path)
    if problem:
        raise SegAssistError(f"--out {path}: {problem}")
    if path.exists() and not overwrite:
        raise SegAssistError(_KEEP_EXISTING.format(path=path))


def refuse_output_in_store(path: Path, store_root: Path) -> None:
    """Refuse a proposal output inside the datastore (symlinks followed): in ``images/`` or ``labels/`` it
    would replace a stored annotation or be taken for an unrecorded file of the store's own."""
    root, target = Path(store_root).resolve(), Path(path).resolve()
    if target == root or root in target.parents:
        raise SegAssistError(
            f"--out {path} lies inside the datastore {store_root}, whose files are its own: write the proposal "
            "outside the store"
        )


def cmd_next(args: argparse.Namespace) -> int:
    from SegAssistLib.learning.active import NEEDS_ENGINE, next_case, release_next_case

    if args.user is not None and not args.lock:  # it once did nothing, silently
        raise SegAssistError("--user names whom --lock locks the case to: add --lock, or leave --user out")
    if args.lock and args.user is None:  # before the model is loaded, not after
        raise SegAssistError("--lock locks the case to a user: add --user NAME")
    if args.out is not None:  # before any case is locked
        if args.no_proposal:
            raise SegAssistError("--out writes the model's proposal: it cannot go with --no-proposal")
        refuse_output_in_store(args.out, args.store)
        check_mask_output(args.out, args.overwrite)
    engine = None
    _progress(args, f"choosing the next case ({args.strategy}) ...")
    if args.strategy in NEEDS_ENGINE or not args.no_proposal:
        import torch

        from SegAssistLib.engine.builtin import BuiltinEngine
        from SegAssistLib.learning.deploy import activate

        torch.set_num_threads(max(1, args.threads))
        engine = BuiltinEngine.from_checkpoint(_checkpoint(args.checkpoint))
        activate(engine, AdapterRegistry(args.store))
    with _open(args) as store:
        result = next_case(
            store, engine, args.strategy, seed=args.seed, user=args.user, lock=args.lock,
            lock_ttl_s=args.hours * 3600.0, with_proposal=not args.no_proposal, diversity_weight=args.diversity_weight,
            max_candidates=args.max_candidates,
            on_progress=lambda done, total: _progress(args, f"[{done}/{total}] candidate(s) scored with the model"),
            # with no proposal nothing else reads the chosen case's image: a damaged or missing one is
            # passed over here (as a server's next does), not handed out (and locked) to be found later
            prepare=(lambda case: store.load_image(case.id)) if args.no_proposal else None,
        )
        data = result.to_dict()
        for case_id, error in result.skipped.items():  # damaged or missing files, for someone to repair
            _progress(args, f"passed over case {case_id}: {error}")
        text = f"next case: {result.case.id} ({result.case.name}), {args.strategy} score {result.score.score:.4f}"
        if result.proposal is not None:
            p = result.proposal
            text += (f"\nproposal by {p.engine_version}: {int(p.mask.sum())} voxels, agreement "
                     f"{p.agreement:.3f} over {p.members} perturbed answers")
            if args.out is not None:
                reference = store.reference_geometry(result.case.id)
                from SegAssistLib.files import atomic_write
                from SegAssistLib.io import save_mask_nifti, save_segmentation_nrrd

                save = save_segmentation_nrrd if args.out.name.lower().endswith(".seg.nrrd") else save_mask_nifti
                try:  # written whole or not at all, and never over a file that appeared meanwhile
                    atomic_write(args.out, lambda tmp: save(p.mask, reference, tmp), overwrite=args.overwrite)
                except BaseException as exc:
                    if args.lock:  # the case is not left locked to someone who never got its proposal
                        release_next_case(store, result, args.user)
                    if isinstance(exc, FileExistsError) and args.out.exists():
                        raise SegAssistError(_KEEP_EXISTING.format(path=args.out)) from exc
                    raise
                data["proposal_file"] = str(args.out)
                text += f"\nwritten to {args.out}"
    _print(args, data, text)
    return 0
