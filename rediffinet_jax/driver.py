"""The two-stage cross-validation driver: runs what is missing of splits → stage-1 U-Net per fold →
out-of-fold U-Net predictions → stage-2 model per fold, in a work directory (see README).

(Named ``driver`` rather than DESIGN.md's ``pipeline`` so it is not confused with ``data/pipeline``.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from rediffinet_jax import parallel
from rediffinet_jax.data import brats, phantoms, pipeline, splits
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.labels import regions_to_labels
from rediffinet_jax.training import DiffusionStage, Trainer, UNetStage

# Settings that change how a run is carried out, not what it produces: never a conflict.
SETTINGS_FILE = "settings.json"
OOF_KEY = "oof_checkpoint"  # which checkpoint of each fold made unet/oof/ (part of stage 1's settings)
OOF_RUNS = "oof_runs"  # which training of each U-Net fold made unet/oof/ (part of a refiner's settings)
OOF_RECORD = "runs.json"  # unet/oof/runs.json: {fold: the done.json "run" of the U-Net that made its maps}
_RUNTIME_KEYS = {"num_workers", "val_every", "keep", "batch_windows", "val_cases", "sampler", "val_sampler"}


@dataclasses.dataclass
class ValCase:
    """A held-out case for validation: cropped image, regions and (stage 2) U-Net masks, channels-last."""

    case_id: str
    image: np.ndarray
    regions: np.ndarray
    unet: np.ndarray | None = None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k in _RUNTIME_KEYS:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _settings_diff(folder: Path, settings: dict):
    """(saved flat settings or None, the new ones flattened, the sorted keys that differ)."""
    path = folder / "config.json"
    flat = _flat(json.loads(json.dumps(settings)))
    saved = json.loads(path.read_text()) if path.is_file() else None
    diff = sorted(k for k in set(saved or {}) | set(flat) if (saved or {}).get(k) != flat.get(k))
    return saved, flat, diff


def _write_settings(folder: Path, flat: dict, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(flat, indent=1, sort_keys=True))
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def check_record(path: Path, record: dict, remedy: str) -> None:
    """Writes ``record`` (JSON) to ``path`` the first time (process 0, atomically: another process may be
    reading it); afterwards refuses another one, naming what differs and ``remedy``. For outputs made bit
    by bit (scores, predictions) that must not be mixed."""
    record = json.loads(json.dumps(record))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in sorted(set(old) | set(record))
                if old.get(k) != record.get(k)]
        if diff:
            raise ConfigError(f"{path.parent} was made with other settings ({', '.join(diff)}); {remedy}")
        return
    if parallel.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(path)


def check_stage_config(folder: Path, settings: dict, overwrite: bool, log=print) -> None:
    """Writes ``folder/config.json`` the first time; afterwards refuses different settings (naming the
    keys) unless ``overwrite``, which deletes the stage's folder and starts it again."""
    saved, flat, diff = _settings_diff(folder, settings)
    if saved is not None:
        if diff and not overwrite:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {flat.get(k)!r}" for k in diff[:8])
            raise ConfigError(f"{folder} was trained with other settings ({details}); use another --workdir, "
                              f"or --overwrite to retrain this stage")
        if not diff:
            return
        log(f"--overwrite: settings of {folder} changed ({', '.join(diff[:8])}); deleting it")
        shutil.rmtree(folder)
    _write_settings(folder, flat, settings)


def renew_oof_if_checkpoint_changed(unet_dir: Path, settings: dict, log=print) -> None:
    """The out-of-fold maps depend on which checkpoint made them (``oof_checkpoint``, from
    ``eval.checkpoint``), not on the training: when only that differs from the saved settings, delete the
    maps (and the U-Net's scores made from them) so that they are remade, and record the new choice,
    instead of refusing the stage. Stage 2's settings include it, so a refiner trained on the old maps is
    still refused."""
    saved, flat, diff = _settings_diff(unet_dir, settings)
    if saved is None or diff != [OOF_KEY]:
        return
    log(f"the out-of-fold U-Net maps were made from the {saved.get(OOF_KEY)} checkpoints; remaking them from "
        f"the {flat[OOF_KEY]} ones (and the U-Net's scores in eval/unet)")
    shutil.rmtree(unet_dir / "oof", ignore_errors=True)
    shutil.rmtree(unet_dir.parent / "eval" / "unet", ignore_errors=True)
    _write_settings(unet_dir, flat, settings)


def adopt_oof_runs(folder: Path, settings: dict, log=print) -> None:
    """A stage folder made before its settings recorded ``oof_runs`` (which U-Net trainings made the maps it
    was trained on) takes the current ones, as :func:`predict_oof` adopts maps made before they were
    recorded, instead of being refused and retrained."""
    saved, flat, diff = _settings_diff(folder, settings)
    prefix = f"{OOF_RUNS}."
    if saved is None or not diff or any(k.startswith(prefix) for k in saved):
        return
    if all(k.startswith(prefix) for k in diff):
        log(f"{folder}: made by a version that kept no record of its U-Nets' trainings; taking the current ones")
        _write_settings(folder, flat, settings)


def trained(folder: Path) -> dict | None:
    """``folder/done.json`` of a stage's fold (steps, best/latest step, and ``run``, a fresh id per finished
    training), or None while the fold is not trained."""
    path = Path(folder) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def oof_record(unet_dir: Path) -> dict:
    """``{str(fold): run}``: the training of each U-Net fold whose out-of-fold maps are in ``unet/oof/``
    (``{}`` before any are made)."""
    path = Path(unet_dir) / "oof" / OOF_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def oof_runs(unet_dir: Path, n_folds: int) -> dict:
    """:func:`oof_record` once every fold's maps are made by its current U-Net (what a model conditioned on
    U(I) trains on).

    Raises:
      ConfigError: a fold whose maps are not made (or were made by a version that kept no record), or were
        made by an earlier training of the fold.
    """
    record = oof_record(unet_dir)
    missing = [k for k in range(n_folds) if str(k) not in record]
    if missing:
        raise ConfigError(f"the out-of-fold U-Net maps of fold(s) {missing} are not made (or not recorded in "
                          f"{Path(unet_dir) / 'oof' / OOF_RECORD}): run train.py --stage unet first")
    runs = {str(k): record[str(k)] for k in range(n_folds)}
    if stale := stale_folds(runs, unet_runs(unet_dir, n_folds)):
        raise ConfigError(f"the out-of-fold maps of U-Net fold(s) {stale} were made before the fold was trained "
                          f"again: run train.py --stage unet first, which remakes them")
    return runs


def unet_runs(unet_dir: Path, n_folds: int) -> dict:
    """``{str(fold): run}`` of the U-Nets trained now (None for a fold not trained)."""
    return {str(k): (trained(Path(unet_dir) / f"fold_{k}") or {}).get("run") for k in range(n_folds)}


def stale_folds(runs: dict, made_by: dict) -> list[int]:
    """The folds whose U-Net training in ``runs`` (``{str(fold): run}``, e.g. a refiner's ``oof_runs``) is not
    the one in ``made_by`` (:func:`oof_record`, or the U-Nets' done.json); a fold missing from ``made_by``
    (maps made before records were kept) counts as current."""
    return [int(k) for k, r in runs.items() if made_by.get(k, r) != r]


def load_settings(folder: Path):
    """The full settings a stage folder was made with, as a ConfigDict (for evaluate and predict)."""
    from ml_collections import ConfigDict
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no trained stage ({SETTINGS_FILE} missing)")
    return ConfigDict(json.loads(path.read_text()))


def resolve_data(config, workdir: Path, log=print) -> Path:
    """The data folder: ``data.root``, or phantoms generated into ``workdir/data`` when it is empty."""
    if config.data.root:
        return Path(config.data.root)
    p = config.data.phantoms
    root = workdir / "data"
    kind = "hard " if p.get("hard") else ""
    log(f"No data.root given: using {p.n_cases} generated {kind}phantom cases of shape {tuple(p.shape)} in {root}")
    phantoms.write_dataset(root, p.n_cases, tuple(p.shape), p.seed, progress=jax.process_index() == 0,
                           hard=bool(p.get("hard", False)), tumour_scale=float(p.get("tumour_scale", 1.0)))
    return root


def _val_cases(ids, refs_by_id, limit: int, with_unet: bool) -> list[ValCase]:
    ids = ids[:limit] if limit else ids
    out = []
    for cid in ids:
        folder = Path(refs_by_id[cid].folder)
        unet = np.load(folder / "unet.npy", mmap_mode="r") if with_unet else None
        out.append(ValCase(cid, np.load(folder / "image.npy", mmap_mode="r"),
                           np.load(folder / "regions.npy", mmap_mode="r"), unet))
    return out


def predict_oof(trainer: Trainer, stage: UNetStage, workdir: Path, folds, files_by_id, refs_by_id,
                trained_folds: dict, which: str, log=print) -> Path:
    """Writes ``unet/oof/<case>.nii.gz`` for every case of the folds in ``trained_folds`` ({fold: its
    done.json}, as every process has it: not read back from a file process 0 may still be writing), with
    the fold's own U-Net, and records which training of the fold made them (:func:`oof_record`). A fold
    trained again since (its folder deleted by hand) has its maps made again; maps without a record (older
    versions) are kept."""
    oof = workdir / "unet" / "oof"
    oof.mkdir(parents=True, exist_ok=True)
    record = oof_record(workdir / "unet")
    for k, done in trained_folds.items():
        run_id = done.get("run")
        todo = [c for c in folds[k] if not (oof / f"{c}.nii.gz").is_file()]
        if stale_folds({str(k): run_id}, record):  # overwritten, not deleted: every process sees the same todo
            log(f"unet fold {k} was trained again since its out-of-fold maps were made; remaking them")
            todo = list(folds[k])
        parallel.barrier(f"oof fold {k} listed")  # before process 0 writes a map another is still looking for
        if not todo:
            _record_oof(oof, record, k, run_id)
            continue
        model = trainer.load(workdir / "unet" / f"fold_{k}", which)
        for cid in _progress(todo, f"oof fold {k}"):
            folder = Path(refs_by_id[cid].folder)
            meta = brats.cached_meta(folder)
            probs = stage.probabilities(model, np.load(folder / "image.npy", mmap_mode="r"))
            regions = brats.paste((probs > 0.5).astype(np.uint8), meta["box"], meta["full_shape"])
            if jax.process_index() == 0:
                brats.write_label_map(regions_to_labels(regions), oof / f"{cid}.nii.gz",
                                      files_by_id[cid].images["t1n"])
        _record_oof(oof, record, k, run_id)
        log(f"unet fold {k}: wrote {len(todo)} out-of-fold predictions to {oof}")
    parallel.barrier("oof written")  # the U-Net inference has no collective: process 0 may still be writing
    return oof


def _record_oof(oof: Path, record: dict, k: int, run_id) -> None:
    if record.get(str(k)) == run_id or jax.process_index() != 0:
        return
    record[str(k)] = run_id
    tmp = oof / f".{OOF_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(oof / OOF_RECORD)


def _progress(items, desc):
    if jax.process_index() != 0:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="case", leave=False)


def check_request(config, fold: int | None) -> None:
    """What can be refused before any work (phantoms, cache, splits) is done.

    Raises:
      ConfigError: a fold outside ``0..n_folds-1``.
    """
    n = config.data.n_folds
    if fold is not None and not 0 <= fold < n:
        raise ConfigError(f"--fold {fold} is outside 0..{n - 1} (data.n_folds = {n})")


def run(config, workdir, *, fold: int | None = None, stage: str | None = None, overwrite: bool = False,
        stop_after: int | None = None, progress: bool = True, log=print) -> dict:
    """Runs what is missing of the two-stage pipeline; returns {stage: {fold: done.json}}."""
    check_request(config, fold)
    workdir = Path(workdir)
    d = config.data
    # several processes: process 0 writes the shared files first, the others then find them made
    with parallel.main_first("prepare data"):
        workdir.mkdir(parents=True, exist_ok=True)
        if parallel.is_main():
            (workdir / "config.json").write_text(config.to_json(indent=1))
        root = resolve_data(config, workdir, log)
        cases = [c for c in brats.discover_cases(root, require_labels=True) if c.seg is not None]
        folds = splits.load_or_create(workdir, [c.case_id for c in cases], d.n_folds, d.split_seed)
        refs = pipeline.prepare_cache(cases, workdir / "cache", d.normalization, d.old_brats,
                                      progress=progress and parallel.is_main(),
                                      allow_empty_modality=d.get("allow_empty_modality", False))
    fold_ids = list(range(d.n_folds)) if fold is None else [fold]
    refs_by_id = {r.case_id: r for r in refs}
    files_by_id = {c.case_id: c for c in cases}
    data_settings = config.data.to_dict()
    results: dict = {}

    # ---- stage 1: the U-Net of every fold, then its out-of-fold predictions
    unet_stage = UNetStage(config.unet)
    unet_dir = workdir / "unet"
    unet_settings = {"seed": config.seed, "data": data_settings, "unet": config.unet.to_dict(),
                     OOF_KEY: config.eval.checkpoint}
    with parallel.main_first("unet settings"):
        if stage in (None, "unet"):  # the maps are remade below
            renew_oof_if_checkpoint_changed(unet_dir, unet_settings, log)
        check_stage_config(unet_dir, unet_settings, overwrite and stage in (None, "unet"), log)
    if stage in (None, "unet"):
        trainer = Trainer(unet_stage, progress=progress)
        for k in fold_ids:
            folder = unet_dir / f"fold_{k}"
            if (done := trained(folder)) is not None:
                results.setdefault("unet", {})[k] = done
                continue
            train = [refs_by_id[c] for c in splits.train_ids(folds, k)]
            val = _val_cases(folds[k], refs_by_id, config.unet.val_cases, False)
            done = trainer.fit(folder, train, val, config.seed + k, num_workers=d.num_workers,
                               stop_after=stop_after, log=log)
            if done is None:
                return results
            results.setdefault("unet", {})[k] = done
        predict_oof(trainer, unet_stage, workdir, folds, files_by_id, refs_by_id, results["unet"],
                    config.eval.checkpoint, log)
    if config.stages == "unet" or stage == "unet":
        return results

    # ---- stage 2: the diffusion model of every fold
    dstage = DiffusionStage(config.diffusion)
    ddir = workdir / dstage.name
    stage_settings = {**unet_settings, "diffusion": config.diffusion.to_dict()}
    with parallel.main_first(f"{dstage.name} settings"):
        if dstage.with_unet:  # trained on these U-Nets' maps: refused once a U-Net fold is trained again
            pipeline.attach_unet_masks(refs, unet_dir / "oof")
            stage_settings[OOF_RUNS] = oof_runs(unet_dir, d.n_folds)
            adopt_oof_runs(ddir, stage_settings, log)
        check_stage_config(ddir, stage_settings, overwrite, log)
    trainer = Trainer(dstage, progress=progress)
    for k in fold_ids:
        folder = ddir / f"fold_{k}"
        if (done := trained(folder)) is not None:
            results.setdefault(dstage.name, {})[k] = done
            continue
        train = [refs_by_id[c] for c in splits.train_ids(folds, k)]
        val = _val_cases(folds[k], refs_by_id, config.diffusion.val_cases, dstage.with_unet)
        done = trainer.fit(folder, train, val, config.seed + 100 + k, num_workers=d.num_workers,
                           stop_after=stop_after, log=log)
        if done is None:
            return results
        results.setdefault(dstage.name, {})[k] = done
    return results
