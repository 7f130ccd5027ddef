"""Test set-up: two fake CPU devices, absl flags parsed (grain workers need it), shared tiny data, and one
JAX compilation cache for every test process and the commands they start.

The cache: the end-to-end tests start train.py, evaluate.py and predict.py dozens of times on the same tiny
config, and compiling is most of each run (a smoke run took 158 s with an empty cache, 67 s with a warm
one, with the same summary.json to the byte). A compiled program is the same binary from the cache as from
the compiler, so no result changes; the key covers the program, the JAX version and the flags.
"""

import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rediffinet-jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import absl.flags  # noqa: E402
import pytest  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

SMALL_SHAPE = (40, 44, 36)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """Six labelled phantoms and one unlabelled one, BraTS layout, 40×44×36 voxels."""
    from rediffinet_jax.data import phantoms

    root = tmp_path_factory.mktemp("phantoms")
    phantoms.write_dataset(root, 6, SMALL_SHAPE, seed=0, n_unlabelled=1)
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The smoke config trained end to end (train.py, both stages, the evaluation): (work directory, seconds,
    output, summary.json as the run left it). Module-scoped: each end-to-end file trains its own once."""
    from e2e import _train

    workdir = tmp_path_factory.mktemp("e2e") / "run"
    t0 = time.time()
    proc = _train(workdir)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the scores as the run left them (later tests evaluate this work directory again in other ways)
    return workdir, elapsed, proc.stdout + proc.stderr, (workdir / "eval" / "summary.json").read_text()
