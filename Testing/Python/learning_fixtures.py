"""Helpers for the learning-loop tests: a tiny base checkpoint and a datastore of small synthetic cases.

Each case is a noisy dark volume with one bright ellipsoid (the structure), at a position and size
that vary with the seed; the label is the ellipsoid. Small enough that a training step and a
simulated click take milliseconds with the tiny network.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch

from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint
from SegAssistLib.image import Volume
from SegAssistLib.learning import CaseRecord, Datastore
from SegAssistLib.learning.registry import AdapterRegistry, VersionRecord

TINY = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), patch_size=32)
SHAPE = (20, 28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread for each test of a module that imports this fixture (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    network = build_network(TINY)
    return save_checkpoint(path, network, TINY, {"name": "tiny-unet", "version": "tiny-1"})


def promote_base_weights(
    registry: AdapterRegistry, checkpoint: Path, expected_current: Optional[str] = None
) -> VersionRecord:
    """A version a server on ``checkpoint`` can load, recorded and promoted as a training job does: the
    base weights as a full fine-tune (what matters is the registry and the swap, not the weights)."""
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning.deploy import save_full_version

    base = load_checkpoint(checkpoint)
    fields = {"base_identity": base.identity, "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4}
    return registry.add_version(
        "full", lambda path, _: save_full_version(path, base.network, base.config, base.identity, {}), fields,
        promote=True, expected_current=expected_current,
    )  # fmt: skip


def synthetic_case(seed: int, shape=SHAPE, brightness: float = 100.0) -> Tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) / 2.0 + rng.uniform(-2.5, 2.5, 3)
    radii = rng.uniform(3.5, 5.5, 3)
    grid = np.indices(shape).astype(float)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    image = 20.0 + brightness * inside + rng.normal(0.0, 6.0, shape)
    return Volume(image.astype(np.float32), spacing=(1.0, 1.0, 1.0)), inside.astype(np.uint8)


def make_store(root: Path, n_labelled: int, n_new: int, seed: int = 0) -> Tuple[Datastore, List[CaseRecord]]:
    """A store with ``n_labelled`` submitted cases followed by ``n_new`` unlabelled ones."""
    store = Datastore(root)
    cases = []
    for i in range(n_labelled + n_new):
        volume, mask = synthetic_case(seed * 1000 + i)
        case = store.import_volume(volume, name=f"case_{i:02d}", user="admin")
        if i < n_labelled:
            store.save_label(case.id, mask, user="alice")
        cases.append(case)
    return store, cases


# ---- stores of earlier schemas, as earlier releases wrote them (learning/store_db.py's _SCHEMA then) ---
#: schema 1: the tables before subjects
SCHEMA_1_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    shape TEXT NOT NULL,
    spacing TEXT NOT NULL,
    origin TEXT NOT NULL,
    direction TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    imported_at REAL NOT NULL,
    imported_by TEXT NOT NULL,
    locked_by TEXT,
    lock_expires REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_status ON cases(status);
CREATE TABLE IF NOT EXISTS labels (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id),
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    model TEXT,
    adapter_version TEXT,
    n_interactions INTEGER NOT NULL,
    seconds_spent REAL NOT NULL,
    submitted INTEGER NOT NULL,
    n_foreground INTEGER NOT NULL,
    prompt_log TEXT,
    UNIQUE (case_id, version)
);
CREATE TABLE IF NOT EXISTS image_hashes (
    hash TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id)
);
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY,
    label_id TEXT NOT NULL REFERENCES labels(id),
    reviewer TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    note TEXT,
    created_at REAL NOT NULL
);
"""
#: schema 2: cases.subject; the counts of a label still NOT NULL (unknown ones were written as 0)
SCHEMA_2_DDL = SCHEMA_1_DDL.replace(
    "    updated_at REAL NOT NULL\n);", "    updated_at REAL NOT NULL,\n    subject TEXT\n);", 1
)
assert SCHEMA_2_DDL.count("subject TEXT") == 1  # the replacement above found its place


def adapter_settings(defaults: dict, overrides: dict) -> dict:
    """``defaults`` updated by ``overrides``, less the defaults the chosen kind does not take
    (``AdapterTrainConfig.check`` refuses ``lora_rank`` unless the kind is salt, and ``rank``,
    ``lora_rank`` and ``alpha`` for full): a test helper's small ranks suit every kind."""
    settings = {**defaults, **overrides}
    kind = settings.get("kind", "lora")
    unused = {"rank", "lora_rank", "alpha"} if kind == "full" else set() if kind == "salt" else {"lora_rank"}
    return {k: v for k, v in settings.items() if k in overrides or k not in unused}


def labelled_store(folder: Path, n_labelled: int) -> Tuple[Path, Path]:
    """``(store root, base checkpoint)``: a closed store of ``n_labelled`` submitted cases under
    ``folder`` and a tiny base network beside it; torch's first optimiser is imported here (seconds)
    so that it does not count against the time budget of the run under test."""
    made, _ = make_store(folder / "store", n_labelled=n_labelled, n_new=0)
    made.close()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return folder / "store", tiny_checkpoint(folder / "tiny.pt")
