import numpy as np
import pytest

from rediffinet_jax import inference


@pytest.mark.parametrize("shape", [(37, 29, 45), (16, 16, 16), (10, 20, 5)])
def test_identity_model_reproduces_input(shape):
    vol = np.random.default_rng(0).normal(size=shape + (3,)).astype(np.float32)
    out = inference.sliding_window(lambda x: x, vol, (16, 16, 16), overlap=0.5, batch_windows=3)
    assert out.shape == vol.shape
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-6)


def test_window_starts_cover_exactly():
    assert inference.window_starts(37, 16) == [0, 8, 16, 21]
    assert inference.window_starts(16, 16) == [0]
    assert inference.window_starts(10, 16) == [0]


def test_gaussian_weights():
    g = inference.gaussian_weights((16, 16, 16))
    assert g.shape == (16, 16, 16) and g.max() == pytest.approx(1.0) and g.min() > 0
    # centre 7.5, σ = window/8 = 2 voxels
    assert g[7, 7, 7] == pytest.approx(g[8, 8, 8])
    assert g[5, 7, 7] / g[6, 7, 7] == pytest.approx(np.exp(-0.5 * ((2.5 / 2) ** 2 - (1.5 / 2) ** 2)), rel=1e-5)


def test_one_compilation_for_every_window():
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x[..., :2]

    inference.sliding_window(fn, np.zeros((40, 40, 40, 4), np.float32), (16, 16, 16), batch_windows=4, out_channels=2)
    assert len(set(calls)) == 1  # the last batch is padded to the same shape


def test_needed_windows_only_and_exact_where_needed():
    """Windows of 16 at overlap 0.5 over 40 voxels start at 0, 8, 16, 24 per axis (64 windows, 32 batches of 2).
    One needed voxel at (20, 20, 20) lies in the windows starting at 8 or 16 on each axis: 2³ = 8 windows. A
    batch pairs the windows starting at 0 and 8, or 16 and 24, on the last axis, so each of the 8 is in its own
    batch: 8 of 32 run. Its value equals the full run's; voxels no run window covers get the fill."""
    vol = np.random.default_rng(0).normal(size=(40, 40, 40, 1)).astype(np.float32)
    calls = []

    def fn(x, index=None):
        calls.append(index)
        return x * 2.0

    needed = np.zeros((40, 40, 40), bool)
    needed[20, 20, 20] = True
    full = inference.sliding_window(lambda x: x * 2.0, vol, (16, 16, 16), batch_windows=2, out_channels=1)
    part = inference.sliding_window(fn, vol, (16, 16, 16), batch_windows=2, out_channels=1, needed=needed, fill=-7.0)
    assert inference.windows_run((40, 40, 40), (16, 16, 16), 0.5, 2, needed) == (len(calls), 32)
    assert len(calls) == 8 and calls == sorted(calls)
    np.testing.assert_allclose(part[20, 20, 20], full[20, 20, 20], rtol=1e-6)
    assert part[0, 0, 0, 0] == -7.0
