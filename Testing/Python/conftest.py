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
