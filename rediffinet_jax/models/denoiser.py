"""The Diff-UNet denoiser, its time embedding and its conditioning encoder ξ (stage 2): docs/method.md.

Layout NDHWC. The denoiser takes ``[condition image, x_t]`` concatenated on channels and predicts x0
as raw logits ``[B, D, H, W, 3]``; the encoder takes the condition image alone and its per-stage
features are added to the denoiser's. D, H, W must be multiples of 16 (four 2× poolings).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rediffinet_jax.models.layers import Conv3d, ConvTranspose3d, Dense, InstanceNorm, check_spatial

FEATURES = (64, 64, 128, 256, 512, 64)
TIME_DIM, TEMB_DIM = 128, 512
MULTIPLE = 16


def timestep_embedding(t: jax.Array, dim: int = TIME_DIM) -> jax.Array:
    """Sinusoidal embedding ``[B, dim]`` float32 of timesteps ``t`` ``[B]`` (ints 0..999 used as floats).

    half = dim/2; freq_j = exp(−j·ln(10000)/(half − 1)); emb = [sin(t·freq), cos(t·freq)] (sin first).
    """
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freq[None]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class ConvUnit(nnx.Module):
    """Conv3d k3 (with bias) → InstanceNorm → LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int, dtype, *, rngs: nnx.Rngs):
        self.conv = Conv3d(cin, cout, 3, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.norm = InstanceNorm(cout)

    def __call__(self, x):
        return jax.nn.leaky_relu(self.norm(self.conv(x)), 0.1)


class TwoConv(nnx.Module):
    """``h = ConvUnit(x)``; ``h += Dense(swish(temb))`` broadcast over space (if timed); ``ConvUnit(h)``."""

    def __init__(self, cin: int, cout: int, timed: bool, dtype, *, rngs: nnx.Rngs):
        self.unit1 = ConvUnit(cin, cout, dtype, rngs=rngs)
        self.temb_proj = Dense(TEMB_DIM, cout, dtype, rngs=rngs) if timed else None
        self.unit2 = ConvUnit(cout, cout, dtype, rngs=rngs)

    def __call__(self, x, temb=None):
        h = self.unit1(x)
        if self.temb_proj is not None:
            h = h + self.temb_proj(jax.nn.swish(temb))[:, None, None, None, :].astype(h.dtype)
        return self.unit2(h)


def _maxpool2(x):
    """2×2×2 max pooling, stride 2, of ``[B, D, H, W, C]`` with even D, H, W.

    A max over reshaped axes rather than ``lax.reduce_window``: the same values, and its gradient is an
    elementwise mask where reduce_window's tracks argmax indices on the CPU (slower: docs/decisions.md).
    At ties the gradient is shared equally instead of going to one voxel (PyTorch: the first); ties between
    float activations are rare.
    """
    b, d, h, w, c = x.shape
    return jnp.max(x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c), axis=(2, 4, 6))


class Down(nnx.Module):
    """MaxPool 2 → TwoConv."""

    def __init__(self, cin: int, cout: int, timed: bool, dtype, *, rngs: nnx.Rngs):
        self.block = TwoConv(cin, cout, timed, dtype, rngs=rngs)

    def __call__(self, x, temb=None):
        return self.block(_maxpool2(x), temb)


class Up(nnx.Module):
    """ConvTranspose(k2 s2) cin → cin/2 (or cin when not ``halve``) → concat [skip, up] → TwoConv."""

    def __init__(self, cin: int, cskip: int, cout: int, halve: bool, dtype, *, rngs: nnx.Rngs):
        cup = cin // 2 if halve else cin
        self.up = ConvTranspose3d(cin, cup, 2, dtype, rngs=rngs)
        self.block = TwoConv(cskip + cup, cout, True, dtype, rngs=rngs)

    def __call__(self, x, skip, temb):
        return self.block(jnp.concatenate([skip, self.up(x).astype(skip.dtype)], axis=-1), temb)


class Encoder(nnx.Module):
    """The conditioning encoder ξ: e0 = TwoConv(cin→64), e1..e4 = Down; no time input.

    ``__call__(cond [B, D, H, W, cin])`` returns the five feature maps [e0, …, e4].
    """

    def __init__(self, in_channels: int, features=FEATURES, dtype=jnp.float32, *, rngs: nnx.Rngs):
        f = features
        self.stages = nnx.List(
            [TwoConv(in_channels, f[0], False, dtype, rngs=rngs)]
            + [Down(f[i], f[i + 1], False, dtype, rngs=rngs) for i in range(4)]
        )

    def __call__(self, cond: jax.Array) -> list[jax.Array]:
        check_spatial(cond.shape, MULTIPLE, "Encoder")
        feats, x = [], cond
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _add_shared(x, feature):
    """``x`` ``[n·b, ...]`` plus ``feature`` ``[b, ...]``, the same feature for each of the n sample-major
    blocks of x (n = 1: a plain sum). Broadcast inside the addition, so the sampler's S samples never hold
    S copies of the encoder's features."""
    n = x.shape[0] // feature.shape[0]
    if n * feature.shape[0] != x.shape[0]:
        raise ValueError(f"encoder features of batch {feature.shape[0]} do not divide the denoiser's {x.shape[0]}")
    return (x.reshape((n,) + feature.shape) + feature.astype(x.dtype)[None]).reshape(x.shape)


class Denoiser(nnx.Module):
    """The Diff-UNet denoiser: input ``[B, D, H, W, in_channels]``, ``t`` ``[B]``, optional encoder
    features (added after each encoder stage; their batch may be B or any b dividing it, shared by the
    B/b sample-major blocks: :func:`_add_shared`); returns x0 logits ``[B, D, H, W, out_channels]`` float32."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        features=FEATURES,
        dtype=jnp.float32,
        remat: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        f = features
        self.time_mlp1 = Dense(TIME_DIM, TEMB_DIM, dtype, rngs=rngs)
        self.time_mlp2 = Dense(TEMB_DIM, TEMB_DIM, dtype, rngs=rngs)
        self.stages = nnx.List(
            [TwoConv(in_channels, f[0], True, dtype, rngs=rngs)]
            + [Down(f[i], f[i + 1], True, dtype, rngs=rngs) for i in range(4)]
        )
        self.ups = nnx.List(
            [
                Up(f[4], f[3], f[3], True, dtype, rngs=rngs),
                Up(f[3], f[2], f[2], True, dtype, rngs=rngs),
                Up(f[2], f[1], f[1], True, dtype, rngs=rngs),
                Up(f[1], f[0], f[5], False, dtype, rngs=rngs),
            ]
        )
        self.out = Conv3d(f[5], out_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.remat = remat

    def _run(self, module, *args):
        return nnx.remat(lambda m, *a: m(*a))(module, *args) if self.remat else module(*args)

    def __call__(self, x: jax.Array, t: jax.Array, features: list[jax.Array] | None = None) -> jax.Array:
        check_spatial(x.shape, MULTIPLE, "Denoiser")
        temb = self.time_mlp2(jax.nn.swish(self.time_mlp1(timestep_embedding(t))))
        skips = []
        for i, stage in enumerate(self.stages):
            x = self._run(stage, x, temb)
            if features is not None:
                x = _add_shared(x, features[i])
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = self._run(up, x, skips.pop(), temb)
        return self.out(x).astype(jnp.float32)


class DiffusionNet(nnx.Module):
    """Encoder ξ plus denoiser for one variant; the sampler uses the two apart.

    ``encode(cond)`` once per window, then ``denoise(cond, x_t, t, feats)`` for every step and sample.
    cond ``[B, D, H, W, cond_channels]``, x_t ``[B, D, H, W, 3]``, t ``[B]`` int.
    """

    def __init__(
        self,
        cond_channels: int,
        out_channels: int = 3,
        features=FEATURES,
        dtype=jnp.float32,
        remat: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.cond_channels = cond_channels
        self.encoder = Encoder(cond_channels, features, dtype, rngs=rngs)
        self.denoiser = Denoiser(cond_channels + out_channels, out_channels, features, dtype, remat, rngs=rngs)

    def encode(self, cond: jax.Array) -> list[jax.Array]:
        if cond.shape[-1] != self.cond_channels:
            raise ValueError(f"condition image has {cond.shape[-1]} channels, the model expects {self.cond_channels}")
        return self.encoder(cond)

    def denoise(self, cond: jax.Array, x_t: jax.Array, t: jax.Array, features: list[jax.Array]) -> jax.Array:
        return self.denoiser(jnp.concatenate([cond.astype(x_t.dtype), x_t], axis=-1), t, features)

    def __call__(self, cond: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        return self.denoise(cond, x_t, t, self.encode(cond))
