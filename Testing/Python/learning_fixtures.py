"""Helpers for the learning-loop tests: a tiny base checkpoint and a datastore of small synthetic cases.

Each case is a noisy dark volume with one bright ellipsoid (the structure), at a position and size
that vary with the seed; the label is the ellipsoid. Small enough that a training step and a
simulated click take milliseconds with the tiny network.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint
from SegAssistLib.image import Volume
from SegAssistLib.learning import CaseRecord, Datastore

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
