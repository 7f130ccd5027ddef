"""The two-stage cross-validation driver: runs what is missing of splits → stage-1 U-Net per fold →
out-of-fold U-Net predictions → stage-2 model per fold, in a work directory (:mod:`workdir`).

(Named ``driver`` rather than ``pipeline`` so it is not confused with ``data/pipeline``.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from rediffinet_jax import config_check, diffusion, given_maps, inference, parallel, progress, stages
from rediffinet_jax import workdir as wd
from rediffinet_jax.data import brats, changes, phantoms, pipeline, splits
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.labels import regions_to_labels
from rediffinet_jax.training import Trainer


@dataclasses.dataclass
class ValCase:
    """A held-out case for validation: cropped image, regions and (stage 2) U-Net masks, channels-last."""

    case_id: str
    image: np.ndarray
    regions: np.ndarray
    unet: np.ndarray | None = None


@dataclasses.dataclass
class Data:
    """What every stage of a run reads: the case files, their cache references and the folds."""

    files_by_id: dict
    refs: list
    refs_by_id: dict
    folds: list
    fingerprint: str = ""  # of the source files (changes.fingerprint): part of every stage's settings


def check_request(config, fold: int | None, stage: str | None = None) -> None:
    """What can be refused before any work (phantoms, cache, splits) is done.

    Raises:
      ConfigError: a setting that breaks a rule (:mod:`config_check`); a fold outside ``0..n_folds-1``; stage 1
        asked for where ``baseline.maps`` replaces it.
    """
    config_check.check(config)
    n = config.data.n_folds
    if fold is not None and not 0 <= fold < n:
        raise ConfigError(f"--fold {fold} is outside 0..{n - 1} (data.n_folds = {n})")
    if given_maps.configured(config) and (stage == "unet" or config.stages == "unet"):
        raise ConfigError("baseline.maps is given: there is no U-Net to train (--stage unet, stages=unet)")


def resolve_data(config, layout: wd.Layout, log=print) -> Path:
    """The data folder: ``data.root``, or phantoms generated into the work directory when it is empty."""
    if config.data.root:
        return Path(config.data.root)
    p = config.data.phantoms
    kind = "hard " if p.get("hard") else ""
    log(
        f"No data.root given: using {p.n_cases} generated {kind}phantom cases of shape {tuple(p.shape)} in "
        f"{layout.data}"
    )
    phantoms.write_dataset(
        layout.data,
        p.n_cases,
        tuple(p.shape),
        p.seed,
        progress=parallel.is_main(),
        hard=bool(p.get("hard", False)),
        tumour_scale=float(p.get("tumour_scale", 1.0)),
    )
    return layout.data


def prepare(config, layout: wd.Layout, progress_bars: bool, log=print) -> Data:
    """Phantoms (if no data.root), the split and the cache; several processes: process 0 makes the shared
    files first, the others then find them made."""
    d = config.data
    with parallel.main_first("prepare data"):
        layout.root.mkdir(parents=True, exist_ok=True)
        if parallel.is_main():
            wd.write_atomic(layout.config, config.to_json(indent=1))
        root = resolve_data(config, layout, log)
        cases = [c for c in brats.discover_cases(root, require_labels=True) if c.seg is not None]
        folds = splits.load_or_create(layout.root, [c.case_id for c in cases], d.n_folds, d.split_seed)
        refs = pipeline.prepare_cache(
            cases,
            layout.cache,
            d.normalization,
            d.old_brats,
            progress=progress_bars and parallel.is_main(),
            allow_empty_modality=d.get("allow_empty_modality", False),
            spacing=tuple(d.get("spacing") or ()) or None,
            log=log if parallel.is_main() else None,
        )
    by_id = {c.case_id: c for c in cases}
    return Data(by_id, refs, {r.case_id: r for r in refs}, folds, changes.fingerprint(layout.cache, list(by_id)))


def _val_cases(ids, refs_by_id, limit: int, with_unet: bool) -> list[ValCase]:
    ids = ids[:limit] if limit else ids
    out = []
    for cid in ids:
        folder = Path(refs_by_id[cid].folder)
        unet = np.load(folder / "unet.npy", mmap_mode="r") if with_unet else None
        out.append(
            ValCase(
                cid, np.load(folder / "image.npy", mmap_mode="r"), np.load(folder / "regions.npy", mmap_mode="r"), unet
            )
        )
    return out


def _recover_done(stage, layout: wd.Layout, k: int, log) -> dict | None:
    """A fold whose ``done.json`` is lost but whose last checkpoint is its final step: ``done.json`` written
    again from the checkpoints, with the training's ``run`` id where a record kept it (the U-Net's
    ``oof/runs.json``, or the fold's scores' ``trained.json``; else a fresh one), so that nothing made from it
    turns stale. None: the checkpoints do not say it finished."""
    folder = layout.fold(stage.name, k)
    # read from the folder, not through an Orbax manager: making one is a collective, and the processes of a
    # distributed run must not differ in their collectives (one may see another's empty new folder)
    ckpt = wd.checkpoints_dir(folder)
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
    if not steps or steps[-1] != stage.cfg.steps:
        return None
    vals = {}
    if wd.metrics_file(folder).is_file():
        for line in wd.metrics_file(folder).read_text().splitlines():
            rec = json.loads(line) if line.strip().startswith("{") else {}
            if "val_dice" in rec and rec.get("step") in steps:
                vals[rec["step"]] = rec["val_dice"]
    best = max(vals, key=lambda s: (vals[s], s)) if vals else steps[-1]
    run = wd.oof_record(layout).get(str(k)) if stage.name == layout.baseline else None
    scored = wd.scored_from(layout.eval_fold(stage.name, k)) or {}
    run = run or (scored.get("training") or {}).get("run") or parallel.shared_id()
    done = {"steps": stage.cfg.steps, "best_step": best, "latest_step": steps[-1], "run": run}
    wd.mark_trained(folder, done)
    log(f"{stage.name} {folder.name}: done.json was missing; its checkpoints say it finished: rebuilt (run {run})")
    return done


def _fit_folds(
    trainer, stage, layout: wd.Layout, data: Data, fold_ids, config, seed_offset: int, stop_after, log
) -> dict | None:
    """Trains (or skips, when done) each fold of a stage; returns ``{fold: done.json}``, or None when
    ``stop_after`` stopped it."""
    results = {}
    for k in fold_ids:
        folder = layout.fold(stage.name, k)
        if (done := wd.trained(folder) or _recover_done(stage, layout, k, log)) is None:
            train = [data.refs_by_id[c] for c in splits.train_ids(data.folds, k)]
            val = _val_cases(data.folds[k], data.refs_by_id, stage.cfg.val_cases, stage.with_unet)
            done = trainer.fit(
                folder,
                train,
                val,
                config.seed + seed_offset + k,
                num_workers=config.data.num_workers,
                stop_after=stop_after,
                log=log,
            )
            if done is None:
                return None
        results[k] = done
    return results


def predict_oof(stage, layout: wd.Layout, data: Data, trained_folds: dict, which: str, log=print) -> None:
    """Writes ``unet/oof/<case>.nii.gz`` for every case of the folds in ``trained_folds`` ({fold: its
    done.json}, as every process has it: not read back from a file process 0 may still be writing), with
    the fold's own U-Net, and records which training of the fold made them (:func:`workdir.oof_record`). A
    fold trained again since (its folder deleted by hand), or whose maps have no record, has them remade."""
    layout.oof.mkdir(parents=True, exist_ok=True)
    record = wd.oof_record(layout)
    for k, done in trained_folds.items():
        run_id = done.get("run")
        todo = [c for c in data.folds[k] if not layout.oof_map(c).is_file()]
        if wd.stale_folds({str(k): run_id}, record) and len(todo) < len(data.folds[k]):
            log(f"unet fold {k}: its out-of-fold maps were not made by its current training; remaking them")
            todo = list(data.folds[k])  # overwritten, not deleted: every process sees the same todo
        parallel.barrier(f"oof fold {k} listed")  # before process 0 writes a map another is still looking for
        if todo:
            _write_oof(stage, layout, data, k, todo, which, log)
        wd.record_oof(layout, record, k, run_id)
    parallel.barrier("oof written")  # the U-Net inference has no collective: process 0 may still be writing


def _write_oof(stage, layout: wd.Layout, data: Data, k: int, todo, which: str, log) -> None:
    model = inference.load_model(stage, layout.fold(stage.name, k), which, log=log)
    for cid in progress.bar(todo, f"oof fold {k}"):
        folder = Path(data.refs_by_id[cid].folder)
        meta = brats.cached_meta(folder)
        probs = inference.unet_probabilities(stage.cfg, model, np.load(folder / "image.npy", mmap_mode="r"))
        probs = brats.to_source(probs, meta)  # the map is made on the source grid (data.spacing)
        regions = brats.paste((probs > 0.5).astype(np.uint8), meta["box"], meta["full_shape"])
        if jax.process_index() == 0:
            brats.write_label_map(regions_to_labels(regions), layout.oof_map(cid), data.files_by_id[cid].images["t1n"])
    log(f"unet fold {k}: wrote {len(todo)} out-of-fold predictions to {layout.oof}")


def _unet_settings(config) -> dict:
    """What stage 1's results depend on (and so every stage 2 trained on its maps); with ``baseline.maps``,
    what the given maps' import depends on."""
    if given_maps.configured(config):
        return given_maps.settings(config)
    return {
        "seed": config.seed,
        "data": config.data.to_dict(),
        "unet": config.unet.to_dict(),
        wd.OOF_KEY: config.eval.checkpoint,
    }


def _only_fold(fold_ids, config) -> int | None:
    """The fold a command asked for alone (``--fold``), else None."""
    return fold_ids[0] if len(fold_ids) == 1 and config.data.n_folds > 1 else None


def _refuse_changed_settings(config, layout: wd.Layout, stage_flag, overwrite: bool) -> None:
    """The stages' settings compared with the saved ones before anything is written (config.json, phantoms,
    cache): a command that will be refused changes no file. The full check, with the U-Net trainings a
    refiner was trained on, follows once the data is ready."""
    if given_maps.configured(config):
        return
    checks = [(layout.stage(wd.BASELINE), _unet_settings(config), None, overwrite and stage_flag in (None, "unet"))]
    if config.stages != "unet" and stage_flag != "unet":
        d = {**_unet_settings(config), "diffusion": config.diffusion.to_dict()}
        checks.append((layout.stage(config.diffusion.model), d, stages.implied_settings(config), overwrite))
    for folder, settings, implied, allowed in checks:
        wd.refuse_changed(folder, settings, implied, allowed)
    _refuse_evaluation_changes(config, layout)


_SAMPLER_FLAGS = {"fusion": "--fusion", "steps": "--steps", "samples": "--samples", "start": "--start"}


def _refuse_evaluation_changes(config, layout: wd.Layout) -> None:
    """Settings that change only how a trained run is evaluated are not taken silently by train.py: a
    refiner keeps the sampler it was trained with, and scores keep their HD95 convention; the way to apply
    either (evaluate.py's flags, scored beside) is named instead."""
    stage = layout.stage(config.diffusion.model)
    if config.stages != "unet" and (stage / wd.SETTINGS_FILE).is_file():
        old, now = (
            diffusion.sampler_settings(x) for x in (wd.load_settings(stage).diffusion.sampler, config.diffusion.sampler)
        )
        for k, flag in _SAMPLER_FLAGS.items():
            a, b = old.get(k, diffusion.FIRST_T), now.get(k, diffusion.FIRST_T)
            if a != b:
                raise ConfigError(
                    f"diffusion.sampler.{k}: {a!r} -> {b!r} changes only how the trained {config.diffusion.model} "
                    f"samples: score it beside its own with evaluate.py --workdir {layout.root} {flag} {b} (or "
                    f"train into another --workdir)"
                )
    old, new = wd.read_json(layout.config, {}).get("eval", {}).get("convention"), config.eval.convention
    if old and old != new and layout.eval.is_dir():
        raise ConfigError(
            f"eval.convention: {old!r} -> {new!r}: the scores in {layout.eval} use {old}; score in {new} with "
            f"evaluate.py --workdir {layout.root} --convention {new}"
        )


def _refuse_data_changes(layout: wd.Layout, overwrite: bool, log) -> None:
    """A source file changed under a trained run (:mod:`changes`): refused, or with ``overwrite`` named and
    retrained (the stages' settings hold the data's fingerprint)."""
    if not layout.splits.is_file():
        return
    ids = [c for fold in wd.read_json(layout.splits)["folds"] for c in fold]
    if not overwrite:
        changes.refuse_changes(
            layout.cache,
            ids,
            "the stages trained on it and their scores no longer match it; restore it, retrain every stage on it "
            "with --overwrite, or use another --workdir",
        )
    for line in changes.changed_sources(layout.cache, ids):
        log(f"--overwrite: {line}; the stages trained on it are trained again")


def run_unet(
    config, layout: wd.Layout, data: Data, fold_ids, stage_flag, overwrite, stop_after, progress_bars, log
) -> dict | None:
    """Stage 1: settings checked, the U-Net of each fold, then its out-of-fold maps."""
    stage = stages.make("unet", config.unet)
    settings = {**_unet_settings(config), wd.DATA_KEY: data.fingerprint}
    with parallel.main_first("unet settings"):
        if stage_flag in (None, "unet"):  # the maps are remade below
            wd.renew_oof_if_checkpoint_changed(layout, settings, log)
        wd.check_stage_config(
            layout.stage(stage.name),
            settings,
            overwrite and stage_flag in (None, "unet"),
            log,
            only_fold=_only_fold(fold_ids, config),
        )
    if stage_flag not in (None, "unet"):
        return {}
    trainer = Trainer(stage, progress=progress_bars)
    results = _fit_folds(trainer, stage, layout, data, fold_ids, config, 0, stop_after, log)
    if results is not None:
        predict_oof(stage, layout, data, results, config.eval.checkpoint, log)
    return results


def run_diffusion(
    config, layout: wd.Layout, data: Data, fold_ids, overwrite, stop_after, progress_bars, log
) -> tuple[str, dict | None]:
    """Stage 2: settings checked (with the U-Net trainings whose maps it trains on), each fold trained."""
    stage = stages.make("diffusion", config.diffusion)
    settings = {**_unet_settings(config), "diffusion": config.diffusion.to_dict(), wd.DATA_KEY: data.fingerprint}
    with parallel.main_first(f"{stage.name} settings"):
        if stage.with_unet:  # trained on these U-Nets' maps: refused once a U-Net fold is trained again
            pipeline.attach_unet_masks(data.refs, layout.oof)
            settings[wd.OOF_RUNS] = wd.oof_runs(layout, config.data.n_folds)
        implied = stages.implied_settings(config)
        only = _only_fold(fold_ids, config)
        wd.check_stage_config(layout.stage(stage.name), settings, overwrite, log, implied, only_fold=only)
    trainer = Trainer(stage, progress=progress_bars)
    return stage.name, _fit_folds(trainer, stage, layout, data, fold_ids, config, 100, stop_after, log)


def run(
    config,
    workdir,
    *,
    fold: int | None = None,
    stage: str | None = None,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Runs what is missing of the two-stage pipeline; returns {stage: {fold: done.json}} of the stages
    finished (a stage stopped by ``stop_after`` is left out)."""
    check_request(config, fold, stage)
    given = given_maps.configured(config)
    layout = wd.Layout(workdir, wd.GIVEN if given else wd.BASELINE)
    _refuse_changed_settings(config, layout, stage, overwrite)
    _refuse_data_changes(layout, overwrite, log)
    data = prepare(config, layout, progress, log)
    fold_ids = list(range(config.data.n_folds)) if fold is None else [fold]
    results: dict = {}
    if given:
        imported = given_maps.import_maps(config, layout, data, overwrite and stage is None, log)
        unet = {k: imported[k] for k in fold_ids}
    else:
        unet = run_unet(config, layout, data, fold_ids, stage, overwrite, stop_after, progress, log)
    if unet is None:
        return results
    if unet:
        results[layout.baseline] = unet
    if config.stages == "unet" or stage == "unet":
        return results
    name, done = run_diffusion(config, layout, data, fold_ids, overwrite, stop_after, progress, log)
    if done is not None:
        results[name] = done
    return results
