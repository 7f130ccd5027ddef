"""``rediffinet-phantoms``: writes phantom cases in a BraTS layout and prints a short summary.

rediffinet-phantoms --out data/phantoms --cases 20 --shape 240,240,155 --seed 0
rediffinet-phantoms --out data/old --cases 4 --layout 2021      # <case>_t1ce.nii.gz ..., ET labelled 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rediffinet_jax.data import brats, phantoms
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.labels import LAYOUTS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic BraTS-layout cases.")
    p.add_argument("--out", required=True, help="folder for the case folders")
    p.add_argument("--cases", type=int, default=10, help="labelled cases")
    p.add_argument("--unlabelled", type=int, default=0, help="extra cases without -seg")
    p.add_argument("--shape", default="240,240,155", help="D,H,W voxels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard", action="store_true", help="add vessels, plexus, satellites, broken rims, fading edema")
    p.add_argument("--tumour_scale", type=float, default=1.0, help="multiplies the lesions' radii")
    p.add_argument("--overwrite", action="store_true", help="remake a folder of phantoms made with other settings")
    p.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="2023", help="file names and ET label of BraTS 2023 or 2018-2021"
    )
    a = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in a.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8 or a.cases < 0 or a.unlabelled < 0 or a.tumour_scale <= 0:
        print(
            f"error: --shape {a.shape!r} must be three integers ≥ 8 (D,H,W); --cases {a.cases} and --unlabelled "
            f"{a.unlabelled} ≥ 0; --tumour_scale {a.tumour_scale} > 0",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        phantoms.write_dataset(
            a.out,
            a.cases,
            shape,
            a.seed,
            a.unlabelled,
            progress=True,
            hard=a.hard,
            tumour_scale=a.tumour_scale,
            overwrite=a.overwrite,
            layout=a.layout,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(Path(a.out)))


def summary(root: Path) -> str:
    """What is on disk in ``root`` (read back, not what was asked for): cases, shapes, labelled, WT sizes."""
    cases = brats.discover_cases(root)
    wt, shapes = [], set()
    for files in cases:
        case = brats.load_case(files)
        shapes.add(tuple(int(s) for s in case.full_shape))
        if case.regions is not None:
            wt.append(int(np.asarray(case.regions[..., 0]).sum()))
    record = json.loads((root / phantoms.RECORD).read_text()) if (root / phantoms.RECORD).is_file() else {}
    made = ", ".join(f"{k} {v}" for k, v in record.items() if k != "shape")
    return (
        f"{len(cases)} cases of shape {' / '.join(str(s) for s in sorted(shapes))} in {root} ({made}): "
        f"{len(wt)} labelled, WT volume {min(wt) if wt else 0}–{max(wt) if wt else 0} voxels"
    )


if __name__ == "__main__":
    main()
