"""Launching several JAX processes on 127.0.0.1 for the multi-host tests (one CPU device each, gloo)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# LLVM at -O1 instead of -O2 in every test process: the tests' tiny programs take far longer to compile than
# to run, and -O1 compiles them faster with steps as fast (docs/benchmarks.md, Tests); -O0 compiles faster
# still but runs slower and moves a result past a test's tolerance.
XLA_FLAGS = "--xla_backend_optimization_level=1"


def xla_flags(devices: int) -> str:
    """The tests' XLA flags with ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int, **extra) -> dict:
    """The test environment with ``devices`` fake CPU devices and no inherited coordinator settings. A process
    of a multi-process run (``JAX_NUM_PROCESSES`` given) also loads ``tests/multiprocess_site/sitecustomize.py``,
    so that it writes what it compiles to the JAX cache (JAX lets process 0 alone write)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    path = [str(ROOT)] + ([str(ROOT / "tests" / "multiprocess_site")] if "JAX_NUM_PROCESSES" in extra else [])
    out.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(path),
        **extra,
    )
    return out


def start(cmd, **kwargs) -> subprocess.Popen:
    """``cmd`` started with its stdout and stderr in a temporary file, read back by :func:`output`: a pipe
    that nobody reads while the test waits fills at 64 KiB and stops the process where it writes."""
    log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, **kwargs)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    """Everything a process from :func:`start` has written so far."""
    proc.log.seek(0)
    return proc.log.read()


def wait_all(procs, deadline: float, timeout: float) -> list[str]:
    """Waits for every process of :func:`start`; if one fails or time runs out, kills the rest (never
    hangs). Returns their outputs."""
    outs = [None] * len(procs)
    while any(o is None for o in outs):
        for i, p in enumerate(procs):
            if outs[i] is None and p.poll() is not None:
                outs[i] = output(p)
                if p.returncode != 0:
                    for q in procs:
                        q.kill()
        if time.time() > deadline:
            for q in procs:
                q.kill()
            pytest.fail(f"multi-process run did not finish in {timeout} s")
        time.sleep(0.1)
    return outs


def run_distributed(args, n: int = 2, timeout: float = 300) -> list[str]:
    """``python *args`` as ``n`` processes of one JAX distributed run (the environment variables
    ``parallel.maybe_initialize_distributed`` reads), one CPU device each; fails the test unless all exit 0."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        start(
            [sys.executable, *args],
            cwd=ROOT,
            env=env(1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)),
        )
        for i in range(n)
    ]
    outs = wait_all(procs, time.time() + timeout, timeout)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs
