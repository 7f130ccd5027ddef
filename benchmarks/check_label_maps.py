"""Checks predict.py's output against its input: one label map per input case, each with the case's image
shape and affine and only the labels 0-3; one JSON line, exit status 1 on any problem.

    python benchmarks/check_label_maps.py CASES_DIR OUTPUT_DIR [JSONL]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(cases_dir: str, out_dir: str) -> dict:
    """{"cases", "problems": ["case: what"], "voxels_per_label": {0: n, ...}} over every case."""
    import numpy as np

    from rediffinet_jax import given_maps
    from rediffinet_jax.data import brats
    from rediffinet_jax.errors import CaseError
    from rediffinet_jax.labels import regions_to_labels

    cases = brats.discover_cases(cases_dir)
    problems, counts = [], np.zeros(4, np.int64)
    for files in cases:
        try:  # the same check as another model's maps get: file, shape, affine, labels
            regions = given_maps.read(out_dir, files, old_brats=False, what="label map")
        except CaseError as e:
            problems.append(f"{files.case_id}: {e}")
            continue
        counts += np.bincount(regions_to_labels(regions).ravel(), minlength=4)[:4]
    return {
        "bench": "label_maps",
        "cases": len(cases),
        "problems": problems,
        "voxels_per_label": {str(k): int(v) for k, v in enumerate(counts)},
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    rec = check(argv[0], argv[1])
    line = json.dumps(rec)
    print(line)
    if len(argv) == 3:
        with open(argv[2], "a") as f:
            f.write(line + "\n")
    for p in rec["problems"]:
        print("problem:", p, file=sys.stderr)
    return 1 if rec["problems"] or not rec["cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
