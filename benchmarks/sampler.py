"""Times the compiled Re-DiffiNet sampler on one window: encoder once, S samples × K DDIM steps.

    python benchmarks/sampler.py                                   # paper size, float32
    python benchmarks/sampler.py --size 64,64,64 --steps 10 --samples 2 --dtype bfloat16
    python benchmarks/sampler.py --features 8,8,16,32,64,8 --size 32,32,32   # tiny, for a laptop

Prints a table and one JSON line: compile time, median time per window and per DDIM step over
--repeats runs after warm-up (block_until_ready), voxels/s, the FLOP count from the architecture
(rediffinet_jax.flops), achieved TFLOP/s and its fraction of the measured matmul peak, peak memory.
With --compile_only it compiles without running and prints XLA's memory plan (does a size fit?); with
--profile, one more window runs under the profiler (benchmarks/hlo_profile.py reads it).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import compiled_memory, device_name, emit, matmul_peak, peak_memory, print_memory, timed  # noqa: E402
from benchmarks.hlo_profile import capture  # noqa: E402
from rediffinet_jax import (
    compiling,  # noqa: E402
    diffusion,  # noqa: E402
)
from rediffinet_jax.flops import diffusion_flops  # noqa: E402
from rediffinet_jax.models.denoiser import FEATURES, DiffusionNet  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def ints(s):
    return tuple(int(x) for x in s.split(","))


def _record(a, cond_channels: int, compile_s: float, window_s: float) -> dict:
    """The timing's JSON record: seconds, voxels per second, work and its fraction of the matmul peak."""
    fl = diffusion_flops(a.size, cond_channels, 3, a.features)
    total = fl["encoder"] + a.steps * a.samples * fl["denoiser"]
    peak = matmul_peak(DTYPES[a.dtype])
    return {
        "bench": "sampler",
        "device": device_name(),
        **{k: getattr(a, k) for k in ("dtype", "size", "steps", "samples", "features")},
        "compile_s": round(compile_s, 3),
        "window_s": window_s,
        "step_s": window_s / a.steps,
        "voxels_per_s": a.samples * a.steps * (a.size[0] * a.size[1] * a.size[2]) / window_s,
        "tflop_per_window": total / 1e12,
        "tflops": total / window_s / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "fraction_of_peak": total / window_s / peak,
        "peak_memory_gib": (peak_memory() or 0) / 2**30 or None,
    }


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=ints, default=(128, 192, 128))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--chunk", type=int, default=0, help="samples per sequential chunk (0: all at once)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--features", type=ints, default=FEATURES)
    p.add_argument("--condition", default="concat", choices=diffusion.CONDITIONS)
    p.add_argument("--fusion", default="mean", choices=sorted(diffusion.FUSIONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile_only", action="store_true", help="compile, print XLA's memory plan, do not run")
    p.add_argument(
        "--profile",
        default="",
        metavar="PREFIX",
        help="also profile one window: PREFIX-DTYPE.{trace.json.gz,hlo.txt.gz}",
    )
    return p.parse_args(argv)


def main(argv=None):
    a = _parse(argv)
    variant = diffusion.Variant(a.condition, "discrepancy" if a.condition != "image" else "mask")
    # made eagerly: under nnx.jit the initializers compile as one program (15.6 s on the CPU at tiny widths)
    model = DiffusionNet(variant.cond_channels, 3, a.features, DTYPES[a.dtype], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cond = jax.random.uniform(jax.random.key(1), (1, *a.size, variant.cond_channels))

    @compiling.jit
    def run(state, cond, key):
        return diffusion.sample(nnx.merge(graphdef, state), cond, key, a.steps, a.samples, a.fusion, a.chunk or None)[
            "y"
        ]

    if a.compile_only:
        rec = {
            "bench": "sampler_memory",
            "device": device_name(),
            **{k: getattr(a, k) for k in ("dtype", "size", "steps", "samples", "chunk")},
            **compiled_memory(run, state, cond, jax.random.key(2)),
        }
        print_memory(f"sampler {a.dtype} {a.size} K={a.steps} S={a.samples} chunk={a.chunk}", rec)
        emit(rec)
        return rec
    compile_s, window_s, _ = timed(run, state, cond, jax.random.key(2), repeats=a.repeats)
    if a.profile:  # one more window under the profiler, after the timing so that it cannot skew it
        prefix = f"{a.profile}-{a.dtype}"
        capture(
            lambda: jax.block_until_ready(run(state, cond, jax.random.key(3))),
            run.lower(state, cond, jax.random.key(3)).compile().as_text(),
            prefix,
        )
        print(f"profile of one window: {prefix}.trace.json.gz, {prefix}.hlo.txt.gz (benchmarks/hlo_profile.py)")
    rec = _record(a, variant.cond_channels, compile_s, window_s)
    print(f"sampler on {rec['device']}, {a.dtype}, window {a.size}, K={a.steps}, S={a.samples}")
    print(f"  compile + first run   {compile_s:8.2f} s")
    print(f"  one window            {window_s:8.3f} s   ({rec['step_s']:.4f} s per DDIM step over S samples)")
    print(
        f"  work                  {rec['tflop_per_window']:8.2f} TFLOP  -> {rec['tflops']:.2f} TFLOP/s, "
        f"{100 * rec['fraction_of_peak']:.1f} % of the measured matmul peak ({rec['matmul_peak_tflops']:.1f} TFLOP/s)"
    )
    emit(rec)
    return rec


if __name__ == "__main__":
    main()
