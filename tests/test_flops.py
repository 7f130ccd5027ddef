import pytest

from rediffinet_jax.flops import diffusion_flops, unet_flops


def test_rediffinet_flops_match_spec():
    f = diffusion_flops((128, 192, 128), cond_channels=7)
    assert f["denoiser"] / 1e12 == pytest.approx(3.67, abs=0.01)
    assert f["encoder"] / 1e12 == pytest.approx(1.06, abs=0.01)
    assert f["denoiser_full_res"] / f["denoiser"] == pytest.approx(0.79, abs=0.01)


def test_unet_flops_by_hand():
    # two levels, filters (8, 16), strides (1, 2), 4 input channels, 8³ input, 3 outputs
    v = 8**3
    enc = (27 * 4 * 8 + 27 * 8 * 8) * v + (27 * 8 * 16 + 27 * 16 * 16) * v / 8
    dec = (16 * 8 + 27 * 16 * 8 + 27 * 8 * 8) * v
    head = 8 * 3 * v
    assert unet_flops((8, 8, 8), 4, (8, 16)) == pytest.approx(2 * (enc + dec + head))
