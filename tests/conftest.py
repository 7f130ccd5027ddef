"""Test set-up: two fake CPU devices, absl flags parsed (grain workers need it), shared tiny data."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.flags  # noqa: E402
import pytest  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

SMALL_SHAPE = (40, 44, 36)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """Six labelled phantoms and one unlabelled one, BraTS layout, 40×44×36 voxels."""
    from rediffinet_jax.data import phantoms

    root = tmp_path_factory.mktemp("phantoms")
    phantoms.write_dataset(root, 6, SMALL_SHAPE, seed=0, n_unlabelled=1)
    return root
