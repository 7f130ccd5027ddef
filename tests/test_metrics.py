import numpy as np
import pytest
from scipy import ndimage

from rediffinet_jax import metrics as M


def _cube(shape=(40, 40, 40), lo=(10, 10, 10), size=10):
    a = np.zeros(shape, bool)
    a[tuple(slice(s, s + size) for s in lo)] = True
    return a


def _sphere(r, shape=(48, 48, 48)):
    c = np.indices(shape) - (np.asarray(shape) // 2)[:, None, None, None]
    return np.sqrt((c**2).sum(0)) <= r


IN_MM = [c for c in M.CONVENTIONS if c != "brats2025"]  # brats2025 counts in voxels (tests/test_brats2025.py)


@pytest.mark.parametrize("convention", IN_MM)
def test_shifted_cube(convention):
    a = _cube()
    for axis in range(3):
        b = np.roll(a, 2, axis=axis)
        assert M.hd95(b, a, (1, 1, 1), convention) == pytest.approx(2.0)
        spacing = [1.0, 1.0, 1.0]
        spacing[axis] = 2.0
        assert M.hd95(b, a, spacing, convention) == pytest.approx(4.0)
    # anisotropic spacing on another axis than the shift does not change it
    assert M.hd95(np.roll(a, 2, axis=0), a, (1.0, 2.5, 0.7), convention) == pytest.approx(2.0)


@pytest.mark.parametrize("convention", M.CONVENTIONS)
def test_concentric_spheres(convention):
    for r, d in ((8, 2), (10, 4)):
        hd = M.hd95(_sphere(r + d), _sphere(r), (1, 1, 1), convention)
        assert abs(hd - d) <= 0.6, (r, d, hd)


@pytest.mark.parametrize("convention", M.CONVENTIONS)
def test_symmetric(convention):
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(size=(30, 30, 30)), 3) > 0.02
    b = ndimage.gaussian_filter(rng.normal(size=(30, 30, 30)), 3) > 0.02
    assert M.hd95(a, b, (1, 1.5, 2), convention) == pytest.approx(M.hd95(b, a, (1, 1.5, 2), convention))


def test_conventions_differ_on_irregular_masks():
    rng = np.random.default_rng(1)
    gt = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 4) > 0.01
    half = np.zeros_like(gt)
    half[:20] = True
    pred = gt | (ndimage.binary_dilation(gt, iterations=4) & half)  # grown by 4 voxels on one side
    values = {c: M.hd95(pred, gt, (1, 1, 1), c) for c in M.CONVENTIONS}
    assert values["medpy"] <= values["monai"]  # pooled 95th ≤ max of the directed ones
    assert len(set(round(v, 6) for v in values.values())) > 1


def test_dice_values_and_empty_rules():
    a = _cube(size=10)
    b = np.roll(a, 5, axis=0)  # overlap is half of each cube
    assert M.dice(a, b) == pytest.approx(0.5)
    empty = np.zeros_like(a)
    assert M.dice(empty, empty) == 1.0 and M.dice(a, empty) == 0.0 and M.dice(empty, a) == 0.0
    for c in IN_MM:
        assert M.hd95(empty, empty, (1, 1, 1), c) == 0.0
        assert M.hd95(a, empty, (1, 1, 1), c) == 373.13
        assert M.hd95(empty, a, (1, 1, 1), c) == 373.13


def test_mask_touching_the_volume_border():
    a = np.zeros((20, 20, 20), bool)
    a[0:6, 5:15, 5:15] = True
    b = np.roll(a, 1, axis=0)
    for c in M.CONVENTIONS:
        assert M.hd95(a, b, (1, 1, 1), c) == pytest.approx(1.0)


def test_lesion_wise_built_by_hand():
    """GT: A (6³), B (5³, missed), C (3³ = 27 ≤ 50, ignored), D1 + D2 (4³ each, 2 voxels apart: merged).
    Prediction: A, a blob on C, D1 + D2, and one false positive far away."""
    gt = np.zeros((80, 80, 80), bool)
    pred = np.zeros_like(gt)
    gt[5:11, 5:11, 5:11] = True  # A
    gt[40:45, 5:10, 5:10] = True  # B
    gt[5:8, 60:63, 5:8] = True  # C
    gt[60:64, 60:64, 60:64] = True  # D1
    gt[66:70, 60:64, 60:64] = True  # D2
    pred[5:11, 5:11, 5:11] = True
    pred[5:8, 60:63, 5:8] = True
    pred[60:64, 60:64, 60:64] = True
    pred[66:70, 60:64, 60:64] = True
    pred[30:34, 40:44, 70:74] = True  # false positive
    out = M.lesion_wise(pred, gt)
    # kept lesions A (1, 0), B (0, 374), D (1, 0); one FP (0, 374)
    assert (out["tp"], out["fn"], out["fp"], out["dropped"]) == (2, 1, 1, 1)
    assert out["dice"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert out["hd95"] == pytest.approx((0 + 374 + 0 + 374) / 4)


def test_lesion_wise_empty_rules():
    empty = np.zeros((20, 20, 20), bool)
    blob = _cube((20, 20, 20), (5, 5, 5), 5)
    assert M.lesion_wise(empty, empty) == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0, "dropped": 0}
    fp_only = M.lesion_wise(blob, empty)
    assert (fp_only["dice"], fp_only["hd95"], fp_only["fp"]) == (0.0, 374.0, 1)
    missed = M.lesion_wise(empty, blob)
    assert (missed["dice"], missed["hd95"], missed["fn"]) == (0.0, 374.0, 1)
    tiny = _cube((20, 20, 20), (5, 5, 5), 3)  # 27 voxels: ignored, so nothing is scored
    assert M.lesion_wise(empty, tiny)["dice"] == 1.0 and M.lesion_wise(empty, tiny)["dropped"] == 1


def test_score_case_rows_and_summary():
    gt = np.zeros((30, 30, 30, 3), np.uint8)
    gt[5:15, 5:15, 5:15, 0] = 1
    gt[7:13, 7:13, 7:13, 1] = 1
    pred = gt.copy()
    pred[..., 2] = 0  # ET absent in both -> Dice 1, HD95 0
    pred[5:15, 5:15, 5:16, 0] = 1
    rows = M.score_case(pred, gt, (1, 1, 1), case="c1")
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"]
    assert all(r["convention"] == "brats2023" and r["case"] == "c1" for r in rows)
    assert rows[1]["dice"] == 1.0 and rows[2]["dice"] == 1.0 and rows[2]["hd95"] == 0.0
    assert rows[0]["dice"] == pytest.approx(2 * 1000 / 2100)
    assert {"lesionwise_dice", "lesionwise_hd95", "tp", "fp", "fn"} <= set(rows[0])
    s = M.summarize(rows)
    assert s["avg"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))


def test_bad_input():
    a = _cube()
    with pytest.raises(ValueError, match="shape"):
        M.dice(a, a[:-1])
    for bad in (a.astype(int) * 2, a.astype(np.int8) - 1, a * 0.5, np.where(a, np.nan, 0.0)):
        with pytest.raises(ValueError, match="binary"):
            M.hd95(bad, a)
    assert M.dice(a.astype(np.uint8), a.astype(np.float32)) == 1.0  # 0/1 in any dtype is a mask
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, a, (1, 0, 1))
    with pytest.raises(ValueError, match="convention"):
        M.hd95(a, a, (1, 1, 1), "scipy")


def test_flip_counts_by_hand():
    """WT: U = cube 10³ at 10, G = the same cube shifted by 2 along axis 0 (U ⊕ G = 2 slabs of 2·10·10 = 400).
    P fixes the front slab (200 voxels, all wrong in U) and flips 50 correct voxels inside: flipped 250,
    fixed 200. TC: P = U (no flips). ET: U empty, G a 3³ cube, P adds it plus 2 voxels next to it."""
    u, g, p = (np.zeros((40, 40, 40, 3), bool) for _ in range(3))
    u[..., 0], g[..., 0] = _cube(), _cube(lo=(12, 10, 10))
    p[..., 0] = u[..., 0]
    p[10:12, 10:20, 10:20, 0] = False  # U had these wrong (not in G)
    p[15, 10:15, 10:20, 0] = False  # 50 voxels U had right
    u[..., 1], g[..., 1] = _cube(size=4), _cube(size=5)
    p[..., 1] = u[..., 1]
    g[20:23, 20:23, 20:23, 2] = True
    p[20:23, 20:23, 20:23, 2] = True
    p[23, 20, 20:22, 2] = True
    rows = M.flip_counts(p, u, g)
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"]
    assert [(r["unet_errors"], r["flipped"], r["fixed"]) for r in rows] == [
        (400, 250, 200),
        (5**3 - 4**3, 0, 0),
        (27, 29, 27),
    ]
    assert all(r["flipped"] == 0 for r in M.flip_counts(u, u, g))


def test_surfels_sorted_as_the_package_sorts_them():
    """The numpy order of (distance, area) pairs is the package's own ``sorted`` order, ties included (areas
    repeat, and distances repeat on a grid): the same arrays to the bit, so the same HD95."""
    import surface_distance
    from surface_distance import metrics as sdm

    original = sdm._sort_distances_surfels
    rng = np.random.default_rng(3)
    for spacing in ((1.0, 1.0, 1.0), (2.0, 1.0, 1.5)):
        gt = ndimage.binary_dilation(rng.random((24, 26, 20)) < 0.02, iterations=2)
        pred = ndimage.binary_dilation(rng.random((24, 26, 20)) < 0.02, iterations=2)
        d = sdm.compute_surface_distances(gt, pred, spacing)  # the package alone
        raw_d = np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]])
        raw_a = np.concatenate([d["surfel_areas_gt"], d["surfel_areas_pred"]])
        perm = rng.permutation(raw_d.size)
        for ours, theirs in zip(
            M._sort_surfels(raw_d[perm], raw_a[perm]), sdm._sort_distances_surfels(raw_d[perm], raw_a[perm])
        ):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
        expected = float(surface_distance.compute_robust_hausdorff(d, 95))
        assert M.hd95(pred, gt, spacing) == expected
    assert sdm._sort_distances_surfels is original  # the package is left as it was
