"""Layers shared by both networks, channels-last (NDHWC), with PyTorch-default initialization.

Parameters are always float32; ``dtype`` is the compute dtype (float32, or bfloat16 for speed), to
which inputs and parameters are cast at call time. Instance-norm statistics are taken in float32.
Initialization follows PyTorch's defaults so that training behaves like the reference: kernels
kaiming-uniform with a = √5 and biases uniform, both ±1/√fan_in (for a transposed convolution
PyTorch's fan_in is out_channels · kernel volume, and so it is here).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DIMS = ("NDHWC", "DHWIO", "NDHWC")
_DIMS2 = ("NHWC", "HWIO", "NHWC")
CONV_IMPLS = ("xla", "2d")


def conv_impl() -> str:
    """Which convolution formulation to trace: ``2d`` (2-D convolutions and matrix products, see
    :func:`conv3d`; the CPU and GPUs) or ``xla`` (XLA's native 3-D convolution; TPUs and other backends).
    REDIFFINET_CONV overrides.

    ``2d`` was measured faster on both the CPU and an H200 (above all XLA's transposed convolution's backward;
    docs/benchmarks.md has the numbers), for more peak memory. TPUs were never measured, so they keep
    XLA's own."""
    forced = os.environ.get("REDIFFINET_CONV")
    if forced:
        if forced not in CONV_IMPLS:
            raise ValueError(f"REDIFFINET_CONV must be one of {CONV_IMPLS}, got {forced!r}")
        return forced
    return "2d" if jax.default_backend() in ("cpu", "gpu", "cuda", "rocm") else "xla"


def conv3d(x, kernel, stride: int, padding: int, impl: str | None = None):
    """3-D convolution ``x`` ``[B, D, H, W, cin]`` * ``kernel`` ``[kd, kh, kw, cin, cout]``, symmetric
    ``padding`` on every axis.

    ``xla``: ``lax.conv_general_dilated``. ``2d``: 2-D convolutions over (H, W) with the depth taps
    moved to channels, which XLA runs faster than its 3-D convolution on the CPU and (at stride 1) on an
    H200 (:func:`conv_impl`; docs/benchmarks.md): a "same" stride-1 kernel through :func:`_depth_taps_on_outputs`,
    other strides through :func:`_depth_taps_on_inputs`; a 1×1×1 kernel with stride 1 is a matrix product.
    Both give the same result to float rounding. Compile through ``compiling.jit`` (its CPU options) for the
    fast 2-D convolution.
    """
    impl = impl or conv_impl()
    kd = kernel.shape[0]
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (stride,) * 3, [(padding, padding)] * 3, dimension_numbers=_DIMS)
    if kernel.shape[:3] == (1, 1, 1) and stride == 1 and padding == 0:
        return x @ kernel.reshape(kernel.shape[3:])
    if stride == 1 and 2 * padding == kd - 1:
        return _depth_taps_on_outputs(x, kernel, padding)
    return _depth_taps_on_inputs(x, kernel, stride, padding)


def _depth_taps_on_outputs(x, kernel, padding: int):
    """Stride-1 "same" convolution: one 2-D convolution of every depth slice with kd·cout outputs (one
    group per depth tap), then each output slice sums its kd neighbours' groups (zero past the edges).
    Nothing the size of the input is copied. Faster than :func:`_depth_taps_on_inputs` in the networks,
    although a single layer's backward alone is slower (docs/benchmarks.md)."""
    b, d, h, w, c = x.shape
    kd, kh, kw, _, co = kernel.shape
    k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, c, kd * co)
    y = jax.lax.conv_general_dilated(
        x.reshape(b * d, h, w, c), k2, (1, 1), [(padding, padding)] * 2, dimension_numbers=_DIMS2
    ).reshape(b, d, h, w, kd, co)
    out = y[..., padding, :]
    for a in range(kd):
        s = a - padding  # out[:, i] += y[:, i + s, ..., a, :]
        if s > 0 and s < d:
            out = out.at[:, : d - s].add(y[:, s:, ..., a, :])
        elif s < 0 and -s < d:
            out = out.at[:, -s:].add(y[:, : d + s, ..., a, :])
    return out


def _depth_taps_on_inputs(x, kernel, stride: int, padding: int):
    """Any stride: the kd depth slices each output slice reads are stacked on channels (a [B, Do, H, W,
    kd·cin] copy, half the input's size at stride 2) and one 2-D convolution with kd·cin inputs does the
    rest."""
    b, d, h, w, c = x.shape
    kd, kh, kw, _, co = kernel.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (0, 0), (0, 0), (0, 0)))
    d_out = (d + 2 * padding - kd) // stride + 1
    span = stride * (d_out - 1) + 1
    # stack on a new axis, not concatenate on channels: XLA's CPU concatenation measured slower
    stacked = jnp.stack([xp[:, a : a + span : stride] for a in range(kd)], axis=-2)  # [B, Do, H, W, kd, cin]
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, co)
    y = jax.lax.conv_general_dilated(
        stacked.reshape(b * d_out, h, w, kd * c),
        k2,
        (stride, stride),
        [(padding, padding)] * 2,
        dimension_numbers=_DIMS2,
    )
    return y.reshape((b, d_out) + y.shape[1:])


def conv_transpose3d(x, kernel, stride: int, impl: str | None = None):
    """Transposed convolution with kernel size = stride (no overlap), ``lax.conv_transpose``'s orientation.

    ``2d``: every input voxel times the kernel is one matrix product ``[N, cin] @ [cin, s³·cout]``
    followed by a reshape into the s×s×s blocks (exact; XLA's own transposed convolution is far slower on the
    CPU, and its backward on a GPU: docs/benchmarks.md). ``xla``: ``lax.conv_transpose``.
    """
    impl = impl or conv_impl()
    if impl == "xla":
        return jax.lax.conv_transpose(x, kernel, (stride,) * 3, "VALID", dimension_numbers=_DIMS)
    b, d, h, w, c = x.shape
    s, co = stride, kernel.shape[-1]
    flipped = kernel[::-1, ::-1, ::-1]  # conv_transpose (no kernel transpose) applies the kernel mirrored
    y = x.reshape(-1, c) @ jnp.transpose(flipped, (3, 0, 1, 2, 4)).reshape(c, s**3 * co)
    y = y.reshape(b, d, h, w, s, s, s, co).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, d * s, h * s, w * s, co)


def _uniform(rngs: nnx.Rngs, shape, fan_in: int) -> nnx.Param:
    """U(−1/√fan_in, 1/√fan_in) from the module's ``params`` key stream.

    Outside a trace the values are drawn with NumPy from a generator seeded by the key, because XLA on
    the CPU compiles every new random op (seconds per model); under a trace
    (``nnx.eval_shape``, ``nnx.jit``) ``jax.random`` is used and nothing is allocated.
    """
    bound = 1.0 / math.sqrt(fan_in)
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return nnx.Param(jax.random.uniform(key, shape, jnp.float32, -bound, bound))
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    values = np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)
    return nnx.Param(jnp.asarray(values))


class Conv3d(nnx.Module):
    """3-D convolution, kernel ``[k, k, k, cin, cout]``; input ``[B, D, H, W, cin]``.

    ``padding`` is symmetric per axis; with k = 3, padding 1 and stride 2 an even size n becomes n/2.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        padding: int | None = None,
        use_bias: bool = True,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        fan_in = cin * kernel**3
        self.kernel = _uniform(rngs, (kernel,) * 3 + (cin, cout), fan_in)
        self.bias = _uniform(rngs, (cout,), fan_in) if use_bias else None
        self.stride = stride
        self.padding = (kernel - 1) // 2 if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class ConvTranspose3d(nnx.Module):
    """Transposed convolution with kernel = stride (k2 s2 doubles every spatial size), with bias."""

    def __init__(self, cin: int, cout: int, stride: int = 2, dtype=jnp.float32, *, rngs: nnx.Rngs):
        fan_in = cout * stride**3  # PyTorch computes fan_in of a transposed conv from dim 1 (= out)
        self.kernel = _uniform(rngs, (stride,) * 3 + (cin, cout), fan_in)
        self.bias = _uniform(rngs, (cout,), fan_in)
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv_transpose3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride)
        return y + self.bias[...].astype(self.dtype)


class Dense(nnx.Module):
    """``x @ kernel + bias`` over the last axis."""

    def __init__(self, cin: int, cout: int, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.kernel = _uniform(rngs, (cin, cout), cin)
        self.bias = _uniform(rngs, (cout,), cin)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class InstanceNorm(nnx.Module):
    """Per-sample, per-channel normalization over the spatial axes (biased variance, eps 1e-5), affine.

    Statistics in float32 whatever the input dtype; the output has the input's dtype.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3), keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def check_spatial(shape, multiple: int, name: str) -> None:
    """Raises ValueError unless every spatial size of ``shape`` ``[B, D, H, W, C]`` is a multiple."""
    spatial = tuple(shape[1:4])
    if len(shape) != 5 or any(s % multiple for s in spatial):
        raise ValueError(
            f"{name} needs input [B, D, H, W, C] with D, H, W multiples of {multiple}; got shape {tuple(shape)}"
        )


def count_params(module_or_state) -> int:
    """Number of scalar parameters (``nnx.Param``) of a module or of its abstract state."""
    state = nnx.state(module_or_state, nnx.Param) if isinstance(module_or_state, nnx.Module) else module_or_state
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
