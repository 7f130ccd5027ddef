"""Times Dice + HD95 (each convention) and the lesion-wise scores on one full-size 240×240×155 case.

    python benchmarks/metrics_speed.py

The prediction is the ground truth dilated by one voxel with a one-voxel shift (tumour-sized masks).
Prints one line per convention: seconds for 3 regions (median of 3 runs).
"""

import time

import numpy as np
from scipy import ndimage

from rediffinet_jax import metrics
from rediffinet_jax.data.phantoms import generate_case
from rediffinet_jax.labels import labels_to_regions


def main():
    _, labels = generate_case((240, 240, 155), np.random.default_rng([0, 2]))
    gt = labels_to_regions(labels).astype(bool)
    pred = np.stack([np.roll(ndimage.binary_dilation(gt[..., r]), 1, axis=0) for r in range(3)], -1)
    print(f"tumour voxels WT/TC/ET: {gt.reshape(-1, 3).sum(0).tolist()}")
    for conv in metrics.CONVENTIONS:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            vals = [
                (metrics.dice(pred[..., r], gt[..., r]), metrics.hd95(pred[..., r], gt[..., r], (1, 1, 1), conv))
                for r in range(3)
            ]
            times.append(time.perf_counter() - t0)
        print(
            f"Dice + HD95 ({conv:9s}), 3 regions: {np.median(times):.3f} s   HD95 = "
            + ", ".join(f"{h:.2f}" for _, h in vals)
        )
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lw = [metrics.lesion_wise(pred[..., r], gt[..., r]) for r in range(3)]
        times.append(time.perf_counter() - t0)
    print(
        f"lesion-wise Dice + HD95, 3 regions: {np.median(times):.3f} s   "
        + ", ".join(f"{x['dice']:.3f}/{x['hd95']:.2f}" for x in lw)
    )


if __name__ == "__main__":
    main()
