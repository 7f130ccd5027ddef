"""train.py end to end on the smoke config (2 folds, tiny phantoms), as a user runs it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "configs/rediffinet.py:smoke"


def _train(workdir, *args, wait=True, timeout=300):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "train.py", f"--config={SMOKE}", f"--workdir={workdir}", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    t0 = time.time()
    proc = _train(workdir)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, elapsed, proc.stdout + proc.stderr


def test_two_stage_run(finished):
    workdir, elapsed, out = finished
    assert elapsed < 180
    assert "generated phantom" in out
    for stage in ("unet", "rediffinet"):
        for k in (0, 1):
            assert (workdir / stage / f"fold_{k}" / "done.json").is_file()
            assert (workdir / stage / f"fold_{k}" / "metrics.jsonl").is_file()
    assert (workdir / "splits.json").is_file() and (workdir / "config.json").is_file()
    oof = sorted((workdir / "unet" / "oof").glob("*.nii.gz"))
    assert len(oof) == 6
    case = oof[0].name[: -len(".nii.gz")]
    src = nib.load(str(workdir / "data" / case / f"{case}-t1n.nii.gz"))
    pred = nib.load(str(oof[0]))
    np.testing.assert_array_equal(pred.affine, src.affine)
    assert pred.shape == src.shape and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def test_second_run_does_nothing(finished):
    workdir = finished[0]
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    proc = _train(workdir)
    assert proc.returncode == 0
    assert "step" not in proc.stdout.replace("stage-folds", "")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_conflicting_config_is_refused(finished):
    proc = _train(finished[0], "--config.unet.lr=0.5")
    assert proc.returncode == 2
    assert "unet.lr" in proc.stdout and "--overwrite" in proc.stdout


def test_unknown_key_and_missing_root(tmp_path):
    proc = _train(tmp_path / "w", "--config.unet.stepz=3")
    assert proc.returncode == 2 and "unet.stepz" in proc.stderr and "unet.steps" in proc.stderr
    proc = _train(tmp_path / "w", f"--config.data.root={tmp_path / 'nope'}")
    assert proc.returncode == 2 and "does not exist" in proc.stdout


def test_killed_in_stage_two_resumes(finished, tmp_path):
    """SIGKILL once stage 2 has its first checkpoint; the same command then finishes with every step."""
    src = finished[0]
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("data", "cache", "unet", "splits.json"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, workdir / name)
    proc = _train(workdir, "--config.diffusion.steps=8", wait=False)
    ckpt = workdir / "rediffinet" / "fold_0" / "checkpoints" / "2"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (workdir / "rediffinet" / "fold_1" / "done.json").exists()
    again = _train(workdir, "--config.diffusion.steps=8")
    assert again.returncode == 0, again.stdout[-2000:]
    assert "resuming from step" in again.stdout
    for k in (0, 1):
        lines = (workdir / "rediffinet" / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()
        assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, 9))
        assert (workdir / "rediffinet" / f"fold_{k}" / "done.json").is_file()
