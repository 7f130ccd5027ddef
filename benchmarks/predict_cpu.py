"""predict.py on one full-size case on this machine: seconds and peak memory, the U-Net alone and with the refiner.

    python benchmarks/predict_cpu.py --workdir runs/real/seed_0 --cases /path/to/brats --case Brats18_2013_11_1

The case (its four modalities, never its seg) is copied into a folder of its own and segmented by
``predict.py`` with the work directory's models of every fold, once ``--model unet`` and once with the
refiner (``--model``, default ``rediffinet``), gated as evaluate.py chose (windows no kept flip can reach are
not sampled) and with ``--nogate`` (every window sampled), each a fresh process timed alone:
wall seconds (start-up and compilation included) and its peak resident memory. Out:
``benchmarks/results/predict-cpu.json`` (with the machine and the commit) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "predict-cpu.json"


def timed_predict(src: Path, out: Path, workdir: Path, model: str, *flags: str) -> dict:
    """One predict.py process: wall seconds and peak RSS (GiB)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "predict.py", "-i", str(src), "-o", str(out), f"--workdir={workdir}", f"--model={model}"]
    cmd += list(flags)
    log = out.parent / f"{out.name}.log"
    code, wall, peak = common.run_measured(cmd, ROOT, log)
    if code:
        raise SystemExit(f"error: predict.py failed for --model {model}; see {log}")
    return {"model": " ".join([model, *flags]), "seconds": round(wall, 1), "peak_rss_gib": round(peak, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a trained work directory (e.g. a real benchmark seed)")
    p.add_argument("--cases", required=True, help="the folder holding the case")
    p.add_argument("--case", required=True, help="the case id")
    p.add_argument("--model", default="rediffinet", help="the refiner")
    p.add_argument("--tmp", default="runs/predict_cpu")
    a = p.parse_args(argv)
    tmp = Path(a.tmp)
    src = tmp / "in" / a.case
    src.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(a.cases, a.case).glob(f"{a.case}_*.nii*")):
        if "_seg" not in f.name:
            shutil.copy2(f, src / f.name)
    w = Path(a.workdir)
    rows = [timed_predict(tmp / "in", tmp / "unet", w, "unet"), timed_predict(tmp / "in", tmp / "gated", w, a.model)]
    rows.append(timed_predict(tmp / "in", tmp / "every_flip", w, a.model, "--nogate"))  # samples every window
    record = {
        "command": " ".join(["python benchmarks/predict_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "case": a.case,
        "commit": common.commit(ROOT),
        "machine": common.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }
    OUT.write_text(json.dumps(record, indent=1))
    print(f"{record['command']}; {record['machine']}; commit {record['commit']}")
    print("| model | seconds | peak GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['seconds']} | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
