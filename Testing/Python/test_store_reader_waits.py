"""A reader of the store never queues behind a writer of the same process that waits for another
process's write lock: every read (a server's case list, its status) waited with it, up to 30 s."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from SegAssistLib.image import Volume
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.records import CaseStatus
from SegAssistLib.learning.store_db import DB_NAME

HOLD_S = 2.0
HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def test_reads_go_on_while_a_local_writer_waits_for_another_process(tmp_path: Path):
    store = Datastore(tmp_path / "store")
    case = store.import_volume(Volume(np.arange(336, dtype=np.int16).reshape(6, 7, 8), spacing=(1.0, 1.0, 1.0)),
                               name="a", user="admin")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root / DB_NAME), str(HOLD_S)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = {}

        def write() -> None:
            done["case"] = store.lock(case.id, "alice")
            done["after"] = time.monotonic() - started

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.3)  # the writer is waiting for the other process's lock now
        slowest, seen = 0.0, []
        for _ in range(5):
            before = time.monotonic()
            seen.append(([c.id for c in store.list_cases()], store.count_by_status()["new"]))
            slowest = max(slowest, time.monotonic() - before)
        assert slowest < 0.5, slowest
        assert "after" not in done  # still waiting: the reads did not wait with it
        assert seen == [([case.id], 1)] * 5
        writer.join(timeout=30)
        assert done["after"] >= HOLD_S - 0.5 and done["case"].status is CaseStatus.IN_PROGRESS
        assert store.get_case(case.id).locked_by == "alice"
    finally:
        holder.wait(timeout=30)
        holder.stdout.close()
        store.close()
