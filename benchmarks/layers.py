"""Times each kind of layer of the denoiser alone, forward and forward + backward, at full resolution.

    python benchmarks/layers.py                                  # 128×192×128, batch 2, bfloat16 then float32
    python benchmarks/layers.py --size 16,16,16 --dtype float32  # a CPU

Finds where a slow training step spends its time: on an H200 the Re-DiffiNet train step ran at 4 % of the
matmul peak while the sampler (forward only) ran at 28 %, so some layer's backward is slow. Each row is one
layer at the finest level (widths from FEATURES), timed as ``y = f(x, params)`` (forward) and as the
gradient of ``sum(y * g)`` with respect to x and params (train = forward + backward), median of
--repeats runs after warm-up, with both formulations of the convolutions (``xla``: XLA's native
convolution, what a GPU runs; ``cpu``: 2-D convolutions / a matrix product, models.layers.conv3d). One
line per row as it is measured, one JSON line per row. Imports only jax, flax and numpy.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import device_name, emit, timed  # noqa: E402
from rediffinet_jax.models import layers  # noqa: E402
from rediffinet_jax.models.denoiser import FEATURES, _maxpool2  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def ints(s):
    return tuple(int(x) for x in s.split(","))


def cases(f0: int):
    """(name, input channels, input scale (1: full size, 2: half), function(x, params, dtype), params shapes,
    forward FLOPs per output voxel). The finest level's layers: the denoiser's first conv (cond 4 + x_t 3
    channels), its second, the last decoder block's first (skip + upsampled), the transposed convolution
    into the finest level, max pooling and instance norm."""
    def conv(impl):
        return lambda x, p, dt: layers.conv3d(x.astype(dt), p[0].astype(dt), 1, 1, impl) + p[1].astype(dt)

    def convt(impl):
        return lambda x, p, dt: layers.conv_transpose3d(x.astype(dt), p[0].astype(dt), 2, impl) + p[1].astype(dt)

    def norm(x, p, dt):
        x32 = x.astype(jnp.float32)  # layers.InstanceNorm's arithmetic, parameters as arguments
        mean = jnp.mean(x32, axis=(1, 2, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3), keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * p[0] + p[1]).astype(dt)

    rows = []
    for cin in (7, f0, 2 * f0):
        for impl in ("xla", "cpu"):
            rows.append((f"conv k3 {cin}->{f0} {impl}", cin, 1, conv(impl), [(3, 3, 3, cin, f0), (f0,)],
                         2 * 27 * cin * f0))
    for impl in ("xla", "cpu"):
        rows.append((f"convT k2 {f0}->{f0} {impl}", f0, 2, convt(impl), [(2, 2, 2, f0, f0), (f0,)], 2 * f0 * f0))
    rows.append((f"maxpool2 {f0}", f0, 1, lambda x, p, dt: _maxpool2(x.astype(dt)), [], 0))
    rows.append((f"instance norm {f0}", f0, 1, norm, [(f0,), (f0,)], 0))
    return rows


def bench(name, cin, scale, fn, shapes, flops_per_voxel, size, batch, dtype, repeats):
    k = iter(jax.random.split(jax.random.key(0), 8))
    x = jax.random.normal(next(k), (batch, *(s // scale for s in size), cin), jnp.float32).astype(dtype)
    params = [jax.random.normal(next(k), s, jnp.float32) * 0.05 for s in shapes]
    fwd = jax.jit(lambda x, p: fn(x, p, dtype))
    y = jax.eval_shape(fwd, x, params)
    g = jax.random.normal(next(k), y.shape, jnp.float32).astype(y.dtype)
    # g is an argument: closed over, it would be a constant (folded at compile time, 0.8 GB at full size)
    train = jax.jit(jax.grad(lambda x, p, g: jnp.sum((fn(x, p, dtype) * g).astype(jnp.float32)), argnums=(0, 1)))
    rec = {"bench": "layer", "device": device_name(), "layer": name, "dtype": jnp.dtype(dtype).name,
           "input": list(x.shape), "output": list(y.shape)}
    for what, f, args in (("forward", fwd, (x, params)), ("train", train, (x, params, g))):
        compile_s, t, _ = timed(f, *args, repeats=repeats)
        rec[f"{what}_ms"], rec[f"{what}_compile_s"] = round(1e3 * t, 3), round(compile_s, 2)
    voxels = y.size // y.shape[-1]
    for what, factor in (("forward", 1), ("train", 3)):
        rec[f"{what}_tflops"] = round(factor * flops_per_voxel * voxels / (rec[f"{what}_ms"] / 1e3) / 1e12, 2)
    print(f"{name:22s} {rec['dtype']:8s} forward {rec['forward_ms']:9.2f} ms ({rec['forward_tflops']:7.2f} TFLOP/s)"
          f"   train {rec['train_ms']:9.2f} ms ({rec['train_tflops']:7.2f} TFLOP/s)"
          f"   ratio {rec['train_ms'] / rec['forward_ms']:5.1f}", flush=True)
    emit(rec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=ints, default=(128, 192, 128))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--width", type=int, default=FEATURES[0], help="channels at the finest level")
    p.add_argument("--only", default="", help="rows whose name contains this")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    print(f"layers on {device_name()}, input {a.size} batch {a.batch}", flush=True)
    for dt in a.dtype:
        for row in cases(a.width):
            if a.only in row[0]:
                bench(*row, a.size, a.batch, DTYPES[dt], a.repeats)


if __name__ == "__main__":
    main()
