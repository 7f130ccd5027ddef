"""Scores saved folds on their held-out cases, on the full original grid (SPEC §6).

For every model and fold: the baseline U-Net is scored from its out-of-fold label maps (made by the
fold's own U-Net); a diffusion model is restored from its checkpoint, run by sliding window on the
held-out cases (conditioned on those same out-of-fold U-Net masks), and its label maps are written
to ``eval/<model>/fold_k/pred/``. Every model is scored on the regions of the label map it outputs
(nested: TC ⊆ WT, ET ⊆ TC after painting), never on raw per-region masks. Rows go to
``eval/<model>/fold_k/cases.csv`` as each case is done, so an interrupted evaluation resumes; cases
already scored are skipped. ``fold_k/trained.json`` records the training the rows come from (the fold's
done.json) and that of the U-Net whose out-of-fold maps they used: a fold trained again (``train.py
--overwrite``), or whose U-Net maps were remade, is rescored, never summarized from old rows.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from rediffinet_jax import metrics, parallel, reports
from rediffinet_jax.data import brats
from rediffinet_jax.driver import (OOF_KEY, OOF_RUNS, check_record, load_settings, oof_record, stale_folds,
                                   trained)
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.labels import labels_to_regions, regions_to_labels
from rediffinet_jax.training import DiffusionStage, Trainer

BASELINE = "unet"
# seconds: the model's prediction of the case (sliding window and sampler); empty for the U-Net, whose
# rows come from its out-of-fold maps
CASE_COLUMNS = ("case", "region", "dice", "hd95", "lesionwise_dice", "lesionwise_hd95", "tp", "fp", "fn",
                *metrics.FLIP_KEYS, "seconds", "convention")


def trained_models(workdir: Path) -> list[str]:
    """The stage folders of a work directory: the baseline first, then diffusion models by name."""
    names = [p.name for p in sorted(workdir.iterdir()) if (p / "settings.json").is_file()]
    if BASELINE not in names:
        raise ConfigError(f"{workdir} has no trained U-Net (unet/settings.json); run train.py first")
    return [BASELINE] + [n for n in names if n != BASELINE]


def read_rows(path: Path) -> list[dict]:
    """The rows of ``eval/<model>/fold_k/cases.csv``; refuses one with other columns (an older version's)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if tuple(reader.fieldnames or ()) != CASE_COLUMNS:
        raise ConfigError(f"{path} has the columns {reader.fieldnames}, not {list(CASE_COLUMNS)} (an older "
                          f"version wrote it); delete {path.parents[2]} to rescore")
    for r in rows:
        for k in ("dice", "hd95", "lesionwise_dice", "lesionwise_hd95", "seconds"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
        for k in metrics.FLIP_KEYS:
            r[k] = int(r[k])
    return rows


def _append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CASE_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def _case_arrays(cache: Path, cid: str):
    folder = cache / cid
    meta = brats.cached_meta(folder)
    box, full = meta["box"], meta["full_shape"]
    gt = brats.paste(np.load(folder / "regions.npy"), box, full)
    return folder, meta, box, full, gt


def _made_from(done: dict, maps_by: dict, k: int) -> dict:
    """What a fold's rows are made from: the model's training (its done.json) and the training of the
    U-Net fold whose out-of-fold maps it was scored against (U(I), the flips)."""
    return {"training": done, "unet_maps": maps_by.get(str(k))}


def _tie_to_training(out_dir: Path, made_from: dict, log) -> None:
    """Deletes ``out_dir``'s rows and maps unless they were made from ``made_from`` (:func:`_made_from`),
    then records it (``trained.json``). Process 0 does it; every process returns once it is done."""
    with parallel.main_first(f"tie {out_dir.parent.name}/{out_dir.name}"):
        if not parallel.is_main():
            return
        record = out_dir / "trained.json"
        if out_dir.is_dir() and (not record.is_file() or json.loads(record.read_text()) != made_from):
            log(f"{out_dir}: scored before the fold or its U-Net maps were made again (or by an older version); "
                f"rescoring it")
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(made_from))


def _sampler_label(name: str, sampler, override: dict | None) -> str:
    """``name``, or ``name-<fusion>-k<K>-s<S>`` when ``override`` changes the model's own sampler (it is
    then applied to ``sampler``, the stage's ConfigDict), so both evaluations sit side by side."""
    override = {k: v for k, v in (override or {}).items() if v is not None and v != sampler[k]}
    if not override:
        return name
    sampler.update(override)
    return f"{name}-{sampler.fusion}-k{sampler.steps}-s{sampler.samples}"


def evaluate(workdir, models=None, folds=None, checkpoint: str | None = None, convention: str | None = None,
             sampler: dict | None = None, progress: bool = True, log=print) -> dict:
    """Scores every (model, fold), writes cases.csv per fold and eval/summary.{md,csv,json} + figures.

    checkpoint: ``best`` or ``latest`` of each diffusion fold; by default the run's ``eval.checkpoint``
    (config.json), else ``latest`` (validation scores the held-out fold: ``best`` selects on it).
    convention: the HD95 convention; by default the run's ``eval.convention`` (config.json), else
    ``brats2023``. Rows already scored in another convention are refused (delete eval/ to rescore).
    sampler: ``{"fusion", "steps", "samples"}`` overriding the diffusion models' own (None: keep); results
    then go to ``eval/<model>-<fusion>-k<K>-s<S>/``. A folder's rows made with another checkpoint or
    sampler, or from other out-of-fold maps, are refused.
    Returns the summary dict (see :func:`reports.summary_tables`).
    """
    workdir = Path(workdir)
    splits_path = workdir / "splits.json"
    if not splits_path.is_file():
        raise ConfigError(f"{workdir} has no splits.json; run train.py first")
    all_folds = json.loads(splits_path.read_text())["folds"]
    names = trained_models(workdir)
    if models:
        unknown = sorted(set(models) - set(names))
        if unknown:
            raise ConfigError(f"no trained model {unknown} in {workdir}; found {names}")
        names = [BASELINE] + [n for n in names if n in models and n != BASELINE]
    fold_ids = list(range(len(all_folds))) if folds is None else list(folds)
    run_config = workdir / "config.json"
    saved = json.loads(run_config.read_text()).get("eval", {}) if run_config.is_file() else {}
    convention = convention or saved.get("convention", "brats2023")
    checkpoint = checkpoint or saved.get("checkpoint", "latest")
    if convention not in metrics.CONVENTIONS:
        raise ConfigError(f"unknown HD95 convention {convention!r}; choose one of {metrics.CONVENTIONS}")
    cache, oof = workdir / "cache", workdir / BASELINE / "oof"
    per_fold: dict = {}
    scored = []  # eval/ folder names, in order
    oof_checkpoint = load_settings(workdir / BASELINE).get(OOF_KEY)
    maps_by = oof_record(workdir / BASELINE)  # which training of each U-Net fold made its out-of-fold maps
    for name in names:
        if name == BASELINE:
            label, dstage, settings = name, None, {OOF_KEY: oof_checkpoint}
        else:
            stage_settings = load_settings(workdir / name)
            if stage_settings.get(OOF_KEY) != oof_checkpoint:
                log(f"{name}: trained on out-of-fold maps from the {stage_settings.get(OOF_KEY)} checkpoints, which "
                    f"are now made from the {oof_checkpoint} ones; skipped (retrain it: train.py --overwrite)")
                continue
            if OOF_RUNS in stage_settings and (stale := stale_folds(stage_settings[OOF_RUNS].to_dict(), maps_by)):
                log(f"{name}: trained on out-of-fold maps of U-Net fold(s) {stale} that were trained again since; "
                    f"skipped (retrain it: train.py --overwrite)")
                continue
            cfg = stage_settings.diffusion
            label = _sampler_label(name, cfg.sampler, sampler)
            dstage = DiffusionStage(cfg)
            settings = {"checkpoint": checkpoint, "sampler": {k: cfg.sampler[k] for k in ("fusion", "steps", "samples")},
                        OOF_KEY: oof_checkpoint}
        # what its rows are made with (checkpoint, sampler, the checkpoints of the out-of-fold maps)
        check_record(workdir / "eval" / label / "settings.json", settings, "delete it to rescore")
        scored.append(label)
        trainer = None
        for k in fold_ids:
            done = trained(workdir / name / f"fold_{k}")
            if done is None:
                log(f"{name} fold {k}: not trained, skipped")
                continue
            if name == BASELINE and stale_folds({str(k): done.get("run")}, maps_by):
                log(f"unet fold {k}: trained again since its out-of-fold maps were made; skipped (train.py --stage "
                    f"unet remakes them)")
                continue
            out_dir = workdir / "eval" / label / f"fold_{k}"
            _tie_to_training(out_dir, _made_from(done, maps_by, k), log)
            csv_path = out_dir / "cases.csv"
            old = read_rows(csv_path)
            if any(r["convention"] != convention for r in old):
                raise ConfigError(f"{csv_path} was scored with HD95 convention {old[0]['convention']}, not "
                                  f"{convention}; delete {workdir / 'eval'} to rescore")
            done = {r["case"] for r in old}
            todo = [c for c in all_folds[k] if c not in done]
            parallel.barrier(f"listed {label}/{k}")  # every process has read the rows before process 0 adds any
            model = None
            for cid in _bar(todo, f"eval {label} fold {k}", progress):
                folder, meta, box, full, gt = _case_arrays(cache, cid)
                unet_full = labels_to_regions(np.asarray(brats.read_nifti(oof / f"{cid}.nii.gz", cid)[0], np.uint8))
                seconds = float("nan")
                if dstage is None:
                    pred = unet_full
                else:
                    if model is None:
                        trainer = trainer or Trainer(dstage, progress=False)
                        model = trainer.load(workdir / name / f"fold_{k}", checkpoint)
                    t0 = time.perf_counter()
                    labels = regions_to_labels(_refine(dstage, model, folder, brats.crop(unet_full, box), box, full,
                                                       k, cid))
                    seconds = time.perf_counter() - t0
                    if parallel.is_main():
                        _write_pred(labels, out_dir / "pred" / f"{cid}.nii.gz", workdir, cid)
                    # score the label map written, as for the U-Net: its regions are nested (a TC voxel
                    # outside WT counts as WT), which the refiner's per-region flips need not be
                    pred = labels_to_regions(labels)  # = labels.nested(refined)
                rows = metrics.score_case(pred, gt, meta["spacing"], cid, convention,
                                          with_lesion_wise=True)
                for row, flips in zip(rows, metrics.flip_counts(pred, unet_full, gt)):
                    row.update({k: flips[k] for k in metrics.FLIP_KEYS}, seconds=f"{seconds:.4f}")
                if parallel.is_main():  # every process scored the case (the sampler runs on all); one writes
                    _append_rows(csv_path, rows)
            parallel.barrier(f"scored {label}/{k}")
            per_fold.setdefault(label, {})[k] = read_rows(csv_path)
    if not any(rows for folds in per_fold.values() for rows in folds.values()):
        raise ConfigError(f"nothing was scored in {workdir}: no trained fold among folds {fold_ids}")
    _add_other_samplers(workdir, per_fold, names, fold_ids, convention, maps_by, log)
    summary = reports.write_summary(workdir / "eval", per_fold, convention, checkpoint, write=parallel.is_main())
    if parallel.is_main():
        reports.hd95_by_model_figure(per_fold, workdir / "eval" / "figures" / "hd95_by_model.png")
        _case_figures(workdir, per_fold, scored, fold_ids, all_folds)
    log(reports.summary_markdown(summary))
    return summary


def _add_other_samplers(workdir: Path, per_fold: dict, names, fold_ids, convention: str, maps_by: dict,
                        log) -> None:
    """Adds to ``per_fold`` the rows of earlier evaluations of these models with another sampler (their own,
    or ``eval/<model>-<fusion>-k<K>-s<S>/``; same HD95 convention, same training of the fold and of its
    U-Net maps), so that the summary compares them."""
    for folder in sorted((workdir / "eval").iterdir()):
        owners = [n for n in names if n != BASELINE and (folder.name == n or folder.name.startswith(f"{n}-"))]
        if folder.name in per_fold or not (folder / "settings.json").is_file() or not owners:
            continue
        name = max(owners, key=len)
        for k in fold_ids:
            rows = read_rows(folder / f"fold_{k}" / "cases.csv")
            if not rows or any(r["convention"] != convention for r in rows):
                continue
            record = folder / f"fold_{k}" / "trained.json"
            now = _made_from(trained(workdir / name / f"fold_{k}"), maps_by, k)
            if not record.is_file() or json.loads(record.read_text()) != now:
                log(f"{folder / f'fold_{k}'}: scored before {name} fold {k} or its U-Net maps were made again; left "
                    f"out of the summary (score it again with its evaluate.py options)")
                continue
            per_fold.setdefault(folder.name, {})[k] = rows


def _refine(dstage, model, folder, unet_crop, box, full, fold, cid):
    s = dstage.cfg.sampler
    key = jax.random.fold_in(jax.random.key(fold), zlib.crc32(cid.encode()) % (1 << 31))  # stable per case
    unet = unet_crop if dstage.with_unet else None
    y = dstage.fused(model, np.load(folder / "image.npy", mmap_mode="r"), unet, key, s.steps, s.samples, s.fusion,
                     s.chunk or None)
    fused = np.asarray(dstage.variant.finish((y > 0).astype(np.uint8), unet))
    return brats.paste(fused.astype(np.uint8), box, full)


def _write_pred(labels, path: Path, workdir: Path, cid: str) -> None:
    src = next((workdir / "data" / cid).glob(f"{cid}-t1n.nii*"), None) if (workdir / "data" / cid).is_dir() else None
    if src is None:  # real data: the reference geometry is the out-of-fold map, written from the source
        src = workdir / BASELINE / "oof" / f"{cid}.nii.gz"
    brats.write_label_map(labels, path, src)


def _bar(items, desc, progress):
    if not progress or jax.process_index() != 0:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="case", leave=False)


def _case_figures(workdir: Path, per_fold, names, fold_ids, all_folds, n: int = 2) -> None:
    """Figure-2-style PNGs for the cases where the first diffusion model changed HD95 the most."""
    refined = next((n_ for n_ in names if n_ != BASELINE), None)
    if refined is None:
        return
    gains = []
    for k in fold_ids:
        base = {(r["case"], r["region"]): r["hd95"] for r in per_fold.get(BASELINE, {}).get(k, [])}
        for r in per_fold.get(refined, {}).get(k, []):
            if (r["case"], r["region"]) in base and r["region"] == "WT":
                gains.append((base[(r["case"], r["region"])] - r["hd95"], r["case"], k))
    for _, cid, k in sorted(gains, reverse=True)[:n]:
        folder, meta, box, full, gt = _case_arrays(workdir / "cache", cid)
        image = brats.paste(np.load(folder / "image.npy"), box, full)
        unet = labels_to_regions(np.asarray(brats.read_nifti(workdir / BASELINE / "oof" / f"{cid}.nii.gz", cid)[0],
                                            np.uint8))
        pred_path = workdir / "eval" / refined / f"fold_{k}" / "pred" / f"{cid}.nii.gz"
        if not pred_path.is_file():
            continue
        ref = labels_to_regions(np.asarray(brats.read_nifti(pred_path, cid)[0], np.uint8))
        reports.refinement_figure(image, gt, unet, ref, workdir / "eval" / "figures" / f"{cid}_{refined}.png",
                                  f"{cid} (fold {k}): {refined}")
