"""A small training-data folder of a known dataset, for tests of what the trainer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np


def brats_like_folder(root: Path) -> Tuple[Path, np.ndarray, np.ndarray]:
    """``root/brats`` with empty ``imagesTr``/``labelsTr`` (a known dataset; cases named ``brats_new_*``
    are not in its evaluation split), and an image and its label to write there."""
    folder = root / "brats"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    image = np.random.default_rng(0).normal(0, 1, (12, 20, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[3:9, 5:15, 6:18] = 1
    return folder, image, labels
