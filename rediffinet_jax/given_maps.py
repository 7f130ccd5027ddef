"""Another model's segmentations as U(I): the refiner trained on them, and applied with them to new cases.

With ``baseline.maps = DIR`` in the config, stage 1 is not trained: ``DIR/<case>.nii.gz`` (a BraTS label
map per case, labels 0-3, or 1/2/4 with ``data.old_brats``) is U(I). The maps must be out-of-fold: made by
a model that did not train on that case (its own cross-validation), or the refiner learns the small errors
a model makes on its training cases rather than those it makes on new ones.

Before any training every case of the split is checked (a map with the image's shape and affine, integer
labels), and every problem is reported, each naming its case and file. The maps are then imported into the
work directory as the ``baseline`` stage (``baseline/oof/<case>.nii.gz``, labels 0-3, the image's geometry),
and each fold's ``baseline/fold_k/done.json`` gets as ``run`` a digest of the files of the fold's cases:
changed maps make the refiners trained on them stale exactly as a retrained U-Net fold does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib

from rediffinet_jax import parallel, progress
from rediffinet_jax import workdir as wd
from rediffinet_jax.data import brats
from rediffinet_jax.errors import CaseError, ConfigError
from rediffinet_jax.labels import MODALITIES, regions_to_labels

MAX_LISTED = 20  # problems listed in one error; the count says how many more


def map_path(maps_dir, case_id: str) -> Path:
    """``maps_dir/<case>.nii.gz`` (or ``.nii`` when only that exists)."""
    gz = Path(maps_dir) / f"{case_id}.nii.gz"
    plain = gz.with_suffix("")
    return plain if not gz.exists() and plain.exists() else gz


def read(maps_dir, files: brats.CaseFiles, old_brats: bool, what: str = "baseline map"):
    """One case's map ``maps_dir/<case>.nii.gz`` as regions ``[D, H, W, 3]`` uint8 on the full grid, checked
    against the case's first modality (shape, affine; its header only). Raises CaseError naming the case
    and file (and ``what`` the map is)."""
    path = map_path(maps_dir, files.case_id)
    if not path.is_file():
        raise CaseError(f"no {what} for this case", case=files.case_id, path=str(path))
    ref = nib.load(str(files.images[MODALITIES[0]]))
    return brats.read_label_map(path, files.case_id, ref.shape[:3], ref.affine, old_brats, what)


def check_all(maps_dir, files_by_id: dict, old_brats: bool) -> None:
    """Reads every case's map; one ConfigError listing every problem (case and file), none → returns."""
    if not Path(maps_dir).is_dir():
        raise ConfigError(f"baseline.maps {maps_dir} is not a folder")
    problems = []
    for cid in progress.bar(sorted(files_by_id), "check baseline maps", enabled=parallel.is_main()):
        try:
            read(maps_dir, files_by_id[cid], old_brats)
        except CaseError as e:
            problems.append(str(e))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ConfigError(
            f"{len(problems)} of {len(files_by_id)} cases have no usable map in baseline.maps {maps_dir} "
            f"(nothing was trained):\n  " + "\n  ".join(problems[:MAX_LISTED]) + more
        )


def _digest(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()[:16]


def configured(config) -> str:
    """The config's ``baseline.maps`` ("" when the refiner trains on this project's U-Net)."""
    return str(config.get("baseline", {}).get("maps", "") or "")


def settings(config) -> dict:
    """What a refiner trained on given maps depends on besides its own config (in place of the U-Net's)."""
    return {"seed": config.seed, "data": config.data.to_dict(), "baseline": {"maps": str(config.baseline.maps)}}


def import_maps(config, layout: wd.Layout, data, overwrite: bool = False, log=print) -> dict:
    """Checks every map, then imports the folds whose files changed (or are new); returns
    ``{fold: done.json}`` for every fold, as :func:`driver.run_unet` does for the U-Net. Another
    ``baseline.maps`` folder than the stage's settings say is refused unless ``overwrite``."""
    maps_dir = Path(config.baseline.maps)
    check_all(maps_dir, data.files_by_id, config.data.old_brats)
    with parallel.main_first("baseline settings"):
        wd.check_stage_config(layout.stage(wd.GIVEN), settings(config), overwrite, log)
    record, results = wd.oof_record(layout), {}
    for k, cases in enumerate(data.folds):
        run = _digest(map_path(maps_dir, c) for c in cases)
        done = {"run": run, "maps": str(maps_dir), "cases": len(cases)}
        if wd.trained(layout.fold(wd.GIVEN, k)) != done:
            if parallel.is_main():
                _write_fold(maps_dir, layout, data, cases, config.data.old_brats)
                layout.fold(wd.GIVEN, k).mkdir(parents=True, exist_ok=True)
                wd.mark_trained(layout.fold(wd.GIVEN, k), done)
            log(f"baseline fold {k}: imported {len(cases)} maps from {maps_dir} (digest {run})")
        wd.record_oof(layout, record, k, run)
        results[k] = done
    parallel.barrier("baseline maps imported")
    return results


def _write_fold(maps_dir: Path, layout: wd.Layout, data, cases, old_brats: bool) -> None:
    layout.oof.mkdir(parents=True, exist_ok=True)
    for cid in cases:
        files = data.files_by_id[cid]
        regions = read(maps_dir, files, old_brats)
        brats.write_label_map(regions_to_labels(regions), layout.oof_map(cid), files.images[MODALITIES[0]])
