"""The ``brats2025`` convention (the current official BraTS package's rules), on hand-built masks where each
rule matters: numbers worked out by hand (always run) and the package itself (run where it is installed).
"""

import math

import numpy as np
import pytest

from rediffinet_jax import metrics, official
from rediffinet_jax.labels import labels_to_regions

SHAPE = (20, 20, 20)


def cube(lo, hi, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# a 5³ cube, and the same shifted one voxel along D: 100 voxels shared, Dice 2·100/250 = 0.8. Of each
# cube's 98 border voxels, 34 lie 1 voxel from the other's border (the 25 of the far face, the 9 inner
# ones of the near face) and the rest on it: pooled, 35 % at 1 → the 95th percentile is 1 voxel.
GT = cube((5, 5, 5), (10, 10, 10))
SHIFTED = cube((6, 5, 5), (11, 10, 10))


def test_hd95_ignores_spacing_and_pools_both_directions():
    assert metrics.hd95(SHIFTED, GT, (2.0, 1.0, 1.0), "brats2025") == 1.0
    assert metrics.hd95(SHIFTED, GT, (2.0, 1.0, 1.0), "medpy") == 2.0  # the same rule in mm


def test_empty_rules():
    empty = np.zeros(SHAPE, bool)
    assert math.isnan(metrics.hd95(empty, empty, convention="brats2025"))
    assert metrics.hd95(GT, empty, convention="brats2025") == 373.0
    apart = cube((12, 12, 12), (15, 15, 15))  # no voxel in common with GT, its corner 3 voxels off
    assert metrics.hd95(apart, GT, convention="brats2025") == 373.0
    assert metrics.hd95(apart, GT, convention="medpy") < 20  # a distance in the other conventions
    assert metrics.hd95(GT, empty, convention="brats2023") == 373.13
    both = metrics.matched_lesions(empty, empty)
    assert math.isnan(both["dice"]) and math.isnan(both["hd95"])
    one = metrics.matched_lesions(GT, empty)
    assert (one["dice"], one["hd95"], one["tp"], one["fp"], one["fn"]) == (0.0, math.inf, 0, 1, 0)
    rows = metrics.score_case(np.zeros((*SHAPE, 3), bool), np.zeros((*SHAPE, 3), bool), (1, 1, 1), "c", "brats2025")
    assert all(math.isnan(r["dice"]) and math.isnan(r["hd95"]) and r["gt_empty"] == 1 for r in rows)


def test_lesions_matched_one_to_one_and_only_matches_scored():
    # one predicted slab over two GT cubes of 4³ (64 voxels each; the slab 4·4·10 = 160): it matches
    # one of them (Dice 2·64/224 = 4/7), the other is a miss that lowers no mean, only counts as fn
    gt = cube((2, 2, 2), (6, 6, 6)) | cube((2, 2, 8), (6, 6, 12))
    pred = cube((2, 2, 2), (6, 6, 12))
    m = metrics.matched_lesions(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["dice"] == pytest.approx(4 / 7)
    # the 2023 rules merge the two cubes (2 voxels apart, within 3 dilations) into one lesion of 128
    assert metrics.lesion_wise(pred, gt)["tp"] == 1
    assert metrics.lesion_wise(pred, gt)["dice"] == pytest.approx(2 * 128 / 288)


def test_small_lesions_kept_by_2025_dropped_by_2023():
    tiny = cube((0, 0, 17), (2, 2, 19))  # 8 voxels, far from the rest: ≤ 50 mm³
    blob = cube((15, 15, 15), (17, 17, 17))  # a false positive
    m = metrics.matched_lesions(SHIFTED | blob, GT | tiny)
    assert (m["tp"], m["fp"], m["fn"], m["dice"], m["hd95"]) == (1, 1, 1, pytest.approx(0.8), 1.0)
    old = metrics.lesion_wise(SHIFTED | blob, GT | tiny)
    assert (old["tp"], old["fp"], old["fn"], old["dropped"]) == (1, 1, 0, 1)
    assert old["dice"] == pytest.approx(0.8 / 2)  # the false positive counts as a lesion of Dice 0


def _label_map(*parts):
    labels = np.zeros(SHAPE, np.uint8)
    for mask, value in parts:
        labels[mask] = value
    return labels


CASES = {  # name: (prediction, ground truth), BraTS 2023+ labels 1 NETC, 2 SNFH, 3 ET
    "shifted": (
        _label_map((SHIFTED, 2), (cube((7, 6, 6), (9, 9, 9)), 3)),
        _label_map((GT, 2), (cube((6, 6, 6), (9, 9, 9)), 3)),
    ),
    "no_gt_et": (_label_map((SHIFTED, 2), (cube((7, 7, 7), (8, 8, 8)), 3)), _label_map((GT, 2))),
    "empty_pred": (_label_map(), _label_map((GT, 2), (cube((6, 6, 6), (8, 8, 8)), 1))),
    "disjoint": (_label_map((cube((12, 12, 12), (15, 15, 15)), 3)), _label_map((GT, 3))),
    "two_to_one": (
        _label_map((cube((2, 2, 2), (6, 6, 12)), 2)),
        _label_map((cube((2, 2, 2), (6, 6, 6)), 2), (cube((2, 2, 8), (6, 6, 12)), 2)),
    ),
    "fp_and_tiny": (
        _label_map((SHIFTED | cube((15, 15, 15), (17, 17, 17)), 2)),
        _label_map((GT | cube((0, 0, 17), (2, 2, 19)), 2)),
    ),
}
OURS = {"global_dsc": "dice", "global_hd95": "hd95", "lesionwise_dsc_mean": "lesionwise_dice"}
OURS |= {"lesionwise_hd95_mean": "lesionwise_hd95", "all_instance_tp": "tp", "all_instance_fp": "fp"}
OURS |= {"all_instance_fn": "fn"}


def _write_pairs(folder, affine) -> list:
    import nibabel as nib

    pairs = []
    for name, (pred, gt) in CASES.items():
        for kind, labels in (("pred", pred), ("gt", gt)):
            nib.save(nib.Nifti1Image(labels, affine), folder / f"{name}_{kind}.nii.gz")
        pairs.append((name, folder / f"{name}_pred.nii.gz", folder / f"{name}_gt.nii.gz"))
    return pairs


@pytest.mark.skipif(official.version() is None, reason="the official package is not installed (.[official])")
def test_brats2025_equals_the_official_package(tmp_path):
    theirs = official.score(_write_pairs(tmp_path, np.eye(4)))["cases"]  # BraTS's 1 mm voxels
    for name, (pred, gt) in CASES.items():
        rows = metrics.score_case(labels_to_regions(pred), labels_to_regions(gt), (1, 1, 1), name, "brats2025")
        for row, region in zip(rows, official.REGIONS):
            for metric, key in OURS.items():
                want, got = theirs[name][f"{metric}_{region}"], float(row[key])
                assert got == pytest.approx(want, nan_ok=True), (name, region, metric, got, want)
    # other voxel sizes: the package's global HD95 ignores them, as brats2025 does (its lesion-wise HD95
    # does not: docs/evaluation.md)
    (tmp_path / "aniso").mkdir()
    aniso = official.score(_write_pairs(tmp_path / "aniso", np.diag([1.2, 1.0, 1.0, 1.0])))["cases"]
    assert [aniso[c]["global_hd95_wt"] for c in CASES] == [theirs[c]["global_hd95_wt"] for c in CASES]
