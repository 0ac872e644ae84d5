"""Masks are written whole or not at all: a full disk (SimpleITK's NIfTI writer reports no failed write)
fails the write instead of replacing a good file with an empty one, every name ``segment --out`` accepts
is written under that exact name, and a write that fails leaves no temporary file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.files import TMP_PREFIX, atomic_write
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, save_mask_nifti, save_segmentation_nrrd

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = REPO / "Resources" / "Examples" / "hippocampus_001_prompts.json"
FORMATS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")

try:
    import resource
except ImportError:  # Windows
    resource = None
needs_fsize_limit = pytest.mark.skipif(
    resource is None or not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)"
)

# A child process whose writes past RLIMIT_FSIZE bytes fail (EFBIG, SIGXFSZ ignored), as they do on a full
# disk: the file is left empty or cut short, and SimpleITK's NIfTI writer reports nothing.
_LIMITED_WRITES = """
import json, resource, signal, sys
from pathlib import Path
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from SegAssistLib.files import atomic_write
from SegAssistLib.image import Volume
from SegAssistLib.io import save_mask_nifti, save_segmentation_nrrd
folder = Path(sys.argv[1])
mask = np.load(folder / "mask.npy")
volume = Volume(np.zeros(mask.shape, np.float32), (0.8, 0.9, 2.0), (1.0, 2.0, 3.0), np.eye(3))
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
outcomes = {}
for limit in (0, 300, 3000):
    for suffix in sys.argv[2:]:
        save = save_segmentation_nrrd if suffix == ".seg.nrrd" else save_mask_nifti
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            atomic_write(folder / f"mask{suffix}", lambda tmp: save(mask, volume, tmp), overwrite=True)
            outcomes[f"{limit} {suffix}"] = "written"
        except Exception as exc:
            outcomes[f"{limit} {suffix}"] = f"{type(exc).__name__}: {exc}"
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print(json.dumps(outcomes))
"""

# `segassist segment` in a child process whose writes fail past RLIMIT_FSIZE (argv[1]) bytes
_LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), hard))
from SegAssistLib.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _mask_and_volume():
    mask = (np.random.default_rng(0).random((40, 50, 60)) > 0.5).astype(np.uint8)  # ~20 KB compressed
    volume = Volume(np.zeros(mask.shape, np.float32), (0.8, 0.9, 2.0), (1.0, 2.0, 3.0), np.eye(3))
    return mask, volume


def _save(suffix: str):
    return save_segmentation_nrrd if suffix.lower().endswith(".seg.nrrd") else save_mask_nifti


def _child_env() -> dict:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written under the limit


@needs_fsize_limit
def test_a_full_disk_fails_every_format_and_keeps_the_earlier_file(tmp_path):
    """On a full disk every format was written as a 0-byte (or cut) file and reported written; with
    overwrite the good earlier file was replaced by it."""
    mask, volume = _mask_and_volume()
    np.save(tmp_path / "mask.npy", mask)
    earlier = {}
    for suffix in FORMATS:
        dest = tmp_path / f"mask{suffix}"
        atomic_write(dest, lambda tmp, s=suffix: _save(s)(1 - mask, volume, tmp))
        earlier[dest] = dest.read_bytes()

    child = subprocess.run([sys.executable, "-c", _LIMITED_WRITES, str(tmp_path), *FORMATS],
                           capture_output=True, text=True, env=_child_env(), timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    outcomes = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 3 * len(FORMATS)
    for key, outcome in outcomes.items():
        assert outcome.startswith("ImageError: ") and "is the disk full?" in outcome, (key, outcome)
    for dest, data in earlier.items():
        assert dest.read_bytes() == data, dest
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


@needs_fsize_limit
def test_segment_on_a_full_disk_exits_with_the_reason_and_keeps_the_earlier_result(tmp_path, shipped_checkpoint):
    out = tmp_path / "result.nii.gz"
    mask, volume = _mask_and_volume()
    save_mask_nifti(mask, volume, out)
    before = out.read_bytes()
    argv = ["segment", SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--overwrite", "--threads", "1"]
    child = subprocess.run([sys.executable, "-c", _LIMITED_CLI, "0", *map(str, argv)],
                           capture_output=True, text=True, env=_child_env(), timeout=300)  # fmt: skip
    assert child.returncode == 2, child.stdout + child.stderr
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith(f"segassist segment: error: --out {out} not written, nothing replaced: ") and (
        "the file written is empty (is the disk full?)" in last
    ), child.stderr
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]


# names `segment --out` accepts (any case) that SimpleITK's writers refused ("Bad Nifti file name"), or
# wrote elsewhere (a .mhd and .zraw pair; an Analyze .hdr.gz): each is written under the exact name given
NAMES = ["RESULT.NII.GZ", "result.Nii", "result.MHA", "scan.img.nii.gz", "x.nii.nii.gz", "R.Seg.NRRD", "a.NRRD",
         "m.nii.GZ", ".nii.gz", "two dots..nii"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_every_accepted_name_is_written_under_that_name(tmp_path, name):
    mask, volume = _mask_and_volume()
    dest = tmp_path / name
    atomic_write(dest, lambda tmp: _save(name)(mask, volume, tmp))
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing beside it, no temporary file
    assert np.array_equal(load_mask(dest), mask)  # read back by SegAssist, whatever the suffix's case
    if name.lower().endswith(".seg.nrrd"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(dest))
        reader.ReadImageInformation()
        assert reader.GetMetaData("Segment0_Name") == "SegAssist"


def test_a_simpleitk_failure_is_an_image_error_naming_the_file(tmp_path):
    mask, volume = _mask_and_volume()
    with pytest.raises(ImageError, match=r"cannot write .*mask\.unknown: .*ImageIO"):
        save_mask_nifti(mask, volume, tmp_path / "mask.unknown")


def test_what_a_failed_writer_left_beside_its_temporary_file_is_removed(tmp_path):
    """ITK's MetaImage writer, given ``.MHA``, wrote a ``.mhd`` and ``.zraw`` pair instead: the write failed
    (no file of the temporary name) and the pair stayed."""
    mask, volume = _mask_and_volume()

    def writer(tmp: Path) -> None:
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp.with_name(tmp.name[: -len(".mha")] + ".mhd")), True)

    with pytest.raises(OSError, match="did not create"):
        atomic_write(tmp_path / "result.mha", writer)
    assert list(tmp_path.iterdir()) == []


def test_files_written_together_are_all_replaced_or_none(tmp_path, monkeypatch):
    """A rename that fails puts back the files renamed before it: the earlier file, or no file."""
    from SegAssistLib import files

    old_mask, new_log = tmp_path / "mask.nii.gz", tmp_path / "log.json"
    old_mask.write_bytes(b"earlier mask")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == new_log:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    writes = [(old_mask, lambda p: Path(p).write_bytes(b"new mask")), (new_log, lambda p: Path(p).write_text("{}"))]
    with pytest.raises(PermissionError):
        files.atomic_write_many(writes, overwrite=True)
    assert old_mask.read_bytes() == b"earlier mask" and not new_log.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]  # no temporary or backup file

    fresh = tmp_path / "fresh"
    writes = [(fresh / "mask.nii.gz", lambda p: Path(p).write_bytes(b"m")), (new_log, lambda p: Path(p).write_text(""))]
    real_link = os.link

    def link(src, dst, **kwargs):  # without overwrite, files are published as hard links
        if Path(dst) == new_log:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(files.os, "link", link)
    with pytest.raises(PermissionError):
        files.atomic_write_many(writes)
    assert list(fresh.iterdir()) == []  # the first file, published, is taken back

    monkeypatch.setattr(files.os, "replace", real_replace)
    monkeypatch.setattr(files.os, "link", real_link)
    assert len(files.atomic_write_many(writes)) == 2 and (fresh / "mask.nii.gz").read_bytes() == b"m"
    assert new_log.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == [
        "fresh", "log.json", "mask.nii.gz"
    ]  # fmt: skip


# A writer process (argv: folder, its name, writers, rounds): each round every writer writes file-<round>
# without overwrite, all of them past the first check and their file written before any publishes it;
# prints the rounds it won
_RACING_WRITER = """
import contextlib, os, sys, time
from pathlib import Path
from SegAssistLib.files import atomic_write
folder, me, writers, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 60  # a writer that never came (it failed) leaves the others waiting no longer
for n in range(rounds):
    def writer(tmp):
        tmp.write_bytes(me.encode())
        (folder / f"ready-{n}-{me}").touch()
        while sum(name.startswith(f"ready-{n}-") for name in os.listdir(folder)) < writers:
            if time.monotonic() > deadline:
                sys.exit("the other writers never came")
    with contextlib.suppress(FileExistsError):
        atomic_write(folder / f"file-{n}", writer)
        print(n, flush=True)
"""


def test_a_write_that_must_not_replace_never_replaces_a_file_made_meanwhile(tmp_path):
    """The no-overwrite check came before a rename, and a rename replaces: writers of one name (two
    saves of an adapter to one path) could both pass the check, the second replacing the first's file
    (in about half of these rounds)."""
    writers, rounds = 2, 100
    argv = [sys.executable, "-c", _RACING_WRITER, str(tmp_path)]
    processes = [subprocess.Popen([*argv, f"w{i}", str(writers), str(rounds)], stdout=subprocess.PIPE, text=True)
                 for i in range(writers)]  # fmt: skip
    try:
        won = {f"w{i}": set(map(int, p.communicate(timeout=120)[0].split())) for i, p in enumerate(processes)}
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert all(p.returncode == 0 for p in processes)
    for n in range(rounds):
        winners = [name for name, rounds_won in won.items() if n in rounds_won]
        assert len(winners) == 1, f"round {n}: {winners or 'no writer'} published file-{n}"
        assert (tmp_path / f"file-{n}").read_text() == winners[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


# A datastore import in a child process whose writes fail past RLIMIT_FSIZE bytes (argv[2])
_LIMITED_IMPORT = """
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from SegAssistLib.image import Volume
from SegAssistLib.learning.datastore import Datastore
store = Datastore(sys.argv[1])
volume = Volume(np.random.default_rng(1).normal(size=(40, 50, 60)).astype(np.float32), (0.8, 0.9, 2.0))
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))
try:
    store.import_volume(volume, name="big", user="admin")
    print("imported")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


@needs_fsize_limit
def test_an_import_on_a_full_disk_stores_no_short_image(tmp_path):
    """The store's copy of an image is read back whole before it becomes a case: on a full disk the
    import fails and leaves neither a case nor a file (a cut-off NIfTI reads back as other voxels)."""
    from learning_fixtures import make_store

    store, cases = make_store(tmp_path / "store", n_labelled=1, n_new=0)
    store.close()
    images = sorted(p.name for p in (tmp_path / "store" / "images").iterdir())
    for limit in (0, 4000, 200_000):  # the float image is ~700 KB compressed
        child = subprocess.run([sys.executable, "-c", _LIMITED_IMPORT, str(tmp_path / "store"), str(limit)],
                               capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert child.returncode == 0, child.stderr
        # the store's storage error (503 storage_unavailable over HTTP), saying why and that nothing was saved
        assert child.stdout.startswith("StoreAccessError") and "is the disk full?" in child.stdout, child.stdout
        assert "nothing was saved" in child.stdout, child.stdout
    from SegAssistLib.learning.datastore import Datastore

    with Datastore(tmp_path / "store") as store:
        assert [c.id for c in store.list_cases()] == [c.id for c in cases]
        assert store.verify().ok
    assert sorted(p.name for p in (tmp_path / "store" / "images").iterdir()) == images

