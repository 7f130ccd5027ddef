"""Our ``brats2025`` convention against the official BraTS package, case by case, on a work directory's
label maps (the U-Net's out-of-fold maps and every refiner's evaluated maps) and its phantoms' ground truth.

    python benchmarks/official_check.py --workdir runs/demo      # needs the [official] extra

Prints every value that differs (Dice, HD95, lesion-wise Dice and HD95, lesion counts per region) and a count.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rediffinet_jax import metrics, official  # noqa: E402
from rediffinet_jax.labels import labels_to_regions  # noqa: E402

OURS = {
    "global_dsc": "dice",
    "global_hd95": "hd95",
    "lesionwise_dsc_mean": "lesionwise_dice",
    "lesionwise_hd95_mean": "lesionwise_hd95",
    "all_instance_tp": "tp",
    "all_instance_fp": "fp",
    "all_instance_fn": "fn",
}


def _regions(path: Path) -> np.ndarray:
    return labels_to_regions(np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.uint8))


def compare(pred: Path, gt: Path, case: str, evaluator) -> list[str]:
    """The differences between ours and the package's scores of one label map."""
    theirs = official.score([(case, pred, gt)], evaluator)["cases"][case]
    rows = metrics.score_case(_regions(pred), _regions(gt), (1, 1, 1), case, "brats2025")
    out = []
    for row, region in zip(rows, official.REGIONS):
        for name, key in OURS.items():
            a, b = float(row[key]), theirs[f"{name}_{region}"]
            if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6):
                out.append(f"{pred}: {name}_{region} ours {a}, the package's {b}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo")
    w = Path(p.parse_args().workdir)
    official.require()
    maps = sorted(w.glob("unet/oof/*.nii.gz")) + sorted(w.glob("eval/*/fold_*/pred/*.nii.gz"))
    evaluator, differ = official.make_evaluator(), []
    for pred in maps:
        case = pred.name[: -len(".nii.gz")]
        differ += compare(pred, w / "data" / case / f"{case}-seg.nii.gz", case, evaluator)
    print("\n".join(differ))
    n = len(maps) * len(official.REGIONS) * len(OURS)
    print(f"{n} values compared on {len(maps)} label maps of {w}: {len(differ)} differ")


if __name__ == "__main__":
    main()
