"""Figures and tables shared by the command lines (matplotlib, Agg backend; PNG out)."""

from __future__ import annotations

import os

import numpy as np

from rediffinet_jax.labels import MODALITIES

_LABEL_COLOURS = {1: (1.0, 0.2, 0.2), 2: (0.2, 0.9, 0.2), 3: (1.0, 0.9, 0.1)}  # NCR red, ED green, ET yellow


def _overlay(ax, slice_2d, labels_2d, alpha=0.45):
    ax.imshow(slice_2d.T, cmap="gray", origin="lower")
    rgba = np.zeros(labels_2d.T.shape + (4,))
    for value, colour in _LABEL_COLOURS.items():
        rgba[labels_2d.T == value] = (*colour, alpha)
    ax.imshow(rgba, origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])


def case_figure(image: np.ndarray, labels: np.ndarray | None, path: str | os.PathLike, title: str = "") -> None:
    """Orthogonal slices through the tumour centre of the four contrasts, with the label overlay.

    image: ``[D, H, W, 4]`` in MODALITIES order; labels: ``[D, H, W]`` BraTS labels or None.
    Rows: axial, coronal, sagittal; columns: t1n, t1c, t2w, t2f, then t2f with the labels.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = labels > 0 if labels is not None and labels.any() else np.any(image != 0, -1)
    centre = [int(np.mean(ix)) for ix in np.nonzero(fg)]
    labels = np.zeros(image.shape[:3], np.uint8) if labels is None else labels
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig, axes = plt.subplots(3, len(MODALITIES) + 1, figsize=(2.2 * (len(MODALITIES) + 1), 6.6))
    for row, (name, axis) in enumerate(views):
        take = lambda a: np.take(a, centre[axis], axis=axis)  # noqa: E731
        for col, m in enumerate(MODALITIES):
            _overlay(axes[row, col], take(image[..., col]), np.zeros_like(take(labels)))
            if row == 0:
                axes[row, col].set_title(m)
        _overlay(axes[row, -1], take(image[..., -1]), take(labels))
        axes[row, 0].set_ylabel(name)
    axes[0, -1].set_title("t2f + labels")
    fig.suptitle(title + "  (NCR red, ED green, ET yellow)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
