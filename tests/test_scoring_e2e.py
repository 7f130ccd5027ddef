"""End to end, beyond the U-Net's own pipeline: the official scorer, the refiner on another model's maps, and
the refinement benchmark over seeds, on the smoke config."""

import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
from e2e import SMOKE, _predict_inputs, _run, _train, rows_of


def test_official_scorer(finished, tmp_path):
    """Without the package, --scorer official says how to install it before any work; with it (the
    .[official] extra), the package's Dice of each fold equals ours: its numbers sit beside ours."""
    import json

    from rediffinet_jax import official

    w = tmp_path / "w"
    shutil.copytree(finished[0], w, ignore=shutil.ignore_patterns("eval"))
    proc = _run("evaluate.py", f"--workdir={w}", "--scorer=official", "--models=unet")
    if official.version() is None:
        assert proc.returncode == 2 and 'pip install -e ".[official]"' in proc.stdout, proc.stdout[-2000:]
        assert not (w / "eval").exists()
        return
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((w / "eval" / "summary.json").read_text())
    theirs = summary["official"]["scores"]["unet"]["folds"]
    import csv

    for k in (0, 1):
        with open(w / "eval" / "unet" / f"fold_{k}" / "cases.csv") as f:
            rows = list(csv.DictReader(f))
        for region in ("WT", "TC", "ET"):
            # the package leaves out a region empty in both maps, where ours scores Dice 1
            kept = [
                float(r["dice"])
                for r in rows
                if r["region"] == region and not (r["gt_empty"] == "1" and r["dice"] == "1.0")
            ]
            want = np.mean(kept) if kept else float("nan")
            assert theirs[str(k)][f"global_dsc_{region.lower()}"] == pytest.approx(want, abs=1e-9, nan_ok=True)
    assert "Official BraTS package" in (w / "eval" / "summary.md").read_text()


def test_refinement_benchmark_over_two_seeds(finished, tmp_path):
    """benchmarks/refinement.py on the smoke config, 2 seeds (seed 0 is the finished run, resumed with nothing
    to do; seed 1 trains from scratch): its table equals the numbers recomputed here from the case rows."""
    import json

    from rediffinet_jax import metrics
    from rediffinet_jax.case_rows import read_rows

    root = tmp_path / "bench"
    shutil.copytree(finished[0], root / "seed_0")
    proc = _run("benchmarks/refinement.py", f"--config={SMOKE}", "--seeds=2", f"--root={root}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((root / "refinement.json").read_text())
    assert sorted(result["seeds"]) == ["0", "1"] and (root / "refinement.md").is_file()
    changes, nets = [], []
    for s in ("0", "1"):
        rows = {
            m: [r for k in (0, 1) for r in read_rows(root / f"seed_{s}" / "eval" / m / f"fold_{k}" / "cases.csv")]
            for m in ("unet", "rediffinet")
        }
        fold_hd = {
            m: [
                np.mean([r["hd95"] for r in read_rows(root / f"seed_{s}" / "eval" / m / f"fold_{k}" / "cases.csv")])
                for k in (0, 1)
            ]
            for m in rows
        }
        unet, ref = np.mean(fold_hd["unet"]), np.mean(fold_hd["rediffinet"])
        assert result["seeds"][s]["rediffinet"]["hd95"]["avg"] == pytest.approx(ref)
        changes.append(100 * (ref - unet) / unet)
        et = [r for r in rows["rediffinet"] if r["region"] == "ET"]
        nets.append(sum(r["flipped"] - 2 * r["fixed"] for r in et))
        assert result["seeds"][s]["rediffinet"]["flips"]["ET"]["net_error_change"] == nets[-1]
        assert all(r["convention"] == "brats2023" for r in rows["unet"]) and metrics.FLIP_KEYS
    mean = result["mean"]["rediffinet"]
    assert mean["hd95_change_percent"]["avg"] == pytest.approx(np.mean(changes))
    assert result["std"]["rediffinet"]["hd95_change_percent"]["avg"] == pytest.approx(np.std(changes, ddof=1))
    assert mean["flips"]["ET"]["net_error_change"] == sum(nets)


def test_refiner_on_another_models_maps(finished, tmp_path):
    """baseline.maps: maps checked (every problem named) before anything trains; the refiner trained on
    them alone (no U-Net); the baseline scored as its own row; changed maps make the refiner stale;
    predict.py --baseline refines new cases' given maps, and refuses what does not fit."""
    import json

    from benchmarks.refinement import grown_edema_maps

    # maps no model of this project made: the ground truth with its edema grown by 2 voxels
    data, maps, w = finished[0] / "data", tmp_path / "maps", tmp_path / "w"
    ids = grown_edema_maps(data, maps)
    bad = tmp_path / "bad"
    shutil.copytree(maps, bad)
    (bad / f"{ids[0]}.nii.gz").unlink()
    img = nib.load(str(bad / f"{ids[1]}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(bad / f"{ids[1]}.nii.gz"))
    args = [f"--config.data.root={data}"]
    proc = _train(w, *args, f"--config.baseline.maps={bad}")
    assert proc.returncode == 2 and "2 of 6 cases have no usable map" in proc.stdout, proc.stdout[-2000:]
    assert f"no baseline map for this case (case {ids[0]}" in proc.stdout and f"case {ids[1]}" in proc.stdout
    assert not (w / "rediffinet").exists() and not (w / "baseline").exists()
    proc = _train(w, *args, f"--config.baseline.maps={maps}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (w / "unet").exists() and len(list((w / "baseline" / "oof").glob("*.nii.gz"))) == 6
    summary = json.loads((w / "eval" / "summary.json").read_text())
    assert list(summary["models"]) == ["baseline", "rediffinet", "baseline+pp", "rediffinet+gate"]
    assert "rediffinet" in summary["improvement"] and "rediffinet+gate" in summary["flips"]
    gt = np.rint(nib.load(str(data / ids[0] / f"{ids[0]}-seg.nii.gz")).get_fdata()) > 0
    given = np.asarray(nib.load(str(maps / f"{ids[0]}.nii.gz")).dataobj) > 0
    (row,) = [r for r in rows_of(w, "baseline") if r["case"] == ids[0] and r["region"] == "WT"]
    assert float(row["dice"]) == pytest.approx(2 * (gt & given).sum() / (gt.sum() + given.sum()))
    assert "baseline (given maps) errors" in (w / "eval" / "summary.md").read_text()
    # new cases: their given maps refined; the U-Net's row and a missing --baseline are refused
    cases, out = tmp_path / "in", tmp_path / "out"
    new = _predict_inputs(finished[0], cases)
    for flags, msg in [((), "--baseline DIR"), ((f"--baseline={maps}", "--model=baseline"), "meaningless")]:
        proc = _run("predict.py", "-i", str(cases), "-o", str(out), f"--workdir={w}", *flags)
        assert proc.returncode == 2 and msg in proc.stdout and not out.exists(), proc.stdout[-2000:]
    proc = _run("predict.py", "-i", str(cases), "-o", str(out), f"--workdir={w}", f"--baseline={maps}")
    assert proc.returncode == 0 and "2 written" in proc.stdout, proc.stdout[-2000:]
    for c in new:
        assert nib.load(str(out / f"{c}.nii.gz")).shape == nib.load(str(maps / f"{c}.nii.gz")).shape
    assert json.loads((out / "prediction.json").read_text())["baseline_maps"] == str(maps.resolve())
    # a changed map: its fold is imported again, and the refiner trained on the old maps is refused
    changed = nib.load(str(maps / f"{ids[0]}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(changed.shape, np.uint8), changed.affine), str(maps / f"{ids[0]}.nii.gz"))
    proc = _train(w, *args, f"--config.baseline.maps={maps}")
    assert proc.returncode == 2 and "oof_runs" in proc.stdout and "--overwrite" in proc.stdout, proc.stdout[-2000:]


def test_gpu_pipeline_script_runs_its_whole_sequence(finished, tmp_path):
    """benchmarks/gpu_pipeline.sh with SMOKE=1: every stage exits 0 and is recorded, predict.py's label maps
    pass the check, the table is written. The smoke work directory is the fixture's (training resumes it)."""
    import json
    import os
    import subprocess

    from processes import ROOT

    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(finished[0], work / "smoke")
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "gpu_pipeline.jsonl").read_text().splitlines()]
    stages = {x["stage"]: x for x in recs if x["bench"] == "pipeline_stage"}
    assert list(stages) == ["train_smoke", "evaluate_smoke", "predict_smoke", "train_bench"]
    assert all(x["rc"] == 0 and x["seconds"] > 0 for x in stages.values()), stages
    assert stages["train_smoke"]["trained"] == {"rediffinet": [0, 1], "unet": [0, 1]}
    assert stages["train_bench"]["trained"] == {}  # stopped after 2 steps: no fold finished
    (maps,) = [x for x in recs if x["bench"] == "label_maps"]
    assert maps["cases"] == 2 and maps["problems"] == [] and sum(maps["voxels_per_label"].values()) == 2 * 40 * 40 * 36
    table = (out / "gpu_pipeline.md").read_text()
    assert "| predict_smoke | 0 |" in table and "label maps: 2 cases, 0 problems" in table


def _labels(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_gate_applied_by_evaluate_and_predict(finished, tmp_path):
    """evaluate.py: the paper's maps are U(I) XOR (Y > 0) exactly, the gated ones U(I) XOR (Y > 0, p ≥ τ, within
    b voxels of U(I)'s surface) with each fold's stored gate, both rebuilt here from the kept fields with
    scipy's distance transform; predict.py: a stored gate with every region off gives the U-Net's maps (the
    paper's candidate is U(I) XOR (Y > 0) exactly: tests/test_gate.py)."""
    import json

    w = finished[0]
    record = json.loads((w / "eval" / "rediffinet" / "gate.json").read_text())
    assert set(record) == {"0", "1", "all"}
    assert "Gate of rediffinet" in (w / "eval" / "summary.md").read_text()
    _check_gated_maps(w, record)
    _check_postprocessing(w, json.loads((w / "eval" / "unet" / "postprocess.json").read_text()))
    _check_choices_from_kept_effects(w, record)
    _check_gate_off_everywhere(w, tmp_path / "off_everywhere")
    _check_predict_applies_the_stored_gates(w, tmp_path)


def _check_gated_maps(w, record):
    """Each fold's paper and gated maps rebuilt from the kept fields (sign, p) and the stored gate."""
    from scipy import ndimage

    from rediffinet_jax.data import brats
    from rediffinet_jax.labels import labels_to_regions, nested, regions_to_labels

    for k in (0, 1):
        for fused in sorted((w / "eval" / "rediffinet" / f"fold_{k}" / "fused").glob("*.npz")):
            cid = fused.name[: -len(".npz")]
            meta = brats.cached_meta(w / "cache" / cid)
            unet = brats.crop(labels_to_regions(_labels(w / "unet" / "oof" / f"{cid}.nii.gz")), meta["box"])
            z = np.load(fused)
            paper = brats.crop(_labels(w / "eval" / "rediffinet" / f"fold_{k}" / "pred" / f"{cid}.nii.gz"), meta["box"])
            np.testing.assert_array_equal(paper, regions_to_labels(unet ^ z["sign"].astype(np.uint8)))
            flips = np.zeros_like(unet)
            for r, region in enumerate(("WT", "TC", "ET")):
                choice = record[str(k)][region]["gate"]
                if choice == "off":
                    continue
                cand = dict(kv.split("=") for kv in choice.split(","))
                u = unet[..., r] > 0
                dist = np.where(u, ndimage.distance_transform_edt(u), ndimage.distance_transform_edt(~u))
                band = np.inf if cand["band"] == "inf" else float(cand["band"])
                keep = z["sign"][..., r] & (dist <= band)
                if float(cand["tau"]) > 0.5:
                    keep &= z["p"][..., r].astype(np.float32) >= float(cand["tau"])
                flips[..., r] = keep
            gated = _labels(w / "eval" / "rediffinet+gate" / f"fold_{k}" / "pred" / f"{cid}.nii.gz")
            np.testing.assert_array_equal(brats.crop(gated, meta["box"]), regions_to_labels(nested(unet ^ flips)))
            _check_rows_score_the_map(w, "rediffinet+gate", cid, gated, meta["spacing"])


def _check_predict_applies_the_stored_gates(w, tmp_path):
    """predict.py with the all-folds gate set off (the U-Net's maps) or to the paper's candidate (--nogate's
    maps), and the U-Net's post-processing off or keeping only the largest component."""
    import json

    src = tmp_path / "cases"
    _predict_inputs(w, src)
    copy = tmp_path / "w"
    shutil.copytree(w, copy)
    gate_file = copy / "eval" / "rediffinet" / "gate.json"
    outs = {}
    for name, gates in (("off", "off"), ("paper", "tau=0.5,band=inf")):
        rec = json.loads(gate_file.read_text())
        rec["all"] = {r: {**c, "gate": gates} for r, c in rec["all"].items()}
        gate_file.write_text(json.dumps(rec))
        proc = _run("predict.py", "-i", str(src), "-o", str(tmp_path / name), f"--workdir={copy}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outs[name] = tmp_path / name
    pp_file = copy / "eval" / "unet" / "postprocess.json"
    runs = (("--model=unet", "unet", "off"), ("--nogate", "nogate", None), ("--model=unet", "pp", "inf"))
    for flag, name, pp in runs:
        if pp:  # the U-Net alone: as it is (post-processing off), then every component but the largest removed
            rec = json.loads(pp_file.read_text())
            rec["all"] = {r: {**c, "gate": "off" if pp == "off" else "min_size=inf"} for r, c in rec["all"].items()}
            pp_file.write_text(json.dumps(rec))
        proc = _run("predict.py", "-i", str(src), "-o", str(tmp_path / name), f"--workdir={copy}", flag)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for case in sorted(p.name for p in (tmp_path / "unet").glob("*.nii.gz")):
        np.testing.assert_array_equal(_labels(tmp_path / "pp" / case), _largest_only(_labels(tmp_path / "unet" / case)))
    assert json.loads((tmp_path / "off" / "prediction.json").read_text())["gate"] == {
        "WT": "off",
        "TC": "off",
        "ET": "off",
    }
    for case in sorted(p.name for p in (tmp_path / "unet").glob("*.nii.gz")):
        np.testing.assert_array_equal(_labels(tmp_path / "off" / case), _labels(tmp_path / "unet" / case))
        np.testing.assert_array_equal(_labels(tmp_path / "paper" / case), _labels(tmp_path / "nogate" / case))


def _check_rows_score_the_map(w, label, cid, labels, spacing):
    """The rows of ``cid`` under ``label`` are the scores of its written map against the phantom's seg (a
    fold gated off in every region takes the U-Net's rows: the same map)."""
    from rediffinet_jax import metrics
    from rediffinet_jax.labels import labels_to_regions

    truth = labels_to_regions(_labels(w / "data" / cid / f"{cid}-seg.nii.gz"))
    rows = {r["region"]: r for r in rows_of(w, label) if r["case"] == cid}
    for want in metrics.score_case(labels_to_regions(labels), truth, spacing, cid):
        got = rows[want["region"]]
        assert (float(got["dice"]), float(got["hd95"])) == pytest.approx((want["dice"], want["hd95"])), (cid, want)


def _check_gate_off_everywhere(w, copy):
    """Every candidate made to add a wrong voxel in the kept effects: the gate is off in every region of every
    fold, the folds are rescored, their maps are U(I) and their rows the U-Net's (only the seconds differ)."""
    import json

    shutil.copytree(w, copy)
    for path in copy.glob("eval/rediffinet/fold_*/gate_effects.json"):
        effects = json.loads(path.read_text())
        for case in effects.values():
            for row in case.values():
                row.update({n: [row["unet"][0] + 1, *v[1:]] for n, v in row.items() if n != "unet"})
        path.write_text(json.dumps(effects))
    proc = _run("evaluate.py", f"--workdir={copy}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {
        c["gate"]
        for fold in json.loads((copy / "eval/rediffinet/gate.json").read_text()).values()
        for c in fold.values()
    } == {"off"}
    unet = {(r["case"], r["region"]): r for r in rows_of(copy, "unet")}
    gated = rows_of(copy, "rediffinet+gate")
    assert len(gated) == len(unet) and all(
        {**r, "seconds": ""} == {**unet[r["case"], r["region"]], "seconds": ""} for r in gated
    )
    for path in copy.glob("eval/rediffinet+gate/fold_*/pred/*.nii.gz"):
        np.testing.assert_array_equal(_labels(path), _labels(copy / "unet" / "oof" / path.name))


def _check_choices_from_kept_effects(w, record):
    """Each fold's stored gate is :func:`gate.choose` on the other folds' kept effects (each fold a group, no
    case made worse), ``all`` on every fold's: the HD95s measured only where a choice reads them are all there."""
    import json

    from rediffinet_jax import gate

    effects = {
        k: json.loads((w / "eval" / "rediffinet" / f"fold_{k}" / "gate_effects.json").read_text()) for k in (0, 1)
    }
    for key, folds in (("0", [1]), ("1", [0]), ("all", [0, 1])):
        cases = [(k, e) for k in folds for e in effects[k].values()]
        groups = [k for k, _ in cases]
        assert gate.choose([e for _, e in cases], groups=groups, selection="no_case_worse") == record[key]


def _largest_only(labels):
    """A label map with, per region, only its largest 26-connected components (ties: all of that size)."""
    from scipy import ndimage

    from rediffinet_jax.labels import labels_to_regions, nested, regions_to_labels

    regions = labels_to_regions(labels)
    for r in range(3):
        comp, n = ndimage.label(regions[..., r], np.ones((3, 3, 3)))
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            regions[..., r] = (sizes == sizes.max())[comp] & (comp > 0)
    return regions_to_labels(nested(regions))


def _check_postprocessing(w, record):
    """The U-Net's post-processed maps (``unet+pp``) rebuilt with scipy: per region, the components (26-
    connected) of its out-of-fold map below the fold's chosen size removed, never one of the largest size."""
    from scipy import ndimage

    from rediffinet_jax.labels import labels_to_regions, nested, regions_to_labels

    assert "Post-processing of the U-Net" in (w / "eval" / "summary.md").read_text()
    for k in (0, 1):
        for path in sorted((w / "eval" / "unet+pp" / f"fold_{k}" / "pred").glob("*.nii.gz")):
            unet = labels_to_regions(_labels(w / "unet" / "oof" / path.name))
            removed = np.zeros_like(unet)
            for r, region in enumerate(("WT", "TC", "ET")):
                choice = record[str(k)][region]["gate"]
                labels, n = ndimage.label(unet[..., r], np.ones((3, 3, 3)))
                if choice == "off" or n < 2:
                    continue
                sizes = np.bincount(labels.ravel())
                sizes[0] = 0
                small = (sizes < float(choice.split("=")[1])) & (sizes < sizes.max())  # the largest: kept, ties too
                removed[..., r] = small[labels] & (labels > 0)
            np.testing.assert_array_equal(_labels(path), regions_to_labels(nested(unet ^ removed)))


def test_predict_writes_the_labels_of_its_input(finished, tmp_path):
    """Cases in the BraTS 2018–2021 layout get ET = 4, as their seg would; the same cases in the 2023 layout
    get 3; --labels 2023 writes 3 for the old layout too. Otherwise the maps are the same."""
    from rediffinet_jax.data import phantoms
    from rediffinet_jax.labels import to_convention

    w = finished[0]
    for layout in ("2023", "2021"):
        phantoms.write_dataset(tmp_path / f"in{layout}", 2, (40, 40, 36), seed=9, layout=layout)
    outs = {}
    for name, src, extra in (
        ("new", "in2023", ()),
        ("old", "in2021", ()),
        ("old_as_new", "in2021", ("--labels=2023",)),
    ):
        proc = _run(
            "predict.py",
            "-i",
            str(tmp_path / src),
            "-o",
            str(tmp_path / name),
            f"--workdir={w}",
            "--model=unet",
            *extra,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outs[name] = {p.name: _labels(p) for p in sorted((tmp_path / name).glob("*.nii.gz"))}
    assert len(outs["new"]) == 2 and outs["new"].keys() == outs["old"].keys()
    for case, labels in outs["new"].items():
        np.testing.assert_array_equal(outs["old"][case], to_convention(labels, "2021"))
    # the smoke U-Net may predict no ET at all: the writer itself, with an ET voxel, in each convention
    from rediffinet_jax import prediction
    from rediffinet_jax.data import brats

    files = brats.discover_cases(tmp_path / "in2021")[0]
    case = brats.load_case(files, read_labels=False)
    regions = np.zeros(case.image.shape[:3] + (3,), np.uint8)
    regions[1, 1, 1] = 1  # WT, TC and ET
    for conv, et in (("2021", 4), ("2023", 3)):
        prediction._write_case(tmp_path / conv, files, case, regions, None, None, conv)
        written = _labels(tmp_path / conv / f"{files.case_id}.nii.gz")
        box = tuple(b[0] + 1 for b in case.box)
        assert written[box] == et and set(np.unique(written)) == {0, et}


def test_spacing_trains_coarser_and_writes_the_source_grid(finished, tmp_path):
    """data.spacing = 2 mm on the smoke phantoms: the cache holds the 2 mm crop and the 1 mm truth; the
    U-Net's out-of-fold maps and predict.py's maps are on the source grid, shape and affine; its rows are
    scored there (the truth's voxel counts are the source's)."""
    import json

    w = tmp_path / "w"
    proc = _train(w, "--config.data.spacing=(2.0, 2.0, 2.0)", "--config.stages=unet")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    case = sorted(p.name for p in (w / "cache").iterdir())[0]
    meta = json.loads((w / "cache" / case / "meta.json").read_text())
    crop = [b - a for a, b in meta["box"]]
    assert meta["work_shape"] == [round(n / 2) for n in crop]
    assert np.load(w / "cache" / case / "image.npy").shape[:3] == tuple(meta["work_shape"])
    truth = np.load(w / "cache" / case / "truth.npy")
    assert truth.shape[:3] == tuple(crop)
    src = nib.load(str(w / "data" / case / f"{case}-seg.nii.gz"))
    oof = nib.load(str(w / "unet" / "oof" / f"{case}.nii.gz"))
    assert oof.shape == src.shape and np.allclose(oof.affine, src.affine)
    seg = np.asarray(src.dataobj)
    assert truth[..., 0].sum() == (seg > 0).sum()  # the truth scored is the 1 mm one
    src_dir = tmp_path / "cases"
    _predict_inputs(w, src_dir, n=1)
    proc = _run("predict.py", "-i", str(src_dir), "-o", str(tmp_path / "out"), f"--workdir={w}", "--model=unet")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = nib.load(str(next((tmp_path / "out").glob("*.nii.gz"))))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)


def test_predict_new_save_flag_and_colliding_names(finished, tmp_path):
    """A save flag new to a filled -o writes its missing files (the label maps stay as they were); cases A and
    A_probabilities are refused before any work, naming both."""
    w = finished[0]
    src = tmp_path / "cases"
    ids = _predict_inputs(w, src)
    out = tmp_path / "out"
    for extra in ((), ("--save_probabilities",)):
        proc = _run("predict.py", "-i", str(src), "-o", str(out), f"--workdir={w}", "--model=unet", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        if not extra:
            first = {c: _labels(out / f"{c}.nii.gz") for c in ids}
    assert "2 to do" in proc.stdout
    for c in ids:
        assert (out / f"{c}_probabilities.nii.gz").is_file()
        np.testing.assert_array_equal(_labels(out / f"{c}.nii.gz"), first[c])
    twin = f"{ids[0]}_probabilities"
    shutil.copytree(src / ids[0], src / twin)
    for f in (src / twin).iterdir():
        f.rename(f.with_name(f.name.replace(ids[0], twin)))
    proc = _run("predict.py", "-i", str(src), "-o", str(tmp_path / "out2"), f"--workdir={w}", "--model=unet")
    assert proc.returncode == 2 and f"cases {ids[0]} and {twin} would write one file" in proc.stdout
    assert not (tmp_path / "out2").exists()


def test_full_disk_is_one_line_and_the_rerun_finishes(finished, tmp_path):
    """predict.py writing to a disk with two 4 KiB blocks free (a 1 MiB tmpfs, filled): its lock and record
    fit, the first label map does not: one `error: no space left on the device` line, status 2, no map or
    temporary left; with the space freed, the same command writes every map."""
    import os
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}): the full disk is untested")
    try:
        src = tmp_path / "cases"
        ids = _predict_inputs(finished[0], src)
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 2 * 4096))
        args = ("predict.py", "-i", str(src), "-o", str(disk / "out"), f"--workdir={finished[0]}")
        proc = _run(*args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "error: no space left on the device" in out and "Traceback" not in out, out
        assert [p.name for p in (disk / "out").iterdir() if p.name != ".lock"] == ["prediction.json"]
        (disk / "filler").unlink()
        proc = _run(*args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert sorted(p.name for p in (disk / "out").glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in ids)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
