"""Small synthetic datasets in the MSD layout for the evaluation tests (eval, bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def ball_dataset(folder: Path, names: Sequence[str] = ("a", "b", "c"), channels: int = 0) -> Path:
    """Cases ``names``: a bright ball (label 1) on noise; ``channels`` > 0: 4D images of that many volumes."""
    import SimpleITK as sitk

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball"}}))
    k, j, i = np.mgrid[:10, :24, :24]
    ball = ((k - 5) ** 2 + (j - 12) ** 2 + (i - 12) ** 2 <= 16).astype(np.uint8)
    image = (100.0 * ball + np.random.default_rng(0).normal(0, 5, ball.shape)).astype(np.float32)
    if channels:
        image = np.stack([image * (c + 1) for c in range(channels)])
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=False), str(folder / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(ball), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return folder
