"""train.py end to end on the smoke config after a change: killed and resumed, a fold or stage trained again,
a record lost, a source file corrected (each on a copy of the finished smoke run)."""

import os
import shutil
import signal
import time

import nibabel as nib
import numpy as np
from e2e import _run, _train, check_scores_against_files
from processes import output


def test_changed_oof_checkpoint_remakes_the_maps(finished, tmp_path):
    """eval.checkpoint picks the checkpoints the out-of-fold maps come from: changing it remakes the maps
    (not the U-Nets), and the refiner trained on the old maps is refused, naming the key."""
    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    oof = sorted((workdir / "unet" / "oof").glob("*.nii.gz"))
    stamps = {p.name: p.stat().st_mtime_ns for p in oof}
    ckpt = {p: p.stat().st_mtime_ns for p in (workdir / "unet").glob("fold_*/done.json")}
    proc = _train(workdir, "--config.eval.checkpoint=best", "--stage=unet")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "made from the latest checkpoints; remaking them from the best ones" in proc.stdout
    assert "rediffinet: trained on out-of-fold maps from the latest checkpoints" in proc.stdout  # not scored
    remade = {p.name: p.stat().st_mtime_ns for p in (workdir / "unet" / "oof").glob("*.nii.gz")}
    assert set(remade) == set(stamps) and all(remade[n] != stamps[n] for n in stamps)
    assert all(p.stat().st_mtime_ns == t for p, t in ckpt.items())  # no U-Net retrained
    proc = _train(workdir, "--config.eval.checkpoint=best")
    assert proc.returncode == 2 and "oof_checkpoint" in proc.stdout and "rediffinet" in proc.stdout


def test_unet_fold_trained_again_remakes_its_maps(finished, tmp_path):
    """A U-Net fold trained again by hand (a new run id in its done.json): its out-of-fold maps are not
    scored until remade, then remade (not the other fold's), and the refiner trained on the old maps is
    refused by train.py and predict.py and left out of the evaluation."""
    import json

    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    folds = json.loads((workdir / "splits.json").read_text())["folds"]
    runs = json.loads((workdir / "unet" / "oof" / "runs.json").read_text())
    done_path = workdir / "unet" / "fold_0" / "done.json"
    assert runs == {
        str(k): json.loads((workdir / "unet" / f"fold_{k}" / "done.json").read_text())["run"] for k in (0, 1)
    }
    done = json.loads(done_path.read_text())
    done_path.write_text(json.dumps({**done, "run": "trained-again"}))
    stamps = {c: (workdir / "unet" / "oof" / f"{c}.nii.gz").stat().st_mtime_ns for f in folds for c in f}
    proc = _run("evaluate.py", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unet fold 0: trained again since its out-of-fold maps were made; skipped" in proc.stdout
    assert "rediffinet: trained on out-of-fold maps of U-Net fold(s) [0]" not in proc.stdout  # the maps are old
    proc = _train(workdir, "--stage=diffusion")  # no refiner trained on maps older than their U-Net
    assert proc.returncode == 2 and "maps of U-Net fold(s) [0] were made before the fold was trained" in proc.stdout
    proc = _train(workdir, "--stage=unet")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unet fold 0: its out-of-fold maps were not made by its current training; remaking them" in proc.stdout
    assert all((workdir / "unet" / "oof" / f"{c}.nii.gz").stat().st_mtime_ns != stamps[c] for c in folds[0])
    assert all((workdir / "unet" / "oof" / f"{c}.nii.gz").stat().st_mtime_ns == stamps[c] for c in folds[1])
    assert json.loads((workdir / "unet" / "oof" / "runs.json").read_text()) == {**runs, "0": "trained-again"}
    assert "rediffinet: trained on out-of-fold maps of U-Net fold(s) [0] that were trained again" in proc.stdout
    assert "unet/fold_0: scored before the fold or its U-Net maps were made again" in proc.stdout
    assert json.loads((workdir / "eval" / "unet" / "fold_0" / "trained.json").read_text()) == {
        "training": {**done, "run": "trained-again"},
        "unet_maps": "trained-again",
    }
    proc = _train(workdir)
    assert proc.returncode == 2 and "oof_runs.0" in proc.stdout and "rediffinet" in proc.stdout
    cases = tmp_path / "in"
    shutil.copytree(workdir / "data" / folds[0][0], cases / folds[0][0])
    proc = _run("predict.py", "-i", str(cases), "-o", str(tmp_path / "out"), f"--workdir={workdir}")
    assert proc.returncode == 2 and "maps of U-Net fold(s) [0] before they were trained again" in proc.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refiner_without_a_record_of_its_unets_is_refused(finished, tmp_path):
    """A refiner whose settings do not record the U-Net trainings it was trained on (``oof_runs``) is not
    adopted: train.py refuses it, naming the keys, and --overwrite retrains it."""
    import json

    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir, ignore=shutil.ignore_patterns("eval"))
    stage = workdir / "rediffinet"
    flat = json.loads((stage / "config.json").read_text())
    assert sorted(k for k in flat if k.startswith("oof_runs.")) == ["oof_runs.0", "oof_runs.1"]
    (stage / "config.json").write_text(json.dumps({k: v for k, v in flat.items() if not k.startswith("oof_runs.")}))
    proc = _train(workdir, "--noevaluate")
    assert proc.returncode == 2 and "oof_runs.0" in proc.stdout and "--overwrite" in proc.stdout


def test_killed_in_stage_two_resumes(finished, tmp_path):
    """SIGKILL once stage 2 has its first checkpoint; the same command then finishes with every step."""
    src = finished[0]
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("data", "cache", "unet", "splits.json"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, workdir / name)
    proc = _train(workdir, "--config.diffusion.steps=8", "--noevaluate", wait=False)  # the scoring: elsewhere
    ckpt = workdir / "rediffinet" / "fold_0" / "checkpoints" / "2"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = output(proc)
    assert ckpt.exists() and not (workdir / "rediffinet" / "fold_1" / "done.json").exists()
    again = _train(workdir, "--config.diffusion.steps=8", "--noevaluate")
    assert again.returncode == 0, again.stdout[-2000:]
    assert "resuming from step" in again.stdout
    for k in (0, 1):
        lines = (workdir / "rediffinet" / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
        assert steps == list(range(1, 9)), (k, steps, killed[-1500:], again.stdout[-1500:])
        assert (workdir / "rediffinet" / f"fold_{k}" / "done.json").is_file()


def test_retrained_stage_is_rescored(finished, tmp_path):
    """train.py --overwrite retrains the refiner: its scores and maps are made again from the new models
    (not kept from the old ones), and an evaluation with another sampler scored before is left out."""
    import csv
    import json

    workdir = tmp_path / "run"
    shutil.copytree(finished[0], workdir)
    old = {k: json.loads((workdir / "rediffinet" / f"fold_{k}" / "done.json").read_text()) for k in (0, 1)}
    for model in ("unet", "rediffinet"):  # mark the old rows: a score no model gives
        path = workdir / "eval" / model / "fold_0" / "cases.csv"
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        rows[0]["dice"] = "0.123456"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    suf = _run("evaluate.py", f"--workdir={workdir}", "--fusion=suf", "--steps=1", "--samples=1")
    assert suf.returncode == 0, suf.stdout[-2000:] + suf.stderr[-2000:]
    # 8 steps: the kill test's count, so that both tests run one compiled step (the schedule is baked into it)
    proc = _train(workdir, "--config.diffusion.steps=8", "--overwrite")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for k in (0, 1):
        done = json.loads((workdir / "rediffinet" / f"fold_{k}" / "done.json").read_text())
        assert done["steps"] == 8 and done["run"] != old[k]["run"]
        made_from = json.loads((workdir / "eval" / "rediffinet" / f"fold_{k}" / "trained.json").read_text())
        assert made_from["training"] == done
        with open(workdir / "eval" / "rediffinet" / f"fold_{k}" / "cases.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 9  # rescored once, not appended to the old rows
        check_scores_against_files(workdir, k, rows)  # from the maps the new models wrote
    assert "rediffinet/fold_0: scored before the fold or its U-Net maps were made again" in proc.stdout
    assert "0.123456" not in (workdir / "eval" / "rediffinet" / "fold_0" / "cases.csv").read_text()
    assert "0.123456" in (workdir / "eval" / "unet" / "fold_0" / "cases.csv").read_text()  # U-Net not retrained
    assert "rediffinet-suf-k1-s1/fold_0: scored before rediffinet fold 0 or its U-Net maps" in proc.stdout
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"unet", "unet+pp", "rediffinet", "rediffinet+gate"}


def test_lost_done_json_is_rebuilt_from_the_checkpoints(finished, tmp_path):
    """A finished U-Net fold's done.json deleted: rebuilt from its checkpoints with the same run id (its maps'
    record), so nothing is retrained and its refiner is not refused as trained on other maps."""
    import json

    w = tmp_path / "w"
    shutil.copytree(finished[0], w)
    before = json.loads((w / "unet" / "fold_0" / "done.json").read_text())
    (w / "unet" / "fold_0" / "done.json").unlink()
    (w / "rediffinet" / "fold_1" / "done.json").unlink()
    proc = _train(w, "--noevaluate")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unet fold_0: done.json was missing; its checkpoints say it finished: rebuilt" in proc.stdout
    assert "rediffinet fold_1: done.json was missing" in proc.stdout and "resuming" not in proc.stdout
    assert json.loads((w / "unet" / "fold_0" / "done.json").read_text()) == before
    assert "remaking them" not in proc.stdout  # the maps of the rebuilt fold stand


def test_changed_source_file_is_named_and_refused(finished, tmp_path):
    """A seg corrected after training: train.py and evaluate.py refuse, naming the case and the file, and
    change nothing; the same bytes merely touched are no change; --overwrite names it and retrains."""
    import json

    from rediffinet_jax.data import changes

    w = tmp_path / "w"
    shutil.copytree(finished[0], w)
    for meta in w.glob("cache/*/meta.json"):  # as if made from the copy's own files (copytree keeps mtimes)
        meta.write_text(meta.read_text().replace(str(finished[0]), str(w)))
    ids = [c for fold in json.loads((w / "splits.json").read_text())["folds"] for c in fold]
    cid = ids[0]
    seg = w / "data" / cid / f"{cid}-seg.nii.gz"
    os.utime(seg, ns=(1, 1))  # another mtime, the same bytes
    assert changes.changed_sources(w / "cache", ids) == []
    img = nib.load(str(seg))
    labels = np.asarray(img.dataobj).copy()
    labels[0, 0, 0] = 2  # a corrected voxel
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), str(seg))
    assert changes.changed_sources(w / "cache", ids) == [f"case {cid}: {seg} changed"]
    before = {p: p.read_bytes() for p in (w / "config.json", w / "cache" / cid / "meta.json")}
    for proc in (_train(w), _run("evaluate.py", f"--workdir={w}")):
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and f"error: case {cid}: {seg} changed since" in out, out[-2000:]
        assert "Traceback" not in out
    assert all(p.read_bytes() == b for p, b in before.items())
    proc = _train(w, "--overwrite", "--stage=unet", "--stop_after=1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert f"--overwrite: case {cid}: {seg} changed; the stages trained on it are trained again" in out
    assert "data_sources" in out and not (w / "unet" / "fold_0" / "done.json").is_file()
