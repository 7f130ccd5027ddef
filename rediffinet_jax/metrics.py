"""Segmentation scores per case and region (docs/evaluation.md, "Conventions"): Dice, HD95 in four conventions,
lesion-wise Dice and HD95 by the BraTS 2023 script's rules or by the current BraTS package's, with every
empty-mask rule.

Masks are ``[D, H, W]`` binary arrays on the full original grid (or ``[D, H, W, 3]`` in [WT, TC, ET]
for :func:`score_case`); spacing is the NIfTI voxel size in mm along D, H, W. Work is done on the
bounding box of both masks plus a margin (never padded past the volume, so borders behave exactly as
on the full grid), so a whole 240×240×155 case is quick to score (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, optimize

from rediffinet_jax.labels import REGIONS

CONVENTIONS = ("brats2023", "monai", "medpy", "brats2025")
EMPTY_HD95 = 373.13  # diagonal of the 240×240×155 BraTS grid, for exactly one empty mask
OFFICIAL_EMPTY_HD95 = 373.0  # brats2025: the current package's parser turns its infinite HD95 into 373
OFFICIAL_MATCH_DICE = 1e-6  # brats2025: the least Dice of a lesion pair that may be matched
LESION_MISS_HD95 = 374.0  # BraTS 2023 lesion-wise penalty
LESION_DILATIONS = 3
LESION_MIN_VOLUME = 50.0  # mm³ (= voxels at BraTS's 1 mm); GT lesions at or below it are ignored
_CONN26 = np.ones((3, 3, 3), bool)
_CONN6 = ndimage.generate_binary_structure(3, 1)
_DILATION = ndimage.generate_binary_structure(3, 2)  # the challenge script's dilation element


def _brats_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """DeepMind's surface-distance HD95 (the BraTS 2023 script's), both masks non-empty. Imported here:
    the training step (and so benchmarks/train_step.py) imports this module, and the GPU machines lack
    the package. The package orders its (distance, area) pairs with Python's ``sorted``, most of its time
    on small masks; for this call that step is :func:`_sort_surfels`, the same arrays by numpy."""
    from unittest import mock

    import surface_distance

    with mock.patch.object(surface_distance.metrics, "_sort_distances_surfels", _sort_surfels):
        sd = surface_distance.compute_surface_distances(gt, pred, tuple(float(s) for s in spacing))
    return float(surface_distance.compute_robust_hausdorff(sd, 95))


def _sort_surfels(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """surface-distance 0.1's ``_sort_distances_surfels``: the pairs by distance, then area (``sorted`` on
    tuples), as float64 columns. Pairs that tie on both are equal, so their order changes nothing."""
    order = np.lexsort((areas, distances))
    return distances[order].astype(np.float64), areas[order].astype(np.float64)


def _check_pair(pred, gt, spacing=None):
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if a.dtype != bool and not _binary(a):
            raise ValueError(f"{name} mask must be binary (0/1 or bool); found values {np.unique(a)[:6]}")
    if spacing is not None:
        if len(spacing) != pred.ndim or any(not (s > 0 and math.isfinite(s)) for s in spacing):
            raise ValueError(f"spacing must be {pred.ndim} positive numbers, got {tuple(spacing)}")
    return pred.astype(bool), gt.astype(bool)


def _binary(a: np.ndarray) -> bool:
    """Whether every value is 0 or 1, by a minimum and maximum (np.unique hashes every value: far slower on a
    1 mm volume, and scoring checks each mask four times)."""
    if a.size == 0:
        return True
    if np.issubdtype(a.dtype, np.integer):
        return bool(a.min() >= 0 and a.max() <= 1)
    return bool(((a == 0) | (a == 1)).all())


def _crop_pair(a, b, margin):
    """Crops both masks to their joint bounding box grown by ``margin`` (clipped to the volume)."""
    both = a | b
    sl = []
    for axis in range(both.ndim):
        hits = np.flatnonzero(both.any(axis=tuple(i for i in range(both.ndim) if i != axis)))
        sl.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, both.shape[axis])))
    return a[tuple(sl)], b[tuple(sl)]


def dice(pred, gt) -> float:
    """2|P∩G| / (|P| + |G|); both empty → 1, exactly one empty → 0."""
    pred, gt = _check_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _boundary_distances(a, b, spacing):
    """Distances from a's boundary voxels (mask XOR 6-connected erosion) to b's boundary (EDT)."""
    border_a = a ^ ndimage.binary_erosion(a, _CONN6)
    border_b = b ^ ndimage.binary_erosion(b, _CONN6)
    return ndimage.distance_transform_edt(~border_b, sampling=spacing)[border_a]


def hd95(pred, gt, spacing=(1.0, 1.0, 1.0), convention: str = "brats2023") -> float:
    """95th-percentile Hausdorff distance in mm.

    Conventions: ``brats2023`` — DeepMind surface-distance (area-weighted surfels, max of the two
    directed 95th percentiles), as the BraTS 2023 challenge; ``monai`` — boundary voxels (mask XOR
    6-connected erosion), EDT with spacing, max of the two directed 95th percentiles; ``medpy`` — the
    same boundaries, the 95th percentile of both directions pooled. Both empty → 0, exactly one empty →
    373.13 (applied before surface-distance, which fails on empty masks under NumPy 2). ``brats2025`` —
    the current BraTS package's: ``medpy`` with 1 mm voxels whatever ``spacing`` says, both empty → NaN
    (left out of means), exactly one empty or no voxel in common → 373.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {convention!r}; choose one of {CONVENTIONS}")
    pred, gt = _check_pair(pred, gt, spacing)
    has_p, has_g = pred.any(), gt.any()
    official = convention == "brats2025"
    if not has_p and not has_g:
        return float("nan") if official else 0.0
    if has_p != has_g:
        return OFFICIAL_EMPTY_HD95 if official else EMPTY_HD95
    if official and not (pred & gt).any():  # the package's rule for masks with no voxel in common
        return OFFICIAL_EMPTY_HD95
    if official:  # the package's command line passes no voxel size
        convention, spacing = "medpy", (1.0, 1.0, 1.0)
    pred, gt = _crop_pair(pred, gt, 1)
    spacing = tuple(float(s) for s in spacing)
    if convention == "brats2023":
        return _brats_hd95(pred, gt, spacing)
    d_pg, d_gp = _boundary_distances(pred, gt, spacing), _boundary_distances(gt, pred, spacing)
    if convention == "monai":
        return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    return float(np.percentile(np.hstack([d_pg, d_gp]), 95))


def lesion_wise(pred, gt, spacing=(1.0, 1.0, 1.0)) -> dict:
    """BraTS 2023 (GLI) lesion-wise Dice and HD95 of one region, as the challenge's script computes them.

    GT lesions: 26-connected components, merged when they touch after 3 dilations (18-connected
    element); for each, the predicted components touching its 3×-dilated mask are its match (Dice and
    surface-distance HD95 against their union; none → Dice 0, HD95 374). GT lesions of ≤ 50 mm³ are
    then dropped (their matches still do not count as false positives). Predicted components touching
    no GT lesion are false positives (Dice 0, HD95 374). Scores are means over kept lesions plus false
    positives; with neither, Dice 1 and HD95 0. Returns dict(dice, hd95, tp, fp, fn, dropped), dropped:
    the GT lesions left out as too small.
    """
    pred, gt = _check_pair(pred, gt, spacing)
    if not pred.any() and not gt.any():
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0, "dropped": 0}
    pred, gt = _crop_pair(pred, gt, LESION_DILATIONS + 1)
    voxel = float(np.prod(spacing))
    pred_cc, _ = ndimage.label(pred, _CONN26)
    gt_cc, _ = ndimage.label(gt, _CONN26)
    dilated_cc, n_dilated = ndimage.label(ndimage.binary_dilation(gt, _DILATION, LESION_DILATIONS), _CONN26)
    merged = np.where(gt_cc > 0, dilated_cc, 0)  # GT lesions merged through the dilation
    matched_pred: set[int] = set()
    scores, fn, tp, dropped = [], 0, 0, 0
    for lesion in range(1, n_dilated + 1):
        gt_l = merged == lesion
        if not gt_l.any():
            continue
        hits = np.unique(pred_cc[ndimage.binary_dilation(gt_l, _DILATION, LESION_DILATIONS)])
        hits = hits[hits != 0]
        matched_pred.update(hits.tolist())
        if gt_l.sum() * voxel <= LESION_MIN_VOLUME:
            dropped += 1
            continue
        if hits.size == 0:
            scores.append((0.0, LESION_MISS_HD95))
            fn += 1
            continue
        pred_l = np.isin(pred_cc, hits)
        scores.append((dice(pred_l, gt_l), _brats_hd95(pred_l, gt_l, spacing)))
        tp += 1
    fp = len(set(np.unique(pred_cc[pred_cc > 0]).tolist()) - matched_pred)
    return _lesion_means(scores, {"tp": tp, "fp": fp, "fn": fn, "dropped": dropped})


def _lesion_means(scores: list[tuple[float, float]], counts: dict) -> dict:
    """The 2023 rules' means over kept lesions' (Dice, HD95) plus the false positives (0, 374)."""
    n = len(scores) + counts["fp"]
    if n == 0:
        return {"dice": 1.0, "hd95": 0.0, **counts}
    dice_sum = sum(d for d, _ in scores)
    hd_sum = sum(h for _, h in scores) + counts["fp"] * LESION_MISS_HD95
    return {"dice": dice_sum / n, "hd95": hd_sum / n, **counts}


def matched_lesions(pred, gt) -> dict:
    """The current BraTS package's lesion-wise scores of one region (``brats2025``; panoptica's defaults).

    Lesions: 26-connected components of each mask, no dilation, no size threshold. Matched one to one,
    maximising the summed Dice over pairs that overlap (the Hungarian method). Dice and HD95 (``medpy``,
    1 mm voxels) are means over the matched pairs only: unmatched lesions count only as fp / fn. No
    match: both masks empty → NaN; otherwise Dice 0, HD95 inf (the package keeps it infinite).
    Returns dict(dice, hd95, tp, fp, fn, dropped=0).
    """
    pred, gt = _check_pair(pred, gt)
    counts = {"tp": 0, "fp": 0, "fn": 0, "dropped": 0}
    if not pred.any() and not gt.any():
        return {"dice": float("nan"), "hd95": float("nan"), **counts}
    pred, gt = _crop_pair(pred, gt, 1)
    pred_cc, n_pred = ndimage.label(pred, _CONN26)
    gt_cc, n_gt = ndimage.label(gt, _CONN26)
    overlap = np.zeros((n_gt + 1, n_pred + 1))
    np.add.at(overlap, (gt_cc.ravel(), pred_cc.ravel()), 1)
    sizes = overlap.sum(1)[1:, None] + overlap.sum(0)[None, 1:]
    pair_dice = 2 * overlap[1:, 1:] / sizes
    cost = np.where(pair_dice >= OFFICIAL_MATCH_DICE, 1 - pair_dice, 1 + 1e-6)
    pairs = [(i, j) for i, j in zip(*optimize.linear_sum_assignment(cost)) if cost[i, j] < 1]
    counts.update(tp=len(pairs), fp=n_pred - len(pairs), fn=n_gt - len(pairs))
    if not pairs:
        return {"dice": 0.0, "hd95": float("inf"), **counts}
    hd = [hd95(pred_cc == j + 1, gt_cc == i + 1, convention="brats2025") for i, j in pairs]
    return {"dice": float(np.mean([pair_dice[i, j] for i, j in pairs])), "hd95": float(np.mean(hd)), **counts}


def score_case(
    pred_regions, gt_regions, spacing, case: str = "", convention: str = "brats2023", with_lesion_wise: bool = True
) -> list[dict]:
    """One row per region [WT, TC, ET] for a case: dice, hd95, gt_empty (1: no ground truth), lesion-wise
    scores, TP/FP/FN lesion counts and lesions_dropped (GT lesions the rules left out as too small).

    pred_regions, gt_regions: ``[D, H, W, 3]`` binary. Each row names the convention; ``brats2025`` follows
    the current BraTS package in everything (Dice NaN when both masks are empty, :func:`matched_lesions`).
    """
    pred_regions, gt_regions = np.asarray(pred_regions), np.asarray(gt_regions)
    if pred_regions.shape != gt_regions.shape or pred_regions.shape[-1] != len(REGIONS):
        raise ValueError(f"region masks must both be [D, H, W, 3]; got {pred_regions.shape} and {gt_regions.shape}")
    official = convention == "brats2025"
    rows = []
    for r, name in enumerate(REGIONS):
        p, g = pred_regions[..., r], gt_regions[..., r]
        both_empty = not p.any() and not g.any()
        row = {
            "case": case,
            "region": name,
            "dice": float("nan") if official and both_empty else dice(p, g),
            "hd95": hd95(p, g, spacing, convention),
            "gt_empty": int(not g.any()),
            "convention": convention,
        }
        if with_lesion_wise:
            lw = matched_lesions(p, g) if official else lesion_wise(p, g, spacing)
            row.update(lesionwise_dice=lw["dice"], lesionwise_hd95=lw["hd95"], lesions_dropped=lw["dropped"])
            row.update({k: lw[k] for k in ("tp", "fp", "fn")})
        rows.append(row)
    return rows


FLIP_KEYS = ("unet_errors", "flipped", "fixed")  # the counts of flip_counts, per region


def flip_counts(pred_regions, unet_regions, gt_regions) -> list[dict]:
    """How a refinement changed the U-Net's masks, per region [WT, TC, ET], in voxels.

    All three ``[D, H, W, 3]`` binary. ``unet_errors`` = |U ⊕ G|; ``flipped`` = |P ⊕ U|; ``fixed`` =
    |(P ⊕ U) ∧ (U ⊕ G)|, the flipped voxels U had wrong. The refined mask's errors are then
    ``unet_errors − fixed + (flipped − fixed)``. For the U-Net itself (P = U) all flips are 0.
    """
    p, u, g = (np.asarray(a, bool) for a in (pred_regions, unet_regions, gt_regions))
    if not p.shape == u.shape == g.shape or p.shape[-1] != len(REGIONS):
        raise ValueError(f"region masks must all be [D, H, W, 3]; got {p.shape}, {u.shape}, {g.shape}")
    err, flip = u ^ g, p ^ u
    axes = tuple(range(p.ndim - 1))
    return [
        {"region": name, "unet_errors": int(e), "flipped": int(f), "fixed": int(x)}
        for name, e, f, x in zip(REGIONS, err.sum(axes), flip.sum(axes), (err & flip).sum(axes))
    ]


def summarize(rows: list[dict], keys=("dice", "hd95", "lesionwise_dice", "lesionwise_hd95")) -> dict:
    """Means per region over cases, and their average over the three regions ('avg').

    Returns {region or 'avg': {key: mean}} for every key present in the rows.
    """
    keys = [k for k in keys if rows and k in rows[0]]
    out = {}
    for name in REGIONS:
        sel = [r for r in rows if r["region"] == name]
        out[name] = {k: float(np.nanmean([r[k] for r in sel])) for k in keys} if sel else {}
    out["avg"] = {k: float(np.mean([out[n][k] for n in REGIONS if out[n]])) for k in keys} if rows else {}
    return out
