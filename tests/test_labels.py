import itertools

import numpy as np
import pytest

from rediffinet_jax.labels import REGIONS, check_labels, labels_to_regions, nested, nested_region, regions_to_labels


def test_regions_by_hand():
    labels = np.array([0, 1, 2, 3])
    # WT = {1,2,3}, TC = {1,3}, ET = {3}
    expected = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.uint8)
    np.testing.assert_array_equal(labels_to_regions(labels), expected)
    assert REGIONS == ("WT", "TC", "ET")


def test_round_trip():
    labels = np.random.default_rng(0).integers(0, 4, (7, 8, 9))
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(labels)), labels)


def test_nesting_imposed():
    # ET outside TC still becomes 3; TC outside WT becomes 1; WT alone is 2.
    regions = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(regions_to_labels(regions), [3, 1, 2, 0])


def test_old_brats_label_only_when_asked():
    with pytest.raises(ValueError, match="old_brats"):
        check_labels(np.array([0, 4]))
    np.testing.assert_array_equal(check_labels(np.array([0, 4, 2]), old_brats=True), [0, 3, 2])
    with pytest.raises(ValueError, match=r"\[5\]"):
        check_labels(np.array([0, 5]))


def test_nested_by_hand():
    """A TC voxel outside WT becomes WT too; an ET voxel outside TC and WT becomes all three; a WT voxel
    without TC stays WT only; nested masks are unchanged."""
    r = np.zeros((4, 3), np.uint8)
    r[0] = (0, 1, 0)
    r[1] = (0, 0, 1)
    r[2] = (1, 0, 0)
    r[3] = (1, 1, 1)
    np.testing.assert_array_equal(nested(r), [(1, 1, 0), (1, 1, 1), (1, 0, 0), (1, 1, 1)])
    np.testing.assert_array_equal(nested(nested(r)), nested(r))


def test_nested_region_is_a_channel_of_nested():
    """Every combination of the three region bits, each voxel one: channel r of the label map's masks."""
    regions = np.array(list(itertools.product((0, 1), repeat=3)), np.uint8).reshape(2, 4, 3)
    for r in range(3):
        np.testing.assert_array_equal(nested_region(regions, r), nested(regions)[..., r] > 0)
