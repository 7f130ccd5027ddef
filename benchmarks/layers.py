"""Times each kind of layer of the networks alone, forward and forward + backward, at full resolution.

    python benchmarks/layers.py                                  # 128×192×128, batch 2, bfloat16 then float32
    python benchmarks/layers.py --size 16,16,16 --dtype float32  # a CPU

Finds where a slow training step spends its time: on an H200 the Re-DiffiNet train step ran at 4 % of the
matmul peak while the sampler (forward only) ran at 28 %; this found XLA's native transposed convolution
taking 735 ms backward against 4.8 ms forward (bfloat16). Each row is one layer at the finest level
(the denoiser's widths, FEATURES; the U-Net's strided convolution from f0/2), timed as ``y = f(x, params)``
(forward) and as ``sum(y * g)`` with its gradient with respect to x and params (train: forward +
backward), median of --repeats runs after warm-up, in both formulations of the convolutions (``xla``:
XLA's native convolution; ``2d``: 2-D convolutions / a matrix product, models.layers.conv3d). TFLOP/s
count the forward's FLOPs once forward and three times in train. One line per row as it is measured,
one JSON line per row. Imports only jax, flax and numpy.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import device_name, emit, timed  # noqa: E402
from rediffinet_jax.models import layers  # noqa: E402
from rediffinet_jax.models.denoiser import FEATURES, _maxpool2  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def ints(s):
    return tuple(int(x) for x in s.split(","))


def cases(f0: int):
    """(name, input channels, input scale (1: full size, 2: half), function(x, params, dtype), params shapes,
    forward FLOPs per output voxel). The finest level's layers: the denoiser's first conv (cond 4 + x_t 3
    channels), its second, the last decoder block's first (skip + upsampled), a strided convolution
    (the U-Net's downsampling), the transposed convolution into the finest level, max pooling and
    instance norm."""

    def conv(impl, stride=1):
        return lambda x, p, dt: layers.conv3d(x.astype(dt), p[0].astype(dt), stride, 1, impl) + p[1].astype(dt)

    def convt(impl):
        return lambda x, p, dt: layers.conv_transpose3d(x.astype(dt), p[0].astype(dt), 2, impl) + p[1].astype(dt)

    def norm(x, p, dt):  # the model's layer, its parameters made arguments so that they get gradients
        m = layers.InstanceNorm(p[0].shape[0])
        m.scale, m.bias = nnx.Param(p[0]), nnx.Param(p[1])
        return m(x.astype(dt))

    rows = []
    for cin in (7, f0, 2 * f0):
        for impl in layers.CONV_IMPLS:
            rows.append(
                (f"conv k3 {cin}->{f0} {impl}", cin, 1, conv(impl), [(3, 3, 3, cin, f0), (f0,)], 2 * 27 * cin * f0)
            )
    # 2d_sum differs from 2d only in the stride-1 convolution: the others once per distinct formulation
    for impl in ("xla", "2d"):  # the U-Net's downsampling: its output is half size
        rows.append(
            (
                f"conv k3 s2 {f0 // 2}->{f0} {impl}",
                f0 // 2,
                1,
                conv(impl, 2),
                [(3, 3, 3, f0 // 2, f0), (f0,)],
                2 * 27 * f0 // 2 * f0,
            )
        )
    for impl in ("xla", "2d"):
        rows.append((f"convT k2 {f0}->{f0} {impl}", f0, 2, convt(impl), [(2, 2, 2, f0, f0), (f0,)], 2 * f0 * f0))
    rows.append((f"maxpool2 {f0}", f0, 1, lambda x, p, dt: _maxpool2(x.astype(dt)), [], 0))
    rows.append((f"instance norm {f0}", f0, 1, norm, [(f0,), (f0,)], 0))
    return rows


def functions(cin, scale, fn, shapes, size, batch, dtype):
    """Random input x, parameters and output cotangent g for one row, and its jitted ``forward(x, params)``
    and ``train(x, params, g)`` (the loss ``sum(y * g)`` and its gradients)."""
    k = iter(jax.random.split(jax.random.key(0), 8))
    x = jax.random.normal(next(k), (batch, *(s // scale for s in size), cin), jnp.float32).astype(dtype)
    params = [jax.random.normal(next(k), s, jnp.float32) * 0.05 for s in shapes]
    fwd = jax.jit(lambda x, p: fn(x, p, dtype))
    y = jax.eval_shape(fwd, x, params)
    g = jax.random.normal(next(k), y.shape, jnp.float32).astype(y.dtype)
    # g is an argument: closed over, it would be a constant (folded at compile time, 0.8 GB at full size).
    # The loss is returned too: under jax.grad alone a linear layer's forward is dead code, and the H200
    # run's 'train' column (benchmarks/results/h200-2026-11-27-layers.log) was the backward alone.
    train = jax.jit(
        jax.value_and_grad(lambda x, p, g: jnp.sum((fn(x, p, dtype) * g).astype(jnp.float32)), argnums=(0, 1))
    )
    return x, params, g, fwd, train


def bench(name, cin, scale, fn, shapes, flops_per_voxel, size, batch, dtype, repeats):
    x, params, g, fwd, train = functions(cin, scale, fn, shapes, size, batch, dtype)  # g: the output's shape
    rec = {
        "bench": "layer",
        "device": device_name(),
        "layer": name,
        "dtype": jnp.dtype(dtype).name,
        "input": list(x.shape),
        "output": list(g.shape),
    }
    for what, f, args in (("forward", fwd, (x, params)), ("train", train, (x, params, g))):
        compile_s, t, _ = timed(f, *args, repeats=repeats)
        rec[f"{what}_ms"], rec[f"{what}_compile_s"] = round(1e3 * t, 3), round(compile_s, 2)
    voxels = g.size // g.shape[-1]
    for what, factor in (("forward", 1), ("train", 3)):
        rec[f"{what}_tflops"] = round(factor * flops_per_voxel * voxels / (rec[f"{what}_ms"] / 1e3) / 1e12, 2)
    print(
        f"{name:22s} {rec['dtype']:8s} forward {rec['forward_ms']:9.2f} ms ({rec['forward_tflops']:7.2f} TFLOP/s)"
        f"   train {rec['train_ms']:9.2f} ms ({rec['train_tflops']:7.2f} TFLOP/s)"
        f"   ratio {rec['train_ms'] / rec['forward_ms']:5.1f}",
        flush=True,
    )
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
