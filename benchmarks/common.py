"""Shared by the benchmarks: timing, the device's matmul peak, peak memory, one JSON line.

Imports only jax and numpy (the GPU machines have no grain, nibabel or ml_collections).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int = 5):
    """(compile + first run seconds, median steady-state seconds over ``repeats``, last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def matmul_peak(dtype, n: int | None = None, products: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matrix multiply of random normal values: the best of ``repeats`` runs of
    ``products`` back-to-back products (n = 8192 and 20 products, about 30 ms, on accelerators; 2048 and
    2 on the CPU), after as many again to warm up.

    Random, not ones: on an H200 a product of ones ran at 647–706 TFLOP/s in bfloat16 where the device
    notes give 769–798 on random data. Best of several runs of many products, not the median of single
    ones: one 1.4 ms product five times read 521–684 TFLOP/s across the processes of one H200 run."""
    cpu = jax.default_backend() == "cpu"
    n = n or (2048 if cpu else 8192)
    products = products or (2 if cpu else 20)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready([f(a) for _ in range(products)])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([f(a) for _ in range(products)])
        best = min(best, (time.perf_counter() - t0) / products)
    return 2 * n**3 / best


def peak_memory() -> int | None:
    """Peak bytes in use on device 0 where the backend reports it (GPU), else None."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_memory(jitted, *args) -> dict:
    """Compiles ``jitted`` for ``args`` without running it; seconds and XLA's planned memory in GiB
    (temporaries, arguments, outputs) where the backend reports them: a check that a size fits before
    spending device time on it."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    rec = {"compile_s": round(time.perf_counter() - t0, 3)}
    m = compiled.memory_analysis()
    for key in ("temp", "argument", "output"):
        value = getattr(m, f"{key}_size_in_bytes", None) if m is not None else None
        rec[f"{key}_gib"] = round(value / 2**30, 3) if value is not None else None
    return rec


def print_memory(name: str, rec: dict) -> None:
    print(
        f"{name}: compile {rec['compile_s']:.1f} s, XLA's plan: temporaries {rec['temp_gib']} GiB, "
        f"arguments {rec['argument_gib']} GiB, outputs {rec['output_gib']} GiB"
    )


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def machine() -> str:
    """This machine in words, for result files: CPU model, cores, memory, OS architecture, Python, jax."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        mem = "? GiB"
    return (
        f"{os.cpu_count()}-core {model} ({platform.machine()}), {mem}, Python {platform.python_version()}, "
        f"jax {jax.__version__}"
    )


def commit(root) -> str:
    """The git commit of the checkout at ``root`` (with ``+changes`` when its tracked files differ, leaving out
    the result records and markdown that the benchmarks themselves rewrite between runs), or ``unknown``
    outside git."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        own = [":(exclude)benchmarks/results", ":(exclude)*.md"]  # e.g. the demo's record after its first seed
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", *own], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def run_measured(cmd: list, cwd, log_path) -> tuple[int, float, float]:
    """Runs ``cmd`` with its output to ``log_path``: (exit code, wall seconds, that process's own peak
    resident memory in GiB; ``os.wait4``, not the largest child so far)."""
    import os
    import subprocess
    import time

    t0 = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 2**20  # KiB -> GiB
