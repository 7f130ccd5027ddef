"""The README's result blocks, written from result files so that they cannot go stale.

    python benchmarks/readme_results.py demo --seeds 0,1,2      # runs the README's demo per seed, records it
    python benchmarks/readme_results.py bench --root runs/bench  # records benchmarks/refinement.py's table
    python benchmarks/readme_results.py bench --baseline grown_edema   # ... of its --baseline grown_edema run
    python benchmarks/readme_results.py bench --data real --root runs/real   # ... of the real-data benchmark
    python benchmarks/readme_results.py bench --data real --root runs/real --add   # more refiners, same U-Nets
    python benchmarks/readme_results.py render                   # rewrites the README blocks from the records

Records live in ``benchmarks/results/`` (``demo_runs.json``, ``phantom_bench.json``), each with the commit
and the machine it ran on; ``render`` rewrites the blocks between ``<!-- name:begin -->`` and
``<!-- name:end -->`` in README.md, and ``tests/test_readme.py`` checks that the README equals what
``render`` makes of the committed records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import records  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEMO, BENCH, SWEEP = RESULTS / "demo_runs.json", RESULTS / "phantom_bench.json", RESULTS / "sampler_sweep.json"
GROWN = RESULTS / "phantom_bench_grown_edema.json"  # the refiner on a systematic-error baseline
REAL = RESULTS / "real_bench.json"  # the 20 real BraTS exams (benchmarks/refinement.py --data real)
REAL_ADDED = RESULTS / "real_bench_added.json"  # more refiners on the same seeds' U-Nets (``bench --add``)
REGIONS, COLS = ("WT", "TC", "ET"), ("WT", "TC", "ET", "avg")
DEMO_CMD = "python train.py --config configs/rediffinet.py:demo --workdir runs/demo"


# ----------------------------------------------------------------------------- records


def run_demo(seed: int, root: Path) -> dict:
    """Runs the README's first command (with ``seed`` for the run, the phantoms and the split) in a fresh
    work directory; returns its record: wall seconds, peak memory of the run, and the summary's numbers."""
    from benchmarks import common

    workdir = root / f"demo_seed_{seed}"
    if workdir.exists():
        raise SystemExit(f"error: {workdir} exists; the demo is timed from scratch")
    cmd = [sys.executable, "train.py", "--config=configs/rediffinet.py:demo", f"--workdir={workdir}"]
    cmd += [f"--config.seed={seed}", f"--config.data.phantoms.seed={seed}", f"--config.data.split_seed={seed}"]
    log = root / f"demo_seed_{seed}.log"
    root.mkdir(parents=True, exist_ok=True)
    code, wall, peak = common.run_measured(cmd, ROOT, log)
    if code:
        raise SystemExit(f"error: the demo failed for seed {seed}; see {log}")
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 2),
        "commit": common.commit(ROOT),
        "machine": common.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "summary": _essentials(summary),
    }


def _essentials(summary: dict) -> dict:
    """What the README needs of a summary.json: per model the mean Dice/HD95 per region and avg, and the
    pooled flips of the refiners."""
    models = {
        name: {c: {k: m["mean"][c][k] for k in ("dice", "hd95")} for c in COLS}
        for name, m in summary["models"].items()
        if m["mean"]
    }
    gates = {  # per refiner, per fold (and "all"), per region: the gate's choice
        label: {k: {reg: c["gate"] for reg, c in choice.items()} for k, choice in record.items()}
        for label, record in summary.get("gates", {}).items()
    }
    return {"models": models, "flips": summary.get("flips", {}), "convention": summary["convention"], "gates": gates}


def _real_records() -> tuple[dict | None, dict | None]:
    """The real-data benchmark's record, with the added refiners (REAL_ADDED) merged in once they cover every
    seed it has; until then (the second run still under way) the added record is returned apart: (record,
    added or None)."""
    record = json.loads(REAL.read_text()) if REAL.is_file() else None
    added = json.loads(REAL_ADDED.read_text()) if REAL_ADDED.is_file() else None
    if record and added and set(record["result"]["seeds"]) <= set(added["result"]["seeds"]):
        return records.merge_records(record, added), None
    return record, added


def record_sweep(workdir: Path, folds: str) -> dict:
    """``<workdir>/eval/sampler_sweep.json`` (benchmarks/sampler_sweep.py) with its command and machine; its
    figure is copied to docs/sampler_sweep.png."""
    import shutil

    from benchmarks import common

    shutil.copy(workdir / "eval" / "sampler_sweep.png", ROOT / "docs" / "sampler_sweep.png")
    data = json.loads((workdir / "eval" / "sampler_sweep.json").read_text())
    return {
        "command": f"python benchmarks/sampler_sweep.py --workdir {workdir} --folds {folds}",
        "commit": common.commit(ROOT),
        "machine": common.machine(),
        **data,
    }


def render_sweep(w: dict) -> str:
    from benchmarks import sampler_sweep

    u = w["unet"]
    lines = [
        f"`{w['command']}` on {w['machine']}, commit {w['commit']}: {u['n_cases']} held-out cases; the U-Net "
        f"there: Dice avg {u['dice_avg']:.2f} %, HD95 avg {u['hd95_avg']:.2f} mm. Seconds per case are the "
        f"refiner's prediction (sliding window and sampler) on the benchmark's widths.",
        "",
        "![Sampler sweep](sampler_sweep.png)",
        "",
        *sampler_sweep.table(w["combinations"]),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rendering


def _span(values, fmt="{:.2f}") -> str:
    """``lo to hi`` over the values, or one number when both print the same."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


GATED = "rediffinet+gate"


def demo_no_harm(run: dict, name: str | None = None) -> bool:
    """The demo's target for one run: the refiner ``name`` (the gated one where the run has it, else the
    paper's) leaves no region with more wrong voxels and HD95 avg not above the U-Net's."""
    s = run["summary"]
    name = name or (GATED if GATED in s["models"] else "rediffinet")
    flips = s["flips"].get(name, {})
    hd = {n: s["models"][n]["avg"]["hd95"] for n in ("unet", name)}
    return bool(flips) and all(flips[r]["net_error_change"] <= 0 for r in REGIONS) and hd[name] <= hd["unet"]


def render_demo(runs: list[dict]) -> str:
    n = len(runs)
    lines = [
        f"`{DEMO_CMD}`, {n} runs (seeds {', '.join(str(r['seed']) for r in runs)}: the run, the phantoms and",
        f"the split), on {'; '.join(sorted({r['machine'] for r in runs}))}, commit "
        f"{', '.join(sorted({r['commit'] for r in runs}))}: {_span([r['wall_s'] / 60 for r in runs], '{:.1f}')} "
        f"min, {_span([r['peak_rss_gib'] for r in runs])} GiB peak memory. Ranges over the runs, each run's "
        f"mean over its folds:",
        "",
        "| model | " + " | ".join(f"Dice {c}" for c in COLS) + " | HD95 avg | net wrong voxels WT / TC / ET |",
        "|" + "---|" * (3 + len(COLS)),
    ]
    names = {"unet": "U-Net", "rediffinet": "Re-DiffiNet (paper: every flip)", GATED: "Re-DiffiNet, gated"}
    names = {k: v for k, v in names.items() if all(k in r["summary"]["models"] for r in runs)}
    for name, shown in names.items():
        dice = [_span([100 * r["summary"]["models"][name][c]["dice"] for r in runs]) for c in COLS]
        hd = _span([r["summary"]["models"][name]["avg"]["hd95"] for r in runs])
        nets = ""
        if name != "unet":
            per = [[r["summary"]["flips"][name][reg]["net_error_change"] for r in runs] for reg in REGIONS]
            nets = " / ".join(_span(v, "{:+d}") for v in per)
        lines.append(f"| {shown} | " + " | ".join(dice) + f" | {hd} | {nets} |")
    lines += ["", "Net wrong voxels: a run's held-out cases pooled, against the U-Net's (negative = fewer)."]
    if GATED in names:
        lines += _gate_lines(runs)
    ok_paper = sum(demo_no_harm(r, "rediffinet") for r in runs)
    head = "Target (no region with more wrong voxels, HD95 avg not above the U-Net's): "
    if GATED in names:
        ok = sum(demo_no_harm(r) for r in runs)
        lines += ["", head + f"gated, met in {ok} of {n} runs; the paper's refinement, in {ok_paper} of {n}."]
    else:
        lines += ["", head + f"met in {ok_paper} of {n} runs."]
    return "\n".join(lines)


def _all_off(runs: list[dict]) -> bool:
    """Whether the demo's gate is off in every region of every fold (and predict.py's) of every run."""
    gates = [r["summary"]["gates"]["rediffinet"] for r in runs]
    return all(c == "off" for g in gates for fold in g.values() for c in fold.values())


def _gate_lines(runs: list[dict]) -> list[str]:
    """The demo's gates per run and region (each fold's, then predict.py's), or one sentence when all are off."""
    gates = [r["summary"]["gates"]["rediffinet"] for r in runs]
    if _all_off(runs):
        return ["", "The gate: off in every region of every fold (and predict.py's) of every run."]
    lines = ["", "The gate per region: each fold's (chosen on the other folds), then predict.py's (on all folds):", ""]
    lines += ["| seed | WT | TC | ET |", "|---|---|---|---|"]
    for r, g in zip(runs, gates):
        folds = sorted(k for k in g if k != "all")
        cells = [", ".join(g[k][reg] for k in folds) + f"; all: {g['all'][reg]}" for reg in REGIONS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return lines


def render_status(runs: list[dict], bench: dict | None) -> str:
    if not runs:
        return ""
    ok = sum(demo_no_harm(r) for r in runs)
    if ok == len(runs) and all(GATED in r["summary"]["models"] for r in runs):
        paper = sum(demo_no_harm(r, "rediffinet") for r in runs)
        how = ", by turning itself off everywhere" if _all_off(runs) else ""
        return (
            f"**Read the demo as a check that the pipeline runs, not as a result.** Its gated refiner did no harm "
            f"in each of {len(runs)} runs{how} (the paper's ungated refinement: in {paper}); the result to quote "
            f"is the [phantom benchmark](#results-on-the-phantom-benchmark)."
        )
    if ok == len(runs):
        return (
            f"**The demo** (first command below) shows the refiner improving its U-Net in every one of "
            f"{len(runs)} runs; the result to quote is the [phantom benchmark](#results-on-the-phantom-benchmark)."
        )
    if bench is None:
        where = " (not yet run)."
    elif all(v["all_met"] for v in bench["result"]["verdicts"].values()):
        where = " below, where the refiner meets its targets."
    else:
        where = " below, where the refiner, trained for minutes on a CPU, misses its targets too."
    return (
        f"**Read the demo as a check that the pipeline runs, not as a result**: its refiner made some region "
        f"worse in {len(runs) - ok} of {len(runs)} runs. The result is the "
        f"[phantom benchmark](#results-on-the-phantom-benchmark)" + where
    )


SEED_KEYS = {"phantoms": "`seed`, `data.phantoms.seed` and `data.split_seed`", "real": "`seed` and `data.split_seed`"}
DOCS_ANCHOR = {"phantoms": "the-phantom-benchmark-generated", "real": "real-brats-cases-the-u-net-at-2-mm"}


def _notes(result: dict) -> str:
    """The notes of a benchmark's timed calls (what else ran, what was not timed), one sentence."""
    notes = sorted({c["note"] for cs in result.get("calls", {}).values() for c in cs if c.get("note")})
    return "; ".join(notes)


def _full(record: dict) -> str:
    """A benchmark's every-seed rows for docs/benchmarks.md, headed by its command and the calls' notes."""
    from benchmarks import refinement

    notes = _notes(record["result"])
    head = _command(record) + (f". Times per seed: {notes}" if notes else "")
    return refinement.markdown(record["result"], head).strip()


def _command(b: dict) -> str:
    """The record's command in backticks; a merged record's second run as what it adds to the first."""
    first, *more = b["result"].get("commands") or [b["command"]]
    then = [f"again with `{c[len(first) :].strip()}`" if c.startswith(first) else f"`{c}`" for c in more]
    return ", then ".join([f"`{first}`", *then])


def _minutes(b: dict) -> str:
    """Minutes per seed: one span, or one per run where two runs were merged (``69 to 86 + 83``)."""
    parts = b.get("seconds_parts") or [b["seconds"]]
    spans = [_span([sec / 60 for sec in p.values()], "{:.0f}") for p in parts if p]
    return (" + ".join(spans) if spans else "?") + " min per seed"


def _brackets(parts: list[str]) -> str:
    """`` (a; b)`` of the non-empty parts, or nothing."""
    parts = [p for p in parts if p]
    return f" ({'; '.join(parts)})" if parts else ""


def render_bench(b: dict, explained: bool = True) -> str:
    """A benchmark's README block; ``explained=False``: its notes and targets only named (a block above
    explains them) and Dice only averaged over the regions (every region in docs/benchmarks.md)."""
    r = b["result"]
    data = r.get("data", "phantoms")
    seeds, asked = sorted(r["seeds"]), r.get("seeds_asked", len(r["seeds"]))
    docs = f"[docs/benchmarks.md](docs/benchmarks.md#{DOCS_ANCHOR[data]})"
    one = len(seeds) == 1
    cols = COLS if explained else ("avg",)
    lines = [
        f"{_command(b)}: {len(seeds)} of its {asked} seeds finished so far (a seed changes "
        f"{SEED_KEYS[data]}), on {'; '.join(b['machines'])}, commit {', '.join(b['commits'])}: {_minutes(b)}"
        + _brackets(
            ["its two runs" if b.get("seconds_parts") else "", f"how each was timed: {docs}" if _notes(r) else ""]
        )
        + ". "
        + (
            "One seed's mean over 5 folds: not yet a mean over seeds"
            if one
            else "Mean ± std over the seeds of each seed's mean over 5 folds"
        )
        + " (HD95 in mm, brats2023):",
        "",
        "| model | "
        + " | ".join(f"Dice {c}" for c in cols)
        + " | HD95 avg | HD95 avg change | net wrong voxels WT / TC / ET |",
        "|" + "---|" * (4 + len(cols)),
    ]
    lines += [_bench_row(name, r["mean"][name], r["std"][name], cols, one) for name in r["mean"]]
    if not explained:
        lines += ["", f"Net wrong voxels and targets as above; every seed's rows in {docs}:", ""]
    else:
        lines += [
            "",
            "Net wrong voxels: every held-out case of every seed pooled, against the U-Net's (negative = fewer); "
            f"precision, recall, per-region HD95 and what each seed missed in {docs}.",
        ]
    return "\n".join(lines + _verdict_lines(r, explained))


def _bench_row(name: str, m: dict, sd: dict, cols, one: bool) -> str:
    """One model's README row: Dice per column, HD95 avg (± std unless ``one`` seed), its change, net flips."""
    cells = [f"{m['dice'][c]:.2f}" + ("" if one else f" ± {sd['dice'][c]:.2f}") for c in cols]
    cells.append(f"{m['hd95']['avg']:.2f}" + ("" if one else f" ± {sd['hd95']['avg']:.2f}"))
    change = "" if name in ("unet", "baseline") else f"{m['hd95_change_percent']['avg']:+.1f} %"
    flips = m.get("flips", {})
    net = " / ".join(f"{flips[reg]['net_error_change']:+d}" for reg in flips) if flips else ""
    return f"| {name} | " + " | ".join(cells) + f" | {change} | {net} |"


def _verdict_lines(r: dict, explained: bool) -> list[str]:
    """The targets (explained or only named) and each row's verdicts, as README lines."""
    seeds = r["seeds"]
    lines: list[str] = []
    if any("never_worse" in v for v in r["verdicts"].values()):
        lines += (
            [
                "",
                ("" if len(seeds) == 1 else f"Std: the sample standard deviation over the {len(seeds)} seeds (n − 1). ")
                + "Targets: **never worse** (in every seed and the mean: no region with more wrong voxels, HD95 avg "
                "not above the U-Net's) and **better** (the mean over seeds: HD95 avg ≥ 5 % below the U-Net's, Dice "
                "avg at most 0.5 points below):",
                "",
            ]
            if explained
            else []
        )
        for target, key in (("never worse", "never_worse"), ("better", "better")):
            met = [n for n, v in r["verdicts"].items() if v[key]]
            if not met or len(met) == len(r["verdicts"]):
                lines.append(f"* {target}: {'met by every model' if met else '**not met** by any model'}.")
            else:
                lines.append(f"* {target}: met by {', '.join(met)}; **not met** by the others.")
        return lines
    lines += [
        "",
        "Targets (HD95 avg ≥ 10 % below the U-Net's, Dice avg at most 0.5 points below, no region with more "
        "wrong voxels; in the mean and in every seed):",
        "",
    ]
    for name, v in r["verdicts"].items():
        missed = sorted({k for x in [v["mean"], *v["per_seed"].values()] for k, ok in x.items() if not ok})
        lines.append(f"* {name}: " + ("all met." if v["all_met"] else f"**not met**: {', '.join(missed)}."))
    return lines


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: README.md has no <!-- {name}:begin/end --> block")
    return pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(2), text)


def render_docs(text: str) -> str:
    """docs/benchmarks.md's blocks: every seed's rows of the phantom benchmark, every demo run."""
    bench = json.loads(BENCH.read_text()) if BENCH.is_file() else None
    runs = json.loads(DEMO.read_text()) if DEMO.is_file() else []
    text = replace_block(text, "bench-full", _full(bench) if bench else "Not run yet.")
    lines = ["| seed | commit | machine | minutes | peak GiB | target met |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['seed']} | {r['commit']} | {r['machine']} | {r['wall_s'] / 60:.1f} | {r['peak_rss_gib']:.2f} | "
        f"{'yes' if demo_no_harm(r) else 'no'} |"
        for r in runs
    ]
    text = replace_block(text, "demo-runs", "\n".join(lines) if runs else "Not measured yet.")
    sweep = json.loads(SWEEP.read_text()) if SWEEP.is_file() else None
    text = replace_block(text, "sampler-sweep", render_sweep(sweep) if sweep else "Not run yet.")
    grown = json.loads(GROWN.read_text()) if GROWN.is_file() else None
    text = replace_block(text, "bench-grown-edema", _full(grown) if grown else "Not run yet.")
    real, added = _real_records()
    text = replace_block(text, "real-bench-full", _full(real) if real else "Not run yet.")
    partial = _full(added) if added else "Merged into the table above." if REAL_ADDED.is_file() else "Not run yet."
    return replace_block(text, "real-bench-added", partial)


def render_readme(text: str) -> str:
    runs = json.loads(DEMO.read_text()) if DEMO.is_file() else []
    bench = json.loads(BENCH.read_text()) if BENCH.is_file() else None
    text = replace_block(text, "demo-status", render_status(runs, bench))
    text = replace_block(text, "demo", render_demo(runs) if runs else "Not measured yet.")
    text = replace_block(text, "bench", render_bench(bench) if bench else "Not run yet.")
    real = _real_records()[0]
    return replace_block(text, "real-bench", render_bench(real, explained=False) if real else "Not run yet.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--seeds", default="0,1,2")
    d.add_argument("--root", default="runs")
    b = sub.add_parser("bench")
    b.add_argument("--root", help="default: runs/bench, runs/real")
    b.add_argument("--baseline", choices=("unet", "grown_edema"), default="unet")
    b.add_argument("--data", choices=("phantoms", "real"), default="phantoms")
    b.add_argument(
        "--add",
        action="store_true",
        help="--data real: the root's refiners join the recorded ones (the same seeds' U-Nets), kept apart in "
        f"{REAL_ADDED.name} until every seed is there; its seeds from other machines stay",
    )
    w = sub.add_parser("sweep")
    w.add_argument("--workdir", default="runs/bench/seed_0")
    w.add_argument("--folds", default="0")
    sub.add_parser("render")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.what == "demo":
        runs = json.loads(DEMO.read_text()) if DEMO.is_file() else []
        for seed in (int(s) for s in a.seeds.split(",")):
            runs = [r for r in runs if r["seed"] != seed] + [run_demo(seed, Path(a.root))]
            DEMO.write_text(json.dumps(sorted(runs, key=lambda r: r["seed"]), indent=1))
    elif a.what == "bench":
        root = Path(a.root or ("runs/real" if a.data == "real" else "runs/bench"))
        record = (REAL_ADDED if a.add else REAL) if a.data == "real" else BENCH if a.baseline == "unet" else GROWN
        made = records.record_bench(root if a.baseline == "unet" else root / a.baseline)
        if a.add and record.is_file():  # seeds finished on another machine stay: this root's replace theirs
            made = records.join_seeds(json.loads(record.read_text()), made)
        record.write_text(json.dumps(made, indent=1))
    elif a.what == "sweep":
        SWEEP.write_text(json.dumps(record_sweep(Path(a.workdir), a.folds), indent=1))
    readme, docs = ROOT / "README.md", ROOT / "docs" / "benchmarks.md"
    readme.write_text(render_readme(readme.read_text()))
    docs.write_text(render_docs(docs.read_text()))


if __name__ == "__main__":
    main()
