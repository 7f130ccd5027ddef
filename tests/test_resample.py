"""Resampling to a working grid and back (data/resample.py, brats.to_work / to_source), worked out by hand.

A 4³ cube at [2, 6)³ of an 8³ grid at 1 mm, to 2 mm: a 4³ grid whose voxel i is centred on source
coordinate 2i + 0.5, so voxels 1 and 2 lie wholly inside the cube: the cube is [1, 3)³ (8 voxels). Back to
1 mm, voxel j is centred on 2 mm coordinate j/2 − 0.25: along an axis the indicator reads 0, .25, .75, 1,
1, .75, .25, 0, and in 3-D the product of three axes; above 0.5: every voxel of the cube but its 8 corners
(.75³ = .42), which 56 voxels are; its edges (.75² = .56) stay.
"""

import numpy as np
import pytest

from rediffinet_jax.data import brats, resample

META = {"box": ((0, 8), (0, 8), (0, 8)), "work_shape": (4, 4, 4)}


def _cube_regions():
    r = np.zeros((8, 8, 8, 3), np.uint8)
    r[2:6, 2:6, 2:6, 0] = 1  # WT only (edema)
    return r


def test_work_shape():
    assert resample.work_shape((8, 8, 8), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (4, 4, 4)
    assert resample.work_shape((143, 165, 143), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (72, 82, 72)  # rounded
    assert resample.work_shape((3, 3, 3), (1.0, 1.0, 1.0), (8.0, 8.0, 8.0)) == (1, 1, 1)


@pytest.mark.parametrize("method", resample.LABEL_METHODS)
def test_cube_down_to_2mm(method):
    down = resample.resize_labels(_cube_regions(), (4, 4, 4), method)
    want = np.zeros((4, 4, 4), np.uint8)
    want[1:3, 1:3, 1:3] = 1
    np.testing.assert_array_equal(down[..., 0], want)
    assert not down[..., 1:].any()


def test_cube_back_to_1mm_loses_its_corners():
    down = brats.to_work(_cube_regions(), META)
    up = brats.to_source(down[..., :1].astype(np.float32), META)[..., 0]
    np.testing.assert_allclose(up[:, 4, 4], [0, 0.25, 0.75, 1, 1, 0.75, 0.25, 0], atol=1e-6)
    back = up > 0.5
    assert back.sum() == 56 and back[2:6, 2:6, 2:6].sum() == 56
    assert not back[2, 2, 2] and back[2, 2, 3]  # a corner lost, an edge kept


def test_onehot_keeps_nesting_and_the_most_likely_label():
    r = np.zeros((8, 8, 8, 3), np.uint8)
    r[0:8, 0:8, 0:4] = (1, 1, 1)  # ET in the first half, edema in the second
    r[0:8, 0:8, 4:8] = (1, 0, 0)
    down = resample.resize_labels(r, (4, 4, 4), "onehot")
    assert (down[..., 2] <= down[..., 1]).all() and (down[..., 1] <= down[..., 0]).all()
    assert down[:, :, :2, 2].all() and not down[:, :, 2:, 1].any() and down[..., 0].all()


def test_same_grid_is_untouched():
    r = _cube_regions()
    meta = {"box": META["box"], "work_shape": (8, 8, 8)}
    assert np.array_equal(brats.to_work(r, meta), r)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 2)).astype(np.float32)
    np.testing.assert_array_equal(brats.to_source(x, meta), x)
