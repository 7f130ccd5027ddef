"""How the tests start processes: the commands forked from a server that imported the heavy packages once,
a few plain subprocesses, and several JAX processes of one run on 127.0.0.1 (one CPU device each, gloo).
Imports neither jax nor the package (conftest.py imports it)."""

import functools
import multiprocessing
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


# The commands run in processes forked from a server that has imported these once (the standard library's
# forkserver): each command's process starts with them loaded instead of importing them again, about 3 s of
# CPU each time, dozens of times per test run. Nothing in them starts JAX's backend or a thread, so a fork is
# as fresh as a new interpreter for what the commands do, the processes of a distributed run included (each
# initialises its own backend and coordinator client after the fork).
PRELOAD = [
    "jax",
    "flax.nnx",
    "optax",
    "orbax.checkpoint",
    "grain",
    "nibabel",
    "scipy.ndimage",
    "surface_distance",
    "ml_collections.config_flags",
    "absl.app",
    "tqdm",
    "matplotlib.pyplot",  # the evaluation's figures (Agg: no display, no thread)
    "rediffinet_jax.cli",
    "rediffinet_jax.driver",
    "rediffinet_jax.evaluation",
]


@functools.cache
def _forkserver():
    """The forkserver context, its server started with PRELOAD imported at the first command."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class Forked:
    """``python *cmd`` (a script and its arguments) forked from the preloaded server with ``env``: what the
    tests use of a subprocess.Popen (poll, wait, kill, send_signal, pid, returncode). Its stdout and stderr
    go to one temporary file (:func:`output`), or stderr to a second one (``stderr``) if ``apart``."""

    def __init__(self, cmd, env: dict, apart: bool = False):
        self.cmd = [str(c) for c in cmd]
        self._paths = [_temporary() for _ in range(2 if apart else 1)]
        self.log = open(self._paths[0], encoding="utf-8", errors="replace")
        err = self._paths[1] if apart else None
        self._proc = _forkserver().Process(target=_script, args=(self.cmd, env, self._paths[0], err))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self):
        return self._proc.exitcode

    def poll(self):
        return self._proc.exitcode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return self._proc.exitcode

    def kill(self):
        if self._proc.exitcode is None:
            self._proc.kill()

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    @property
    def stderr(self) -> str:
        return Path(self._paths[-1]).read_text(errors="replace") if len(self._paths) > 1 else ""

    def __del__(self):  # the files go with the object (paths made first: a failed start leaves none)
        if hasattr(self, "log"):
            self.log.close()
        for path in getattr(self, "_paths", []):
            os.unlink(path)


def _temporary() -> str:
    fd, path = tempfile.mkstemp(prefix="command-", suffix=".log")
    os.close(fd)
    return path


def command(cmd, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *cmd`` in ROOT, forked (:class:`Forked`) with the tests' two devices: its exit status and its
    whole stdout and stderr (fds 1 and 2, so native output too), as subprocess.run(capture_output=True,
    text=True) gives."""
    proc = Forked(cmd, env(2), apart=True)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.cmd, proc.returncode, output(proc), proc.stderr)


def _script(cmd, env, out, err):
    """In the forked process: the script as ``__main__`` with ``cmd`` as its argv, in ROOT, with ``env``
    (and the multi-process sitecustomize if env's PYTHONPATH names it); leaves with the script's exit status
    after its exit handlers, as an interpreter would."""
    import atexit
    import runpy
    import traceback

    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if err else 1, 2)  # no err: both in out
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    site = ROOT / "tests" / "multiprocess_site"
    if str(site) in env.get("PYTHONPATH", "").split(os.pathsep):  # as the interpreter would at start-up
        runpy.run_path(str(site / "sitecustomize.py"))
    sys.argv = list(cmd)
    sys.path.insert(0, str(ROOT / Path(cmd[0]).parent))
    code = 0
    try:
        runpy.run_path(cmd[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter treats it: None is 0, a message is printed and is 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(cmd, **kwargs) -> subprocess.Popen:
    """``cmd`` as a plain subprocess (a command that is not a Python script), its stdout and stderr in a
    temporary file read back by :func:`output`: a pipe that nobody reads while the test waits fills at 64 KiB
    and stops the process where it writes."""
    log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, **kwargs)
    proc.log = log
    return proc


def output(proc) -> str:
    """Everything a process of :func:`start` or :class:`Forked` has written to its stdout so far."""
    proc.log.seek(0)
    return proc.log.read()


def distributed_env(coordinator: str, n: int, i: int) -> dict:
    """The environment of process ``i`` of ``n`` of a distributed run, one CPU device."""
    return env(1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))


def wait_all(procs, deadline: float, timeout: float) -> list[str]:
    """Waits for every process (:func:`start`, :class:`Forked`); if one fails or time runs out, kills the
    rest (never hangs). Returns their outputs."""
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
    ``parallel.maybe_initialize_distributed`` reads), forked, one CPU device each; fails the test unless all
    exit 0."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [Forked(args, distributed_env(coordinator, n, i)) for i in range(n)]
    outs = wait_all(procs, time.time() + timeout, timeout)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs
