"""Test set-up: two fake CPU devices, absl flags parsed (grain workers need it), shared tiny data, one smoke
run trained per test run and copied where a test changes it, the longest files first, and one JAX
compilation cache for every test process and the commands they start.

The cache: the end-to-end tests start train.py, evaluate.py and predict.py dozens of times on the same tiny
config, and compiling is most of each run (a smoke run took 158 s with an empty cache, 67 s with a warm
one, with the same summary.json to the byte). A compiled program is the same binary from the cache as from
the compiler, so no result changes; the key covers the program, the JAX version and the flags.
"""

import fcntl
import json
import os
import shutil
import tempfile
import time

from processes import xla_flags  # imports neither jax nor the package

os.environ.setdefault("XLA_FLAGS", xla_flags(2))
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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, worker_id):
    """The smoke config trained end to end once per test run (train.py, both stages, the evaluation), shared
    by the xdist workers of the run: (work directory, seconds, output). The first worker to ask trains it
    while the other waits on the lock; tests use copies (:func:`finished`), never this one."""
    from e2e import _train

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if worker_id != "master" else base) / "smoke"  # the run's folder, not a worker's
    shared.mkdir(exist_ok=True)
    record = shared / "record.json"
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            t0 = time.time()
            proc = _train(shared / "run")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            record.write_text(json.dumps({"seconds": time.time() - t0, "output": proc.stdout + proc.stderr}))
    r = json.loads(record.read_text())
    return shared / "run", r["seconds"], r["output"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smoke_run):
    """A copy of the smoke run for this test file, as if trained there: (work directory, seconds, output,
    summary.json as the run left it). Later tests of the file evaluate it again in other ways."""
    src, seconds, output = smoke_run
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    shutil.copytree(src, workdir)
    for meta in workdir.glob("cache/*/meta.json"):  # the only record naming a path: the case's source files
        meta.write_text(meta.read_text().replace(str(src), str(workdir)))
    return workdir, seconds, output, (workdir / "eval" / "summary.json").read_text()


# --dist loadfile hands whole files to the two workers in collection order (pyproject.toml: no reordering by
# test count, which queued the long end-to-end files last), so the longest go first (every file of over 5 s,
# by its seconds in a warm run), and the short ones fill the end; test_benchmarks.py second: it needs no
# smoke run, so one worker works while the other trains it.
LONGEST_FIRST = (
    "test_train_e2e.py",
    "test_benchmarks.py",
    "test_scoring_e2e.py",
    "test_resume_e2e.py",
    "test_models.py",
    "test_training.py",
    "test_diffusion.py",
    "test_multihost.py",
    "test_conv.py",
    "test_cli_e2e.py",
    "test_pipeline.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order kept
