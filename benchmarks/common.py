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


def matmul_peak(dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a square matrix multiply (n = 8192 on accelerators, 2048 on CPU)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    _, t, _ = timed(f, a, repeats=5)
    return 2 * n**3 / t


def peak_memory() -> int | None:
    """Peak bytes in use on device 0 where the backend reports it (GPU), else None."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
