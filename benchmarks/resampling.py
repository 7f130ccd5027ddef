"""How much of the ground truth survives a coarser working grid: each case's labels resampled to ``--spacing``
and back to the source grid, by each method of ``resample.LABEL_METHODS``, scored (Dice per region) against
the source truth. What decides ``resample.LABEL_METHOD``.

    python benchmarks/resampling.py --root /data/brats_cases --spacing 2.0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from rediffinet_jax import metrics  # noqa: E402
from rediffinet_jax.data import brats, resample  # noqa: E402
from rediffinet_jax.labels import REGIONS  # noqa: E402


def round_trip(regions: np.ndarray, spacing, target, method: str) -> np.ndarray:
    """Regions down to ``target`` mm and back to their own grid by ``method``."""
    shape = regions.shape[:3]
    down = resample.resize_labels(regions, resample.work_shape(shape, spacing, target), method)
    return resample.resize_labels(down, shape, method)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a folder of labelled BraTS cases (any layout)")
    p.add_argument("--spacing", type=float, default=2.0)
    a = p.parse_args(argv)
    target = (a.spacing,) * 3
    dice = {m: {r: [] for r in REGIONS} for m in resample.LABEL_METHODS}
    t0 = time.time()
    cases = [c for c in brats.discover_cases(a.root) if c.seg is not None]
    for files in cases:
        case = brats.load_case(files)
        for m in resample.LABEL_METHODS:
            back = round_trip(np.asarray(case.regions), case.spacing, target, m)
            for i, r in enumerate(REGIONS):
                dice[m][r].append(metrics.dice(back[..., i], case.regions[..., i]))
    out = {
        "cases": len(cases),
        "spacing_mm": a.spacing,
        "dice_mean": {m: {r: float(np.mean(v)) for r, v in d.items()} for m, d in dice.items()},
        "dice_min": {m: {r: float(np.min(v)) for r, v in d.items()} for m, d in dice.items()},
        "seconds": round(time.time() - t0, 1),
        "machine": common.machine(),
        "commit": common.commit(ROOT),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
