"""What makes real cases hard, added to a phantom (the benchmark's ``data.phantoms.hard``).

A U-Net trained on plain phantoms learns "bright on t1c = ET" and "bright on t2f = edema". Real cases
break those rules, and these features break them the same way, so that a strong segmenter is left with
the kind of error a strong segmenter makes on BraTS:

* **vessels**: thin curved tubes brighter on t1c than enhancing tumour (partial volume dims them to about
  its level) but not on t2f, outside the tumour,
  some passing close to it;
* **choroid plexus**: a t1c-bright blob inside each ventricle;
* **satellite lesions**: small enhancing nodules with a thin edema halo near the main tumour (labelled);
* **broken enhancing rims**: a wedge of the rim that does not enhance (labelled NCR, as BraTS 2023
  labels non-enhancing tumour core);
* **fading edema**: the outer shell of the edema whose t2w/t2f brightness fades into white matter.

Every function draws from its own generator ``rng`` only, so that a phantom made with ``hard=False`` is
byte-identical to one made before this module existed. Coordinates are the phantom's ``coords``: three
``[D, H, W]`` float32 grids in [-1, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Columns in MODALITIES order [t1n, t1c, t2w, t2f]; indices continue phantoms._TISSUES.
TISSUES = ("vessel", "plexus")
INTENSITY = np.array(
    [
        [0.45, 1.60, 0.55, 0.55],  # vessel: enhances like ET, grey-matter-like on T2 (no edema around it)
        [0.50, 1.15, 0.85, 0.45],  # choroid plexus: enhances, inside CSF
    ],
    np.float32,
)


def _voxel(coords) -> np.ndarray:
    """Voxel size along each axis in normalized units ([3])."""
    return np.array([2.0 / max(c.shape[i] - 1, 1) for i, c in enumerate(coords)], np.float32)


def satellites(coords, labels, brain, centres, rng) -> None:
    """Adds 1–3 small labelled nodules (ET inside a thin ED halo) near each of ``centres`` with
    probability 0.6. ``labels`` ``[D, H, W]`` uint8 is changed in place; existing tumour is kept."""
    vox = _voxel(coords)
    for centre in centres:
        if rng.uniform() >= 0.6:
            continue
        for _ in range(rng.integers(1, 4)):
            direction = rng.normal(size=3)
            c = centre + direction / np.linalg.norm(direction) * rng.uniform(0.25, 0.45)
            r = rng.uniform(1.2, 2.8) * vox  # ET radius 1.2-2.8 voxels
            d = np.sqrt(sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(coords, c, r)))
            halo = (d < rng.uniform(1.7, 2.4)) & brain & (labels == 0)
            labels[halo] = 2
            labels[(d < 1.0) & brain & np.isin(labels, (0, 2))] = 3


def broken_rims(coords, labels, centres, rng) -> None:
    """For each lesion, with probability 0.5, a wedge (half-angle 30–60°) of its enhancing rim is made
    non-enhancing: ET there becomes NCR (label 1). ``labels`` is changed in place."""
    for centre in centres:
        if rng.uniform() >= 0.5:
            continue
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        rel = [x - c for x, c in zip(coords, centre)]
        norm = np.sqrt(sum(r * r for r in rel)) + 1e-6
        cos = sum(r * ui for r, ui in zip(rel, u)) / norm
        near = norm < 0.6  # this lesion's rim, not another lesion's
        labels[(labels == 3) & near & (cos > np.cos(np.radians(rng.uniform(30, 60))))] = 1


def _tube(coords, rng, through=None) -> np.ndarray:
    """Distance (normalized units) from every voxel to a random smooth curve, optionally through a point."""
    a = through if through is not None else rng.uniform(-0.6, 0.6, 3)
    b = rng.normal(size=3)
    b /= np.linalg.norm(b)
    s = np.linspace(-1.2, 1.2, 48)[:, None]
    wobble = 0.12 * np.sin(s * rng.uniform(2, 5, 3) + rng.uniform(0, 2 * np.pi, 3))
    points = (a + s * b + wobble).astype(np.float32)  # [48, 3]
    grid = np.stack([c.ravel() for c in coords], -1)
    dist = np.full(grid.shape[0], np.inf, np.float32)
    for p in points:  # 48 points: cheaper than one [N, 48] array at full size
        dist = np.minimum(dist, np.sum((grid - p) ** 2, -1))
    return np.sqrt(dist).reshape(coords[0].shape)


def vessels(coords, tissue, labels, brain, centres, rng, vessel_index: int) -> None:
    """Marks 2–4 vessels (radius 0.9–1.6 voxels) as tissue ``vessel_index`` outside the tumour; with
    probability 0.5 one of them passes within a few voxels of the first lesion."""
    vox = float(_voxel(coords).mean())
    n = rng.integers(2, 5)
    for i in range(n):
        through = None
        if i == 0 and centres and rng.uniform() < 0.5:
            through = centres[0] + rng.uniform(-0.3, 0.3, 3)
        d = _tube(coords, rng, through)
        tissue[(d < rng.uniform(0.9, 1.6) * vox) & brain & (labels == 0)] = vessel_index


def plexus(coords, tissue, labels, rng, plexus_index: int) -> None:
    """A blob in each ventricle (centres at x = ±0.12, as phantoms draws them) as tissue ``plexus_index``."""
    for side in (-1, 1):
        c = np.array([side * 0.12, rng.uniform(-0.08, 0.08), rng.uniform(-0.03, 0.03)])
        r = rng.uniform([0.04, 0.07, 0.04], [0.06, 0.11, 0.06])
        d = sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(coords, c, r))
        tissue[(d < 1) & (labels == 0)] = plexus_index


def fade_edema(image, labels, wm_intensity, rng) -> np.ndarray:
    """With probability 0.7, the edema within 2.5 voxels of the tumour's outer border fades towards white
    matter on t2w and t2f (by up to 40–80 %, patchily). ``image`` ``[D, H, W, 4]``; returns a new image."""
    if rng.uniform() >= 0.7 or not (labels == 2).any():
        return image
    outside = ndimage.distance_transform_edt(labels > 0)  # distance to the nearest non-tumour voxel
    shell = (labels == 2) & (outside <= 2.5)
    patches = ndimage.gaussian_filter(rng.uniform(size=labels.shape), 2.0)
    patches = np.clip((patches - patches.mean()) / (patches.std() + 1e-8) + 0.5, 0, 1)
    w = ndimage.gaussian_filter(shell * patches * rng.uniform(0.4, 0.8), 0.7).astype(np.float32)
    out = image.copy()
    for ch in (2, 3):  # t2w, t2f
        out[..., ch] = image[..., ch] * (1 - w) + wm_intensity[ch] * w
    return out
