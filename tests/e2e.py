"""What the end-to-end test files share: the smoke config, how they start train.py and the other commands,
and small readers (the smoke run they read is conftest.py's ``finished`` fixture)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "configs/rediffinet.py:smoke"


def _train(workdir, *args, wait=True, timeout=300):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "train.py", f"--config={SMOKE}", f"--workdir={workdir}", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _run(script, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


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
