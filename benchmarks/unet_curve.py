"""The U-Net's learning curve on the real cases: Dice per region against training steps, on one fold.

    python benchmarks/unet_curve.py --cases /path/to/brats --fold 0 --steps 1000,2000,4000
    python benchmarks/unet_curve.py --cases /path/to/brats --steps 1000 --set unet.patch="(48,48,48)" --name p48

For each budget, stage 1 of ``--fold`` is trained with that many steps (its own schedule) in
``<root>/<name>-<steps>/`` (``configs/baseline_unet.py:real``, ``--set`` applied to every budget; the 2 mm
cache is made once and copied) and its out-of-fold maps are scored at 1 mm. A budget interrupted resumes; a
finished one is only re-read. Out: ``<root>/<name>.{json,md}``: Dice and HD95 per region, the seconds
each budget took (training and its out-of-fold maps, one process alone on the machine named there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, levers, real_data  # noqa: E402
from benchmarks.refinement import COLS  # noqa: E402
from rediffinet_jax import reports  # noqa: E402

CONFIG = "configs/baseline_unet.py:real"


def run_point(workdir: Path, cases: Path, steps: int, fold: int, extra: list[str]) -> float:
    """Trains (or resumes) fold ``fold``'s U-Net for ``steps`` steps and scores its out-of-fold maps; returns
    the seconds of this call."""
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={CONFIG}", f"--workdir={workdir}", f"--fold={fold}"]
    cmd += [f"--config.data.root={cases.resolve()}", f"--config.unet.steps={steps}"]
    cmd += [f"--config.unet.val_every={steps}", "--noevaluate", *extra]
    print(" ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"error: train.py failed for {workdir.name}")
    levers.score(workdir, fold, workdir.name)
    return time.time() - t0


def point(workdir: Path, fold: int) -> dict:
    """Dice (%) and HD95 (mm) per region and averaged, mean over the fold's held-out cases."""
    rows = levers.lever_rows(workdir, fold)["unet"]
    mean = reports.summary_tables({"unet": {0: rows}}, "")["models"]["unet"]["mean"]
    return {
        "dice": {c: 100 * mean[c]["dice"] for c in COLS},
        "hd95": {c: mean[c]["hd95"] for c in COLS},
        "n_cases": len({r["case"] for r in rows}),
    }


def markdown(curve: dict) -> str:
    lines = [
        f"U-Net learning curve: {curve['command']}; commit {curve['commit']}; {curve['machine']}",
        "",
        "| steps | " + " | ".join(f"Dice {c}" for c in COLS) + " | " + " | ".join(f"HD95 {c}" for c in COLS) + " | s |",
        "|" + "---|" * (2 + 2 * len(COLS)),
    ]
    for steps, p in sorted(curve["points"].items(), key=lambda x: int(x[0])):
        cells = [f"{p['dice'][c]:.1f}" for c in COLS] + [f"{p['hd95'][c]:.1f}" for c in COLS]
        lines.append(f"| {steps} | " + " | ".join(cells) + f" | {p['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True, help="the 20 real cases (benchmarks/real_data.py)")
    p.add_argument("--root", default="runs/real_curve")
    p.add_argument("--name", default="unet", help="this curve's name (its settings)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed and data.split_seed")
    p.add_argument("--steps", default="1000,2000,4000")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config value (repeatable)")
    a = p.parse_args(argv)
    real_data.check(a.cases)
    root = Path(a.root)
    extra = [f"--config.{kv}" for kv in a.set] + [f"--config.seed={a.seed}", f"--config.data.split_seed={a.seed}"]
    out = root / f"{a.name}.json"
    curve = json.loads(out.read_text()) if out.is_file() else {"points": {}}
    for steps in (int(s) for s in a.steps.split(",")):
        workdir = root / f"{a.name}-{steps}"
        caches = sorted(root.glob("*/cache"))
        if not workdir.exists() and caches:
            shutil.copytree(caches[0], workdir / "cache")  # the same 2 mm crops: made once
        if str(steps) not in curve["points"]:
            seconds = run_point(workdir, Path(a.cases), steps, a.fold, extra)
            curve["points"][str(steps)] = {**point(workdir, a.fold), "seconds": seconds}
        curve.update(command=" ".join(["python benchmarks/unet_curve.py", *(argv or sys.argv[1:])]))
        curve.update(commit=common.commit(ROOT), machine=common.machine())
        root.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(curve, indent=1))
        (root / f"{a.name}.md").write_text(markdown(curve))
    print(markdown(curve))


if __name__ == "__main__":
    main()
