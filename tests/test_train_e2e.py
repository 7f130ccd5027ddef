"""train.py end to end on the smoke config (2 folds, tiny phantoms), as a user runs it."""

import shutil

import nibabel as nib
import numpy as np
from e2e import SMOKE, _predict_inputs, _run, _train, check_scores_against_files, rows_of
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


# the columns of eval/<model>/fold_k/cases.csv, in their order
CASE_COLUMNS = (
    "case region dice hd95 lesionwise_dice lesionwise_hd95 tp fp fn unet_errors flipped fixed seconds convention "
    "gt_empty lesions_dropped"
).split()


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
            assert list(rows[0]) == CASE_COLUMNS
            assert len(rows) == 3 * 3  # 3 held-out cases × [WT, TC, ET]
            if model == "rediffinet":  # the scores and flips are those of the label maps written, recomputed
                wt_net += check_scores_against_files(workdir, k, rows)
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
