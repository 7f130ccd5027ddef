"""The phantom and real-data benchmarks over seeds: does the refiner make a strong U-Net better?

    python benchmarks/refinement.py                       # 3 seeds: the paper's refiner, rediffinet_plus, control
    python benchmarks/refinement.py --data real --cases /path/to/brats --root runs/real   # 20 real exams
    python benchmarks/refinement.py --config configs/rediffinet.py:bench   # one refiner only
    python benchmarks/refinement.py --variants            # + Diff-U-Net and UA-Diffusion concat
    python benchmarks/refinement.py --seeds 5 --root runs/bench --set diffusion.steps=3000
    python benchmarks/refinement.py --baseline grown_edema --seeds 1   # the refiner on another model's maps
    python benchmarks/refinement.py --root runs/bench3000 --unet_from runs/bench --set diffusion.steps=3000
    python benchmarks/refinement.py --seeds 3 --first 1   # seeds 1 and 2 only (seed 0 ran on another machine)

Seed ``s`` changes ``seed``, ``data.phantoms.seed`` and ``data.split_seed`` (new phantoms, new folds, new
initialisation) and runs ``train.py`` (both stages on every fold, then the evaluation) in
``<root>/seed_<s>``; a seed interrupted at any moment continues where it was when the command is run
again (train.py resumes), a finished one is only re-read. ``--unet_from ROOT`` starts each seed from a copy
of ``ROOT/seed_<s>``'s finished U-Net (the same phantoms, folds and U(I)), so that refiners trained another
way are compared on the same U-Net without training it again. The table is recomputed from the per-case rows
(``eval/<model>/fold_k/cases.csv``) of every seed and written to ``<root>/refinement.{md,csv,json}``:
per seed and mean ± sample std (n − 1) over seeds, each model's Dice and HD95 per region and averaged (every
discrepancy refiner twice: as the paper does it and ``+gate``, gated per fold on the other folds), the HD95
change against the seed's U-Net, the flips pooled over every held-out case, and the targets' verdicts.

``--data real`` runs the same on the 20 real BraTS 2018 exams of ``benchmarks/real_cases.txt`` (checked
file by file first: ``benchmarks/real_data.py``), read from ``--cases`` as they are, at 2 mm
(``configs/*.py:real``); seed ``s`` then changes ``seed`` and ``data.split_seed`` (5 folds of 16/4), and
the default refiner is the paper's alone.

``--baseline grown_edema`` trains the refiner on another baseline than the U-Net, one whose errors are
systematic: each case's ground truth with its edema grown by 2 voxels (``config.baseline.maps``), on the
phantoms of ``<root>/seed_<s>/data`` (the U-Net benchmark's seed must have been run), in
``<root>/grown_edema/seed_<s>``; its table goes to ``<root>/grown_edema/refinement.*``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from rediffinet_jax import reports  # noqa: E402
from rediffinet_jax.case_rows import read_rows  # noqa: E402
from rediffinet_jax.evaluation import BASELINE  # noqa: E402
from rediffinet_jax.labels import REGIONS  # noqa: E402
from rediffinet_jax.workdir import GIVEN  # noqa: E402

VARIANTS = ("configs/diff_unet.py:{v}", "configs/ua_diffusion.py:concat,{v}")
REFINERS = {
    "phantoms": ("configs/rediffinet.py:bench", "configs/rediffinet_plus.py:bench", "configs/control.py:bench"),
    "real": ("configs/rediffinet.py:real",),
}
TITLE = {"phantoms": "Phantom benchmark", "real": "Real-data benchmark (20 BraTS 2018 exams at 2 mm)"}
COLS = (*REGIONS, "avg")
# Targets. Never worse (every seed): no region with more wrong voxels after refinement (pooled over held-out
# cases), HD95 avg not above the U-Net's. Better (mean over seeds): HD95 avg at least 5 % below the U-Net's
# with Dice avg at most 0.5 points below it.
HD95_GAIN, DICE_LOSS = 5.0, 0.5


def seed_overrides(seed: int, cases: Path | None = None) -> list[str]:
    """The train.py flags of a seed: new initialisation and folds, and new phantoms unless ``cases`` (real)."""
    data = [f"--config.data.root={cases.resolve()}"] if cases else [f"--config.data.phantoms.seed={seed}"]
    return [f"--config.seed={seed}", *data, f"--config.data.split_seed={seed}"]


def run_seed(
    workdir: Path, configs: list[str], seed: int, extra: list[str], log=print, cases=None, note: str = ""
) -> float:
    """Runs (or resumes) train.py for each config in ``workdir``; returns the seconds spent on the seed over
    all calls. Each call is recorded in ``workdir/bench_time.json`` (commit, machine, seconds, ``note``)."""
    t0 = time.time()
    for spec in configs:
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={spec}",
            f"--workdir={workdir}",
            *seed_overrides(seed, cases),
            *extra,
        ]
        log(f"seed {seed}: {' '.join(cmd[1:])}")
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"error: train.py failed (exit {done.returncode}) for seed {seed}: {' '.join(cmd)}")
    calls = seed_calls(workdir)
    calls.append(
        {
            "commit": common.commit(ROOT),
            "machine": common.machine(),
            "seconds": time.time() - t0,
            "date": time.strftime("%Y-%m-%d"),
            **({"note": note} if note else {}),
        }
    )
    (workdir / "bench_time.json").write_text(json.dumps({"calls": calls}, indent=1))
    return sum(c["seconds"] for c in calls)


def copy_unet(source: Path, dest: Path) -> None:
    """Copies what a refiner needs of a finished U-Net work directory (its config, splits, phantoms, cache and
    U-Net with its out-of-fold maps; not its refiners or scores) unless ``dest`` already has a U-Net."""
    if (dest / "unet").is_dir():
        return
    if not (source / "unet" / "oof" / "runs.json").is_file():
        raise SystemExit(f"error: {source} has no finished U-Net out-of-fold maps: run refinement.py first")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "splits.json"):
        shutil.copy2(source / name, dest / name)
    for name in ("data", "cache", "unet"):  # (no data/ for real cases: they stay where data.root says)
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, symlinks=True)


def seed_calls(workdir: Path) -> list[dict]:
    """The recorded calls of a seed (an early version recorded only the total seconds)."""
    record = workdir / "bench_time.json"
    if not record.is_file():
        return []
    data = json.loads(record.read_text())
    return data.get("calls", [{"commit": "unknown", "machine": "unknown", "seconds": data.get("seconds", 0.0)}])


def grown_edema_maps(data: Path, folder: Path, voxels: int = 2) -> list[str]:
    """Writes ``folder/<case>.nii.gz`` for every case of ``data``: its ground truth with the edema grown by
    ``voxels`` around the whole tumour (a model that over-segments oedema); returns the case ids. Made
    once: a finished ``folder`` (its ``done`` file) is kept."""
    import nibabel as nib
    from scipy import ndimage

    ids = sorted(p.name for p in data.iterdir() if p.is_dir())
    if (folder / "done").is_file():
        return ids
    folder.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        seg = nib.load(str(data / cid / f"{cid}-seg.nii.gz"))
        labels = np.rint(seg.get_fdata()).astype(np.uint8)
        labels[ndimage.binary_dilation(labels > 0, iterations=voxels) & (labels == 0)] = 2
        nib.save(nib.Nifti1Image(labels, seg.affine), str(folder / f"{cid}.nii.gz"))
    (folder / "done").write_text(f"{len(ids)} maps, edema grown by {voxels} voxels\n")
    return ids


def baseline_args(root: Path, seed: int, baseline: str) -> tuple[Path, list[str]]:
    """(the seed's work directory, the train.py flags of the baseline)."""
    if baseline == "unet":
        return root / f"seed_{seed}", []
    data = root / f"seed_{seed}" / "data"
    if not data.is_dir():
        raise SystemExit(f"error: --baseline {baseline} needs the phantoms of {data}: run the U-Net benchmark first")
    workdir = root / baseline / f"seed_{seed}"
    grown_edema_maps(data, workdir / "maps")
    return workdir, [f"--config.data.root={data.resolve()}", f"--config.baseline.maps={(workdir / 'maps').resolve()}"]


def seed_rows(workdir: Path) -> dict:
    """``{model: {fold: rows}}`` of a finished seed, read from its cases.csv files (no other sampler)."""
    eval_dir = workdir / "eval"
    n_folds = len(json.loads((workdir / "splits.json").read_text())["folds"])
    per_fold = {}
    for folder in sorted(p for p in eval_dir.iterdir() if (p / "settings.json").is_file()):
        if folder.name not in (BASELINE, GIVEN) and "-k" in folder.name:  # another sampler's evaluation
            continue
        rows = {k: read_rows(folder / f"fold_{k}" / "cases.csv") for k in range(n_folds)}
        per_fold[folder.name] = {k: r for k, r in rows.items() if r}
    base = GIVEN if GIVEN in per_fold else BASELINE
    return {base: per_fold.pop(base), **per_fold}  # the baseline first


def seed_table(per_fold: dict) -> dict:
    """Per model: Dice (%) and HD95 (mm) per region and avg (mean over folds of the per-fold case means),
    the HD95 change in % against the baseline (the first model; negative = better) and the pooled flips."""
    base_name = next(iter(per_fold))
    s = reports.summary_tables(per_fold, "", base_name)
    base = s["models"][base_name]["mean"]
    out = {}
    for name, m in s["models"].items():
        row = {
            "dice": {c: 100 * m["mean"][c]["dice"] for c in COLS},
            "hd95": {c: m["mean"][c]["hd95"] for c in COLS},
            "n_cases": m["n_cases"],
            "n_folds": m["n_folds"],
        }
        row["hd95_change_percent"] = {
            c: 100 * (m["mean"][c]["hd95"] - base[c]["hd95"]) / base[c]["hd95"] if base[c]["hd95"] else float("nan")
            for c in COLS
        }
        row["dice_change_points"] = {c: 100 * (m["mean"][c]["dice"] - base[c]["dice"]) for c in COLS}
        if name in s["flips"]:
            row["flips"] = s["flips"][name]
        out[name] = row
    return out


def verdict(row: dict) -> dict:
    """The targets for one refined model in one seed (or the means over seeds): never worse (no region with
    more wrong voxels, HD95 avg not above the U-Net's) and better (HD95 avg ≥ 5 % lower, Dice avg ≥ −0.5)."""
    net = {r: row["flips"][r]["net_error_change"] for r in REGIONS} if "flips" in row else {}
    return {
        "no_region_more_wrong": bool(net) and all(v <= 0 for v in net.values()),
        "hd95_avg_not_above": row["hd95_change_percent"]["avg"] <= 0,
        "hd95_avg_5pct_lower": row["hd95_change_percent"]["avg"] <= -HD95_GAIN,
        "dice_avg_within_0.5": row["dice_change_points"]["avg"] >= -DICE_LOSS,
    }


def combine(tables: dict) -> dict:
    """``{seed: seed_table}`` -> the benchmark's JSON: per seed, mean ± std over seeds, verdicts."""
    models = list(next(iter(tables.values())))
    mean, std = {}, {}
    for name in models:
        rows = [t[name] for t in tables.values() if name in t]
        mean[name], std[name] = {}, {}
        for key in ("dice", "hd95", "hd95_change_percent", "dice_change_points"):
            vals = np.array([[r[key][c] for c in COLS] for r in rows])
            mean[name][key] = dict(zip(COLS, vals.mean(0).tolist()))
            # the sample standard deviation (n − 1): dividing by n understates the spread of 3 seeds by 18 %
            std[name][key] = dict(zip(COLS, (vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(COLS))).tolist()))
        if all("flips" in r for r in rows) and rows and "flips" in rows[0]:
            mean[name]["flips"] = {reg: _pooled([r["flips"][reg] for r in rows]) for reg in REGIONS}
    verdicts = {
        name: {"per_seed": {s: verdict(t[name]) for s, t in tables.items()}, "mean": verdict(mean[name])}
        for name in models
        if name not in (BASELINE, GIVEN)
    }
    for v in verdicts.values():
        never_worse = [
            x[k] for x in [v["mean"], *v["per_seed"].values()] for k in ("no_region_more_wrong", "hd95_avg_not_above")
        ]
        v["never_worse"] = all(never_worse)
        v["better"] = v["mean"]["hd95_avg_5pct_lower"] and v["mean"]["dice_avg_within_0.5"]
        v["all_met"] = v["never_worse"] and v["better"]
    return {"seeds": tables, "mean": mean, "std": std, "verdicts": verdicts}


def _pooled(flips: list[dict]) -> dict:
    return reports.flip_record(*(sum(f[k] for f in flips) for k in ("unet_errors", "flipped", "fixed")))


def _flip_lines(result: dict) -> list[str]:
    """The markdown of the flips table (per seed and pooled over seeds) and the targets' lead-in."""
    n = len(result["seeds"])
    lines = [
        "",
        "Flips, all held-out cases of every fold pooled (net: change in wrong voxels, negative = fewer):",
        "",
        f"| seed | model | region | {reports.baseline_name(next(iter(result['mean'])))} errors | flipped | fixed "
        "| precision | recall | net |",
        "|" + "---|" * 9,
    ]
    flip_rows = [(s, name, r["flips"]) for s, t in result["seeds"].items() for name, r in t.items() if "flips" in r]
    flip_rows += [(f"all {n} seeds", name, m["flips"]) for name, m in result["mean"].items() if "flips" in m]
    for seed, name, flips in flip_rows:
        for reg, f in flips.items():
            lines.append(
                f"| {seed} | {name} | {reg} | {f['unet_errors']} | {f['flipped']} | {f['fixed']} | "
                f"{100 * f['precision']:.1f} % | {100 * f['recall']:.1f} % | {f['net_error_change']:+d} |"
            )
    return lines + [
        "",
        f"Std: the sample standard deviation over the {n} seeds (n − 1). Targets: never worse (in every seed and the "
        "mean: no region with more wrong voxels, HD95 avg not above the U-Net's); better (the mean over seeds: HD95 "
        "avg ≥ 5 % lower, Dice avg ≥ −0.5 points):",
        "",
    ]


def markdown(result: dict, header: str = "") -> str:
    cols = " | ".join(f"Dice {c}" for c in COLS) + " | " + " | ".join(f"HD95 {c}" for c in COLS)
    lines = [header, "", f"| seed | model | {cols} | HD95 avg change |", "|" + "---|" * (3 + 2 * len(COLS))]

    def fmt(row, sd=None):
        cell = lambda k, c, p: f"{row[k][c]:.{p}f}" + (f" ± {sd[k][c]:.{p}f}" if sd else "")
        return (
            " | ".join(cell("dice", c, 2) for c in COLS)
            + " | "
            + " | ".join(cell("hd95", c, 2) for c in COLS)
            + " | "
            + cell("hd95_change_percent", "avg", 1)
            + " %"
        )

    for seed, table in result["seeds"].items():
        for name, row in table.items():
            lines.append(f"| {seed} | {name} | {fmt(row)} |")
    n = len(result["seeds"])
    for name in result["mean"]:
        lines.append(f"| mean ± std ({n} seeds) | {name} | {fmt(result['mean'][name], result['std'][name])} |")
    lines += _flip_lines(result)
    for name, v in result["verdicts"].items():
        seeds = "; ".join(
            f"seed {s}: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in x.items())
            for s, x in v["per_seed"].items()
        )
        mean = ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in v["mean"].items())
        head = f"never worse {'yes' if v.get('never_worse') else 'NO'}, better {'yes' if v.get('better') else 'NO'}"
        lines.append(f"* {name}: {head} — mean: {mean}; {seeds}")
    return "\n".join(lines) + "\n"


def write_outputs(root: Path, result: dict, header: str) -> None:
    import csv

    (root / "refinement.json").write_text(json.dumps(result, indent=1))
    (root / "refinement.md").write_text(markdown(result, header))
    with open(root / "refinement.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "model", "metric", "region", "value"])
        entries = [(s, t) for s, t in result["seeds"].items()] + [("mean", result["mean"]), ("std", result["std"])]
        for seed, table in entries:
            for name, row in table.items():
                for metric in ("dice", "hd95", "hd95_change_percent", "dice_change_points"):
                    for c in COLS:
                        w.writerow([seed, name, metric, c, f"{row[metric][c]:.6g}"])


def main(argv=None) -> None:
    a = _parse(argv)
    root = Path(a.root or ("runs/real" if a.data == "real" else "runs/bench"))
    cases = _real_cases(a) if a.data == "real" else None
    root.mkdir(parents=True, exist_ok=True)
    refiners = a.config or list(REFINERS[a.data])
    variant = refiners[0].partition(":")[2] or "bench"
    configs = refiners + ([v.format(v=variant) for v in VARIANTS] if a.variants else [])
    extra = [f"--config.{kv}" for kv in a.set]
    tables, calls = {}, {}
    for seed in range(a.seeds):
        workdir, given = baseline_args(root, seed, a.baseline)
        if not a.table_only and seed >= a.first:
            note = _reuse_unet(a, seed, workdir)
            run_seed(workdir, configs, seed, extra + given, cases=cases, note=note)
        if (workdir / "eval").is_dir():
            tables[str(seed)] = seed_table(seed_rows(workdir))
            calls[str(seed)] = seed_calls(workdir)
    if not tables:
        raise SystemExit("error: no finished seed to tabulate")
    result = combine(tables)
    result["calls"] = calls
    result["seeds_asked"] = a.seeds
    result["data"] = a.data
    result["seconds"] = {s: sum(c["seconds"] for c in cs) for s, cs in calls.items()}
    args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--table_only"]  # not how it was made
    result["command"] = " ".join(["python benchmarks/refinement.py", *args])
    machines = sorted({c["machine"] for cs in calls.values() for c in cs})
    commits = sorted({c["commit"] for cs in calls.values() for c in cs})
    header = (
        f"{TITLE[a.data]}: {', '.join(configs)}, baseline {a.baseline}, {len(tables)} seed(s), HD95 in mm (brats2023 "
        f"convention), Dice in %; {result['command']}; commit {', '.join(commits)}; {'; '.join(machines)}"
    )
    write_outputs(root if a.baseline == "unet" else root / a.baseline, result, header)
    print(markdown(result, header))


def _reuse_unet(a, seed: int, workdir: Path) -> str:
    """``--unet_from``: the seed's finished U-Net copied in (once), so that only the refiners train; the note
    for its time record."""
    if not a.unet_from:
        return ""
    source = Path(a.unet_from) / f"seed_{seed}"
    copy_unet(source, workdir)
    return f"U-Net folds copied from {source}, not timed here"


def _real_cases(a) -> Path:
    """The real cases' folder, checked file by file against benchmarks/real_cases.txt."""
    from benchmarks import real_data

    if a.baseline != "unet":
        raise SystemExit("error: --baseline grown_edema is a phantom benchmark (use --data phantoms)")
    if not a.cases:
        raise SystemExit("error: --data real needs --cases, the folder of the 20 cases (see benchmarks/real_data.py)")
    real_data.check(a.cases)
    return Path(a.cases)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "; ".join(f"{d}: {', '.join(r)}" for d, r in REFINERS.items())
    p.add_argument("--config", action="append", help=f"a refiner's config (path:variant), repeatable; {default}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument(
        "--first", type=int, default=0, help="run seeds FIRST..N-1 only (the earlier ones are tabulated if finished)"
    )
    p.add_argument("--data", choices=("phantoms", "real"), default="phantoms", help="generated phantoms or real exams")
    p.add_argument("--cases", help="--data real: the folder holding the 20 cases (benchmarks/real_cases.txt)")
    p.add_argument("--root", help="one work directory per seed under it (default: runs/bench, runs/real)")
    p.add_argument("--variants", action="store_true", help="also Diff-U-Net and UA-Diffusion concat")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value for every model of every seed (repeatable)",
    )
    p.add_argument(
        "--unet_from",
        metavar="ROOT",
        help="copy each seed's finished U-Net (folds, out-of-fold maps, phantoms, splits) from ROOT/seed_<s>",
    )
    p.add_argument("--table_only", action="store_true", help="only rewrite the table from finished seeds")
    p.add_argument("--baseline", choices=("unet", "grown_edema"), default="unet", help="U(I): see the docstring")
    a = p.parse_args(argv)
    if a.unet_from and a.baseline != "unet":  # before any seed's work (grown_edema writes its maps first)
        raise SystemExit("error: --unet_from takes the U-Net's maps as the baseline (leave --baseline out)")
    return a


if __name__ == "__main__":
    main()
