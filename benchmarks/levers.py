"""Each training lever of the refiner measured alone on one fold of the phantom benchmark.

    python benchmarks/levers.py --root runs/bench --seed 0 --fold 0       # after refinement.py's U-Nets
    python benchmarks/levers.py --root runs/bench --seed 0 --table_only

A lever is one change to the paper's training (configs/rediffinet.py) or sampling; each runs in its own
work directory ``<root>/levers/seed_<s>/<lever>/``, a copy of the seed's finished U-Net (its splits,
phantoms, cache and out-of-fold maps: the same U(I) for every lever), where only the refiner of
``--fold`` is trained and scored on that fold's held-out cases, ungated (a gate needs the other folds).
``sampler_start_<t>`` trains nothing: it scores the paper's refiner with DDIM started at t from "no
discrepancy". A lever interrupted resumes (train.py does); a finished one is only re-read. The table
(``<root>/levers/seed_<s>/levers.{md,json}``): Dice and HD95 per region and averaged, and per region the
flips' precision and the net change in wrong voxels, against the U-Net on the same cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.refinement import COLS, copy_unet, seed_overrides  # noqa: E402
from rediffinet_jax import reports  # noqa: E402
from rediffinet_jax.case_rows import read_rows  # noqa: E402
from rediffinet_jax.labels import REGIONS  # noqa: E402

PAPER = "configs/rediffinet.py:bench"
#: lever -> (config, train.py overrides); every one is the paper's training with one thing changed.
LEVERS = {
    "paper": (PAPER, []),
    "error_patches": (PAPER, ["--config.diffusion.error_fraction=0.5"]),
    "unet_augment": (
        PAPER,
        ["--config.diffusion.unet_augment.p=0.4", "--config.diffusion.unet_augment.component_p=0.2"],
    ),
    "no_dice": (PAPER, ["--config.diffusion.loss_weights=(0.0, 1.0, 1.0)"]),
    "ema": (PAPER, ["--config.diffusion.ema=0.99"]),
    "min_snr": (PAPER, ["--config.diffusion.min_snr=5.0"]),
    "control": ("configs/control.py:bench", []),
}
STARTS = (500, 250)  # sampler_start_<t>: the paper's refiner, sampled from t


def train_and_score(
    workdir: Path, config: str, extra: list[str], seed: int, fold: int, what: str, cases: Path | None = None
) -> float:
    """Trains (or resumes) the refiner of ``fold`` alone with ``config`` and ``extra`` train.py flags, then
    scores it ungated on that fold's held-out cases; returns the seconds of this call. ``cases``: the real
    cases' folder (None: the seed's phantoms)."""
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={config}", f"--workdir={workdir}", f"--fold={fold}"]
    cmd += ["--stage=diffusion", "--noevaluate", *seed_overrides(seed, cases), *extra]
    print(f"{what}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"error: train.py failed for {what}")
    score(workdir, fold, what)
    return time.time() - t0


def score(workdir: Path, fold: int, what: str, *extra: str) -> None:
    """evaluate.py on ``fold`` alone, ungated (a gate needs the other folds), with ``extra`` flags."""
    ev = [sys.executable, str(ROOT / "evaluate.py"), f"--workdir={workdir}", f"--folds={fold}", "--nogate", *extra]
    if subprocess.run(ev, cwd=ROOT).returncode:
        raise SystemExit(f"error: evaluate.py failed for {what}")


def run_lever(workdir: Path, lever: str, seed: int, fold: int) -> float:
    """Trains and scores one lever (or resumes it); returns the seconds of this call."""
    config, extra = LEVERS[lever]
    return train_and_score(workdir, config, extra, seed, fold, f"lever {lever}")


def run_start(workdir: Path, start: int, fold: int) -> float:
    t0 = time.time()
    score(workdir, fold, f"sampler start {start}", f"--start={start}", "--models=rediffinet")
    return time.time() - t0


def lever_rows(workdir: Path, fold: int) -> dict:
    """``{label: rows}`` of fold ``fold``: the U-Net and every refiner scored there (ungated)."""
    out = {}
    for folder in sorted((workdir / "eval").iterdir()):
        rows = read_rows(folder / f"fold_{fold}" / "cases.csv") if folder.is_dir() else []
        if rows and not folder.name.endswith("+gate"):
            out[folder.name] = rows
    return out


def table(levers: dict) -> dict:
    """``{lever: {"dice", "hd95", "flips"}}`` and the U-Net's row (same cases for all)."""
    out = {}
    for lever, rows in levers.items():
        s = reports.summary_tables({k: {0: r} for k, r in rows.items()}, "")
        for label, m in s["models"].items():
            name = "unet" if label == "unet" else lever
            out[name] = {
                "dice": {c: 100 * m["mean"][c]["dice"] for c in COLS},
                "hd95": {c: m["mean"][c]["hd95"] for c in COLS},
            }
            if label in s["flips"]:
                out[name]["flips"] = s["flips"][label]
    return out


def markdown(result: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| lever | "
        + " | ".join(f"Dice {c}" for c in COLS)
        + " | HD95 avg | "
        + " | ".join(f"{r} precision / net" for r in REGIONS)
        + " | minutes |",
        "|" + "---|" * (len(COLS) + 6),
    ]
    for name, row in result["rows"].items():
        flips = [
            f"{100 * row['flips'][r]['precision']:.1f} % / {row['flips'][r]['net_error_change']:+d}"
            if "flips" in row
            else ""
            for r in REGIONS
        ]
        minutes = result["seconds"].get(name)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row['dice'][c]:.2f}" for c in COLS)
            + f" | {row['hd95']['avg']:.2f} | "
            + " | ".join(flips)
            + f" | {'' if minutes is None else f'{minutes / 60:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--levers", default=",".join([*LEVERS, *(f"sampler_start_{t}" for t in STARTS)]))
    p.add_argument("--table_only", action="store_true")
    a = p.parse_args(argv)
    base = Path(a.root) / f"seed_{a.seed}"
    out = Path(a.root) / "levers" / f"seed_{a.seed}"
    record = out / "levers_time.json"
    seconds = json.loads(record.read_text()) if record.is_file() else {}
    rows = {}
    for lever in a.levers.split(","):
        start = int(lever.rpartition("_")[2]) if lever.startswith("sampler_start_") else None
        workdir = out / ("paper" if start is not None else lever)
        if not a.table_only:
            copy_unet(base, workdir)
            done = workdir / "eval" / (f"rediffinet-mean-k3-s4-t{start}" if start is not None else "x")
            if lever not in seconds or (start is not None and not done.is_dir()):
                seconds[lever] = (
                    run_start(workdir, start, a.fold)
                    if start is not None
                    else run_lever(workdir, lever, a.seed, a.fold)
                )
                out.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(seconds, indent=1))
        if (workdir / "eval").is_dir():
            found = lever_rows(workdir, a.fold)
            key = f"rediffinet-mean-k3-s4-t{start}" if start is not None else None
            rows[lever] = {k: v for k, v in found.items() if k == "unet" or (k == key if key else "-t" not in k)}
    result = {"rows": table(rows), "seconds": seconds, "fold": a.fold, "seed": a.seed}
    header = (
        f"Levers on fold {a.fold} of seed {a.seed} of the phantom benchmark (ungated, fold {a.fold}'s held-out cases; "
        f"Dice in %, HD95 in mm, brats2023; net: change in wrong voxels against the U-Net, negative = fewer); "
        f"commit {common.commit(ROOT)}; {common.machine()}"
    )
    (out / "levers.json").write_text(json.dumps(result, indent=1))
    (out / "levers.md").write_text(markdown(result, header))
    print(markdown(result, header))


if __name__ == "__main__":
    main()
