"""The price of fewer sampler steps: quality against seconds per case for K steps and S samples.

    python benchmarks/sampler_sweep.py --workdir runs/bench/seed_0 --folds 0
    python benchmarks/sampler_sweep.py --workdir runs/bench/seed_0 --steps 1,3,10 --samples 1,4 --fusions mean

Scores a trained refiner (``--model``) on the held-out cases of ``--folds`` with every combination of
DDIM steps K, samples S and fusion, through ``evaluate.py``'s own path (``eval/<model>-<fusion>-k<K>-s<S>/``,
so finished combinations are reused and an interrupted sweep resumes), then writes
``<workdir>/eval/sampler_sweep.{md,csv,json,png}``: per combination the Dice and HD95 averaged over the
three regions (mean over cases), the net change in wrong voxels against the U-Net (pooled), and the
seconds per case of the model's prediction (``seconds`` in cases.csv: sliding window and sampler, not
the scoring).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def combo_label(model: str, fusion: str, steps: int, samples: int, own: dict) -> str:
    """The eval/ folder evaluate.py uses: the model's own name for its own sampler."""
    if (fusion, steps, samples) == (own["fusion"], own["steps"], own["samples"]):
        return model
    return f"{model}-{fusion}-k{steps}-s{samples}"


def score(rows: list[dict]) -> dict:
    """Dice (%) and HD95 (mm) averaged over regions and cases, pooled net change in wrong voxels per region,
    seconds per case."""
    out = {
        "dice_avg": 100 * float(np.mean([r["dice"] for r in rows])),
        "hd95_avg": float(np.mean([r["hd95"] for r in rows])),
        "seconds_per_case": float(np.nanmean([r["seconds"] for r in rows])),
        "n_cases": len({r["case"] for r in rows}),
    }
    for region in ("WT", "TC", "ET"):
        sel = [r for r in rows if r["region"] == region]
        out[f"net_{region}"] = int(sum(r["flipped"] - 2 * r["fixed"] for r in sel))
    return out


def table(results: list[dict]) -> list[str]:
    """The markdown rows of the sweep: one per combination of fusion, K and S."""
    head = ["| fusion | K | S | Dice avg | HD95 avg | net WT | net TC | net ET | s / case |", "|" + "---|" * 9]
    return head + [
        f"| {r['fusion']} | {r['steps']} | {r['samples']} | {r['dice_avg']:.2f} | {r['hd95_avg']:.2f} | "
        f"{r['net_WT']:+d} | {r['net_TC']:+d} | {r['net_ET']:+d} | {r['seconds_per_case']:.2f} |"
        for r in results
    ]


def figure(results: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fusions = sorted({r["fusion"] for r in results})
    fig, axes = plt.subplots(2, len(fusions), figsize=(5.2 * len(fusions), 7.4), squeeze=False)
    for col, fusion in enumerate(fusions):
        for row, (key, label) in enumerate((("dice_avg", "Dice avg (%)"), ("hd95_avg", "HD95 avg (mm)"))):
            ax = axes[row, col]
            for s in sorted({r["samples"] for r in results}):
                pts = sorted(
                    (r["seconds_per_case"], r[key], r["steps"])
                    for r in results
                    if r["fusion"] == fusion and r["samples"] == s
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"S = {s}")
                for x, y, k in pts:
                    ax.annotate(f"K{k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.axhline(base[key], color="k", ls="--", lw=1, label="U-Net")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())  # the default labels every minor tick: unreadable
            ax.set_xlabel("seconds per case (log scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{fusion} fusion: {label.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Sampler steps K and samples S on {base['n_cases']} held-out cases (K labelled at each point)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rows(workdir: Path, label: str, folds: list[int]) -> list[dict]:
    from rediffinet_jax import case_rows

    return [r for k in folds for r in case_rows.read_rows(workdir / "eval" / label / f"fold_{k}" / "cases.csv")]


def sweep(workdir: Path, a, folds: list[int]) -> list[dict]:
    """Scores ``a.model`` on ``folds`` with every fusion × steps × samples; one score record each."""
    from rediffinet_jax import evaluation
    from rediffinet_jax.workdir import load_settings

    own = load_settings(workdir / a.model).diffusion.sampler
    results = []
    for fusion in a.fusions.split(","):
        for steps in _ints(a.steps):
            for samples in _ints(a.samples):
                sampler = {"fusion": fusion, "steps": steps, "samples": samples}
                evaluation.evaluate(workdir, [a.model], folds, sampler=sampler, progress=False, log=lambda m: None)
                rows = _rows(workdir, combo_label(a.model, fusion, steps, samples, own), folds)
                results.append({**sampler, **score(rows)})
                print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="rediffinet")
    p.add_argument("--folds", default="0", help="held-out folds to score, e.g. 0 or 0,1,2,3,4")
    p.add_argument("--steps", default="1,2,3,5,10")
    p.add_argument("--samples", default="1,2,4,10")
    p.add_argument("--fusions", default="mean,suf")
    a = p.parse_args(argv)

    from rediffinet_jax import workdir as wd

    workdir, folds = Path(a.workdir), _ints(a.folds)
    with wd.lock(workdir, "benchmarks/sampler_sweep.py", create=False):
        results = sweep(workdir, a, folds)
    base = {k: v for k, v in score(_rows(workdir, "unet", folds)).items() if not k.startswith("net_")}
    out = workdir / "eval"
    (out / "sampler_sweep.json").write_text(
        json.dumps({"unet": base, "combinations": results, "folds": folds}, indent=1)
    )
    with open(out / "sampler_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    lines = [
        f"Sampler sweep of {a.model} in {workdir}, folds {folds} ({base['n_cases']} cases); U-Net: Dice avg "
        f"{base['dice_avg']:.2f} %, HD95 avg {base['hd95_avg']:.2f} mm",
        "",
        *table(results),
    ]
    (out / "sampler_sweep.md").write_text("\n".join(lines) + "\n")
    figure(results, base, out / "sampler_sweep.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
