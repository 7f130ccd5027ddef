"""What the end-to-end test files share: the smoke config, how they start train.py and the other commands,
and small readers (the smoke run they read is conftest.py's ``finished`` fixture)."""

import functools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from processes import env, start

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "configs/rediffinet.py:smoke"


# The commands run in processes forked from a server that has imported these once (the standard library's
# forkserver): each command's process starts with them loaded instead of importing them again, a few
# seconds each time, dozens of times per test run. Nothing in them starts JAX's backend or a thread, so a
# fork is as fresh as a new interpreter for what the commands do; a command that is killed or that must be
# a process of its own (the kill tests, the multi-process runs) is still started with subprocess.
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


def _train(workdir, *args, wait=True, timeout=300):
    cmd = ["train.py", f"--config={SMOKE}", f"--workdir={workdir}", *args]
    if not wait:
        return start([sys.executable, *cmd], cwd=ROOT, env=env(2))
    return _command(cmd, timeout)


def _run(script, *args):
    return _command([script, *args], 300)


def _command(cmd, timeout) -> subprocess.CompletedProcess:
    """``python *cmd`` in ROOT, as a fork of the preloaded server: its exit status and its whole stdout and
    stderr (fds 1 and 2, so native output too), as subprocess.run(capture_output=True, text=True) gives."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        proc = _forkserver().Process(target=_script, args=([str(c) for c in cmd], env(2), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        read = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
    return subprocess.CompletedProcess(cmd, proc.exitcode, *read)


def _script(cmd, env, out, err):
    """In the forked process: the script as ``__main__`` with ``cmd`` as its argv, in ROOT, with ``env``;
    leaves with the script's exit status after its exit handlers, as an interpreter would."""
    import atexit
    import runpy
    import traceback

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
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


def rows_of(workdir, model):
    import csv

    out = []
    for k in (0, 1):
        with open(workdir / "eval" / model / f"fold_{k}" / "cases.csv") as f:
            out += list(csv.DictReader(f))
    return out


def _predict_inputs(workdir, folder, n=2):
    """The first ``n`` phantom cases of ``workdir`` as new cases (without labels) in ``folder``; their ids."""
    folder.mkdir()
    ids = sorted(p.name for p in (workdir / "data").iterdir())[:n]
    for c in ids:
        shutil.copytree(workdir / "data" / c, folder / c)
        (folder / c / f"{c}-seg.nii.gz").unlink()
    return ids


def check_scores_against_files(workdir, k, rows) -> int:
    """Recomputes each row from the written label maps; returns the change in wrong WT voxels over the
    fold's cases, |P ⊕ G| − |U ⊕ G|, counted directly."""
    from rediffinet_jax import metrics
    from rediffinet_jax.labels import REGIONS, labels_to_regions

    def regions(path):
        return labels_to_regions(np.rint(nib.load(str(path)).get_fdata()).astype(np.uint8)).astype(bool)

    wt_net = 0
    for cid in sorted({r["case"] for r in rows}):
        pred = regions(workdir / "eval" / "rediffinet" / f"fold_{k}" / "pred" / f"{cid}.nii.gz")
        gt = regions(workdir / "data" / cid / f"{cid}-seg.nii.gz")
        unet = regions(workdir / "unet" / "oof" / f"{cid}.nii.gz")
        flips = {f["region"]: f for f in metrics.flip_counts(pred, unet, gt)}
        for i, region in enumerate(REGIONS):
            (row,) = [r for r in rows if r["case"] == cid and r["region"] == region]
            assert float(row["dice"]) == pytest.approx(metrics.dice(pred[..., i], gt[..., i]), abs=1e-12)
            assert [int(row[c]) for c in metrics.FLIP_KEYS] == [flips[region][c] for c in metrics.FLIP_KEYS]
        wt_net += int((pred[..., 0] ^ gt[..., 0]).sum()) - int((unet[..., 0] ^ gt[..., 0]).sum())
    return wt_net
