"""``rediffinet-phantoms``: writes phantom cases in BraTS 2023 layout and prints a short summary.

    rediffinet-phantoms --out data/phantoms --cases 20 --shape 240,240,155 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np

from rediffinet_jax.data import brats, phantoms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic BraTS-layout cases.")
    p.add_argument("--out", required=True, help="folder for the case folders")
    p.add_argument("--cases", type=int, default=10, help="labelled cases")
    p.add_argument("--unlabelled", type=int, default=0, help="extra cases without -seg")
    p.add_argument("--shape", default="240,240,155", help="D,H,W voxels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    ids = phantoms.write_dataset(a.out, a.cases, shape, a.seed, a.unlabelled, progress=True)
    cases = brats.discover_cases(a.out)
    wt = []
    for files in cases:
        if files.seg is not None:
            case = brats.load_case(files)
            wt.append(int(np.asarray(case.regions[..., 0]).sum()))
    print(f"{len(ids)} cases of shape {shape} in {a.out}: {len(wt)} labelled, "
          f"WT volume {min(wt) if wt else 0}–{max(wt) if wt else 0} voxels")


if __name__ == "__main__":
    main()
