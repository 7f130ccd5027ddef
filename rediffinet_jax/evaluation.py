"""Scores saved folds on their held-out cases, on the full original grid (docs/evaluation.md).

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

import dataclasses
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from rediffinet_jax import (
    diffusion,
    figures,
    gate_eval,
    inference,
    metrics,
    official,
    parallel,
    progress,
    reports,
    stages,
)
from rediffinet_jax import workdir as wd
from rediffinet_jax.case_rows import append_rows, read_rows
from rediffinet_jax.data import brats, changes
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.labels import labels_to_regions, regions_to_labels

BASELINE = wd.BASELINE


@dataclasses.dataclass
class Run:
    """What an evaluation scores: the work directory, its folds, the options resolved against its config."""

    layout: wd.Layout
    all_folds: list
    fold_ids: list
    convention: str
    checkpoint: str
    oof_checkpoint: str
    maps_by: dict  # which training of each U-Net fold made its out-of-fold maps
    names: list = dataclasses.field(default_factory=list)  # the stage folders asked for


@dataclasses.dataclass
class Model:
    """One row of the tables: its eval/ label, its stage folder, and (diffusion) the stage to run."""

    label: str
    name: str
    stage: object = None
    settings: dict = dataclasses.field(default_factory=dict)


def _open_run(workdir, folds, checkpoint, convention) -> Run:
    layout = wd.Layout(workdir)
    if not layout.splits.is_file():
        raise ConfigError(f"{layout.root} has no splits.json; run train.py first")
    all_folds = wd.read_json(layout.splits)["folds"]
    changes.refuse_changes(
        layout.cache,
        [c for fold in all_folds for c in fold],
        f"the models trained on it and their scores no longer match it; restore it, or retrain on it with train.py "
        f"--workdir {layout.root} --overwrite",
    )
    fold_ids = list(range(len(all_folds))) if folds is None else list(folds)
    if bad := [k for k in fold_ids if not 0 <= k < len(all_folds)]:
        raise ConfigError(f"--folds {bad} outside 0..{len(all_folds) - 1}")
    saved = wd.read_json(layout.config, {}).get("eval", {})
    convention = convention or saved.get("convention", "brats2023")
    if convention not in metrics.CONVENTIONS:
        raise ConfigError(f"unknown HD95 convention {convention!r}; choose one of {metrics.CONVENTIONS}")
    return Run(
        layout,
        all_folds,
        fold_ids,
        convention,
        checkpoint or saved.get("checkpoint", "latest"),
        wd.load_settings(layout.stage(layout.baseline)).get(wd.OOF_KEY),
        wd.oof_record(layout),
    )


def _sampler_label(name: str, sampler, override: dict | None) -> str:
    """``name``, or ``name-<fusion>-k<K>-s<S>[-t<start>]`` when ``override`` changes the model's own sampler
    (it is then applied to ``sampler``, the stage's ConfigDict), so both evaluations sit side by side."""
    own = {**diffusion.sampler_settings(sampler), "start": diffusion.sampler_start(sampler)}
    override = {k: v for k, v in (override or {}).items() if v is not None and v != own[k]}
    if not override:
        return name
    sampler.update(override)
    start = diffusion.sampler_start(sampler)
    return f"{name}-{sampler.fusion}-k{sampler.steps}-s{sampler.samples}" + (
        f"-t{start}" if start != diffusion.FIRST_T else ""
    )


def _models(run: Run, models, sampler, log) -> list[Model]:
    """The models to score (the baseline first), leaving out refiners trained on out-of-fold maps other
    than the current ones. Sets ``run.names``: the stage folders asked for."""
    names = wd.trained_stages(run.layout)
    if models:
        if unknown := sorted(set(models) - set(names)):
            raise ConfigError(f"no trained model {unknown} in {run.layout.root}; found {names}")
        names = [names[0]] + [n for n in names[1:] if n in models]
    run.names = names
    base = run.layout.baseline
    out = [Model(base, base, None, {wd.OOF_KEY: run.oof_checkpoint})]
    for name in names[1:]:
        settings = wd.load_settings(run.layout.stage(name))
        if settings.get(wd.OOF_KEY) != run.oof_checkpoint:
            log(
                f"{name}: trained on out-of-fold maps from the {settings.get(wd.OOF_KEY)} checkpoints, which "
                f"are now made from the {run.oof_checkpoint} ones; skipped (retrain it: train.py --overwrite)"
            )
            continue
        if wd.OOF_RUNS in settings and (stale := wd.stale_folds(settings[wd.OOF_RUNS].to_dict(), run.maps_by)):
            log(
                f"{name}: trained on out-of-fold maps of U-Net fold(s) {stale} that were trained again since; "
                f"skipped (retrain it: train.py --overwrite)"
            )
            continue
        cfg = settings.diffusion
        label = _sampler_label(name, cfg.sampler, sampler)
        out.append(
            Model(
                label,
                name,
                stages.make("diffusion", cfg),
                {
                    "checkpoint": run.checkpoint,
                    "sampler": diffusion.sampler_settings(cfg.sampler),
                    wd.OOF_KEY: run.oof_checkpoint,
                },
            )
        )
    return out


def evaluate(
    workdir,
    models=None,
    folds=None,
    checkpoint: str | None = None,
    convention: str | None = None,
    sampler: dict | None = None,
    progress: bool = True,
    log=print,
    scorer: str = "ours",
    gate: bool | None = None,
) -> dict:
    """Scores every (model, fold), writes cases.csv per fold and eval/summary.{md,csv,json} + figures.

    checkpoint: ``best`` or ``latest`` of each diffusion fold; by default the run's ``eval.checkpoint``
    (config.json), else ``latest`` (validation scores the held-out fold: ``best`` selects on it).
    convention: the HD95 convention; by default the run's ``eval.convention`` (config.json), else
    ``brats2023``. Rows already scored in another convention are refused (delete eval/ to rescore).
    sampler: ``{"fusion", "steps", "samples"}`` overriding the diffusion models' own (None: keep); results
    then go to ``eval/<model>-<fusion>-k<K>-s<S>/``. A folder's rows made with another checkpoint or
    sampler, or from other out-of-fold maps, are refused.
    scorer: ``official`` also runs the official BraTS package on the maps (checked first; :mod:`official`),
    its numbers beside ours. gate: also score each discrepancy refiner gated (``<label>+gate``,
    :mod:`gate_eval`); by default the run's ``eval.gate``, else on.
    Returns the summary dict (see :func:`reports.summary_tables`).

    Raises:
      ConfigError: nothing could be scored (no trained fold among ``folds``), or a refused folder.
    """
    package = official.require() if scorer == "official" else None
    run = _open_run(workdir, folds, checkpoint, convention)
    chosen = _models(run, models, sampler, log)
    per_fold, scored = _score_models(run, chosen, progress, log)
    if not any(rows for folds_ in per_fold.values() for rows in folds_.values()):
        raise ConfigError(f"nothing was scored in {run.layout.root}: no trained fold among folds {run.fold_ids}")
    gates = _score_gated(run, chosen, per_fold, scored, gate, progress, log)
    _add_other_samplers(run, per_fold, log)
    scores = _official(run, per_fold, package, progress) if package and parallel.is_main() else None
    return _summarize(run, per_fold, scored, scores, gates, log)


def _summarize(run: Run, per_fold: dict, scored: list, official_scores, gates: dict, log) -> dict:
    """Writes eval/summary.* and the figures (process 0), logs the summary and returns it."""
    summary = reports.write_summary(
        run.layout.eval,
        per_fold,
        run.convention,
        run.checkpoint,
        write=parallel.is_main(),
        official=official_scores,
        baseline=run.layout.baseline,
        gates=gates,
    )
    if parallel.is_main():
        figures.hd95_by_model_figure(per_fold, run.layout.figure("hd95_by_model.png"))
        _case_figures(run, per_fold, scored)
    log(reports.summary_markdown(summary))
    return summary


def _score_gated(run: Run, models: list[Model], per_fold: dict, scored: list, gate, progress_bar: bool, log) -> dict:
    """Adds the gated rows (:mod:`gate_eval`) to ``per_fold`` and ``scored``: the U-Net post-processed
    (``<unet>+pp``) and each discrepancy refiner gated (``<label>+gate``), unless ``gate`` (or, when None, the
    run's ``eval.gate``) is off; returns the choices, ``{label: record}`` (the U-Net's under ``<unet>+pp``)."""
    gates = {}
    if not (gate if gate is not None else wd.read_json(run.layout.config, {}).get("eval", {}).get("gate", True)):
        return gates
    unet = next((m.label for m in models if m.stage is None), None)
    for model in models:
        if model.stage is None and model.label in per_fold:
            kind = gate_eval.POSTPROCESS
        elif model.stage is not None and model.stage.variant.target == "discrepancy" and model.label in per_fold:
            kind = gate_eval.GATE
        else:
            continue
        rows, record = gate_eval.score_gated(run, model, progress_bar, log, _write_pred, kind, per_fold.get(unet))
        label = gate_eval.gated_label(model.label, kind)
        gates[label if kind is gate_eval.POSTPROCESS else model.label] = record
        per_fold[label] = rows
        scored.append(label)
    return gates


def _score_models(run: Run, models: list[Model], progress_bar: bool, log) -> tuple[dict, list]:
    """Scores every fold of every model: ({label: {k: rows}}, the labels scored, in order)."""
    per_fold: dict = {}
    for model in models:
        # what its rows are made with (checkpoint, sampler, the checkpoints of the out-of-fold maps)
        wd.check_record(run.layout.eval_settings(model.label), model.settings, "delete it to rescore")
        for k in run.fold_ids:
            rows = _score_fold(run, model, k, progress_bar, log)
            if rows is not None:
                per_fold.setdefault(model.label, {})[k] = rows
    return per_fold, [m.label for m in models]


def _score_fold(run: Run, model: Model, k: int, progress_bar: bool, log) -> list[dict] | None:
    """Scores the fold's held-out cases not scored yet; returns all its rows (None: fold not trained)."""
    done = wd.trained(run.layout.fold(model.name, k))
    if done is None:
        log(f"{model.name} fold {k}: not trained, skipped")
        return None
    if model.stage is None and wd.stale_folds({str(k): done.get("run")}, run.maps_by):
        log(
            f"unet fold {k}: trained again since its out-of-fold maps were made; skipped (train.py --stage "
            f"unet remakes them)"
        )
        return None
    out_dir = run.layout.eval_fold(model.label, k)
    wd.tie_to_training(out_dir, wd.made_from(done, run.maps_by, k), log)
    csv_path = run.layout.cases_csv(model.label, k)
    old = read_rows(csv_path, repair=True)
    if any(r["convention"] != run.convention for r in old):
        raise ConfigError(
            f"{csv_path} was scored with HD95 convention {old[0]['convention']}, not "
            f"{run.convention}; delete {run.layout.eval} to rescore"
        )
    todo = [c for c in run.all_folds[k] if c not in {r["case"] for r in old}]
    parallel.barrier(f"listed {model.label}/{k}")  # every process has read the rows before process 0 adds any
    net = None
    for cid in progress.bar(todo, f"eval {model.label} fold {k}", enabled=progress_bar):
        if model.stage is not None and net is None:
            net = inference.load_model(model.stage, run.layout.fold(model.name, k), run.checkpoint, log=log)
        rows = _score_case(run, model, net, k, cid)
        if parallel.is_main():  # every process scored the case (the sampler runs on all); one writes
            append_rows(csv_path, rows)
    parallel.barrier(f"scored {model.label}/{k}")
    return read_rows(csv_path)


def _score_case(run: Run, model: Model, net, k: int, cid: str) -> list[dict]:
    """The rows of one case: its label map (the U-Net's out-of-fold one, or the model's, written to pred/)
    scored against the ground truth, with the flips against the U-Net and the seconds of the prediction."""
    folder = run.layout.cache / cid
    meta = brats.cached_meta(folder)
    box, full = meta["box"], meta["full_shape"]
    gt = brats.paste(brats.source_truth(folder), box, full)
    unet_full = labels_to_regions(np.asarray(brats.read_nifti(run.layout.oof_map(cid), cid)[0], np.uint8))
    seconds, pred = float("nan"), unet_full
    if model.stage is not None:
        t0 = time.perf_counter()
        refined, fields = _refine(model.stage, net, folder, brats.crop(unet_full, box), meta, k, cid)
        labels = regions_to_labels(refined)
        seconds = time.perf_counter() - t0
        if parallel.is_main():
            _write_pred(labels, run.layout.pred_map(model.label, k, cid), run.layout, cid)
            if model.stage.variant.target == "discrepancy":  # what the gate reads (gate_eval)
                fused = run.layout.eval_fold(model.label, k) / gate_eval.FIELDS_DIR / f"{cid}.npz"
                gate_eval.save_fields(fused, fields["y"], fields["p"])
        # score the label map written, as for the U-Net: its regions are nested (a TC voxel outside WT
        # counts as WT), which the refiner's per-region flips need not be
        pred = labels_to_regions(labels)  # = labels.nested(refined)
    rows = metrics.score_case(pred, gt, meta["spacing"], cid, run.convention, with_lesion_wise=True)
    for row, flips in zip(rows, metrics.flip_counts(pred, unet_full, gt)):
        row.update({k: flips[k] for k in metrics.FLIP_KEYS}, seconds=f"{seconds:.4f}")
    return rows


def _refine(stage, model, folder, unet_crop, meta, fold, cid):
    """(the refined regions on the full grid, the refiner's fields on the crop of the source grid: ``y``,
    ``p``). The refiner runs on the working grid (``data.spacing``); its fields are resampled back to the
    source grid, where U(I) is flipped."""
    s = stage.cfg.sampler
    key = jax.random.fold_in(jax.random.key(fold), zlib.crc32(cid.encode()) % (1 << 31))  # stable per case
    unet = brats.to_work(unet_crop, meta) if stage.with_unet else None
    image = np.load(folder / "image.npy", mmap_mode="r")
    out = inference.diffusion_fused(stage, model, image, unet, key, s.steps, s.samples, s.fusion, s.chunk or None)
    fields = {k: brats.to_source(out[k], meta) for k in ("y", "p")}
    refined = inference.finish(stage, fields["y"], unet_crop if stage.with_unet else None).astype(np.uint8)
    return brats.paste(refined, meta["box"], meta["full_shape"]), fields


def _write_pred(labels, path: Path, layout: wd.Layout, cid: str) -> None:
    # the geometry: a phantom's own file; real data: the out-of-fold map, written with the source's
    src = layout.source_image(cid) or layout.oof_map(cid)
    brats.write_label_map(labels, path, src)


def _add_other_samplers(run: Run, per_fold: dict, log) -> None:
    """Adds to ``per_fold`` the rows of earlier evaluations of the scored models with another sampler
    (their own, or ``eval/<model>-<fusion>-k<K>-s<S>/``; same HD95 convention, same training of the fold
    and of its U-Net maps), so that the summary compares them."""
    names = run.names[1:]
    for folder in sorted(run.layout.eval.iterdir()):
        owners = [n for n in names if folder.name in (n, gate_eval.gated_label(n)) or folder.name.startswith(f"{n}-")]
        if folder.name in per_fold or not run.layout.eval_settings(folder.name).is_file() or not owners:
            continue
        name = max(owners, key=len)
        for k in run.fold_ids:
            rows = read_rows(run.layout.cases_csv(folder.name, k))
            if not rows or any(r["convention"] != run.convention for r in rows):
                continue
            now = wd.made_from(wd.trained(run.layout.fold(name, k)), run.maps_by, k)
            if wd.scored_from(run.layout.eval_fold(folder.name, k)) != now:
                log(
                    f"{run.layout.eval_fold(folder.name, k)}: scored before {name} fold {k} or its U-Net maps were "
                    f"made again; left out of the summary (score it again with its evaluate.py options)"
                )
                continue
            per_fold.setdefault(folder.name, {})[k] = rows


def _official(run: Run, per_fold: dict, package: str, progress_bar: bool) -> dict:
    """The official package's scores of every scored (model, fold): {"version", "scores"}; the ground
    truth is written to ``eval/official/gt/`` first (label maps from the cached regions)."""
    evaluator = official.make_evaluator()
    scores: dict = {}
    for label, folds_ in per_fold.items():
        for k, rows in folds_.items():
            cases = sorted({r["case"] for r in rows})
            pairs = []
            for cid in progress.bar(cases, f"official {label} fold {k}", enabled=progress_bar):
                pred = run.layout.oof_map(cid) if label == run.layout.baseline else run.layout.pred_map(label, k, cid)
                pairs.append((cid, pred, _official_gt(run.layout, cid)))
            scores.setdefault(label, {})[k] = official.score(pairs, evaluator)
    return {"version": package, "scores": official.folds_summary(scores)}


def _official_gt(layout: wd.Layout, cid: str) -> Path:
    path = layout.eval / "official" / "gt" / f"{cid}.nii.gz"
    if not path.is_file():
        meta = brats.cached_meta(layout.cache / cid)
        gt = brats.paste(brats.source_truth(layout.cache / cid), meta["box"], meta["full_shape"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_pred(regions_to_labels(gt), path, layout, cid)
    return path


def _case_figures(run: Run, per_fold, labels, n: int = 2) -> None:
    """For the first refiner: the U-Net-against-refined HD95 scatter, and Figure-2-style PNGs of the ``n``
    cases whose masks it changed most (voxels flipped, any region); none when it changed nothing."""
    base = run.layout.baseline
    refined = next((x for x in labels if x != base), None)
    if refined is None:
        return
    figures.hd95_scatter_figure(per_fold, refined, run.layout.figure(f"hd95_{base}_vs_{refined}.png"), base)
    changed = {}
    for k in run.fold_ids:
        for r in per_fold.get(refined, {}).get(k, []):
            changed[(r["case"], k)] = changed.get((r["case"], k), 0) + r["flipped"]
    for (cid, k), count in sorted(changed.items(), key=lambda x: (-x[1], x[0]))[:n]:
        pred_path = run.layout.pred_map(refined, k, cid)
        if count == 0 or not pred_path.is_file():
            continue
        folder = run.layout.cache / cid
        meta = brats.cached_meta(folder)
        box, full = meta["box"], meta["full_shape"]
        image = brats.paste(brats.to_source(np.load(folder / "image.npy"), meta), box, full)
        gt = brats.paste(brats.source_truth(folder), box, full)
        unet = labels_to_regions(np.asarray(brats.read_nifti(run.layout.oof_map(cid), cid)[0], np.uint8))
        ref = labels_to_regions(np.asarray(brats.read_nifti(pred_path, cid)[0], np.uint8))
        figures.refinement_figure(
            image,
            gt,
            unet,
            ref,
            run.layout.figure(f"{cid}_{refined}.png"),
            f"{cid} (fold {k}): {refined}, {count} voxels flipped",
            reports.baseline_name(base),
        )
