"""Layers shared by both networks, channels-last (NDHWC), with PyTorch-default initialization.

Parameters are always float32; ``dtype`` is the compute dtype (float32, or bfloat16 for speed), to
which inputs and parameters are cast at call time. Instance-norm statistics are taken in float32.
Initialization follows PyTorch's defaults so that training behaves like the reference: kernels
kaiming-uniform with a = √5 and biases uniform, both ±1/√fan_in (for a transposed convolution
PyTorch's fan_in is out_channels · kernel volume, and so it is here).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DIMS = ("NDHWC", "DHWIO", "NDHWC")
_DIMS2 = ("NHWC", "HWIO", "NHWC")
CONV_IMPLS = ("xla", "2d", "2d_sum")


def conv_impl() -> str:
    """Which convolution formulation to trace (:func:`conv3d`): ``2d`` on the CPU, ``2d_sum`` on GPUs,
    ``xla`` (XLA's native 3-D convolution) on TPUs and other backends. REDIFFINET_CONV overrides.

    Both ``2d`` forms run as 2-D convolutions and matrix products, measured faster than XLA's own on the
    CPU and an H200 (above all its transposed convolution's backward; docs/benchmarks.md). They differ only
    in the stride-1 convolution's depth taps: ``2d`` makes them in one convolution with three times the
    output (the fastest on the CPU), ``2d_sum`` one convolution per tap summed in place (a third of that
    memory, for GPUs, where memory is what bounds the batch and the samples at once). TPUs were never
    measured, so they keep XLA's own."""
    forced = os.environ.get("REDIFFINET_CONV")
    if forced:
        if forced not in CONV_IMPLS:
            raise ValueError(f"REDIFFINET_CONV must be one of {CONV_IMPLS}, got {forced!r}")
        return forced
    backend = jax.default_backend()
    return "2d" if backend == "cpu" else "2d_sum" if backend in ("gpu", "cuda", "rocm") else "xla"


def conv3d(x, kernel, stride: int, padding: int, impl: str | None = None):
    """3-D convolution ``x`` ``[B, D, H, W, cin]`` * ``kernel`` ``[kd, kh, kw, cin, cout]``, symmetric
    ``padding`` on every axis.

    ``xla``: ``lax.conv_general_dilated``. ``2d`` and ``2d_sum``: 2-D convolutions over (H, W) with the
    depth handled apart (:func:`conv_impl`): a "same" stride-1 kernel through :func:`_depth_taps_on_outputs`
    (``2d``) or :func:`_depth_taps_summed` (``2d_sum``), other strides through :func:`_depth_taps_on_inputs`;
    a 1×1×1 kernel with stride 1 is a matrix product. All give the same result to float rounding. Compile
    through ``compiling.jit`` (its CPU options) for the fast 2-D convolution.
    """
    impl = impl or conv_impl()
    kd = kernel.shape[0]
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (stride,) * 3, [(padding, padding)] * 3, dimension_numbers=_DIMS)
    if kernel.shape[:3] == (1, 1, 1) and stride == 1 and padding == 0:
        return x @ kernel.reshape(kernel.shape[3:])
    if stride == 1 and 2 * padding == kd - 1:
        same = _depth_taps_summed if impl == "2d_sum" else _depth_taps_on_outputs
        return same(x, kernel, padding)
    return _depth_taps_on_inputs(x, kernel, stride, padding)


def _conv2d(x2, kernel2, stride: int, padding: int):
    """2-D convolution of ``[N, H, W, cin]`` by ``[kh, kw, cin, cout]``, symmetric padding."""
    return jax.lax.conv_general_dilated(
        x2, kernel2, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DIMS2
    )


def _depth_taps_on_outputs(x, kernel, padding: int):
    """Stride-1 "same" convolution: one 2-D convolution of every depth slice with kd·cout outputs (one
    group per depth tap), then each output slice sums its kd neighbours' groups (zero past the edges).
    Nothing the size of the input is copied, but the convolution's output (and its gradient in the
    backward) is kd times the result's size."""
    b, d, h, w, c = x.shape
    kd, kh, kw, _, co = kernel.shape
    k2 = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, c, kd * co)
    y = _conv2d(x.reshape(b * d, h, w, c), k2, 1, padding).reshape(b, d, h, w, kd, co)
    return _sum_depth_taps(lambda a, after=None: y[..., a, :], d, kd, padding)


def _taps_summed_forward(x, kernel, padding: int):
    b, d, h, w, c = x.shape
    kd, kh, kw, _, co = kernel.shape
    x2 = x.reshape(b * d, h, w, c)

    def tap(a, after=None):
        # tied to the sum so far (``after``) by a barrier, a tap's convolution waits for the previous
        # addition: otherwise XLA may run all three convolutions first and hold their outputs at once
        src = x2 if after is None else jax.lax.optimization_barrier((x2, after))[0]
        return _conv2d(src, kernel[a], 1, padding).reshape(b, d, h, w, co)

    return _sum_depth_taps(tap, d, kd, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depth_taps_summed(x, kernel, padding: int):
    """Stride-1 "same" convolution as one 2-D convolution of every depth slice per depth tap (cout outputs
    each), each added in place into the result shifted by its tap: at most one tap's output exists beside
    the result. Its own backward (a ``custom_vjp``; reverse mode only) keeps to the same: the input gradient
    is this convolution of the output gradient by the mirrored kernel, summed in place, and each tap's kernel
    gradient is taken alone, where autodiff's transpose of the in-place sums made all three taps' input
    gradients before adding them (XLA's plan of the float32 step at 64×96×64: 4.67 → 4.12 GiB)."""
    return _taps_summed_forward(x, kernel, padding)


def _taps_summed_fwd(x, kernel, padding):
    return _taps_summed_forward(x, kernel, padding), (x, kernel)


def _taps_summed_bwd(padding, res, g):
    x, kernel = res
    b, d, h, w, c = x.shape
    kd, co = kernel.shape[0], kernel.shape[-1]
    # the input gradient of a "same" stride-1 convolution: the same convolution of g by the kernel
    # mirrored in space, its channel axes swapped
    dx = _taps_summed_forward(g, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), padding).astype(x.dtype)
    x2 = x.reshape(b * d, h, w, c)
    dk = []
    for a in range(kd):  # tap a enters out[:, i] as tap[:, i + s]: its output's gradient is g moved by s
        s = a - padding
        ga = jnp.zeros_like(g)
        ga = ga.at[:, s:].set(g[:, : d - s]) if s >= 0 else ga.at[:, : d + s].set(g[:, -s:])
        dk.append(jax.vjp(lambda k: _conv2d(x2, k, 1, padding), kernel[a])[1](ga.reshape(b * d, h, w, co))[0])
    return dx, jnp.stack(dk).astype(kernel.dtype)


_depth_taps_summed.defvjp(_taps_summed_fwd, _taps_summed_bwd)


def _sum_depth_taps(tap, d: int, kd: int, padding: int):
    """``out[:, i] = Σ_a tap(a)[:, i + a − padding]`` over the kd taps (zero past the depth edges), where
    ``tap(a, after)`` is ``[B, D, H, W, cout]`` (``after``: the sum so far, to order against). In-place
    additions (``.at[].add``): XLA keeps ``out`` as one buffer; a sum of shifted terms would instead be
    fused into every consumer, which then keeps all the terms alive (3× the memory) until the backward."""
    out = tap(padding)
    for a in range(kd):
        s = a - padding  # out[:, i] += tap(a)[:, i + s]
        if 0 < s < d:
            out = out.at[:, : d - s].add(tap(a, out)[:, s:])
        elif 0 < -s < d:
            out = out.at[:, -s:].add(tap(a, out)[:, : d + s])
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
    y = _conv2d(stacked.reshape(b * d_out, h, w, kd * c), k2, stride, padding)
    return y.reshape((b, d_out) + y.shape[1:])


def conv_transpose3d(x, kernel, stride: int, impl: str | None = None):
    """Transposed convolution with kernel size = stride (no overlap), ``lax.conv_transpose``'s orientation.

    ``2d`` and ``2d_sum``: every input voxel times the kernel is one matrix product ``[N, cin] @ [cin, s³·cout]``
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
    return _param(np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32))


def _param(values: np.ndarray) -> nnx.Param:
    """A parameter holding ``values``, copied to the default device as they are: a transfer, where
    ``jnp.asarray`` or ``jnp.ones`` would compile a small program for every new shape."""
    return nnx.Param(jax.device_put(values))


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

    Statistics in float32 whatever the input dtype, both from one pass over the data (shifted by one of its
    values, so that a channel's mean far from zero costs no precision); the output has the input's dtype.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        self.scale = _param(np.ones((channels,), np.float32))
        self.bias = _param(np.zeros((channels,), np.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        # both statistics in one pass over x, of x less one of its own values per channel (k): the variance
        # E[(x−k)²] − E[x−k]² does not depend on k, and with k within a few deviations of the mean it keeps
        # float32's precision where E[x²] − E[x]² would cancel. The normalisation is one scale and shift.
        k = jax.lax.stop_gradient(x32[:, :1, :1, :1, :])
        shifted_mean = jnp.mean(x32 - k, axis=(1, 2, 3), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(x32 - k), axis=(1, 2, 3), keepdims=True) - jnp.square(shifted_mean), 0.0)
        scale = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        return (x32 * scale + (self.bias[...] - (shifted_mean + k) * scale)).astype(x.dtype)


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
