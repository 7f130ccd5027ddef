"""The work-directory lock: one command at a time, a killed holder never blocks the next."""

import os
import signal
import subprocess
import sys

import pytest

from rediffinet_jax import workdir
from rediffinet_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(folder, seconds=60):
    """A process that takes the lock of ``folder`` and sleeps; returns once it holds it."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from rediffinet_jax import workdir\n"
        "with workdir.lock(sys.argv[2], 'holder-test'):\n    print('held', flush=True); time.sleep(float(sys.argv[3]))"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, ROOT, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_command_is_refused_with_the_holder(tmp_path):
    p = _holder(tmp_path / "w")
    try:
        with pytest.raises(ConfigError, match=rf"in use by holder-test \(host .+, pid {p.pid}, since "):
            with workdir.lock(tmp_path / "w"):
                pass
    finally:
        p.kill()
        p.wait()


def test_killed_holder_does_not_block(tmp_path):
    p = _holder(tmp_path / "w")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with workdir.lock(tmp_path / "w", "next"):  # taken over at once
        assert '"command": "next"' in (tmp_path / "w" / workdir.LOCK_FILE).read_text()


def test_lock_is_released_after_the_block_and_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with workdir.lock(tmp_path):
            raise RuntimeError("boom")
    with workdir.lock(tmp_path):  # the lock is non-blocking: a lock still held would raise ConfigError here
        pass


def test_unwritable_or_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        with workdir.lock(tmp_path / "nope", create=False):
            pass
    assert not (tmp_path / "nope").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            bad = tmp_path / "file"
            bad.write_text("")
            target = bad / "w"
        else:
            target = ro / "w"
        with pytest.raises(ConfigError, match="cannot write to"):
            with workdir.lock(target):
                pass
    finally:
        ro.chmod(0o700)


def test_a_refiner_of_0_2_0_resumes(tmp_path):
    """0.2.0 saved diffusion.condition and .target beside diffusion.model; now the model implies them. A
    stage folder saved so resumes when they are what the model implies, and is refused when not."""
    import json

    from ml_collections import ConfigDict

    from rediffinet_jax import stages

    folder = tmp_path / "rediffinet"
    folder.mkdir()
    settings = {"seed": 0, "diffusion": {"model": "rediffinet", "lr": 0.002}}
    implied = stages.implied_settings(ConfigDict(settings))
    assert implied == {"diffusion.condition": "concat", "diffusion.target": "discrepancy"}
    old = {"seed": 0, "diffusion.model": "rediffinet", "diffusion.lr": 0.002}
    for condition, ok in (("concat", True), ("image", False)):
        saved = {**old, "diffusion.condition": condition, "diffusion.target": "discrepancy"}
        (folder / workdir.STAGE_CONFIG).write_text(json.dumps(saved))
        if ok:
            workdir.check_stage_config(folder, settings, overwrite=False, implied=implied)
        else:
            with pytest.raises(ConfigError, match="diffusion.condition: 'image' -> None"):
                workdir.check_stage_config(folder, settings, overwrite=False, implied=implied)
    with pytest.raises(ConfigError, match="diffusion.condition: 'concat' -> None"):  # what 0.3 said without it
        (folder / workdir.STAGE_CONFIG).write_text(json.dumps({**old, "diffusion.condition": "concat"}))
        workdir.check_stage_config(folder, settings, overwrite=False)


def test_damaged_record_is_named(tmp_path):
    """A record cut off (a full disk, an editor) is an error naming the file and the way out, not a traceback."""
    path = tmp_path / "eval" / "trained.json"
    path.parent.mkdir()
    path.write_text('{"training": {"run": ')
    with pytest.raises(ConfigError, match=r"trained\.json is damaged .*delete it"):
        workdir.read_json(path)
    assert workdir.read_json(tmp_path / "none.json", {}) == {}


def test_overwrite_of_one_fold_with_new_settings_deletes_nothing(tmp_path):
    """--overwrite --fold 0 with changed settings would have deleted every fold: refused, every fold kept."""
    stage = tmp_path / "rediffinet"
    workdir.check_stage_config(stage, {"diffusion": {"lr": 1.0}}, overwrite=False, log=lambda m: None)
    for k in (0, 1):
        (stage / f"fold_{k}").mkdir()
        (stage / f"fold_{k}" / "done.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"--overwrite --fold 0 would delete the other folds"):
        workdir.check_stage_config(stage, {"diffusion": {"lr": 2.0}}, True, lambda m: None, only_fold=0)
    assert all((stage / f"fold_{k}" / "done.json").is_file() for k in (0, 1))
    workdir.check_stage_config(stage, {"diffusion": {"lr": 1.0}}, True, lambda m: None, only_fold=0)  # same: fine
    workdir.check_stage_config(stage, {"diffusion": {"lr": 2.0}}, True, lambda m: None)  # every fold: retrained
    assert not (stage / "fold_1").exists()


def test_torn_and_incomplete_case_rows_are_rescored(tmp_path):
    """cases.csv after a kill mid-write: a case with two of its three rows and a last row cut off. Both cases
    read as not scored (so they are scored again), and repair rewrites the file with the whole case only."""
    from rediffinet_jax.case_rows import CASE_COLUMNS, append_rows, read_rows

    def row(case, region):
        return {k: 0 for k in CASE_COLUMNS} | {"case": case, "region": region, "convention": "brats2023"}

    path = tmp_path / "cases.csv"
    append_rows(path, [row("A", r) for r in ("WT", "TC", "ET")] + [row("B", r) for r in ("WT", "TC")])
    with open(path, "a") as f:
        f.write("C,WT,0.5,1")  # cut off mid-row
    assert sorted({r["case"] for r in read_rows(path)}) == ["A"]
    assert len(path.read_text().splitlines()) == 7  # reading alone changes nothing
    assert [r["case"] for r in read_rows(path, repair=True)] == ["A"] * 3
    assert len(path.read_text().splitlines()) == 4 and path.read_text().endswith("\n")
    append_rows(path, [row("B", r) for r in ("WT", "TC", "ET")])
    assert sorted({r["case"] for r in read_rows(path)}) == ["A", "B"]


def test_overlapping_folds_are_refused(tmp_path):
    import json

    from rediffinet_jax.data import splits

    (tmp_path / splits.SPLITS_FILE).write_text(json.dumps({"folds": [["a", "b"], ["b", "c"]]}))
    with pytest.raises(ConfigError, match="case b is in folds 0 and 1"):
        splits.load_or_create(tmp_path, ["a", "b", "c"], 2)


def test_a_full_disk_is_recognised_through_library_wrappers():
    """cli's one-line "no space left" needs ENOSPC found however a library wraps it: an OSError naming the file,
    one raised inside another error (Orbax re-raises as its own), or only the C library's message."""
    import errno

    from rediffinet_jax import cli

    full = OSError(errno.ENOSPC, "No space left on device", "/w/unet/fold_0/checkpoints/100/x")
    assert cli._no_space(full) == "/w/unet/fold_0/checkpoints/100/x"
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e
    except RuntimeError as wrapped:
        assert cli._no_space(wrapped) == "/w/unet/fold_0/checkpoints/100/x"
    assert cli._no_space(ValueError("write failed: [Errno 28] No space left on device")) == ""
    assert cli._no_space(OSError(errno.EACCES, "Permission denied", "/w")) is None
    assert cli._no_space(ValueError("a bug")) is None
