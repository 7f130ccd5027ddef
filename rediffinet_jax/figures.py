"""The evaluation's figures (matplotlib, Agg backend, PNG): phantoms, HD95 per case, what the refiner did.

Arrays are channels-last: images ``[D, H, W, 4]`` in MODALITIES order, region masks ``[D, H, W, 3]`` in
[WT, TC, ET]. Every figure names its axes with units and says what each mark is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rediffinet_jax import reports
from rediffinet_jax.labels import MODALITIES, REGIONS

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
        take = lambda a, axis=axis: np.take(a, centre[axis], axis=axis)
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


def mimics_figure(cases, path: str | os.PathLike, titles=None) -> None:
    """Per case (a row): the t1c maximum-intensity projection along the last axis (where vessels show as
    bright lines), the t1c slice through the tumour centre, and the t2f slice with the label overlay.

    cases: ``[(image [D, H, W, 4], labels [D, H, W])]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t1c, t2f = MODALITIES.index("t1c"), MODALITIES.index("t2f")
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.2, 2.5 * len(cases)), squeeze=False)
    for row, (image, labels) in enumerate(cases):
        z = int(np.mean(np.nonzero(labels)[2])) if labels.any() else image.shape[2] // 2
        empty = np.zeros(image.shape[:2], np.uint8)
        _overlay(axes[row, 0], image[..., t1c].max(axis=2), empty)
        _overlay(axes[row, 1], image[:, :, z, t1c], empty)
        _overlay(axes[row, 2], image[:, :, z, t2f], labels[:, :, z])
        axes[row, 0].set_ylabel(titles[row] if titles else f"case {row}")
    for col, name in enumerate(("t1c, maximum over slices", "t1c, tumour slice", "t2f + labels")):
        axes[0, col].set_title(name, fontsize=9)
    fig.suptitle("Hard phantoms (NCR red, ED green, ET yellow)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mm_axis(axis) -> None:
    """A symlog axis in mm (linear to 10, log above) with plain numbers for ticks."""
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    axis.set_major_locator(FixedLocator([0, 1, 2, 5, 10, 20, 50, 100, 200, 400]))
    axis.set_major_formatter(ScalarFormatter())


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # nothing cut off
    fig.clf()


def case_hd95(rows: list[dict]) -> dict:
    """``{case: mean HD95 over its regions}`` of a model's rows."""
    cases = sorted({r["case"] for r in rows})
    return {c: float(np.mean([r["hd95"] for r in rows if r["case"] == c])) for c in cases}


def hd95_by_model_figure(per_fold: dict, path) -> None:
    """Per-case HD95 (mean of WT, TC, ET) by model: a dot per case, a bar at the mean over the cases."""
    plt = _pyplot()
    names = list(per_fold)
    fig, ax = plt.subplots(figsize=(2.4 + 1.5 * len(names), 4.0))
    for i, name in enumerate(names):
        vals = list(case_hd95([r for rows in per_fold[name].values() for r in rows]).values())
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(vals))
        ax.scatter(
            np.full(len(vals), i) + jitter,
            vals,
            s=14,
            alpha=0.7,
            color="tab:blue",
            label="one held-out case" if i == 0 else None,
        )
        if vals:
            ax.hlines(np.mean(vals), i - 0.3, i + 0.3, colors="k", label="mean over the cases" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    _mm_axis(ax.yaxis)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("model")
    ax.set_ylabel("HD95 per case, mean of WT/TC/ET (mm, log above 10)")
    ax.set_title("HD95 of every held-out case")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    plt.close(fig)


def hd95_scatter_figure(per_fold: dict, refined: str, path, baseline: str = "unet") -> None:
    """The baseline's (U-Net's) HD95 against the refined HD95: a dot per case and region, the diagonal
    drawn; dots below it are cases the refiner made better."""
    plt = _pyplot()
    name = reports.baseline_name(baseline)
    base = {(r["case"], r["region"]): r["hd95"] for rows in per_fold.get(baseline, {}).values() for r in rows}
    pairs = [
        (r["region"], base[(r["case"], r["region"])], r["hd95"])
        for rows in per_fold.get(refined, {}).values()
        for r in rows
        if (r["case"], r["region"]) in base
    ]
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    for region, colour in zip(REGIONS, ("tab:green", "tab:red", "tab:orange")):
        xy = np.array([(u, v) for reg, u, v in pairs if reg == region]).reshape(-1, 2)
        ax.scatter(xy[:, 0], xy[:, 1], s=16, alpha=0.75, color=colour, label=region)
    top = max([1.0] + [max(u, v) for _, u, v in pairs]) * 1.1
    ax.plot([0, top], [0, top], color="k", lw=0.8, label="no change")
    better = sum(v < u for _, u, v in pairs)
    worse = sum(v > u for _, u, v in pairs)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    _mm_axis(ax.xaxis)
    _mm_axis(ax.yaxis)
    ax.set_xlabel(f"{name} HD95 (mm, log above 10)")
    ax.set_ylabel(f"{refined} HD95 (mm, log above 10)")
    ax.set_title(
        f"{refined} against the {name}: {better} better, {worse} worse,\n"
        f"{len(pairs) - better - worse} unchanged (case × region)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)
    plt.close(fig)


def refinement_figure(image, gt, unet, refined, path, title: str = "", name: str = "U-Net") -> None:
    """In the manner of the paper's Figure 2, on the axial slice where the refiner flipped most voxels: the
    ground-truth, U-Net and refined contours of each region on t1c, and the flipped voxels of any region,
    those that fixed a U-Net error apart from those that made one.

    image ``[D, H, W, 4]``; gt, unet (the baseline, called ``name``), refined ``[D, H, W, 3]`` binary region
    masks.
    """
    plt = _pyplot()
    flipped = unet != refined
    z = int(np.argmax(flipped.any(-1).sum((0, 1)))) if flipped.any() else int(np.argmax(gt[..., 0].sum((0, 1))))
    sl = image[:, :, z, MODALITIES.index("t1c")].T
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.9))
    styles = (
        (gt, "lime", "solid", 1.0, "ground truth"),
        (unet, "red", "solid", 2.2, name),
        (refined, "cyan", "dashed", 1.2, "refined"),
    )  # refined dashed over the U-Net: both stay visible
    for r, region in enumerate(REGIONS):
        ax = axes[r]
        ax.imshow(sl, cmap="gray", origin="lower")
        for mask, colour, style, width, label in styles:
            if mask[:, :, z, r].any():
                ax.contour(
                    mask[:, :, z, r].T.astype(float), levels=[0.5], colors=colour, linewidths=width, linestyles=style
                )
            ax.plot([], [], color=colour, linestyle=style, label=label)
        ax.set_title(f"{region} contours on t1c")
    axes[0].legend(loc="lower right", fontsize=7)
    fixed = (flipped & (unet != gt)).any(-1)[:, :, z].T
    broken = (flipped & (unet == gt)).any(-1)[:, :, z].T
    axes[3].imshow(sl, cmap="gray", origin="lower")
    overlay = np.zeros(sl.shape + (4,))
    overlay[fixed] = (0.1, 0.9, 0.2, 0.9)
    overlay[broken & ~fixed] = (1.0, 0.1, 0.1, 0.9)
    axes[3].imshow(overlay, origin="lower")
    axes[3].plot([], [], "s", color=(0.1, 0.9, 0.2), label=f"fixed a {name} error ({int(fixed.sum())})")
    axes[3].plot([], [], "s", color=(1.0, 0.1, 0.1), label=f"made an error ({int((broken & ~fixed).sum())})")
    axes[3].legend(loc="lower right", fontsize=7)
    axes[3].set_title("voxels the refiner flipped")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{title}, axial slice {z}")
    _save(fig, path)
    plt.close(fig)
