"""Scores an evaluation's label maps with the official BraTS package (``evaluate.py --scorer official``).

The package is ``brats-evaluation`` (on ``panoptica``), an optional extra: ``pip install -e ".[official]"``.
It is run as its command line (``brats-evaluate --config gli``, then ``brats-parse-metrics seg``) runs
it: the package's own ``evaluate_single_exam`` on each case with its bundled ``gli`` config, then its
``parse_seg_results`` on the JSON that makes, once per model and fold; the ``mean`` row it adds is the
fold's score. Nothing of the package is re-implemented here; ``metrics``' ``brats2025`` convention is our own
version of its rules, tested against it.

Inputs: for the U-Net its out-of-fold label maps, for a refiner the maps evaluation wrote to
``eval/<model>/fold_k/pred/``; the ground truth is written once, as label maps made from the cached
regions, to ``eval/official/gt/`` (BraTS 2023+ labels 1 NETC, 2 SNFH, 3 ET, the source's geometry).
Results are never cached: they are remade from the label maps on every call.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from rediffinet_jax.errors import ConfigError

PACKAGE = "brats-evaluation"
CONFIG = "gli"
INSTALL = 'pip install -e ".[official]"'
REGIONS = ("wt", "tc", "et")
# the package's names for what our tables show: Dice, HD95, lesion-wise Dice and HD95, lesion counts
METRICS = (
    "global_dsc",
    "global_hd95",
    "lesionwise_dsc_mean",
    "lesionwise_hd95_mean",
    "all_instance_tp",
    "all_instance_fp",
    "all_instance_fn",
)


def version() -> str | None:
    """The installed package's version, None when it is absent."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def require() -> str:
    """The package's version; a ConfigError saying how to install it when it is absent."""
    found = version()
    if found is None:
        raise ConfigError(f"--scorer official needs the official BraTS package ({PACKAGE}); install it: {INSTALL}")
    return found


def make_evaluator():
    """The package's evaluator with its bundled ``gli`` config (made once per evaluation: it is slow to make)."""
    from importlib.resources import files

    from panoptica import Panoptica_Evaluator

    return Panoptica_Evaluator.load_from_config(
        str(files("brats_evaluation").joinpath("configs", f"config_{CONFIG}.yaml"))
    )


def score(pairs: list[tuple[str, Path, Path]], evaluator=None) -> dict:
    """The package's scores of ``pairs`` (case, prediction label map, ground-truth label map), as its
    command line makes them: {"cases": {case: {metric_region: value}}, "mean": {metric_region: value}}.

    Metric names are the package's (``global_dsc_wt``, ``lesionwise_hd95_mean_et``, ...). Its mean skips
    NaN (a region empty in both maps), and keeps an infinite lesion-wise HD95 (no lesion matched)
    infinite. A case the package fails on raises ConfigError naming the case and file."""
    from brats_evaluation.evaluation import evaluate_single_exam
    from brats_evaluation.metrics_parser import parse_seg_results

    evaluator = evaluator or make_evaluator()
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its tables
        for case, pred, ref in pairs:
            out = evaluate_single_exam(str(pred), str(ref), case, evaluator)
            if "error" in out:
                raise ConfigError(f"{case}: the official package failed on {pred}: {out['error']}")
            results.append(out)
        (Path(tmp) / "metrics.json").write_text(json.dumps({"metrics": results, "missings": []}, default=float))
        parse_seg_results(str(Path(tmp) / "metrics.json"), str(Path(tmp) / "metrics.csv"))
        with open(Path(tmp) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    keep = [f"{m}_{r}" for m in METRICS for r in REGIONS]
    table = {
        row["subject_id"]: {k: float(row[k]) if row.get(k) not in (None, "") else float("nan") for k in keep}
        for row in rows
    }
    return {"cases": {c: table[c] for c, _, _ in pairs}, "mean": table["mean"]}


def folds_summary(per_fold: dict) -> dict:
    """{model: {"folds": {k: mean row}, "mean": mean over folds}} from {model: {k: score(...)}}."""
    out = {}
    for name, folds in per_fold.items():
        fm = {str(k): s["mean"] for k, s in folds.items()}
        keys = next(iter(fm.values())).keys() if fm else []
        out[name] = {"folds": fm, "mean": {k: float(np.mean([f[k] for f in fm.values()])) for k in keys}}
    return out


def markdown(official: dict) -> list[str]:
    """The summary's section for the package's numbers: its names, its rows, apart from ours."""
    if not official:
        return []
    s = official["scores"]
    cols = [f"{m}_{r}" for m in METRICS[:4] for r in REGIONS]
    lines = [
        "",
        f"Official BraTS package ({PACKAGE} {official['version']}, config {CONFIG}), its names and rules; "
        "mean over each fold's held-out cases (Dice 0-1, HD95 in voxels):",
        "",
        "| fold | model | " + " | ".join(cols) + " |",
        "|" + "---|" * (2 + len(cols)),
    ]
    for name, m in s.items():
        for k, row in [*m["folds"].items(), (f"mean ({len(m['folds'])} folds)", m["mean"])]:
            lines.append(f"| {k} | {name} | " + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    return lines


def csv_rows(official: dict) -> list[list]:
    """summary.csv's rows for the package's numbers (model, fold, region, metric, value, convention)."""
    if not official:
        return []
    tag = f"official {PACKAGE} {official['version']}"
    return [
        [name, fold, metric.rsplit("_", 1)[1], metric, f"{value:.6g}", tag]
        for name, m in official["scores"].items()
        for fold, row in [*m["folds"].items(), ("mean", m["mean"])]
        for metric, value in row.items()
    ]
