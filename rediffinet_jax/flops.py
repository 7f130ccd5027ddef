"""Convolution FLOPs of both networks worked out from their architecture (2 FLOPs per multiply-add).

Counts every 3-D convolution (k³·cin·cout multiply-adds per output voxel; a k2 s2 transposed
convolution costs cin·cout per output voxel); dense layers, norms and activations are left out
(under 0.1 %). At 128×192×128 the Re-DiffiNet denoiser is 3.67 TFLOP per forward and the encoder
1.06 TFLOP, 79 % of the denoiser's at full resolution (docs/method.md).
"""

from __future__ import annotations

import math

from rediffinet_jax.models.denoiser import FEATURES


def _twoconv(cin: int, cout: int) -> int:
    return 27 * cin * cout + 27 * cout * cout


def diffusion_flops(spatial, cond_channels: int, out_channels: int = 3, features=FEATURES) -> dict:
    """FLOPs of one forward of the encoder and of the denoiser for a batch of one ``spatial`` volume.

    Returns {"encoder", "denoiser", "denoiser_full_res"} in FLOP.
    """
    f = features
    v = math.prod(spatial)
    res = [v / 8**i for i in range(5)]
    enc = [_twoconv(cond_channels, f[0])] + [_twoconv(f[i], f[i + 1]) for i in range(4)]
    encoder = sum(m * r for m, r in zip(enc, res))
    den_in = cond_channels + out_channels
    den = [_twoconv(den_in, f[0])] + [_twoconv(f[i], f[i + 1]) for i in range(4)]
    # ups: (input channels, skip channels, output channels, halve) at resolution level 3, 2, 1, 0
    ups = [
        (f[4], f[3], f[3], True, 3),
        (f[3], f[2], f[2], True, 2),
        (f[2], f[1], f[1], True, 1),
        (f[1], f[0], f[5], False, 0),
    ]
    per_level = [m * r for m, r in zip(den, res)]
    for cin, cskip, cout, halve, lvl in ups:
        cup = cin // 2 if halve else cin
        per_level[lvl] += (cin * cup + _twoconv(cskip + cup, cout)) * res[lvl]
    per_level[0] += f[5] * out_channels * res[0]
    return {"encoder": 2 * encoder, "denoiser": 2 * sum(per_level), "denoiser_full_res": 2 * per_level[0]}


def unet_flops(
    spatial, in_channels: int, filters, strides=None, out_channels: int = 3, deep_supervision: int = 0
) -> float:
    """FLOPs of one forward of the optimized U-Net for a batch of one ``spatial`` volume."""
    filters = tuple(filters)
    strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(filters) - 1)
    v = math.prod(spatial)
    res, r = [], v
    for s in strides:
        r = r / s**3
        res.append(r)
    cins = (in_channels,) + filters[:-1]
    total = sum((27 * c * f + 27 * f * f) * rr for c, f, rr in zip(cins, filters, res))
    for i in range(len(filters) - 1):
        total += (filters[i + 1] * filters[i] + 27 * 2 * filters[i] * filters[i] + 27 * filters[i] ** 2) * res[i]
    total += filters[0] * out_channels * res[0]
    total += sum(filters[j] * out_channels * res[j] for j in range(1, deep_supervision + 1))
    return 2 * total
