"""Resampling between a case's source grid and a coarser working grid (``data.spacing``), channels-last.

A case is cropped on its source grid, then resampled to the working spacing for training and inference;
every label map goes back to the source grid before it is scored or written, so scores are always on the
source's grid. Floats (images, probabilities, the refiner's fused values) are resampled linearly and
thresholded where they are used; ground-truth labels go down by their one-hot channels (linear, then the
most likely label) or by the nearest voxel (``LABEL_METHODS``; docs/decisions.md says which keeps Dice
better and is the one used). Voxel centres are aligned (``grid_mode``), as ``jax.image.resize`` does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rediffinet_jax.labels import labels_to_regions, regions_to_labels

LABEL_METHODS = ("onehot", "nearest")
LABEL_METHOD = "onehot"  # measured: benchmarks/resampling.py, docs/decisions.md


def resize(array: np.ndarray, size) -> np.ndarray:
    """Resizes ``[D, H, W, C]`` to ``size + [C]``, voxel centres aligned. Floats are interpolated linearly,
    integer masks take the nearest voxel so they stay binary. Channel by channel: one 4-D call
    interpolating along C as well was slower."""
    size = tuple(int(s) for s in size)
    if tuple(array.shape[:3]) == size:
        return np.asarray(array)
    order = 1 if np.issubdtype(array.dtype, np.floating) else 0
    factors = np.asarray(size) / np.asarray(array.shape[:3])
    out = [
        ndimage.zoom(array[..., c], factors, order=order, grid_mode=True, mode="nearest")
        for c in range(array.shape[-1])
    ]
    return np.stack(out, axis=-1)


def work_shape(shape, source_spacing, spacing) -> tuple[int, int, int]:
    """The working grid's shape of a crop ``shape`` at ``source_spacing`` resampled to ``spacing`` (mm),
    each axis at least 1 voxel: round(n · source / target)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, source_spacing, spacing))


def resize_labels(regions: np.ndarray, size, method: str = LABEL_METHOD) -> np.ndarray:
    """Region masks ``[D, H, W, 3]`` uint8 on another grid: ``onehot`` resamples each label's indicator
    (0..3) linearly and keeps the most likely label at each voxel (ties: the lower label); ``nearest`` takes
    the nearest voxel's regions. Both give nested regions, as a label map has."""
    if method not in LABEL_METHODS:
        raise ValueError(f"unknown label resampling {method!r}; choose one of {LABEL_METHODS}")
    if tuple(regions.shape[:3]) == tuple(size):
        return np.asarray(regions, np.uint8)
    if method == "nearest":
        return resize(np.asarray(regions, np.uint8), size)
    labels = regions_to_labels(regions)
    onehot = np.stack([labels == v for v in range(4)], -1).astype(np.float32)
    return labels_to_regions(np.argmax(resize(onehot, size), -1).astype(np.uint8))
