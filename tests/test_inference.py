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
