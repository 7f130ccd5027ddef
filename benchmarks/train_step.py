"""Times one sharded, jitted training step of stage 1 (U-Net) and stage 2 (Re-DiffiNet).

    python benchmarks/train_step.py                        # paper sizes, batch 2, float32
    python benchmarks/train_step.py --dtype bfloat16 --remat
    python benchmarks/train_step.py --unet_size 64,64,64 --diff_size 64,64,64 --tiny   # a CPU

Compile time, median step time after warm-up, achieved TFLOP/s (3 × the architecture's forward FLOPs
per sample: forward + backward) and its fraction of the measured matmul peak, peak memory; a table and
one JSON line per stage; with --compile_only, XLA's memory plan without running; with --profile, one more
step under the profiler (benchmarks/hlo_profile.py reads it). Imports neither grain
nor ml_collections (absent on the GPU machines).
"""

import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import compiled_memory, device_name, emit, matmul_peak, peak_memory, print_memory, timed  # noqa: E402
from benchmarks.hlo_profile import capture  # noqa: E402
from rediffinet_jax import parallel  # noqa: E402
from rediffinet_jax.flops import diffusion_flops, unet_flops  # noqa: E402
from rediffinet_jax.models.denoiser import FEATURES  # noqa: E402
from rediffinet_jax.models.unet import DEFAULT_FILTERS  # noqa: E402
from rediffinet_jax.stages import DTYPES, DiffusionStage, UNetStage  # noqa: E402
from rediffinet_jax.training import Trainer  # noqa: E402


def ints(s):
    return tuple(int(x) for x in s.split(","))


def unet_cfg(a):
    return SimpleNamespace(
        filters=a.filters,
        deep_supervision=2 if len(a.filters) > 3 else 1,
        foreground_channel=True,
        dtype=a.dtype,
        remat=a.remat,
        lr=3e-4,
        weight_decay=1e-4,
        steps=1000,
        warmup_frac=0.02,
    )


def diff_cfg(a):
    return SimpleNamespace(
        model="rediffinet",
        features=a.features,
        dtype=a.dtype,
        remat=a.remat,
        lr=1e-4,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        warmup_frac=0.15,
        steps=1000,
        clip_norm=0.0,
        loss_weights=(1.0, 1.0, 1.0),
    )


def _batch(size, batch: int, mesh) -> dict:
    """A random global batch: 4 image channels, 3 sparse region masks and 3 sparse U-Net masks (uint8)."""
    k = jax.random.key(0)
    local = {
        "image": jax.random.uniform(k, (batch, *size, 4)),
        "regions": (jax.random.uniform(k, (batch, *size, 3)) > 0.9).astype(jnp.uint8),
        "unet": (jax.random.uniform(jax.random.key(1), (batch, *size, 3)) > 0.9).astype(jnp.uint8),
    }
    return parallel.global_batch({kk: jax.device_get(v) for kk, v in local.items()}, mesh)


def bench(stage, size, batch, flops_per_sample, a, peak):
    trainer = Trainer(stage, progress=False)
    state = trainer.init_state(0)
    k = jax.random.key(0)
    gb = _batch(size, batch, trainer.mesh)
    what = dict(dtype=a.dtype, remat=a.remat, size=size, batch=batch)
    holder = {"state": state}
    if a.compile_only:
        rec = {
            "bench": f"train_step_memory_{stage.name}",
            "device": device_name(),
            **what,
            **compiled_memory(trainer.step, state, gb, k, trainer.lr(0)),
        }
        print_memory(f"{stage.name} {a.dtype} remat={int(a.remat)} {size} batch {batch}", rec)
        emit(rec)
        return

    def one(gb):  # donated state: thread it through
        holder["state"], m = trainer.step(holder["state"], gb, k, trainer.lr(0))
        return m["loss"]

    compile_s, step_s, _ = timed(one, gb, repeats=a.repeats)
    if a.profile:  # one more step under the profiler, after the timing so that it cannot skew it
        prefix = f"{a.profile}-{stage.name}-{a.dtype}"
        capture(
            lambda: jax.block_until_ready(one(gb)),
            trainer.step.lower(holder["state"], gb, k, trainer.lr(0)).compile().as_text(),
            prefix,
        )
        print(f"profile of one step: {prefix}.trace.json.gz, {prefix}.hlo.txt.gz (benchmarks/hlo_profile.py)")
    total = 3 * flops_per_sample * batch
    rec = {
        "bench": f"train_step_{stage.name}",
        "device": device_name(),
        **what,
        "compile_s": round(compile_s, 3),
        "step_s": step_s,
        "tflop_per_step": total / 1e12,
        "tflops": total / step_s / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "fraction_of_peak": total / step_s / peak,
        "peak_memory_gib": (peak_memory() or 0) / 2**30 or None,
    }
    _print(stage.name, rec)
    emit(rec)


def _print(name: str, rec: dict) -> None:
    print(
        f"{name:10s} {rec['dtype']:8s} remat={int(rec['remat'])} {str(rec['size']):16s} batch {rec['batch']}: "
        f"compile {rec['compile_s']:7.2f} s, "
        f"step {rec['step_s']:.3f} s, {rec['tflops']:.2f} TFLOP/s ({100 * rec['fraction_of_peak']:.1f} % of peak)"
        + (f", peak memory {rec['peak_memory_gib']:.1f} GiB" if rec["peak_memory_gib"] else "")
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["unet", "diffusion", "both"], default="both")
    p.add_argument("--unet_size", type=ints, default=(128, 128, 128))
    p.add_argument("--diff_size", type=ints, default=(128, 192, 128))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--remat", action="store_true", help="jax.checkpoint per block (less memory, more compute)")
    p.add_argument("--tiny", action="store_true", help="small widths, for a CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile_only", action="store_true", help="compile, print XLA's memory plan, do not run")
    p.add_argument(
        "--profile",
        default="",
        metavar="PREFIX",
        help="also profile one step: PREFIX-STAGE-DTYPE.{trace.json.gz,hlo.txt.gz}",
    )
    a = p.parse_args(argv)
    a.filters = (8, 16, 32, 64) if a.tiny else DEFAULT_FILTERS
    a.features = (8, 8, 16, 32, 64, 8) if a.tiny else FEATURES
    peak = None
    if not a.compile_only:
        peak = matmul_peak(DTYPES[a.dtype])
        print(f"device {device_name()}, measured matmul peak {peak / 1e12:.1f} TFLOP/s ({a.dtype})")
    if a.stage in ("unet", "both"):
        bench(UNetStage(unet_cfg(a)), a.unet_size, a.batch, unet_flops(a.unet_size, 5, a.filters), a, peak)
    if a.stage in ("diffusion", "both"):
        fl = diffusion_flops(a.diff_size, 7, 3, a.features)
        bench(DiffusionStage(diff_cfg(a)), a.diff_size, a.batch, fl["encoder"] + fl["denoiser"], a, peak)


if __name__ == "__main__":
    main()
