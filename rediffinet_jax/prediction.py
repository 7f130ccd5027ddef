"""Segments new cases with a trained work directory: U-Net fold ensemble (or a given map), then the refiner.

For each case: the U-Net of every chosen fold gives probabilities (averaged; U(I) = mean > 0.5), or, for
refiners trained on another model's maps, U(I) is the case's map given with ``--baseline``; a diffusion
model of every chosen fold gives its fused value Y on U(I) (averaged; mask = Y > 0, XOR-ed with U(I) for
Re-DiffiNet). Outputs are BraTS label maps ``<case>.nii.gz`` with the source
affine and header; optionally ``<case>_probabilities.nii.gz`` (U-Net, ``[D, H, W, 3]`` float32) and
``<case>_uncertainty.nii.gz`` (refiner's binary entropy in bits, ``[D, H, W, 3]``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
from scipy import ndimage

from rediffinet_jax import gate, gate_eval, given_maps, inference, parallel, progress, stages
from rediffinet_jax import workdir as wd
from rediffinet_jax.data import brats, resample
from rediffinet_jax.errors import CaseError, ConfigError
from rediffinet_jax.files import atomic_path
from rediffinet_jax.labels import LAYOUTS, MODALITIES, nested, regions_to_labels, to_convention

RECORD = "prediction.json"  # in the output folder: what made its label maps (model, folds, trainings)


def _trainings(layout: wd.Layout, name: str, folds) -> list[dict]:
    """done.json of each fold of ``name`` (which training made it); refuses a fold not trained."""
    done = [wd.trained(layout.fold(name, k)) for k in folds]
    for k, d in zip(folds, done):
        if d is None:
            raise ConfigError(f"{name} fold {k} is not trained in {layout.root}")
    return done


def _fold_models(layout: wd.Layout, stage, folds, checkpoint: str, log):
    """The stage's model of each fold ([] for no stage)."""
    if stage is None:
        return []
    return [inference.load_model(stage, layout.fold(stage.name, k), checkpoint, log=log) for k in folds]


def _write_volume(volume: np.ndarray, path: Path, reference: Path) -> None:
    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(volume.astype(np.float32), ref.affine, header), str(tmp))


def _check_baseline(layout: wd.Layout, model: str, maps, save_probabilities: bool) -> None:
    """Refuses a ``--baseline`` that does not fit the work directory's refiners (trained on given maps or
    on this project's U-Net), and what is meaningless with given maps."""
    if layout.baseline == wd.GIVEN and not maps:
        raise ConfigError(
            f"the refiners of {layout.root} were trained on another model's maps (baseline.maps): give each "
            f"new case's map with --baseline DIR"
        )
    if maps and layout.baseline != wd.GIVEN:
        raise ConfigError(
            f"--baseline: the refiners of {layout.root} were trained on this project's U-Net maps, not on given "
            f"ones; predict without --baseline, or train on your model's maps (config baseline.maps)"
        )
    if maps and model in (wd.BASELINE, wd.GIVEN):
        raise ConfigError(f"--model {model} is meaningless with --baseline: the given maps are the baseline")
    if maps and save_probabilities:
        raise ConfigError("--save_probabilities: with --baseline there are no U-Net probabilities")
    if maps and not Path(maps).is_dir():
        raise ConfigError(f"--baseline {maps} is not a folder")


def _plan(layout: wd.Layout, model: str, folds, checkpoint: str, maps=None, save_probabilities=False):
    """What a prediction will use, checked before anything is written: (baseline settings, U-Net stage or
    None (given maps), diffusion stage or None, folds, the record that ``prediction.json`` keeps)."""
    _check_baseline(layout, model, maps, save_probabilities)
    base = layout.baseline
    unet_settings = wd.load_settings(layout.stage(base))
    n_folds = unet_settings.data.n_folds
    folds = list(range(n_folds)) if folds is None else parse_folds(folds)
    if bad := [k for k in folds if not 0 <= k < n_folds]:
        raise ConfigError(f"--folds {bad} outside 0..{n_folds - 1}")
    record = {"model": model, "folds": folds, "checkpoint": checkpoint, base: _trainings(layout, base, folds)}
    if maps:
        record["baseline_maps"] = str(Path(maps).resolve())
    dstage = None
    if model != base:
        settings = wd.load_settings(layout.stage(model))
        if wd.OOF_RUNS in settings:  # conditioned on U(I): only with the U-Nets whose maps it was trained on
            if stale := wd.stale_folds(settings[wd.OOF_RUNS].to_dict(), wd.unet_runs(layout, n_folds)):
                raise ConfigError(
                    f"{model} was trained on the maps of U-Net fold(s) {stale} before they were "
                    f"trained again; retrain it (train.py --overwrite) or predict with --model=unet"
                )
        dstage = stages.make("diffusion", settings.diffusion)
        record[model] = _trainings(layout, model, folds)
        record["sampler"] = {k: dstage.cfg.sampler[k] for k in ("fusion", "steps", "samples")}
        record["gate"] = None
    ustage = None if maps else stages.make("unet", unet_settings.unet)
    return unet_settings, ustage, dstage, folds, record


def parse_folds(folds) -> list[int]:
    """``--folds`` as fold numbers.

    Raises:
      ConfigError: an entry that is not a whole number, named.
    """
    out = []
    for k in folds:
        try:
            out.append(int(k))
        except (TypeError, ValueError):
            raise ConfigError(f"--folds: {k!r} is not a fold number (give e.g. --folds 0,1)") from None
    return out


def _check_labels(labels: str) -> str:
    if labels != "input" and labels not in LAYOUTS:
        raise ConfigError(f"--labels {labels!r}: choose input or one of {sorted(LAYOUTS)}")
    return labels


def _gates(layout: wd.Layout, model: str, dstage, use_gate: bool, record: dict, log) -> dict | None:
    """The gate chosen on all folds' held-out cases (``eval/<model>/gate.json``, written by evaluate.py),
    per region a candidate or None (off); None: every flip (no gate asked for, none chosen yet, or not a
    discrepancy refiner). For the U-Net alone, its post-processing (:func:`_postprocess`). Recorded in
    ``record``."""
    if dstage is None and use_gate:
        return _postprocess(layout, model, record, log)
    if dstage is None or dstage.variant.target != "discrepancy" or not use_gate:
        return None
    chosen = wd.read_json(layout.eval_model(model) / gate_eval.RECORD)
    if chosen is None:
        log(
            f"no gate chosen for {model} yet (evaluate.py chooses it): every flip kept, as the paper does; "
            f"run evaluate.py --workdir {layout.root} first to predict with the gate"
        )
        return None
    record["gate"] = {r: c["gate"] for r, c in chosen["all"].items()}
    for line in gate.describe(chosen["all"], "held-out cases of all folds"):
        log(f"gate {line}")
    return {r: gate.parse(name) for r, name in record["gate"].items()}


def _postprocess(layout: wd.Layout, model: str, record: dict, log) -> dict | None:
    """The U-Net's removal of small components chosen on all folds' out-of-fold maps
    (``eval/<unet>/postprocess.json``), as :func:`_gates` returns a gate; None when none is chosen yet."""
    chosen = wd.read_json(layout.eval_model(model) / gate_eval.POSTPROCESS.record)
    if chosen is None:
        log(f"no post-processing chosen for {model} yet (evaluate.py chooses it): its maps as they are")
        return None
    record["postprocess"] = {r: c["gate"] for r, c in chosen["all"].items()}
    for line in gate.describe(chosen["all"], "held-out cases of all folds", gate_eval.POSTPROCESS.every):
        log(f"post-processing {line}")
    return {r: gate.parse(name) for r, name in record["postprocess"].items()}


def predict_folder(
    input_dir,
    output_dir,
    workdir,
    model: str = "rediffinet",
    folds=None,
    checkpoint: str = "best",
    save_probabilities: bool = False,
    save_uncertainty: bool = False,
    show_progress: bool = True,
    log=print,
    baseline_maps=None,
    use_gate: bool = True,
    labels: str = "input",
) -> list[CaseError]:
    """Writes ``output_dir/<case>.nii.gz`` for every case of ``input_dir`` not written yet.
    ``output_dir/prediction.json`` records the model, folds, checkpoint, sampler, gate, label convention and
    trainings; a later call with any of these different is refused before anything is written. ``output_dir``
    is made only once all is checked, and locked while cases are written. A case's seg is never read. Returns
    the errors of the cases that failed (each names its case and file); ends with one line: written, skipped,
    failed, time. baseline_maps: another model's ``<case>.nii.gz`` maps, refined in place of the U-Net's
    (:mod:`given_maps`). use_gate: apply a discrepancy refiner's gate (:func:`_gates`). labels: the maps'
    labels, ``input`` (each case's own: ET = 4 for the 2018–2021 layout) or a layout of :data:`labels.LAYOUTS`.
    """
    t_start = time.time()
    layout, out = wd.Layout(workdir), Path(output_dir)
    settings, ustage, dstage, folds, record = _plan(layout, model, folds, checkpoint, baseline_maps, save_probabilities)
    record["labels"] = _check_labels(labels)
    gates = _gates(layout, model, dstage, use_gate, record, log)
    cases, errors = _discover(input_dir, out, log)
    with wd.lock(out, "predict.py"):
        wd.check_record(out / RECORD, record, "use another -o, or delete its label maps and prediction.json")
        todo = _todo(cases, out, _outputs(save_probabilities, save_uncertainty))
        log(f"{len(cases)} cases in {input_dir}, {len(cases) - len(todo)} already written, {len(todo)} to do")
        parallel.barrier("predict: listed")  # every process has its list before process 0 writes a label map
        unets, refiners = (_fold_models(layout, st, folds, checkpoint, log) for st in (ustage, dstage))
        failed = len(errors)
        job = _Job(settings, ustage, unets, dstage, refiners, folds, gates, baseline_maps, labels)
        for files in progress.bar(todo, "predict", enabled=show_progress, leave=True):
            try:
                _predict_case(job, files, out, save_probabilities, save_uncertainty)
            except CaseError as e:
                errors.append(e)
                log(f"failed: {e}")
        parallel.barrier("predict: written")
    written, skipped, took = len(todo) - (len(errors) - failed), len(cases) - len(todo), time.time() - t_start
    log(f"predict: {written} written, {skipped} skipped (already in {out}), {len(errors)} failed, {took:.1f} s")
    return errors


@dataclasses.dataclass
class _Job:
    """What every case of one prediction uses: the run's settings, each stage with its fold models, the
    gate and the output's label convention (``input`` or a layout)."""

    settings: object
    ustage: object
    unets: list
    dstage: object
    refiners: list
    folds: list
    gates: dict | None
    baseline_maps: object
    labels: str


def _predict_case(job: _Job, files, out: Path, save_probabilities: bool, save_uncertainty: bool) -> None:
    """Segments one case and writes its files (process 0). Raises CaseError for a case that cannot be read."""
    case, given = _load(files, job.settings.data, job.baseline_maps)
    regions, probs, unc = _segment(
        case,
        job.ustage,
        job.unets,
        job.dstage,
        job.refiners,
        job.folds,
        save_uncertainty,
        given,
        job.gates,
        _spacing(job.settings.data),
    )
    if parallel.is_main():  # every process computed the case (the models run on all); one writes
        conv = files.layout if job.labels == "input" else job.labels
        _write_case(out, files, case, regions, probs if save_probabilities else None, unc, conv)


SUFFIXES = {"probabilities": "_probabilities", "uncertainty": "_uncertainty"}  # beside <case>.nii.gz


def _todo(cases, out: Path, suffixes: list[str]) -> list:
    """The cases missing one of the files asked for (a save flag new to ``out``: its files are made)."""
    return [c for c in cases if not all((out / f"{c.case_id}{s}.nii.gz").is_file() for s in suffixes)]


def _outputs(save_probabilities: bool, save_uncertainty: bool) -> list[str]:
    """The file-name suffixes a case gets: the label map's (none), then the volumes asked for."""
    return [""] + [
        SUFFIXES[k] for k, on in (("probabilities", save_probabilities), ("uncertainty", save_uncertainty)) if on
    ]


def _discover(input_dir, out: Path, log):
    """(the cases of ``input_dir``, the errors of those that cannot be used: each logged, none raised),
    once the output folder ``out`` is checked (:func:`_check_output`).

    Raises:
      ConfigError: two cases whose outputs would have one name (``A`` and ``A_probabilities``).
    """
    _check_output(out)
    errors: list[CaseError] = []
    cases = brats.discover_cases(input_dir, errors=errors)
    ids = {c.case_id for c in cases}
    for c in cases:
        for suffix in SUFFIXES.values():
            if c.case_id + suffix in ids:
                raise ConfigError(
                    f"cases {c.case_id} and {c.case_id}{suffix} would write one file ({c.case_id}{suffix}.nii.gz); "
                    f"rename one of them"
                )
    for err in errors:
        log(f"skipped: {err}")
    return cases, errors


def _check_output(out: Path) -> None:
    """Refuses an output folder holding label maps that no ``prediction.json`` accounts for."""
    if not (out / RECORD).is_file() and (maps := sorted(p.name for p in out.glob("*.nii.gz"))):
        raise ConfigError(
            f"{out} holds label maps ({maps[0]}, ...) but no prediction.json saying what made them "
            f"(copied in by hand?): use another -o, or delete them"
        )


def _load(files, data_cfg, maps=None):
    """A new case as prediction reads it: the modalities only (a ``-seg`` beside them is never read), and
    its map in ``maps`` (given maps) as regions cropped like the image, else None."""
    case = brats.load_case(
        files,
        data_cfg.normalization,
        data_cfg.old_brats,
        read_labels=False,
        allow_empty_modality=data_cfg.get("allow_empty_modality", False),
    )
    given = brats.crop(given_maps.read(maps, files, data_cfg.old_brats), case.box) if maps else None
    return case, given


def _segment(
    case, ustage, unets, dstage, refiners, folds, save_uncertainty: bool, given=None, gates=None, spacing=None
):
    """(regions, U-Net probabilities or None, uncertainty or None) of one loaded case, cropped on its source
    grid, channels-last; ``given``: the case's given map as cropped regions, U(I) in place of the U-Net's;
    ``gates``: {region: candidate or None} applied to the folds' mean output (None: every flip); ``spacing``:
    the working grid's (``data.spacing``; the models run there, every output comes back to the source grid)."""
    meta = {"box": case.box, "work_shape": case.image.shape[:3]}
    if spacing:
        meta["work_shape"] = resample.work_shape(case.image.shape[:3], case.spacing, spacing)
    image = brats.to_work(case.image, meta)
    if given is not None:
        probs, unet = None, given.astype(np.uint8)
    else:
        probs = np.mean([inference.unet_probabilities(ustage.cfg, m, image) for m in unets], 0)
        probs = brats.to_source(probs, meta)
        unet = (probs > 0.5).astype(np.uint8)
    if dstage is None:  # the U-Net alone, post-processed with ``gates`` (gate.COMPONENTS) when given
        if gates is not None:
            unet = gate.apply(gate.component_fields(nested(unet)), gates, gate.COMPONENTS)
        return unet, probs, None
    s = dstage.cfg.sampler
    cond_unet = brats.to_work(unet, meta) if dstage.with_unet else None
    need = _needed(unet, gates, meta) if gates is not None and not save_uncertainty else None
    outs = [
        inference.diffusion_fused(
            dstage,
            m,
            image,
            cond_unet,
            jax.random.key(k),
            s.steps,
            s.samples,
            s.fusion,
            s.chunk or None,
            uncertainty=save_uncertainty,
            needed=need,
        )
        for k, m in zip(folds, refiners)
    ]
    mean = {key: brats.to_source(np.mean([o[key] for o in outs], 0), meta) for key in outs[0]}
    given = unet if dstage.with_unet else None
    if gates is None:
        regions = inference.finish(dstage, mean["y"], given)
    else:
        regions = gate.apply(gate.Fields(mean["y"] > 0, mean["p"], unet), gates)
    return regions, probs, mean.get("uncertainty")


def _needed(unet: np.ndarray, gates: dict, meta: dict) -> np.ndarray | None:
    """The working-grid voxels whose refiner output can reach a kept flip (:func:`gate.needed` on the source
    grid, carried to the working grid and grown by a voxel there, which linear resampling reads from):
    windows without one are not sampled. None: every voxel."""
    need = gate.needed(unet, gates)
    if need is None or tuple(meta["work_shape"]) == need.shape:
        return need
    work = brats.to_work(need[..., None].astype(np.float32), meta)[..., 0] > 0
    return ndimage.binary_dilation(work, np.ones((3, 3, 3), bool))


def _spacing(data_cfg) -> tuple | None:
    """The working spacing of the run's config (``data.spacing``; None: the source's)."""
    return tuple(data_cfg.get("spacing") or ()) or None


def _write_case(out: Path, files, case, regions, probs, uncertainty, convention: str = "2023") -> None:
    """The label map (and the optional volumes) of one case on its full grid, with its t1n's geometry, in the
    labels of ``convention`` (a layout of :data:`labels.LAYOUTS`)."""
    reference = files.images[MODALITIES[0]]
    full = brats.paste(regions.astype(np.uint8), case.box, case.full_shape)
    if probs is not None:
        _write_volume(
            brats.paste(probs, case.box, case.full_shape), out / f"{files.case_id}_probabilities.nii.gz", reference
        )
    if uncertainty is not None:
        _write_volume(
            brats.paste(uncertainty, case.box, case.full_shape),
            out / f"{files.case_id}{SUFFIXES['uncertainty']}.nii.gz",
            reference,
        )
    brats.write_label_map(
        to_convention(regions_to_labels(full), convention), out / f"{files.case_id}.nii.gz", reference
    )
