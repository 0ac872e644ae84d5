"""Shared pytest fixtures. Tests that need ../shared/data skip with a clear message when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SEGASSIST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "hippocampus" / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set SEGASSIST_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hippocampus_dir(shared_data: Path) -> Path:
    return shared_data / "hippocampus"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small, randomly initialised network saved in the real checkpoint format.

    For tests of the engine's mechanics (undo, geometry, errors); quality tests use the shipped model.
    """
    torch = pytest.importorskip("torch")
    from SegAssistLib.engine.network import NetworkConfig, build_network, save_checkpoint

    torch.manual_seed(0)
    config = NetworkConfig(channels=(8, 16, 32), strides=(2, 2), patch_size=32)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, build_network(config), config, {"name": "tiny-test", "version": "0"})
    return path


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT

    assert DEFAULT_CHECKPOINT.is_file(), f"the shipped model is missing: {DEFAULT_CHECKPOINT}"
    return DEFAULT_CHECKPOINT
