"""What the end-to-end test files share: the smoke config, how they start train.py and the other commands,
and small readers (the smoke run they read is conftest.py's ``finished`` fixture)."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from processes import Forked, command, env

SMOKE = "configs/rediffinet.py:smoke"


def _train(workdir, *args, wait=True, timeout=300):
    cmd = ["train.py", f"--config={SMOKE}", f"--workdir={workdir}", *args]
    return command(cmd, timeout) if wait else Forked(cmd, env(2))


def _run(script, *args):
    return command([script, *args], 300)


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
