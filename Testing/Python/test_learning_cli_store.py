"""``segassist learn`` on the store itself: import beside datasets and exports, review, verify, an export
with a damaged label or interrupted, a save with its prompt log, unlock of a case nobody locked, and the
message for a store folder that is the source folder.

Real stores, real image files and the real command (``main``, as ``test_learning_cli``); torch-free and
fast: tiny volumes, no model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import build_parser, main
from SegAssistLib.image import Volume
from SegAssistLib.io import volume_to_sitk
from SegAssistLib.learning import export as export_module
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.records import CaseRecord, CaseStatus
from SegAssistLib.learning.store_files import DEFAULT_RECOVER_AGE_S
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt

REPO = Path(__file__).resolve().parents[2]

SHAPE = (8, 10, 12)  # array order k, j, i


def make_volume(seed: int, shape=SHAPE, spacing=(0.8, 0.9, 2.0), origin=(1.0, -2.0, 3.0)) -> Volume:
    rng = np.random.default_rng(seed)
    array = (rng.random(shape) * 100 + seed).astype(np.int16)
    return Volume(array=array, spacing=spacing, origin=origin)


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume_to_sitk(make_volume(seed)), str(path))
    return path


def write_mask(path: Path, reference: Path, value: int = 1) -> Path:
    """A label file on the grid of ``reference`` (what an MSD dataset's labelsTr holds)."""
    image = sitk.ReadImage(str(reference))
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    array[2:5, 3:6, 4:8] = value
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(path))
    return path


def box(shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2:5, 3:6, 4:8] = 1
    return m


def submitted_store(root: Path, n: int = 3) -> Tuple[Datastore, List[CaseRecord]]:
    """A store of ``n`` cases, each with a submitted label by alice."""
    store = Datastore(root)
    cases = []
    for i in range(n):
        case = store.import_volume(make_volume(10 + i), name=f"case_{i}", user="admin")
        store.save_label(case.id, box(), user="alice")
        cases.append(store.get_case(case.id))
    return store, cases


def run(capsys, *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------- import


def test_import_never_takes_the_labels_of_a_dataset_or_an_export_below_the_folder(tmp_path: Path, capsys):
    """Only the folder given was checked for imagesTr/imagesTs: a dataset or an earlier export one level
    down had its labelsTr (and segmentations) imported as new cases to annotate."""
    scans = tmp_path / "scans"
    write_image(scans / "p1.nii.gz", 1)
    export = scans / "export"  # an earlier `learn export` inside the folder
    write_image(export / "imagesTr" / "e1.nii.gz", 2)
    write_mask(export / "labelsTr" / "e1.nii.gz", export / "imagesTr" / "e1.nii.gz")
    (export / "dataset.json").write_text("{}")
    hippo = scans / "msd" / "hippo"  # an MSD dataset two levels down, with a test split
    write_image(hippo / "imagesTr" / "h1.nii.gz", 3)
    write_image(hippo / "imagesTs" / "h2.nii.gz", 4)
    write_mask(hippo / "labelsTr" / "h1.nii.gz", hippo / "imagesTr" / "h1.nii.gz")
    write_image(hippo / "extra" / "aside.nii.gz", 5)  # beside imagesTr: not read
    write_mask(scans / "other" / "segmentations" / "s.nii.gz", scans / "p1.nii.gz", 2)  # never entered
    write_mask(scans / "other" / "labelsTs" / "t.nii.gz", scans / "p1.nii.gz", 3)

    store = tmp_path / "store"
    code, out, err = run(capsys, "learn", "import", str(scans), "--store", str(store), "--user", "admin", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert sorted(c["name"] for c in report["added"]) == ["e1", "h1", "h2", "p1"], report
    assert report["skipped"] == []
    not_read = {Path(f["folder"]).relative_to(scans).as_posix(): f["reason"] for f in report["not_read"]}
    assert set(not_read) == {"export/labelsTr", "msd/hippo/labelsTr", "msd/hippo/extra", "other/segmentations",
                             "other/labelsTs"}, not_read  # fmt: skip
    assert "labels" in not_read["export/labelsTr"] and "imagesTr" in not_read["msd/hippo/extra"]
    assert "not read: " in err and "labelsTr" in err  # each folder passed over is named
    with Datastore(store) as ds:
        parts = [set(Path(c.source).relative_to(scans).parts) for c in ds.list_cases()]
        assert len(parts) == 4 and not any(p & {"labelsTr", "labelsTs", "segmentations", "extra"} for p in parts)

    # the help says so
    help_text = _help(["learn", "import"])
    assert "labelsTr" in help_text and "segmentations" in help_text and "imagesTr" in help_text


def test_import_passes_over_the_label_maps_beside_their_images_and_names_each(tmp_path: Path, capsys):
    """``learn import Resources/Samples`` imported hippocampus_001_label as a case to annotate (and a
    folder's ``x_mask`` beside ``x``), although the help said labels were never imported; ``learn next``
    then proposed the label map as the next case."""
    samples = REPO / "Resources" / "Samples"
    store = tmp_path / "store"
    code, out, err = run(capsys, "learn", "import", str(samples), "--store", str(store), "--user", "admin", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [c["name"] for c in report["added"]] == ["hippocampus_001_image"], report
    assert report["not_read"] == [{"file": str(samples / "hippocampus_001_label.nii.gz"), "reason": (
        "the label map of hippocampus_001_image.nii.gz beside it, not an image to annotate; --include-label-maps "
        "imports it")}], report  # fmt: skip
    assert f"not read: {samples / 'hippocampus_001_label.nii.gz'} (the label map of" in err

    scans = tmp_path / "scans"  # each ending beside its image; alone (no image of that stem) it is an image
    image = write_image(scans / "x.nii.gz", 1)
    write_mask(scans / "x_mask.nii.gz", image)
    write_mask(scans / "X_Seg.nrrd", image, 2)  # values differ: each a case of its own with the override
    write_mask(scans / "x.seg.nrrd", image, 4)
    write_image(scans / "y_image.nii.gz", 2)
    write_mask(scans / "y_labels.nii.gz", scans / "y_image.nii.gz", 3)
    write_image(scans / "brain_mask.nii.gz", 3)  # no brain.nii.gz beside it: an image to annotate
    code, out, err = run(capsys, "learn", "import", str(scans), "--store", str(tmp_path / "s2"), "--user", "admin",
                         "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert sorted(c["name"] for c in report["added"]) == ["brain_mask", "x", "y_image"], report
    assert sorted(Path(f["file"]).name for f in report["not_read"]) == ["X_Seg.nrrd", "x_mask.nii.gz",
                                                                        "y_labels.nii.gz"]  # fmt: skip
    # the override, and a label-map file given alone: imported
    code, out, err = run(capsys, "learn", "import", str(scans), "--store", str(tmp_path / "s3"), "--user", "admin",
                         "--json", "--include-label-maps")  # fmt: skip
    assert code == 0 and len(json.loads(out)["added"]) == 6 and json.loads(out)["not_read"] == [], err
    code, out, err = run(capsys, "learn", "import", str(scans / "x_mask.nii.gz"), "--store", str(tmp_path / "s4"),
                         "--user", "admin", "--json")  # fmt: skip
    assert code == 0 and [c["name"] for c in json.loads(out)["added"]] == ["x_mask"], err
    help_text = " ".join(_help(["learn", "import"]).split())
    assert "_label, _labels, _seg, _mask, _segmentation or _gt" in help_text and "STEM_image" in help_text, help_text
    assert "never imported" not in help_text


def test_a_store_folder_that_is_the_source_folder_is_named_for_what_it_is(tmp_path: Path, capsys):
    """``--store`` the source folder itself was refused as "it lies inside the datastore", though no
    datastore was there."""
    src = tmp_path / "src"
    write_image(src / "a.nii.gz", 1)
    code, _, err = run(capsys, "learn", "import", str(src), "--store", str(src), "--user", "admin")
    assert code == 2
    assert "lies inside the datastore" not in err, err
    assert "must not be the source folder" in err and "choose another --store" in err, err
    assert not (src / "segassist.sqlite").exists()


# ---------------------------------------------------------------------------------- review


def test_review_accepts_or_rejects_the_latest_submitted_label(tmp_path: Path, capsys):
    """No command (nor endpoint) called Datastore.review: no case could ever become reviewed."""
    root = tmp_path / "store"
    store, cases = submitted_store(root, 2)
    first_label = store.latest_label(cases[0].id)
    store.close()
    base = ["--store", str(root), "--user", "carol"]

    code, out, err = run(capsys, "learn", "review", cases[0].id, "--accept", "--note", "clean edges", *base, "--json")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["accepted"] is True and reply["reviewer"] == "carol" and reply["note"] == "clean edges"
    assert reply["label_id"] == first_label.id and reply["case"]["status"] == "reviewed"

    code, out, err = run(capsys, "learn", "review", cases[1].id, "--reject", *base)
    assert code == 0, err
    assert "rejected" in out and "in_progress" in out
    with Datastore(root) as ds:
        assert ds.get_case(cases[0].id).status is CaseStatus.REVIEWED
        assert ds.get_case(cases[1].id).status is CaseStatus.IN_PROGRESS
        assert [(r.reviewer, r.accepted) for r in ds.reviews(cases[1].id)] == [("carol", False)]
        ds.lock(cases[0].id, "alice")  # a new submission after the review
        newer = ds.save_label(cases[0].id, box() * 2, user="alice")

    # a verdict on the version looked at, once a newer one was submitted: refused
    code, _, err = run(capsys, "learn", "review", cases[0].id, "--accept", "--label", first_label.id, *base)
    assert code == 2 and "no longer the latest" in err, err
    code, _, err = run(capsys, "learn", "review", cases[1].id, "--accept", *base)  # in progress: not reviewable
    assert code == 2 and "only submitted cases can be reviewed" in err, err
    with pytest.raises(SystemExit):  # a verdict is required, and only one
        main(["learn", "review", cases[0].id, "--accept", "--reject", *base])
    capsys.readouterr()
    code, _, err = run(capsys, "learn", "review", cases[0].id, "--accept", "--label", newer.id, *base)
    assert code == 0, err

    # the export's "submitted and reviewed" now has a reviewed case
    out_dir = tmp_path / "export"
    assert run(capsys, "learn", "export", str(out_dir), "--store", str(root), "--no-seg-nrrd")[0] == 0
    exported = json.loads((out_dir / "dataset.json").read_text())["segassist"]["cases"]
    statuses = {c["case_id"]: c["status"] for c in exported}
    assert statuses == {cases[0].id: "reviewed"}  # the rejected case is back in progress: not exported


# ---------------------------------------------------------------------------------- verify


def test_verify_reports_damaged_files_and_recover_tidies_old_leftovers(tmp_path: Path, capsys):
    """verify() and recover() had no command: a damaged store could only be found by a failing export.
    A complete file no record names is moved to quarantine/, never deleted (it may be an annotation)."""
    root = tmp_path / "store"
    store, cases = submitted_store(root, 2)
    label = store.latest_label(cases[0].id)
    store.close()
    code, out, _ = run(capsys, "learn", "verify", "--store", str(root))
    assert code == 0 and "every image and label the database records matches its checksum" in out, out

    label_file = root / "labels" / cases[0].id / f"{label.id}.nii.gz"
    good = label_file.read_bytes()
    label_file.write_bytes(good[:-20] + b"\0" * 20)  # damaged in place
    old = root / "labels" / cases[1].id / ("a" * 32 + ".nii.gz")  # a file no record points at
    old.write_bytes(b"left over")
    then = time.time() - DEFAULT_RECOVER_AGE_S - 60
    os.utime(old, (then, then))
    young = root / "images" / ".tmp-0123456789ab-x.nii.gz"  # maybe a write in progress
    young.write_bytes(b"being written")

    code, out, _ = run(capsys, "learn", "verify", "--store", str(root), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["damaged"] == [f"label version {label.id}: checksum mismatch"]
    assert report["leftovers"] == [str(young.relative_to(root))]
    assert report["unrecorded"] == [str(old.relative_to(root))]
    assert report["removed"] == [] and report["quarantined"] == []

    code, out, _ = run(capsys, "learn", "verify", "--store", str(root), "--recover")
    assert code == 1  # still damaged: a damaged file is never deleted
    moved = next((root / "quarantine").rglob(old.name))
    assert f"moved to quarantine: {old.relative_to(root)} -> {moved.relative_to(root)}" in out, out
    assert "damaged: label version" in out, out
    assert not old.exists() and moved.read_bytes() == b"left over" and young.exists() and label_file.exists()

    label_file.write_bytes(good)
    young.unlink()
    assert run(capsys, "learn", "verify", "--store", str(root))[0] == 0


# ---------------------------------------------------------------------------------- export


def test_an_export_with_a_damaged_label_writes_nothing_and_names_the_case(tmp_path: Path, capsys):
    """One damaged label stopped the export halfway, leaving a half-written folder, and the error said
    "run verify()" (no such command)."""
    root = tmp_path / "store"
    store, cases = submitted_store(root, 3)
    damaged = cases[1]
    label = store.latest_label(damaged.id)
    store.close()
    label_file = root / "labels" / damaged.id / f"{label.id}.nii.gz"
    label_file.write_bytes(label_file.read_bytes()[:-8] + b"\0" * 8)

    out_dir = tmp_path / "exports" / "ds"
    code, _, err = run(capsys, "learn", "export", str(out_dir), "--store", str(root))
    assert code == 2
    assert damaged.id in err and damaged.name in err and "segassist learn verify" in err, err
    assert "verify()" not in err and "--skip-damaged" in err
    assert not (tmp_path / "exports").exists()  # nothing written at all, not even the parent folder

    code, out, err = run(capsys, "learn", "export", str(out_dir), "--store", str(root), "--skip-damaged", "--json")
    assert code == 0, err
    assert f"warning: case {damaged.id} ({damaged.name}) not exported" in err
    reply = json.loads(out)
    assert reply["cases"] == 2 and [s["case_id"] for s in reply["skipped_damaged"]] == [damaged.id]
    dataset = json.loads((out_dir / "dataset.json").read_text())
    assert {c["case_id"] for c in dataset["segassist"]["cases"]} == {cases[0].id, cases[2].id}
    assert [s["case_id"] for s in dataset["segassist"]["skipped_damaged"]] == [damaged.id]
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["ds"]  # no work folder left beside it
    assert "--skip-damaged" in _help(["learn", "export"])


def test_an_interrupted_export_leaves_no_folder_under_its_name(tmp_path: Path, capsys, monkeypatch):
    """The export wrote straight into its target: a failure (or Ctrl-C) halfway left a folder of some
    cases under the name asked for."""
    root = tmp_path / "store"
    submitted_store(root, 3)[0].close()
    written = []
    real = export_module._write_seg_nrrd

    def fail_on_the_second(*args, **kwargs):
        written.append(args)
        if len(written) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "_write_seg_nrrd", fail_on_the_second)
    target = tmp_path / "out" / "ds"
    target.parent.mkdir()
    target.mkdir()  # an empty folder given as the target: allowed, and left as it was
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 130, err
    assert target.is_dir() and not any(target.iterdir())
    assert sorted(p.name for p in target.parent.iterdir()) == ["ds"]  # the work folder is gone too
    monkeypatch.undo()
    assert run(capsys, "learn", "export", str(target), "--store", str(root))[0] == 0
    assert len(json.loads((target / "dataset.json").read_text())["training"]) == 3


EXPORTED = ["dataset.json", "imagesTr", "labelsTr", "segmentations"]


def test_an_export_into_the_current_folder_a_link_or_an_empty_folder_keeps_that_folder(
    tmp_path: Path, capsys, monkeypatch
):
    """Since the export was written beside its target and renamed onto it, `learn export .` (a work
    folder inside the target: "was filled during the export"), a link to an empty folder (ENOTDIR) and an
    empty mount point (EBUSY) failed after all the work, exporting nothing. An existing empty folder is
    kept as it is: the same folder, its permissions (a group's shared folder: setgid) kept."""
    root = tmp_path / "store"
    submitted_store(root, 2)[0].close()

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = run(capsys, "learn", "export", ".", "--store", str(root))
    assert code == 0, err
    assert "exported 2 case(s) to ." in out
    assert sorted(os.listdir(here)) == EXPORTED  # no work folder left inside
    assert len(json.loads((here / "dataset.json").read_text())["training"]) == 2
    monkeypatch.chdir(tmp_path)

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    code, _, err = run(capsys, "learn", "export", str(link), "--store", str(root), "--json")
    assert code == 0, err
    assert link.is_symlink() and sorted(os.listdir(real)) == EXPORTED
    assert len(json.loads((link / "dataset.json").read_text())["training"]) == 2

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2750)
    before = os.stat(shared)
    assert run(capsys, "learn", "export", str(shared), "--store", str(root))[0] == 0
    after = os.stat(shared)
    assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid) == (
        before.st_ino, before.st_mode, before.st_uid, before.st_gid
    )  # fmt: skip
    assert sorted(os.listdir(shared)) == EXPORTED
    assert sorted(os.listdir(tmp_path)) == ["here", "link", "real", "shared", "store"]  # nothing left beside


def _filling(monkeypatch, fill) -> None:
    """The export's writing of its files, then ``fill(work)``: another process adding to the target."""
    real = export_module._write_msd

    def write_then_fill(store, out, *args):
        real(store, out, *args)
        fill(out)

    monkeypatch.setattr(export_module, "_write_msd", write_then_fill)


def test_an_empty_folder_filled_during_the_export_is_refused_and_keeps_what_was_put_there(
    tmp_path: Path, capsys, monkeypatch
):
    root = tmp_path / "store"
    submitted_store(root, 2)[0].close()
    target = tmp_path / "out"
    target.mkdir()
    _filling(monkeypatch, lambda work: (target / "notes.txt").write_text("mine"))
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 2 and f"export folder {target} was filled during the export" in err, err
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"

    # an entry of the export's own name, made while its entries are moved up: never replaced, and the
    # entries already moved are taken back out
    (target / "notes.txt").unlink()
    real_rename = export_module._rename_new

    def someone_writes_dataset_json(src: Path, dst: Path) -> None:
        if dst.name == "dataset.json":
            dst.write_text("theirs")
        real_rename(src, dst)

    monkeypatch.undo()
    monkeypatch.setattr(export_module, "_rename_new", someone_writes_dataset_json)
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 2 and f"export folder {target} was filled during the export" in err, err
    assert os.listdir(target) == ["dataset.json"] and (target / "dataset.json").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["out", "store"]

    # a new target made and filled meanwhile: refused too, what is there kept
    monkeypatch.undo()
    fresh = tmp_path / "fresh"

    def make_and_fill(work: Path) -> None:
        fresh.mkdir()
        (fresh / "notes.txt").write_text("mine")

    _filling(monkeypatch, make_and_fill)
    code, _, err = run(capsys, "learn", "export", str(fresh), "--store", str(root))
    assert code == 2 and f"export folder {fresh} was filled during the export" in err, err
    assert os.listdir(fresh) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["fresh", "out", "store"]

    monkeypatch.undo()
    assert run(capsys, "learn", "export", str(target), "--store", str(root))[0] == 2  # theirs is still there
    (target / "dataset.json").unlink()
    assert run(capsys, "learn", "export", str(target), "--store", str(root))[0] == 0
    assert sorted(os.listdir(target)) == EXPORTED


def test_a_target_not_empty_is_refused_before_any_file_is_read(tmp_path: Path, capsys, monkeypatch):
    root = tmp_path / "store"
    submitted_store(root, 2)[0].close()
    checked = []
    monkeypatch.setattr(export_module, "_damage", lambda *args: checked.append(args))
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 2 and f"export folder {target} is not empty" in err, err
    assert checked == []  # nothing hashed

    # what a killed export left in its target: said so
    (target / "notes.txt").unlink()
    (target / ".exporting-0123abcd").mkdir()
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 2 and checked == []
    assert "holds only what an interrupted export left (.exporting-0123abcd): remove it" in err, err


def test_an_export_killed_while_moving_its_entries_up_is_named_as_interrupted(tmp_path: Path, capsys):
    """A real kill after the first entry moved up into an existing empty target: a next export said
    only "not empty", as if the entries were someone else's."""
    root = tmp_path / "store"
    submitted_store(root, 2)[0].close()
    target = tmp_path / "out"
    target.mkdir()
    code = (
        "import os, signal, sys\n"
        "from SegAssistLib.learning import export\n"
        "real = export._rename_new\n"
        "def killed_after_one(src, dst):\n"
        "    real(src, dst)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "export._rename_new = killed_after_one\n"
        "from SegAssistLib.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run([sys.executable, "-c", code, "learn", "export", str(target), "--store", str(root)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(os.listdir(target))
    assert len(left) == 2 and left[0].startswith(".exporting-"), left  # one entry moved up, the rest hidden
    assert not (target / "dataset.json").exists() and (target / left[0] / "dataset.json").exists()
    code, _, err = run(capsys, "learn", "export", str(target), "--store", str(root))
    assert code == 2 and "holds only what an interrupted export left" in err and left[0] in err, err


# ---------------------------------------------------------------------------------- save with a prompt log


def _log(case: CaseRecord, store: Datastore, shape_ijk=None, model="0.3.0+v3", n=2) -> PromptLog:
    reference = store.reference_geometry(case.id)
    image = ImageInfo(
        shape_ijk=tuple(shape_ijk or case.shape[::-1]),
        spacing=tuple(case.spacing),
        origin=tuple(reference.origin),
        direction=tuple(tuple(row) for row in np.asarray(reference.direction, float).reshape(3, 3).tolist()),
    )
    return PromptLog(image=image, model=model, prompts=[PointPrompt(position=(3 + i, 4, 3)) for i in range(n)])


def test_save_checks_the_prompt_log_against_the_case_and_records_its_model(tmp_path: Path, capsys):
    """A log recorded on a 300x300x90 image was accepted for a 12x10x8 case, and the label recorded no
    model although the log named one."""
    root = tmp_path / "store"
    store = Datastore(root)
    case = store.import_volume(make_volume(1), name="c", user="admin")
    mask_file = tmp_path / "mask.nii.gz"
    sitk.WriteImage(volume_to_sitk(Volume(box(), spacing=case.spacing, origin=(1.0, -2.0, 3.0))), str(mask_file))
    wrong = tmp_path / "wrong.json"
    _log(case, store, shape_ijk=(300, 300, 90)).save(wrong)
    right = tmp_path / "right.json"
    _log(case, store).save(right)
    store.close()
    base = [case.id, str(mask_file), "--store", str(root), "--user", "alice", "--draft"]

    code, _, err = run(capsys, "learn", "save", *base, "--prompt-log", str(wrong))
    assert code == 2 and "[300, 300, 90]" in err and "would land elsewhere" in err, err
    code, _, err = run(capsys, "learn", "save", *base, "--prompt-log", str(right), "--model", "0.2.0")
    assert code == 2 and "0.3.0+v3" in err, err  # provenance that contradicts the log
    with Datastore(root) as ds:
        assert ds.label_versions(case.id) == []  # nothing saved by either

    code, out, err = run(capsys, "learn", "save", *base, "--prompt-log", str(right), "--json")
    assert code == 0, err
    label = json.loads(out)
    assert label["model"] == "0.3.0+v3" and label["adapter_version"] == "v3"
    assert label["n_interactions"] == 2 and label["has_prompt_log"] is True
    code, out, err = run(capsys, "learn", "save", *base, "--interactions", "7", "--seconds", "30", "--json")
    assert code == 0, err
    label = json.loads(out)
    assert label["n_interactions"] == 7 and label["seconds_spent"] == 30.0 and label["model"] is None


# ---------------------------------------------------------------------------------- unlock


def test_unlock_of_a_case_nobody_locked_says_so_with_its_own_exit_code(tmp_path: Path, capsys):
    """Unlocking a case nobody locked printed the case and exited 0; an expired lock was "released" by
    anyone, resetting the case to new; another's live lock was refused without a word of --force."""
    root = tmp_path / "store"
    store = Datastore(root)
    case = store.import_volume(make_volume(1), name="c", user="admin")
    store.close()
    base = ["--store", str(root)]

    code, _, err = run(capsys, "learn", "unlock", case.id, "--user", "alice", *base)
    assert code == 4 and f"case {case.id} (c) is not locked" in err, err
    assert "exit 4" in _help(["learn", "unlock"])

    assert run(capsys, "learn", "lock", case.id, "--user", "alice", *base)[0] == 0
    code, _, err = run(capsys, "learn", "unlock", case.id, "--user", "bob", *base)
    assert code == 2 and "locked by alice" in err and "--force" in err, err
    code, out, err = run(capsys, "learn", "unlock", case.id, "--user", "alice", *base)
    assert code == 0 and "released the lock of alice" in out and "new again" in out, (out, err)

    assert run(capsys, "learn", "lock", case.id, "--user", "alice", "--hours", "0.0001", *base)[0] == 0  # 0.36 s
    time.sleep(0.6)
    code, _, err = run(capsys, "learn", "unlock", case.id, "--user", "bob", *base)
    assert code == 4 and "lapsed" in err and "alice" in err, err
    with Datastore(root) as ds:
        assert ds.get_case(case.id).status is CaseStatus.NEW  # nothing released; read as new: its lock lapsed
    code, _, err = run(capsys, "learn", "unlock", case.id, "--user", "admin", "--force", *base)
    assert code == 4, err  # --force releases a lock; there is none


def _help(argv: List[str]) -> str:
    """The --help text of a subcommand."""
    parser = build_parser()
    sub = parser
    for name in argv:
        action = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction")
        sub = action.choices[name]
    return sub.format_help()
