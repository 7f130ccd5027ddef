"""The evaluation's tables: per fold and mean ± std over folds, improvements, flips (markdown, CSV, JSON)."""

from __future__ import annotations

import numpy as np

from rediffinet_jax import official as official_scores
from rediffinet_jax.labels import REGIONS
from rediffinet_jax.metrics import FLIP_KEYS, summarize

# ----------------------------------------------------------------------------- tables


def baseline_name(baseline: str) -> str:
    """How figures and tables name a baseline row: this project's U-Net, or another model's given maps."""
    return "U-Net" if baseline == "unet" else f"{baseline} (given maps)"


_KEYS = ("dice", "hd95", "lesionwise_dice", "lesionwise_hd95")


def summary_tables(per_fold: dict, convention: str, baseline: str = "unet") -> dict:
    """Per model: per-fold means, mean and std over folds; improvement of each model over the baseline
    (Dice in points, HD95 in % of the baseline's, positive = better), from the per-fold means."""
    out = {"convention": convention, "models": {}, "improvement": {}, "flips": flip_summary(per_fold, baseline)}
    out["baseline"] = baseline
    out["ground_truth"] = ground_truth_counts(per_fold.get(baseline, {}))
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


def ground_truth_counts(folds: dict) -> dict:
    """Per region, over the scored cases of ``folds`` ({k: rows}): how many there are, how many have an
    empty ground truth (where conventions disagree most) and how many ground-truth lesions the lesion-wise
    rules left out as too small. {} when the rows predate these columns."""
    rows = [r for fold_rows in folds.values() for r in fold_rows]
    if not rows or any(r.get("gt_empty") is None for r in rows):
        return {}
    out = {}
    for region in REGIONS:
        sel = [r for r in rows if r["region"] == region]
        out[region] = {
            "cases": len(sel),
            "empty": sum(int(r["gt_empty"]) for r in sel),
            "lesions_dropped": sum(int(r["lesions_dropped"]) for r in sel),
        }
    return out


def ground_truth_markdown(counts: dict) -> list[str]:
    if not counts:
        return []
    cells = [
        f"{r}: {c['empty']} of {c['cases']} empty, {c['lesions_dropped']} lesions dropped" for r, c in counts.items()
    ]
    return [
        "",
        "Ground truth of the scored cases (empty: no voxel of the region; dropped: lesions the lesion-wise",
        "rules left out as too small, which the lesion-wise scores above do not see): " + "; ".join(cells) + ".",
    ]


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
            out[name][region] = flip_record(*(int(sum(r[k] for r in sel)) for k in FLIP_KEYS))
    return out


def flip_record(err: int, flip: int, fixed: int) -> dict:
    """Pooled flip counts with precision = fixed / flipped, recall = fixed / U-Net errors and the net change
    in wrong voxels (flipped − 2·fixed: a right flip removes an error, a wrong one adds one)."""
    return {
        "unet_errors": err,
        "flipped": flip,
        "fixed": fixed,
        "precision": fixed / flip if flip else float("nan"),
        "recall": fixed / err if err else float("nan"),
        "net_error_change": flip - 2 * fixed,
    }


def flip_markdown(flips: dict, name: str = "U-Net") -> list[str]:
    if not flips:
        return []
    lines = [
        "",
        f"Voxels each refiner flipped in the {name}'s masks, all held-out cases pooled (precision: flips",
        f"that fixed a {name} error; recall: {name} errors fixed; net: change in wrong voxels, negative = fewer):",
        "",
        f"| model | region | {name} errors | flipped | fixed | precision | recall | net |",
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
    base_name = baseline_name(s.get("baseline", "unet"))
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
        lines += ["", f"Improvement over the {base_name} (Dice in points, HD95 in %, positive = better):", ""]
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
    lines += ground_truth_markdown(s.get("ground_truth", {}))
    lines += flip_markdown(s.get("flips", {}), base_name)
    lines += gate_markdown(s.get("gates", {}))
    lines += official_scores.markdown(s.get("official"))
    return "\n".join(lines) + "\n"


def gate_markdown(gates: dict) -> list[str]:
    """Each gated refiner's gates: per fold (chosen on the other folds) and the one predict.py applies."""
    from rediffinet_jax import gate

    lines = []
    for label, record in gates.items():
        if label.endswith("+pp"):  # the U-Net's post-processing (gate_eval.POSTPROCESS)
            head, every = f"Post-processing of the U-Net (`{label}`: small components removed)", "removing them all"
        else:
            head, every = f"Gate of {label} (`{label}+gate`)", "every flip"
        lines += ["", f"{head}, per region, chosen on the other folds' held-out cases:", ""]
        for k, choice in record.items():
            where = "all folds (predict.py)" if k == "all" else f"fold {k}"
            cases = "held-out cases of all folds" if k == "all" else "cases of the other folds"
            lines += [f"* {where}: " + "; ".join(gate.describe(choice, cases, every))]
    return lines


def write_summary(
    eval_dir,
    per_fold: dict,
    convention: str,
    checkpoint: str = "latest",
    write: bool = True,
    official=None,
    baseline: str = "unet",
    gates: dict | None = None,
) -> dict:
    """Writes summary.json, summary.csv (long: model, fold, region, metric, value, convention) and summary.md
    (unless ``write`` is false: the other processes of a multi-host run); returns the summary. ``official``
    (the official package's scores, :mod:`official`) goes in apart: its own key, table and tagged rows."""
    import csv
    import json
    from pathlib import Path

    s = {**summary_tables(per_fold, convention, baseline), "checkpoint": checkpoint}
    if gates:
        s["gates"] = gates
    if official:
        s["official"] = official
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
        w.writerows(official_scores.csv_rows(official))
    (eval_dir / "summary.md").write_text(summary_markdown(s))
    return s
