"""The optimized 3-D U-Net of Futrega et al. 2021 (stage 1): docs/method.md.

Input ``[B, D, H, W, C]`` (C = 4 modalities, or 5 with the foreground channel), output logits
``[B, D, H, W, 3]`` in [WT, TC, ET]. D, H, W must be multiples of the product of the strides
(64 with the default 7 levels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rediffinet_jax.models.layers import Conv3d, ConvTranspose3d, InstanceNorm, check_spatial

DEFAULT_FILTERS = (64, 96, 128, 192, 256, 384, 512)


class ConvBlock(nnx.Module):
    """conv(k3, stride s, no bias) → IN → LeakyReLU(0.01) → conv(k3, no bias) → IN → LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, stride: int, dtype, *, rngs: nnx.Rngs):
        self.conv1 = Conv3d(cin, cout, 3, stride, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = InstanceNorm(cout)
        self.conv2 = Conv3d(cout, cout, 3, 1, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = InstanceNorm(cout)

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        return jax.nn.leaky_relu(self.norm2(self.conv2(x)), 0.01)


class UNet(nnx.Module):
    """The optimized U-Net.

    Args:
      in_channels: 4, or 5 with the one-hot foreground channel.
      filters: channels per level; strides: per level, default 1 then 2 for every later level.
      deep_supervision: number of extra 1×1×1 heads on the next coarser decoder levels (training only).
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(
        self,
        in_channels: int = 4,
        filters=DEFAULT_FILTERS,
        strides=None,
        out_channels: int = 3,
        deep_supervision: int = 2,
        dtype=jnp.float32,
        remat: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        filters = tuple(filters)
        strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(filters) - 1)
        if len(strides) != len(filters) or deep_supervision > len(filters) - 2:
            raise ValueError(f"filters {filters}, strides {strides}, deep_supervision {deep_supervision} do not fit")
        self.multiple = math.prod(strides)
        self.remat = remat
        cins = (in_channels,) + filters[:-1]
        self.encoder = nnx.List([ConvBlock(c, f, s, dtype, rngs=rngs) for c, f, s in zip(cins, filters, strides)])
        self.upsample = nnx.List(
            [
                ConvTranspose3d(filters[i + 1], filters[i], strides[i + 1], dtype, rngs=rngs)
                for i in range(len(filters) - 1)
            ]
        )
        self.decoder = nnx.List(
            [ConvBlock(2 * filters[i], filters[i], 1, dtype, rngs=rngs) for i in range(len(filters) - 1)]
        )
        self.head = Conv3d(filters[0], out_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.ds_heads = nnx.List(
            [
                Conv3d(filters[j], out_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
                for j in range(1, deep_supervision + 1)
            ]
        )

    def _block(self, block, x):
        return nnx.remat(lambda b, y: b(y))(block, x) if self.remat else block(x)

    def __call__(self, x: jax.Array, train: bool = False):
        """Returns logits ``[B, D, H, W, 3]`` float32; with ``train`` and deep supervision, a list of
        logits (main first, then each extra head resized to full size)."""
        check_spatial(x.shape, self.multiple, "UNet")
        skips = []
        for block in self.encoder:
            x = self._block(block, x)
            skips.append(x)
        x = skips.pop()
        decoded = {}
        for i in reversed(range(len(self.decoder))):
            x = self._block(self.decoder[i], jnp.concatenate([self.upsample[i](x), skips[i]], axis=-1))
            decoded[i] = x
        out = self.head(x).astype(jnp.float32)
        if not (train and len(self.ds_heads)):
            return out
        outs = [out]
        for j, head in enumerate(self.ds_heads, start=1):
            y = head(decoded[j]).astype(jnp.float32)
            outs.append(jax.image.resize(y, out.shape, "trilinear"))
        return outs
