"""Where an export may go: never into the store's own images/ or labels/ (``verify`` then called the
export's files leftovers and ``--recover`` took them away), only under its exports/ inside the store;
and a target under a file is refused naming that file, before any damaged case is announced as left
out of an export that then failed anyway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from SegAssistLib.cli import main
from SegAssistLib.image import Volume
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.errors import CorruptDataError, DatastoreError
from SegAssistLib.learning.export import export_msd

SHAPE = (6, 7, 8)


def submitted_store(root: Path, n: int = 2) -> Datastore:
    store = Datastore(root)
    for i in range(n):
        rng = np.random.default_rng(i)
        case = store.import_volume(Volume((rng.random(SHAPE) * 100).astype(np.int16), spacing=(1.0, 1.0, 2.0)),
                                   name=f"case{i}", user="admin")  # fmt: skip
        m = np.zeros(SHAPE, np.uint8)
        m[1:4, 2:5, 3:6] = 1
        store.save_label(case.id, m, "alice")
    return store


def stored(root: Path) -> List[Path]:
    return sorted(p for sub in ("images", "labels") for p in (root / sub).rglob("*"))


@pytest.mark.parametrize("inside", ["labels/myexport", "images/myexport", ".", "exports", "elsewhere/x"])
def test_an_export_inside_the_store_but_not_under_exports_is_refused(tmp_path: Path, inside: str):
    root = tmp_path / "store"
    with submitted_store(root) as store:
        before = stored(root)
        with pytest.raises(DatastoreError, match="lies inside the datastore .* only its exports/ folder may hold"):
            export_msd(store, root / inside, seg_nrrd=False)
        assert stored(root) == before and not (root / "elsewhere").exists()
        assert store.verify().orphans == ()


def test_an_export_under_the_stores_exports_folder_is_made(tmp_path: Path):
    root = tmp_path / "store"
    with submitted_store(root) as store:
        out = export_msd(store, root / "exports" / "mine", seg_nrrd=False)
        assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
        default = export_msd(store, seg_nrrd=False)
        assert default.parent == root / "exports"
        assert store.verify().orphans == ()


def test_learn_export_into_labels_exits_2_with_one_line(tmp_path: Path, capsys):
    root = tmp_path / "store"
    submitted_store(root).close()
    code = main(["learn", "export", str(root / "labels" / "myexport"), "--store", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "lies inside the datastore" in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "labels" / "myexport").exists()


def damage_first_label(store: Datastore) -> Tuple[str, Path]:
    case = store.list_cases()[0]
    path = store.label_path(case.id, store.latest_label(case.id).id)
    path.write_bytes(b"damaged")
    return case.id, path


def test_a_target_under_a_file_is_refused_naming_the_file_before_any_case_is_announced(tmp_path: Path):
    root = tmp_path / "store"
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with submitted_store(root) as store:
        damage_first_label(store)
        told: List[str] = []
        expected = f"cannot export to {blocker / 'sub'}: {blocker} is a file, not a folder"
        with pytest.raises(DatastoreError, match=expected):
            export_msd(store, blocker / "sub", seg_nrrd=False, skip_damaged=True,
                       on_damaged=lambda case, problem: told.append(case.id))  # fmt: skip
        assert told == [] and blocker.read_text() == "not a folder"


def test_learn_export_skip_damaged_under_a_file_warns_of_nothing(tmp_path: Path, capsys):
    root = tmp_path / "store"
    (tmp_path / "afile").write_text("x")
    with submitted_store(root) as store:
        damage_first_label(store)
    code = main(["learn", "export", str(tmp_path / "afile" / "sub"), "--store", str(root), "--skip-damaged"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err, err
    assert "not exported" not in err


def test_skip_damaged_names_the_left_out_case_once_the_export_is_under_way(tmp_path: Path):
    root = tmp_path / "store"
    with submitted_store(root) as store:
        damaged, _ = damage_first_label(store)
        told: List[str] = []
        out = export_msd(store, tmp_path / "out", seg_nrrd=False, skip_damaged=True,
                         on_damaged=lambda case, problem: told.append(case.id))  # fmt: skip
        assert told == [damaged] and json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_every_case_damaged_names_them_in_the_error(tmp_path: Path):
    root = tmp_path / "store"
    with submitted_store(root, n=1) as store:
        damaged, _ = damage_first_label(store)
        with pytest.raises(CorruptDataError, match=f"every case to export has damaged files in the store \\(case "
                           f"{damaged}"):  # fmt: skip
            export_msd(store, tmp_path / "out", seg_nrrd=False, skip_damaged=True)
        assert not (tmp_path / "out").exists()
