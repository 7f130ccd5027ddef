"""Runs one command line of the product (train.py, evaluate.py, predict.py) inside this process and appends
one JSON line to a file: the stage's name, exit status, seconds, peak device memory (where the backend
reports it: GPUs) and peak host memory; for train.py also which folds of each stage are trained.

    python benchmarks/stage_run.py NAME JSONL -- train.py --config=configs/rediffinet.py:smoke --workdir=w

In this process, not a child, so that JAX's own allocator statistics give the peak device memory. SIGTERM
(``timeout``) is turned into the KeyboardInterrupt of a Ctrl-C, so that an interrupted stage is recorded
too (exit status 124, like ``timeout``'s) and training stops as it would on Ctrl-C (its last checkpoint
stays; a rerun resumes).
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERRUPTED = 124


def _on_term(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _run(script: str, args: list[str]) -> int:
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BaseException:  # noqa: BLE001 - recorded as a failed stage, with its traceback on stderr
        traceback.print_exc()
        return 1
    return 0


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=v`` or ``--name v`` in ``args``."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def trained_folds(workdir: str | None) -> dict | None:
    """{stage folder: [trained folds]} of a work directory (None without one)."""
    if not workdir or not Path(workdir).is_dir():
        return None
    from rediffinet_jax import workdir as wd

    out = {}
    for stage in sorted(p for p in Path(workdir).iterdir() if p.is_dir()):
        folds = sorted(int(f.name.split("_")[1]) for f in stage.glob("fold_*") if wd.trained(f))
        if folds:
            out[stage.name] = folds
    return out


def _device_memory() -> tuple[str | None, float | None]:
    if "jax" not in sys.modules:
        return None, None
    import jax

    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return f"{d.platform}:{getattr(d, 'device_kind', '')}", (round(peak / 2**30, 3) if peak else None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[4].strip(), file=sys.stderr)
        return 2
    name, jsonl, script, args = argv[0], argv[1], argv[3], argv[4:]
    signal.signal(signal.SIGTERM, _on_term)
    t0 = time.perf_counter()
    rc = _run(script, args)
    seconds = time.perf_counter() - t0
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    device, peak = _device_memory()
    rec = {
        "bench": "pipeline_stage",
        "stage": name,
        "command": " ".join([script, *args]),
        "rc": rc,
        "seconds": round(seconds, 1),
        "device": device,
        "peak_device_gib": peak,
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if script.endswith("train.py"):
        rec["trained"] = trained_folds(_flag(args, "workdir"))
    with open(jsonl, "a") as f:
        f.write(json.dumps(rec) + "\n")
    memory = f"peak device memory {peak} GiB" if peak is not None else "no device memory statistics"
    print(f"stage {name}: exit {rc}, {seconds:.1f} s, {memory}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
