"""What a banded gate saves in prediction: the share of sliding-window batches that hold a band voxel, the
only ones ``predict.py`` samples under that gate, per held-out case of a work directory.

    python benchmarks/band_windows.py --workdir runs/bench/seed_0 --model rediffinet

The gate is the one ``predict.py`` applies (``eval/<model>/gate.json``, chosen on all folds); U(I) is each
case's out-of-fold U-Net map. Counted, not timed: the sampler's time per window batch is the same for every
batch, so the share of batches is the share of the refiner's sampling time (``cases.csv``'s ``seconds``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rediffinet_jax import gate, inference  # noqa: E402
from rediffinet_jax import workdir as wd  # noqa: E402
from rediffinet_jax.case_rows import read_rows  # noqa: E402
from rediffinet_jax.data import brats  # noqa: E402
from rediffinet_jax.labels import labels_to_regions  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="rediffinet")
    a = p.parse_args(argv)
    layout = wd.Layout(a.workdir)
    chosen = wd.read_json(layout.eval_model(a.model) / "gate.json")
    if chosen is None:
        raise SystemExit(f"error: no gate chosen for {a.model} in {layout.root}: run evaluate.py first")
    gates = {r: gate.parse(c["gate"]) for r, c in chosen["all"].items()}
    cfg = wd.load_settings(layout.stage(a.model)).diffusion
    folds = wd.read_json(layout.splits)["folds"]
    shares, seconds = [], []
    for k, cases in enumerate(folds):
        secs = {r["case"]: r["seconds"] for r in read_rows(layout.cases_csv(a.model, k))}
        for cid in cases:
            meta = brats.cached_meta(layout.cache / cid)
            unet = brats.crop(
                labels_to_regions(np.asarray(brats.read_nifti(layout.oof_map(cid), cid)[0], np.uint8)), meta["box"]
            )
            need = gate.needed(unet, gates)
            if need is None:
                run, total = 1, 1
            else:
                run, total = inference.windows_run(need.shape, cfg.patch, cfg.overlap, cfg.batch_windows, need)
            shares.append(run / total)
            seconds.append(secs.get(cid, float("nan")))
    out = {
        "gate": {r: gate.name(g) for r, g in gates.items()},
        "cases": len(shares),
        "share_of_window_batches_sampled": {
            "mean": float(np.mean(shares)),
            "min": float(np.min(shares)),
            "max": float(np.max(shares)),
        },
        "refiner_seconds_per_case_ungated": float(np.nanmean(seconds)),
        "estimated_seconds_per_case_gated": float(np.nanmean(np.asarray(seconds) * np.asarray(shares))),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
