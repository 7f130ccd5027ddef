"""Imported at start-up by the processes of the tests' multi-process runs (tests/processes.py puts this folder
on their PYTHONPATH): every process writes what it compiles to the persistent JAX cache, not only process 0.

JAX writes cache entries from process 0 alone (on a shared file system, many hosts writing at once contend),
and on the CPU a program's cache key differs between processes, so process 1 compiled every program again in
every run, and process 0 waited for it at the first collective (13 s for the smoke U-Net's step, 26 s for the
refiner's). On one machine with a local cache there is no contention to avoid. If JAX's private function is
gone or renamed, nothing is changed (the runs are slower, not wrong).
"""

try:
    from jax._src import compilation_cache, compiler, config, distributed
except ImportError:  # pragma: no cover - another JAX layout
    compiler = None

_write = getattr(compiler, "_cache_write", None)


def _cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if (
        distributed.global_state.process_id == 0
        or host_callbacks
        or compile_time_secs < config.persistent_cache_min_compile_time_secs.value
    ):
        return _write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend, int(compile_time_secs))


if _write is not None:
    compiler._cache_write = _cache_write
