"""train.py end to end on the smoke config (2 folds, tiny phantoms), as a user runs it."""

import os
import shutil
import signal
import time

import nibabel as nib
import numpy as np
import pytest
from e2e import SMOKE, _predict_inputs, _run, _train, rows_of
from processes import run_distributed


def test_two_stage_run(finished):
    workdir, _, out, _ = finished  # its seconds are in the test log, not asserted: a busy machine is no bug
    assert "devices: 2 × cpu (cpu), 1 process(es)" in out  # the log names what the run trains on
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
    """Refused before any file is written: config.json stays what the run kept (a later evaluate.py reads it)."""
    before = (finished[0] / "config.json").read_bytes()
    for arg in ("--config.unet.lr=0.5", "--config.diffusion.lr=0.5"):
        proc = _train(finished[0], arg)
        assert proc.returncode == 2
        assert arg[len("--config.") :].split("=")[0] in proc.stdout and "--overwrite" in proc.stdout
        assert (finished[0] / "config.json").read_bytes() == before
    # settings of the evaluation only: refused with the way to apply them, not silently ignored
    for arg, flag in (
        ("--config.diffusion.sampler.steps=3", "--steps 3"),
        ("--config.eval.convention=monai", "--convention monai"),
    ):
        proc = _train(finished[0], arg)
        assert proc.returncode == 2 and f"evaluate.py --workdir {finished[0]} {flag}" in proc.stdout, proc.stdout
        assert (finished[0] / "config.json").read_bytes() == before


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


def _check_scores_against_files(workdir, k, rows) -> int:
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


def _ground_truth_counts(workdir, rows) -> dict:
    """Empty ground truths counted from the label files; dropped lesions: 26-connected GT components
    (merged through 3 dilations) of at most 50 voxels, found here with scipy directly."""
    from scipy import ndimage

    from rediffinet_jax.labels import REGIONS, labels_to_regions

    out = {r: {"cases": 0, "empty": 0, "lesions_dropped": 0} for r in REGIONS}
    for cid in sorted({r["case"] for r in rows}):
        gt = labels_to_regions(np.rint(nib.load(str(workdir / "data" / cid / f"{cid}-seg.nii.gz")).get_fdata()))
        for i, region in enumerate(REGIONS):
            g = gt[..., i].astype(bool)
            merged, n = ndimage.label(ndimage.binary_dilation(g, ndimage.generate_binary_structure(3, 2), 3))
            sizes = ndimage.sum(g, merged, range(1, n + 1))
            out[region]["cases"] += 1
            out[region]["empty"] += int(not g.any())
            out[region]["lesions_dropped"] += int(sum(0 < s <= 50 for s in sizes))
    return out


def test_evaluate_writes_tables(finished):
    workdir = finished[0]
    proc = _run("evaluate.py", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import csv
    import json

    wt_net = 0
    for model in ("unet", "rediffinet"):
        for k in (0, 1):
            with open(workdir / "eval" / model / f"fold_{k}" / "cases.csv") as f:
                rows = list(csv.DictReader(f))
            assert list(rows[0]) == [
                "case",
                "region",
                "dice",
                "hd95",
                "lesionwise_dice",
                "lesionwise_hd95",
                "tp",
                "fp",
                "fn",
                "unet_errors",
                "flipped",
                "fixed",
                "seconds",
                "convention",
                "gt_empty",
                "lesions_dropped",
            ]
            assert len(rows) == 3 * 3  # 3 held-out cases × [WT, TC, ET]
            if model == "rediffinet":  # the scores and flips are those of the label maps written, recomputed
                wt_net += _check_scores_against_files(workdir, k, rows)
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert summary["models"]["unet"]["n_folds"] == 2 and summary["models"]["rediffinet"]["n_folds"] == 2
    assert "rediffinet" in summary["improvement"]
    assert (
        set(summary["flips"]) == {"rediffinet", "unet+pp", "rediffinet+gate"}
        and summary["flips"]["rediffinet"]["WT"]["net_error_change"] == wt_net
    )
    md = (workdir / "eval" / "summary.md").read_text()
    assert "mean ± std (2 folds)" in md and "| rediffinet | WT | " in md
    assert summary["ground_truth"] == _ground_truth_counts(workdir, rows_of(workdir, "unet"))
    assert "Ground truth of the scored cases" in md
    assert summary["checkpoint"] == "latest" and "each fold's latest checkpoint" in md  # the run's default
    assert (workdir / "eval" / "summary.csv").is_file()
    assert (workdir / "eval" / "figures" / "hd95_by_model.png").is_file()
    pred = sorted((workdir / "eval" / "rediffinet" / "fold_0" / "pred").glob("*.nii.gz"))
    assert len(pred) == 3
    stamp = (workdir / "eval" / "unet" / "fold_0" / "cases.csv").stat().st_mtime_ns
    again = _run("evaluate.py", f"--workdir={workdir}")  # already scored: nothing appended
    assert again.returncode == 0
    assert (workdir / "eval" / "unet" / "fold_0" / "cases.csv").stat().st_mtime_ns == stamp
    other = _run("evaluate.py", f"--workdir={workdir}", "--convention=monai")  # never mixed into old rows
    assert other.returncode == 2 and "convention brats2023" in other.stdout


def test_evaluate_another_sampler_beside(finished):
    """--fusion/--steps/--samples score into eval/<model>-<fusion>-k<K>-s<S>/, summarized beside the model's
    own sampler; a folder's rows are never mixed with another checkpoint's."""
    import json

    workdir = finished[0]
    proc = _run("evaluate.py", f"--workdir={workdir}", "--fusion=suf", "--steps=2", "--samples=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    label = workdir / "eval" / "rediffinet-suf-k2-s2"
    assert json.loads((label / "settings.json").read_text())["sampler"] == {"fusion": "suf", "steps": 2, "samples": 2}
    assert len(list((label / "fold_1" / "pred").glob("*.nii.gz"))) == 3
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {
        "unet",
        "unet+pp",
        "rediffinet",
        "rediffinet+gate",
        "rediffinet-suf-k2-s2",
        "rediffinet-suf-k2-s2+gate",
    }
    other = _run("evaluate.py", f"--workdir={workdir}", "--checkpoint=best")
    assert other.returncode == 2 and "checkpoint: 'latest' -> 'best'" in other.stdout


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
    proc = _train(workdir, "--config.diffusion.steps=3", "--overwrite")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for k in (0, 1):
        done = json.loads((workdir / "rediffinet" / f"fold_{k}" / "done.json").read_text())
        assert done["steps"] == 3 and done["run"] != old[k]["run"]
        made_from = json.loads((workdir / "eval" / "rediffinet" / f"fold_{k}" / "trained.json").read_text())
        assert made_from["training"] == done
        with open(workdir / "eval" / "rediffinet" / f"fold_{k}" / "cases.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 9  # rescored once, not appended to the old rows
        _check_scores_against_files(workdir, k, rows)  # from the maps the new models wrote
    assert "rediffinet/fold_0: scored before the fold or its U-Net maps were made again" in proc.stdout
    assert "0.123456" not in (workdir / "eval" / "rediffinet" / "fold_0" / "cases.csv").read_text()
    assert "0.123456" in (workdir / "eval" / "unet" / "fold_0" / "cases.csv").read_text()  # U-Net not retrained
    assert "rediffinet-suf-k1-s1/fold_0: scored before rediffinet fold 0 or its U-Net maps" in proc.stdout
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"unet", "unet+pp", "rediffinet", "rediffinet+gate"}


def test_predict_new_cases(finished, tmp_path):
    workdir = finished[0]
    cases = tmp_path / "in"
    good = _predict_inputs(workdir, cases)
    shutil.copytree(workdir / "data" / good[0], cases / "BraTS-GLI-99998-000")
    for f in (cases / "BraTS-GLI-99998-000").iterdir():
        f.rename(f.with_name(f.name.replace(good[0], "BraTS-GLI-99998-000")))
    (cases / "BraTS-GLI-99998-000" / "BraTS-GLI-99998-000-t2w.nii.gz").unlink()  # missing modality
    bad = cases / "BraTS-GLI-99999-000"
    shutil.copytree(cases / good[1], bad)
    for f in bad.iterdir():
        f.rename(f.with_name(f.name.replace(good[1], "BraTS-GLI-99999-000")))
    t1c = bad / "BraTS-GLI-99999-000-t1c.nii.gz"
    img = nib.load(str(t1c))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-3], img.affine, img.header), str(t1c))  # wrong shape
    out = tmp_path / "out"
    proc = _run(
        "predict.py",
        "-i",
        str(cases),
        "-o",
        str(out),
        f"--workdir={workdir}",
        "--save_uncertainty",
        "--save_probabilities",
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "BraTS-GLI-99998-000" in proc.stdout and "missing modality t2w" in proc.stdout
    assert "BraTS-GLI-99999-000" in proc.stdout and "shape" in proc.stdout
    for c in good:
        src = nib.load(str(cases / c / f"{c}-t1n.nii.gz"))
        pred = nib.load(str(out / f"{c}.nii.gz"))
        np.testing.assert_array_equal(pred.affine, src.affine)
        assert pred.header.get_zooms() == src.header.get_zooms() and pred.shape == src.shape
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
        assert nib.load(str(out / f"{c}_uncertainty.nii.gz")).shape == src.shape + (3,)
        assert nib.load(str(out / f"{c}_probabilities.nii.gz")).shape == src.shape + (3,)
    stamp = (out / f"{good[0]}.nii.gz").stat().st_mtime_ns
    again = _run("predict.py", "-i", str(cases), "-o", str(out), f"--workdir={workdir}")
    assert "2 already written" in again.stdout
    assert (out / f"{good[0]}.nii.gz").stat().st_mtime_ns == stamp
    other = _run("predict.py", "-i", str(cases), "-o", str(out), f"--workdir={workdir}", "--model=unet")
    assert other.returncode == 2 and "model: 'rediffinet' -> 'unet'" in other.stdout  # never mixed in
    assert (out / f"{good[0]}.nii.gz").stat().st_mtime_ns == stamp
    (out / "prediction.json").unlink()  # label maps whose maker is unknown: not adopted
    unknown = _run("predict.py", "-i", str(cases), "-o", str(out), f"--workdir={workdir}")
    assert unknown.returncode == 2 and "no prediction.json" in unknown.stdout
    assert (out / f"{good[0]}.nii.gz").stat().st_mtime_ns == stamp and not (out / "prediction.json").exists()


def test_two_processes_run_the_pipeline_as_one(finished, tmp_path):
    """train.py (both stages and the evaluation), evaluate.py and predict.py as two processes of one
    distributed run, one device each: the scores equal those of one process with two devices (the same
    global batches and windows), and every shared file is written once (no case scored twice). Before
    process 0 made the shared files first, two processes wrote the same phantoms at once and one crashed."""
    import csv
    import json

    workdir = tmp_path / "run"
    run_distributed(["train.py", f"--config={SMOKE}", f"--workdir={workdir}"])
    one = json.loads(finished[3])
    assert json.loads((workdir / "eval" / "summary.json").read_text()) == one
    for path in sorted((workdir / "eval").glob("*/fold_*/cases.csv")):
        rows = list(csv.DictReader(open(path)))
        assert len(rows) == len({(r["case"], r["region"]) for r in rows}) == 3 * 3, path  # 3 cases × 3 regions
    for summary in (workdir / "eval").glob("summary.*"):  # evaluate.py as two processes: the summary made again
        summary.unlink()  # from the rows (their distributed scoring is train.py's, checked above: the same code)
    run_distributed(["evaluate.py", f"--workdir={workdir}"])
    assert json.loads((workdir / "eval" / "summary.json").read_text()) == one
    ids = _predict_inputs(workdir, tmp_path / "in")
    run_distributed(["predict.py", "-i", tmp_path / "in", "-o", tmp_path / "two", f"--workdir={workdir}"])
    single = _run("predict.py", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "one"), f"--workdir={workdir}")
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in ids] + ["prediction.json", ".lock"]  # the lock of the writing command, released
    )
    for c in ids:
        np.testing.assert_array_equal(
            np.asarray(nib.load(str(tmp_path / "two" / f"{c}.nii.gz")).dataobj),
            np.asarray(nib.load(str(tmp_path / "one" / f"{c}.nii.gz")).dataobj),
        )


def test_evaluate_and_predict_refuse_before_writing(finished, tmp_path):
    """evaluate.py with nothing to score exits non-zero; predict.py without a model makes no -o folder."""
    src = finished[0]
    w = tmp_path / "w"
    shutil.copytree(src, w, ignore=shutil.ignore_patterns("eval", "cache", "data"))
    for done in w.glob("*/fold_*/done.json"):
        done.unlink()
    proc = _run("evaluate.py", f"--workdir={w}")
    assert proc.returncode == 2 and "nothing was scored" in proc.stdout, proc.stdout[-2000:]
    out = tmp_path / "out"
    proc = _run("predict.py", "-i", str(src / "data"), "-o", str(out), f"--workdir={w}")
    assert proc.returncode == 2 and "not trained" in proc.stdout and not out.exists(), proc.stdout[-2000:]


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
