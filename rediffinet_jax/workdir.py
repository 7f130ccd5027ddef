"""The work directory: every file name and record in it, and who may write it (docs/workdir.md).

Layout (:class:`Layout`)::

    config.json  splits.json  data/  cache/<case>/      the run's config, folds, phantoms, cached arrays
    <stage>/settings.json  <stage>/config.json          what the stage was trained with (checked each run)
    <stage>/fold_k/checkpoints/ metrics.jsonl done.json  Orbax steps, one record per step, "finished"
    unet/oof/<case>.nii.gz  unet/oof/runs.json          out-of-fold U-Net maps, which training made them
    baseline/oof/ baseline/fold_k/done.json             instead of unet/: another model's maps (baseline.maps)
    eval/<label>/settings.json  eval/<label>/fold_k/{cases.csv, trained.json, pred/}
    eval/summary.{md,csv,json}  eval/figures/

Records say what made what, so that nothing stale is used or mixed: a stage's settings (a new command
that differs is refused unless asked to retrain), each finished training's ``run`` id (``done.json``),
which U-Net training made each fold's out-of-fold maps (``runs.json``), and which of those a refiner and
its scores were made from (``oof_runs`` in its settings, ``trained.json``). A lock (``.lock``, an
``fcntl`` lock held for the whole command) keeps a second command out; the kernel releases it when the
holder dies in any way, so a killed run never blocks the next one. Only process 0 of a distributed run
takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from rediffinet_jax import files, parallel
from rediffinet_jax.errors import ConfigError

LOCK_FILE = ".lock"
BASELINE = "unet"  # stage 1's folder, and the baseline row of every table
GIVEN = "baseline"  # the same for another model's out-of-fold maps (config baseline.maps), imported
SETTINGS_FILE, STAGE_CONFIG = "settings.json", "config.json"
DONE, METRICS, CHECKPOINTS = "done.json", "metrics.jsonl", "checkpoints"
OOF_KEY = "oof_checkpoint"  # which checkpoint of each fold made unet/oof/ (part of stage 1's settings)
DATA_KEY = "data_sources"  # the fingerprint of the source files a stage trained on (data/changes.py)
OOF_RUNS = "oof_runs"  # which training of each U-Net fold made unet/oof/ (part of a refiner's settings)
# Settings that change how a run is carried out, not what it produces: never a conflict.
_RUNTIME_KEYS = {"num_workers", "val_every", "keep", "batch_windows", "val_cases", "sampler", "val_sampler"}


class Layout:
    """The paths of one work directory (nothing is created here).

    ``baseline``: the stage folder whose out-of-fold maps are U(I), :data:`BASELINE` (this project's U-Net)
    or :data:`GIVEN` (another model's maps); by default what the run's config.json says."""

    def __init__(self, root, baseline: str | None = None):
        self.root = Path(root)
        self.config, self.splits = self.root / "config.json", self.root / "splits.json"
        self.data, self.cache, self.eval = self.root / "data", self.root / "cache", self.root / "eval"
        if baseline is None:
            baseline = GIVEN if read_json(self.config, {}).get("baseline", {}).get("maps") else BASELINE
        self.baseline = baseline
        self.oof = self.root / baseline / "oof"
        self.oof_record = self.oof / "runs.json"

    def stage(self, name: str) -> Path:
        return self.root / name

    def fold(self, name: str, k: int) -> Path:
        return self.root / name / f"fold_{k}"

    def oof_map(self, case: str) -> Path:
        return self.oof / f"{case}.nii.gz"

    def eval_model(self, label: str) -> Path:
        return self.eval / label

    def eval_settings(self, label: str) -> Path:
        """What a model's scores are made with (checkpoint, sampler, out-of-fold maps): see check_record."""
        return self.eval / label / SETTINGS_FILE

    def eval_fold(self, label: str, k: int) -> Path:
        return self.eval / label / f"fold_{k}"

    def cases_csv(self, label: str, k: int) -> Path:
        return self.eval_fold(label, k) / "cases.csv"

    def pred_map(self, label: str, k: int, case: str) -> Path:
        return self.eval_fold(label, k) / "pred" / f"{case}.nii.gz"

    def figure(self, name: str) -> Path:
        return self.eval / "figures" / name

    def source_image(self, case: str) -> Path | None:
        """A generated phantom's t1n (the geometry for its label maps); None for data outside the folder."""
        folder = self.data / case
        return next(folder.glob(f"{case}-t1n.nii*"), None) if folder.is_dir() else None


def checkpoints_dir(fold) -> Path:
    return Path(fold) / CHECKPOINTS


def metrics_file(fold) -> Path:
    return Path(fold) / METRICS


def loader_file(fold_dir) -> Path:
    """The data loader's worker count a fold's training began with (its saved data position is that loader's)."""
    return Path(fold_dir) / "loader.json"


def write_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    files.write_text(path, text)


def read_json(path, default=None):
    """A JSON record, or ``default`` when the file does not exist.

    Raises:
      ConfigError: the file is damaged (cut off by a full disk, edited by hand), naming it; every record
        here is written whole (:func:`write_atomic`), so only something outside this program damages one.
    """
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path} is damaged ({e.__class__.__name__}: {e}); restore it, or delete it to have it made again "
            f"(for a stage's record: retrain that stage)"
        ) from None


# ----------------------------------------------------------------------------- stage settings


def trained(fold) -> dict | None:
    """``done.json`` of a stage's fold (steps, best/latest step, and ``run``, a fresh id per finished
    training), or None while the fold is not trained."""
    return read_json(Path(fold) / DONE)


def mark_trained(fold, done: dict) -> None:
    """Writes the fold's ``done.json`` (process 0)."""
    if parallel.is_main():
        write_atomic(Path(fold) / DONE, json.dumps(done))


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


def _settings_diff(folder: Path, settings: dict, implied: dict | None = None):
    """(saved flat settings or None, the new ones flattened, the sorted keys that differ). ``implied``:
    flat keys that older versions saved and that the current settings imply (0.2.0's diffusion.condition
    and .target, which diffusion.model now decides) with the values implied; a saved one equal to its
    implied value is no difference. Keys added since (:data:`stages.ADDED_SETTINGS`) and missing from the
    saved settings count as saved with the value that does what older versions did."""
    from rediffinet_jax.stages import ADDED_SETTINGS

    flat = _flat(json.loads(json.dumps(settings)))
    saved = read_json(Path(folder) / STAGE_CONFIG)
    retired = {k: v for k, v in (implied or {}).items() if k not in flat}
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k not in retired or retired[k] != v}
        # keys added since, at the value that does what the saved settings did: no difference
        saved.update({k: v for k, v in ADDED_SETTINGS.items() if k not in saved and flat.get(k) == v})
        if DATA_KEY not in saved:  # saved before the data's fingerprint was kept: not compared
            saved[DATA_KEY] = flat.get(DATA_KEY)
    diff = sorted(k for k in set(saved or {}) | set(flat) if (saved or {}).get(k) != flat.get(k))
    return saved, flat, diff


def _write_settings(folder: Path, flat: dict, settings: dict) -> None:
    write_atomic(Path(folder) / STAGE_CONFIG, json.dumps(flat, indent=1, sort_keys=True))
    write_atomic(Path(folder) / SETTINGS_FILE, json.dumps(settings, indent=1))


def refuse_changed(folder: Path, settings: dict, implied=None, overwrite: bool = False) -> None:
    """Refuses settings that differ from a stage's saved ones (as :func:`check_stage_config` would, unless
    ``overwrite``), writing nothing; the records of which U-Net trainings a refiner used are not compared."""
    saved, flat, diff = _settings_diff(folder, settings, implied)
    # which U-Net trainings made the maps: checked later; the maps' checkpoint alone: remade, not refused
    # and the data's fingerprint: known once the cache is made (changed files are named before: data/changes.py)
    diff = [k for k in diff if not k.startswith(OOF_RUNS) and k not in (OOF_KEY, DATA_KEY)]
    if saved is not None and diff and not overwrite:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {flat.get(k)!r}" for k in diff[:8])
        raise ConfigError(
            f"{folder} was trained with other settings ({details}); use another --workdir, or --overwrite to "
            f"retrain this stage"
        )


def check_stage_config(
    folder: Path, settings: dict, overwrite: bool, log=print, implied=None, only_fold: int | None = None
) -> None:
    """Writes the stage's settings the first time; afterwards refuses different settings (naming the
    keys) unless ``overwrite``, which deletes the stage's folder and starts it again. ``implied``: see
    :func:`_settings_diff` (what lets a work directory of an older version resume). ``only_fold``: the
    command asked for that fold alone (``--fold``); new settings are then refused even with ``overwrite``:
    they hold for every fold of the stage, and retraining one would delete the others' training."""
    saved, flat, diff = _settings_diff(folder, settings, implied)
    if saved is not None:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {flat.get(k)!r}" for k in diff[:8])
        if diff and not overwrite:
            raise ConfigError(
                f"{folder} was trained with other settings ({details}); use another --workdir, "
                f"or --overwrite to retrain this stage"
            )
        if diff and only_fold is not None:
            raise ConfigError(
                f"{folder} was trained with other settings ({details}), which hold for every fold: --overwrite "
                f"--fold {only_fold} would delete the other folds' training. Leave out --fold to retrain every "
                f"fold, or use another --workdir"
            )
        if not diff:
            return
        log(f"--overwrite: settings of {folder} changed ({', '.join(diff[:8])}); deleting it")
        shutil.rmtree(folder)
    _write_settings(folder, flat, settings)


def renew_oof_if_checkpoint_changed(layout: Layout, settings: dict, log=print) -> None:
    """The out-of-fold maps depend on which checkpoint made them (``oof_checkpoint``), not on the training:
    when only that differs from stage 1's saved settings, delete the maps (and the U-Net's scores made from
    them) so that they are remade, and record the new choice, instead of refusing the stage. Stage 2's
    settings include it, so a refiner trained on the old maps is still refused."""
    folder = layout.stage(layout.baseline)
    saved, flat, diff = _settings_diff(folder, settings)
    if saved is None or diff != [OOF_KEY]:
        return
    log(
        f"the out-of-fold U-Net maps were made from the {saved.get(OOF_KEY)} checkpoints; remaking them from "
        f"the {flat[OOF_KEY]} ones (and the U-Net's scores in eval/unet and eval/unet+pp)"
    )
    shutil.rmtree(layout.oof, ignore_errors=True)
    for scored in [layout.eval_model(layout.baseline), *layout.eval.glob(f"{layout.baseline}+*")]:
        shutil.rmtree(scored, ignore_errors=True)  # the U-Net's rows and its post-processed ones
    _write_settings(folder, flat, settings)


def load_settings(folder):
    """The full settings a stage folder was made with, as a ConfigDict (for evaluate and predict)."""
    from ml_collections import ConfigDict

    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no trained stage ({SETTINGS_FILE} missing)")
    return ConfigDict(read_json(path))


def trained_stages(layout: Layout) -> list[str]:
    """The stage folders of a work directory: the baseline first, then diffusion models by name."""
    base = layout.baseline
    names = [p.name for p in sorted(layout.root.iterdir()) if (p / SETTINGS_FILE).is_file()]
    if base not in names:
        raise ConfigError(f"{layout.root} has no baseline ({base}/{SETTINGS_FILE}); run train.py first")
    return [base] + [n for n in names if n not in (BASELINE, GIVEN)]


def check_record(path, record: dict, remedy: str) -> None:
    """Writes ``record`` (JSON) to ``path`` the first time (process 0, atomically: another process may be
    reading it); afterwards refuses another one, naming what differs and ``remedy``. For outputs made bit
    by bit (scores, predictions) that must not be mixed."""
    record = json.loads(json.dumps(record))
    old = read_json(path)
    if old is not None:
        diff = [
            f"{k}: {old.get(k)!r} -> {record.get(k)!r}"
            for k in sorted(set(old) | set(record))
            if old.get(k) != record.get(k)
        ]
        if diff:
            raise ConfigError(f"{Path(path).parent} was made with other settings ({', '.join(diff)}); {remedy}")
        return
    if parallel.is_main():
        write_atomic(path, json.dumps(record, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- out-of-fold maps


def oof_record(layout: Layout) -> dict:
    """``{str(fold): run}``: the training of each U-Net fold whose out-of-fold maps are in ``unet/oof/``."""
    return read_json(layout.oof_record, {})


def record_oof(layout: Layout, record: dict, k: int, run_id) -> None:
    """Records (process 0) that U-Net training ``run_id`` made fold ``k``'s out-of-fold maps."""
    if record.get(str(k)) == run_id or not parallel.is_main():
        return
    record[str(k)] = run_id
    write_atomic(layout.oof_record, json.dumps(record, indent=1, sort_keys=True))


def unet_runs(layout: Layout, n_folds: int) -> dict:
    """``{str(fold): run}`` of the U-Nets trained now (None for a fold not trained)."""
    return {str(k): (trained(layout.fold(layout.baseline, k)) or {}).get("run") for k in range(n_folds)}


def stale_folds(runs: dict, made_by: dict) -> list[int]:
    """The folds whose U-Net training in ``runs`` (``{str(fold): run}``, e.g. a refiner's ``oof_runs``) is not
    the one recorded in ``made_by`` (:func:`oof_record`, or :func:`unet_runs`); a fold without a record is
    stale."""
    return [int(k) for k, r in runs.items() if made_by.get(k) != r]


def oof_runs(layout: Layout, n_folds: int) -> dict:
    """:func:`oof_record` once every fold's maps are made by its current U-Net (what a model conditioned on
    U(I) trains on).

    Raises:
      ConfigError: a fold whose maps are not made, or were made by an earlier training of the fold.
    """
    record = oof_record(layout)
    missing = [k for k in range(n_folds) if str(k) not in record]
    if missing:
        raise ConfigError(
            f"the out-of-fold U-Net maps of fold(s) {missing} are not made (or not recorded in "
            f"{layout.oof_record}): run train.py --stage unet first"
        )
    runs = {str(k): record[str(k)] for k in range(n_folds)}
    if stale := stale_folds(runs, unet_runs(layout, n_folds)):
        raise ConfigError(
            f"the out-of-fold maps of U-Net fold(s) {stale} were made before the fold was trained "
            f"again: run train.py --stage unet first, which remakes them"
        )
    return runs


# ----------------------------------------------------------------------------- scores


def made_from(done: dict, maps_by: dict, k: int) -> dict:
    """What a fold's scores are made from: the model's training (its done.json) and the training of the
    U-Net fold whose out-of-fold maps it was scored against (U(I), the flips)."""
    return {"training": done, "unet_maps": maps_by.get(str(k))}


def scored_from(fold_dir) -> dict | None:
    """The ``trained.json`` record of a fold's scores (see :func:`tie_to_training`)."""
    return read_json(Path(fold_dir) / "trained.json")


def tie_to_training(fold_dir: Path, made: dict, log) -> None:
    """Deletes a fold's scores and maps unless they were made from ``made`` (:func:`made_from`), then records
    it (``trained.json``). Process 0 does it; every process returns once it is done."""
    with parallel.main_first(f"tie {fold_dir.parent.name}/{fold_dir.name}"):
        if not parallel.is_main():
            return
        if fold_dir.is_dir() and scored_from(fold_dir) != made:
            log(f"{fold_dir}: scored before the fold or its U-Net maps were made again; rescoring it")
            shutil.rmtree(fold_dir)
        fold_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(fold_dir / "trained.json", json.dumps(made))


# ----------------------------------------------------------------------------- the lock


def writable_folder(folder: Path) -> Path:
    """Creates ``folder`` (and its parents) and checks that a file can be written in it.

    Raises:
      ConfigError: the folder cannot be made or written (read-only mount, permissions), naming it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


def _holder(handle) -> str:
    handle.seek(0)
    try:
        h = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return "another process"
    return f"{h.get('command', '?')} (host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')})"


@contextlib.contextmanager
def lock(folder, what: str | None = None, create: bool = True):
    """Holds the folder's lock while the block runs (process 0 only; the folder is created unless
    ``create`` is false).

    Raises:
      ConfigError: another command holds it, named by its host and pid; the folder is not writable; or
        (``create`` false) it does not exist.
    """
    if not parallel.is_main():
        yield
        return
    if not create and not Path(folder).is_dir():
        raise ConfigError(f"{folder} does not exist (no work directory there)")
    folder = writable_folder(Path(folder))
    handle = open(folder / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{folder} is in use by {_holder(handle)}; wait for it to end or use another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "command": what or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
        )
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock; the record stays for the curious
