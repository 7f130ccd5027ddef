"""Figures and tables shared by the command lines (matplotlib, Agg backend; PNG out)."""

from __future__ import annotations

import os

import numpy as np

from rediffinet_jax.labels import MODALITIES, REGIONS
from rediffinet_jax.metrics import FLIP_KEYS, summarize

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


# ----------------------------------------------------------------------------- tables

_KEYS = ("dice", "hd95", "lesionwise_dice", "lesionwise_hd95")


def summary_tables(per_fold: dict, convention: str, baseline: str = "unet") -> dict:
    """Per model: per-fold means, mean and std over folds; improvement of each model over the baseline
    (Dice in points, HD95 in % of the baseline's, positive = better), from the per-fold means."""
    out = {"convention": convention, "models": {}, "improvement": {}, "flips": flip_summary(per_fold, baseline)}
    for name, folds in per_fold.items():
        fm = {k: summarize(rows, _KEYS) for k, rows in folds.items() if rows}
        cols = [*REGIONS, "avg"]
        mean = {c: {k: float(np.mean([f[c][k] for f in fm.values()])) for k in _KEYS} for c in cols} if fm else {}
        std = {c: {k: float(np.std([f[c][k] for f in fm.values()])) for k in _KEYS} for c in cols} if fm else {}
        out["models"][name] = {
            "folds": fm,
            "mean": mean,
            "std": std,
            "n_folds": len(fm),
            "n_cases": sum(len(r) // len(REGIONS) for r in folds.values()),
        }
    base = out["models"].get(baseline, {}).get("mean")
    for name, m in out["models"].items():
        if name == baseline or not base or not m["mean"]:
            continue
        out["improvement"][name] = {
            c: {
                "dice_points": 100 * (m["mean"][c]["dice"] - base[c]["dice"]),
                "hd95_percent": 100 * (base[c]["hd95"] - m["mean"][c]["hd95"]) / base[c]["hd95"]
                if base[c]["hd95"] > 0
                else float("nan"),
            }
            for c in [*REGIONS, "avg"]
        }
    return out


def flip_summary(per_fold: dict, baseline: str = "unet") -> dict:
    """Per refined model and region, the voxel counts of :func:`metrics.flip_counts` summed over every
    scored case of every fold, with precision = fixed / flipped (how many flips were right), recall =
    fixed / U-Net errors (how many of the U-Net's errors were flipped) and the net change in wrong voxels
    (negative = fewer). Pooled rather than averaged: a case with no U-Net error has no recall."""
    out = {}
    for name, folds in per_fold.items():
        rows = [r for fold_rows in folds.values() for r in fold_rows]
        if name == baseline or not rows or "flipped" not in rows[0]:
            continue
        out[name] = {}
        for region in REGIONS:
            sel = [r for r in rows if r["region"] == region]
            err, flip, fixed = (int(sum(r[k] for r in sel)) for k in FLIP_KEYS)
            out[name][region] = {
                "unet_errors": err,
                "flipped": flip,
                "fixed": fixed,
                "precision": fixed / flip if flip else float("nan"),
                "recall": fixed / err if err else float("nan"),
                "net_error_change": flip - 2 * fixed,
            }
    return out


def flip_markdown(flips: dict) -> list[str]:
    if not flips:
        return []
    lines = [
        "",
        "Voxels each refiner flipped in the U-Net's masks, all held-out cases pooled (precision: flips",
        "that fixed a U-Net error; recall: U-Net errors fixed; net: change in wrong voxels, negative = fewer):",
        "",
        "| model | region | U-Net errors | flipped | fixed | precision | recall | net |",
        "|" + "---|" * 8,
    ]
    for name, regions in flips.items():
        for region, f in regions.items():
            lines.append(
                f"| {name} | {region} | {f['unet_errors']} | {f['flipped']} | {f['fixed']} "
                f"| {100 * f['precision']:.1f} % | {100 * f['recall']:.1f} % | {f['net_error_change']:+d} |"
            )
    return lines


_COLS = [*REGIONS, "avg"]


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _md_head(first: list[str], metrics: tuple[str, str]) -> list[str]:
    """A header row (``first`` columns, then each metric for every region and the average) and its rule."""
    cells = [*first, *(f"{metrics[0]} {c}" for c in _COLS), *(f"{metrics[1]} {c}" for c in _COLS)]
    return [_md_row(cells), "|" + "---|" * len(cells)]


def _score_row(label, name, vals, std=None) -> str:
    def cell(c, k, scale):
        return f"{scale * vals[c][k]:.2f}" + (f" ± {scale * std[c][k]:.2f}" if std else "")

    return _md_row([label, name, *(cell(c, "dice", 100) for c in _COLS), *(cell(c, "hd95", 1) for c in _COLS)])


def summary_markdown(s: dict) -> str:
    """The summary as markdown: per fold and mean ± std, improvements, lesion-wise scores, flips."""
    lines = [
        f"HD95 convention: {s['convention']} (mm). Dice in %. Diffusion models: each fold's "
        f"{s.get('checkpoint', 'latest')} checkpoint.",
        "",
        *_md_head(["fold", "model"], ("Dice", "HD95")),
    ]
    folds = sorted({k for m in s["models"].values() for k in m["folds"]}, key=int)
    for k in folds:
        lines += [_score_row(k, name, m["folds"][k]) for name, m in s["models"].items() if k in m["folds"]]
    for name, m in s["models"].items():
        if m["mean"]:
            lines.append(_score_row(f"mean ± std ({m['n_folds']} folds)", name, m["mean"], m["std"]))
    if s["improvement"]:
        lines += ["", "Improvement over the U-Net (Dice in points, HD95 in %, positive = better):", ""]
        lines += _md_head(["model"], ("Dice", "HD95"))
        for name, imp in s["improvement"].items():
            dice = [f"{imp[c]['dice_points']:+.2f}" for c in _COLS]
            lines.append(_md_row([name, *dice, *(f"{imp[c]['hd95_percent']:+.1f} %" for c in _COLS)]))
    lines += ["", "BraTS 2023 lesion-wise scores (mean ± std over folds):", ""]
    lines += _md_head(["model"], ("LW Dice", "LW HD95"))
    for name, m in s["models"].items():
        if m["mean"]:
            mean, std = m["mean"], m["std"]
            dice = [f"{100 * mean[c]['lesionwise_dice']:.2f} ± {100 * std[c]['lesionwise_dice']:.2f}" for c in _COLS]
            hd = [f"{mean[c]['lesionwise_hd95']:.2f} ± {std[c]['lesionwise_hd95']:.2f}" for c in _COLS]
            lines.append(_md_row([name, *dice, *hd]))
    lines += flip_markdown(s.get("flips", {}))
    return "\n".join(lines) + "\n"


def write_summary(eval_dir, per_fold: dict, convention: str, checkpoint: str = "latest", write: bool = True) -> dict:
    """Writes summary.json, summary.csv (long: model, fold, region, metric, value) and summary.md (unless
    ``write`` is false: the other processes of a multi-host run); returns the summary."""
    import csv
    import json
    from pathlib import Path

    s = {**summary_tables(per_fold, convention), "checkpoint": checkpoint}
    if not write:
        return s
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "summary.json").write_text(json.dumps(s, indent=1))
    with open(eval_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "fold", "region", "metric", "value", "convention"])
        for name, m in s["models"].items():
            entries = [(str(k), v) for k, v in m["folds"].items()] + [("mean", m["mean"]), ("std", m["std"])]
            for fold, vals in entries:
                for region, d in vals.items():
                    for metric, value in d.items():
                        w.writerow([name, fold, region, metric, f"{value:.6g}", convention])
    (eval_dir / "summary.md").write_text(summary_markdown(s))
    return s


# ----------------------------------------------------------------------------- figures


def hd95_by_model_figure(per_fold: dict, path) -> None:
    """Per-case HD95 (average of the three regions) by model: one dot per case, the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    names = list(per_fold)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, name in enumerate(names):
        rows = [r for rows in per_fold[name].values() for r in rows]
        cases = sorted({r["case"] for r in rows})
        vals = [np.mean([r["hd95"] for r in rows if r["case"] == c]) for c in cases]
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(vals))
        ax.scatter(np.full(len(vals), i) + jitter, vals, s=12, alpha=0.7)
        if vals:
            ax.hlines(np.mean(vals), i - 0.3, i + 0.3, colors="k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("HD95 per case, mean of WT/TC/ET (mm)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def refinement_figure(image, gt, unet, refined, path, title: str = "") -> None:
    """In the manner of the paper's Figure 2: a t1c slice with the GT, U-Net and refined WT contours,
    and the discrepancy |U(I) − refined| (the voxels the refiner flipped) beside it.

    image ``[D, H, W, 4]``; gt, unet, refined ``[D, H, W, 3]`` binary region masks.
    """
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    z = int(np.argmax(gt[..., 0].sum((0, 1)))) if gt[..., 0].any() else image.shape[2] // 2
    sl = image[:, :, z, 1].T
    flipped = np.any(unet[:, :, z] != refined[:, :, z], -1).T
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(sl, cmap="gray", origin="lower")
    styles = (
        (gt, "lime", "solid", 1.0, "ground truth"),
        (unet, "red", "solid", 2.2, "U-Net"),
        (refined, "cyan", "dashed", 1.2, "refined"),
    )  # refined dashed over U-Net: both stay visible
    for mask, colour, style, width, label in styles:
        if mask[:, :, z, 0].any():
            axes[0].contour(
                mask[:, :, z, 0].T.astype(float), levels=[0.5], colors=colour, linewidths=width, linestyles=style
            )
        axes[0].plot([], [], color=colour, linestyle=style, label=label)
    axes[0].legend(loc="lower right", fontsize=7)
    axes[0].set_title("WT contours on t1c")
    axes[1].imshow(sl, cmap="gray", origin="lower")
    axes[1].imshow(np.ma.masked_where(~flipped, flipped), cmap="autumn", origin="lower", alpha=0.9)
    axes[1].set_title("voxels the refiner flipped (any region)")
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
