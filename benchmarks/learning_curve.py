"""The refiner's learning curve on one fold: is the training budget what holds it back, and at how many steps
would it help?

    python benchmarks/learning_curve.py --root runs/bench --seed 0 --fold 0 --steps 1000,3000,10000
    python benchmarks/learning_curve.py --data real --cases /path/to/brats --steps 1000,3000,10000

For each model (the paper's refiner, ``rediffinet_plus``, the control) and each budget, the refiner of
``--fold`` is trained with that many steps (its own cosine schedule; every model's smaller budgets
first) in ``<root>/curve/seed_<s>/<model>-<steps>/``, a copy of the seed's finished U-Net work directory
(``benchmarks/levers.py``'s), and scored ungated on the fold's held-out cases. A budget interrupted resumes;
a finished one is only re-read. Out: ``<root>/curve/seed_<s>/curve.{json,md,png}``: flip precision and
recall pooled over the regions, Dice avg and HD95 avg against steps, the U-Net's as a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, levers, refinement  # noqa: E402
from rediffinet_jax import reports  # noqa: E402

MODELS = {
    "rediffinet": "configs/rediffinet.py:{v}",
    "rediffinet_plus": "configs/rediffinet_plus.py:{v}",
    "control": "configs/control.py:{v}",
}
VARIANT = {"phantoms": "bench", "real": "real"}  # which benchmark's configs


def run_point(workdir: Path, config: str, steps: int, seed: int, fold: int, cases: Path | None = None) -> None:
    """Trains (or resumes) one refiner of ``fold`` for ``steps`` steps and scores it ungated. A checkpoint
    every 2000 steps at most, so that a long budget killed resumes near where it was (the evaluation takes
    the last checkpoint, so this changes no score)."""
    over = [f"--config.diffusion.steps={steps}", f"--config.diffusion.val_every={min(steps, 2000)}"]
    levers.train_and_score(workdir, config, over, seed, fold, workdir.name, cases)


def point(workdir: Path, fold: int) -> dict:
    """Dice avg (%), HD95 avg (mm) of the U-Net and the refiner, the refiner's pooled flip precision and recall."""
    rows = levers.lever_rows(workdir, fold)
    s = reports.summary_tables({k: {0: r} for k, r in rows.items()}, "")
    name = next(k for k in rows if k != "unet")
    flips = s["flips"][name]
    pooled = reports.flip_record(*(sum(f[k] for f in flips.values()) for k in ("unet_errors", "flipped", "fixed")))
    mean = {k: s["models"][k]["mean"]["avg"] for k in ("unet", name)}
    return {
        "dice_avg": 100 * mean[name]["dice"],
        "hd95_avg": mean[name]["hd95"],
        "unet_dice_avg": 100 * mean["unet"]["dice"],
        "unet_hd95_avg": mean["unet"]["hd95"],
        "precision": pooled["precision"],
        "recall": pooled["recall"],
        "net_error_change": pooled["net_error_change"],
    }


def figure(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    keys = (
        ("precision", "flip precision (%)"),
        ("recall", "flip recall (%)"),
        ("dice_avg", "Dice avg (%)"),
        ("hd95_avg", "HD95 avg (mm)"),
    )
    for ax, (key, title) in zip(axes, keys):
        scale = 100 if key in ("precision", "recall") else 1  # percent, as the table gives them
        for name, pts in curve.items():
            steps = sorted(pts, key=int)
            ax.plot([int(s) for s in steps], [scale * pts[s][key] for s in steps], "o-", label=name)
        if key == "precision":  # below it a flip adds more wrong voxels than it removes
            ax.axhline(50, color="gray", ls=":", lw=1)
        if key in ("dice_avg", "hd95_avg"):
            first = next(iter(next(iter(curve.values())).values()))
            ax.axhline(first[f"unet_{key}"], color="k", ls="--", lw=1, label="U-Net")
        ax.set_xscale("log")
        ticks = sorted({int(s) for pts in curve.values() for s in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("refiner steps (log)")
        ax.set_title(title)
    axes[2].legend(fontsize=8)  # the models and the U-Net's dashed line
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="the benchmark's root (default: runs/bench, runs/real)")
    p.add_argument("--data", choices=tuple(VARIANT), default="phantoms")
    p.add_argument("--cases", help="--data real: the real cases' folder (benchmarks/real_data.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--steps", default="1000,3000,10000")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--table_only", action="store_true")
    a = p.parse_args(argv)
    root = Path(a.root or ("runs/real" if a.data == "real" else "runs/bench"))
    base, out = root / f"seed_{a.seed}", root / "curve" / f"seed_{a.seed}"
    if a.data == "real" and not a.cases:
        raise SystemExit("error: --data real needs --cases (see benchmarks/real_data.py)")
    cases = Path(a.cases) if a.data == "real" else None
    curve: dict = {}
    # budgets in the outer loop: a run cut short has every model at its smaller budgets
    for steps in (int(s) for s in a.steps.split(",")):
        for name in a.models.split(","):
            workdir = out / f"{name}-{steps}"
            if not a.table_only:
                refinement.copy_unet(base, workdir)
                if not (workdir / name / f"fold_{a.fold}" / "done.json").is_file() or not (workdir / "eval").is_dir():
                    run_point(workdir, MODELS[name].format(v=VARIANT[a.data]), steps, a.seed, a.fold, cases)
            if (workdir / "eval" / name).is_dir():
                curve.setdefault(name, {})[str(steps)] = point(workdir, a.fold)
    write_outputs(
        out,
        {"curve": curve, "seed": a.seed, "fold": a.fold, "machine": common.machine(), "commit": common.commit(ROOT)},
    )


def write_outputs(out: Path, result: dict) -> None:
    """``curve.json``, ``curve.md`` (one row per model and budget) and, with any point, ``curve.png``."""
    curve = result["curve"]
    (out / "curve.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| model | steps | Dice avg | HD95 avg | flip precision | flip recall | net wrong voxels |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pts in curve.items():
        for s in sorted(pts, key=int):
            x = pts[s]
            lines.append(
                f"| {name} | {s} | {x['dice_avg']:.2f} | {x['hd95_avg']:.2f} | {100 * x['precision']:.1f} % | "
                f"{100 * x['recall']:.1f} % | {x['net_error_change']:+d} |"
            )
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    if curve:
        figure(curve, out / "curve.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
