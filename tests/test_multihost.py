"""Two processes on 127.0.0.1 (one CPU device each, gloo collectives) train like one with two devices."""

import sys
import time

import numpy as np
import pytest
from processes import ROOT, Forked, command, distributed_env, env, free_port, output, run_distributed, start, wait_all

from rediffinet_jax.data import brats, pipeline

WORKER = str(ROOT / "tests" / "multihost_worker.py")
TIMEOUT = 240


@pytest.fixture(scope="module")
def cache(phantom_root, tmp_path_factory):
    cases = [c for c in brats.discover_cases(phantom_root) if c.seg is not None]
    folder = tmp_path_factory.mktemp("cache")
    pipeline.prepare_cache(cases, folder, "zscore_rescale", progress=False)
    return folder


def test_two_processes_match_one_process_with_two_devices(cache, tmp_path):
    one = command([WORKER, cache, tmp_path / "one"], TIMEOUT)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    outs = run_distributed([WORKER, cache, tmp_path / "two"], 2, TIMEOUT)  # coordinator from the environment
    assert "process 1 of 2: 2 devices" in outs[1]
    import json

    run = json.loads((tmp_path / "two" / "run" / "done.json").read_text())["run"]  # written by process 0
    assert len(run) == 32 and all(f"run {run}, done" in o for o in outs)  # and returned by both
    a, b = np.load(tmp_path / "one" / "params.npz"), np.load(tmp_path / "two" / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert (tmp_path / "two" / "run" / "checkpoints" / "3").is_dir()  # saved by both processes together


def test_a_dead_process_does_not_hang_the_other(cache, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    alive = Forked([WORKER, cache, tmp_path, coordinator, "2", "0"], env(1))
    dead = start([sys.executable, "-c", "raise SystemExit(3)"])
    wait_all([alive, dead], time.time() + TIMEOUT, TIMEOUT)  # only a hang reaches the timeout
    assert dead.returncode == 3
    assert alive.returncode != 0  # killed once its partner died, instead of waiting for it forever


def test_one_failing_process_stops_every_process():
    """Process 1 meets a bad case while process 0 waits for it in a collective: both must end (JAX's heartbeat,
    parallel.HEARTBEAT_S, about a minute; only a hang reaches the wait's timeout), non-zero, and process 1's
    message names the case."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [Forked([ROOT / "tests" / "failing_worker.py"], distributed_env(coordinator, 2, i)) for i in range(2)]
    outs = []
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)  # only a hang reaches it (heartbeat: ~1 minute)
            outs.append(output(p))
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode not in (0, None) for p in procs), outs
    assert "error (process 1 of 2): cannot read NIfTI (test) (case BraTS-GLI-00042-000" in outs[1]
    assert "passed a barrier" not in outs[0]


@pytest.mark.parametrize("forked", [False, True])
def test_a_process_writing_more_than_a_pipe_holds_is_not_stopped(tmp_path, forked):
    """The tests' processes, plain (:func:`start`) or forked, write to a file, not a pipe: one that writes
    1 MB (a pipe holds 64 KiB and nobody reads it while the test waits) finishes, and all of it comes back."""
    script = tmp_path / "write.py"
    script.write_text("import sys\nsys.stdout.write('x' * 1_000_000)\nprint('end')\n")
    proc = Forked([script], env(1)) if forked else start([sys.executable, script])
    (out,) = wait_all([proc], time.time() + TIMEOUT, TIMEOUT)  # only a blocked write reaches the timeout
    assert proc.returncode == 0 and out == "x" * 1_000_000 + "end\n"
