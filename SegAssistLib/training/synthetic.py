"""Randomised synthetic volumes: shapes and contrasts the real data never shows.

Random smooth label fields give tissue classes with smooth, irregular boundaries; random
intensities, texture, noise, a multiplicative bias field, blur and anisotropic slice thickness make
the network rely on edges and prompts rather than on the look of the few real datasets, so it
generalises to anatomy and scanners it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass
class SyntheticCase:
    image: np.ndarray  # float32 [k, j, i]
    labels: np.ndarray  # int16 [k, j, i], 0 = background
    spacing_kji: Tuple[float, float, float]


def _smooth_field(shape, coarse: int, rng: np.random.Generator) -> np.ndarray:
    """White noise on a coarse grid, interpolated up: a random field smooth at the scale shape/coarse."""
    low = torch.from_numpy(rng.standard_normal((1, 1) + (coarse,) * 3).astype(np.float32))
    return F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def synthetic_case(rng: np.random.Generator, size: int = 96) -> SyntheticCase:
    shape = (size, size, size)
    n_classes = int(rng.integers(3, 8))
    fields = np.stack([_smooth_field(shape, int(rng.integers(3, 7)), rng) for _ in range(n_classes)])
    labels = np.argmax(fields, axis=0).astype(np.int16)
    # compact objects on top of the tissue background: thresholded finer fields, various sizes
    for obj in range(int(rng.integers(1, 4))):
        field = _smooth_field(shape, int(rng.integers(4, 12)), rng)
        blob = field > np.quantile(field, rng.uniform(0.88, 0.995))
        labels[blob] = n_classes + obj
    n_total = int(labels.max()) + 1
    means = rng.uniform(-1.0, 1.0, n_total).astype(np.float32)
    image = means[labels]
    texture = _smooth_field(shape, int(rng.integers(8, 20)), rng)
    image += texture * rng.uniform(0.0, 0.25)
    image += rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.0, 0.25)
    image *= np.exp(_smooth_field(shape, 3, rng) * rng.uniform(0.0, 0.3))
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        image = ndimage.gaussian_filter(image, sigma)
    spacing = [1.0, 1.0, 1.0]
    if rng.random() < 0.3:  # thick slices along one axis
        axis = int(rng.integers(3))
        step = int(rng.integers(2, 6))
        index = [slice(None)] * 3
        index[axis] = slice(0, None, step)
        # average the skipped slices to mimic slice thickness
        image = ndimage.uniform_filter1d(image, step, axis=axis)[tuple(index)]
        labels = labels[tuple(index)]
        spacing[axis] = float(step)
    return SyntheticCase(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels), tuple(spacing))
