"""train.py's refusals and its resume of the data loader, from an empty work directory (no trained run needed)."""

import os

from e2e import SMOKE, _train


def test_unknown_key_and_missing_root(tmp_path):
    proc = _train(tmp_path / "w", "--config.unet.stepz=3")
    assert proc.returncode == 2 and "unet.stepz" in proc.stderr and "unet.steps" in proc.stderr
    proc = _train(tmp_path / "w", f"--config.data.root={tmp_path / 'nope'}")
    assert proc.returncode == 2 and "does not exist" in proc.stdout


def test_user_errors_are_one_line_and_do_no_work(tmp_path):
    """Bad config files, variants, folds and folders end with one 'error:' line and status 2, before any
    file is made; a work directory held by another command is refused naming the holder."""
    from rediffinet_jax import workdir as wd

    w = tmp_path / "w"
    for args, msg in [
        (["--config=configs/nonexist.py"], "error: config file configs/nonexist.py not found"),
        ([f"--config={SMOKE[:-1]}"], "error: config configs/rediffinet.py:smok: unknown config argument"),
        (["--fold=7"], "error: --fold 7 is outside 0..1"),
        (["--fold=x"], "error: flag --fold=x"),
        (
            ["--config.diffusion.sampler.fusion=max"],
            "error: config key diffusion.sampler.fusion = 'max': must be one of",
        ),
        (["--config.unet.keep=0"], "error: config key unet.keep = 0: must be an integer ≥ 1"),
    ]:
        proc = _train(w, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and msg in out and "Traceback" not in out, out[-2000:]
        assert not w.exists()
    (tmp_path / "file").write_text("")
    proc = _train(tmp_path / "file" / "w")
    assert proc.returncode == 2 and "error: cannot write to" in proc.stdout and "Traceback" not in proc.stdout
    with wd.lock(w, "a test holding the lock"):
        proc = _train(w)
    assert (
        proc.returncode == 2
        and "in use by a test holding the lock" in proc.stdout
        and f"pid {os.getpid()}" in proc.stdout
    )
    assert sorted(p.name for p in w.iterdir()) == [wd.LOCK_FILE]  # nothing else was made


def test_resume_keeps_the_loader_it_began_with(tmp_path):
    """A fold stopped with data.num_workers=1 and resumed with 0 goes on with 1 worker, as it began (the saved
    data position is that loader's), says so, and finishes."""
    w = tmp_path / "w"
    proc = _train(w, "--stage=unet", "--fold=0", "--stop_after=2", "--config.data.num_workers=1")
    assert proc.returncode == 0 and not (w / "unet" / "fold_0" / "done.json").is_file(), proc.stdout[-2000:]
    proc = _train(w, "--stage=unet", "--fold=0", "--config.data.num_workers=0")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-2000:]
    assert "fold_0: resuming with data.num_workers=1, as it began" in out
    assert (w / "unet" / "fold_0" / "done.json").is_file()
