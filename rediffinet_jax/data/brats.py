"""BraTS 2023 cases on disk: discovery, NIfTI reading, normalization, crop box, label maps, cache.

Array layout: images ``[D, H, W, 4]`` float32 in :data:`rediffinet_jax.labels.MODALITIES` order,
regions ``[D, H, W, 3]`` uint8 in [WT, TC, ET]. D, H, W are the NIfTI voxel axes i, j, k as stored
(240 × 240 × 155 for BraTS), never reoriented, so that outputs keep the source geometry.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from rediffinet_jax.data import resample
from rediffinet_jax.errors import CaseError
from rediffinet_jax.files import atomic_path
from rediffinet_jax.labels import LAYOUTS, MODALITIES, OLD_ET_LABEL, SEG_SUFFIX, check_labels, labels_to_regions

NORMALIZATIONS = ("zscore", "zscore_rescale")
_EXTENSIONS = (".nii.gz", ".nii")
_CACHE_VERSION = 1

Box = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """Where one case lives: ``images`` maps each modality to its file; ``seg`` is None if unlabelled;
    ``layout``: the file layout it was found in (:data:`labels.LAYOUTS`), which also says how ET is labelled."""

    case_id: str
    images: dict[str, Path]
    seg: Path | None
    layout: str = "2023"


@dataclasses.dataclass
class Case:
    """One loaded case, cropped to the non-zero bounding box of its modalities.

    image: ``[d, h, w, 4]`` float32, normalized, background exactly 0.
    regions: ``[d, h, w, 3]`` uint8 [WT, TC, ET], or None for an unlabelled case.
    box: per axis (start, stop) of the crop inside ``full_shape``.
    """

    case_id: str
    image: np.ndarray
    regions: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    box: Box
    full_shape: tuple[int, int, int]


def _find_file(folder: Path, stem: str) -> Path | None:
    for ext in _EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def _strip_ext(name: str) -> str | None:
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def discover_cases(
    root: str | os.PathLike, require_labels: bool = False, errors: list | None = None
) -> list[CaseFiles]:
    """Finds the cases under ``root``, sorted by id.

    Accepts a folder per case (``<case>/<case>-t1n.nii.gz`` …) or flat files ``<case>-t1n.nii.gz`` in
    ``root`` itself; ``.nii`` works like ``.nii.gz``. The segmentation ``<case>-seg`` is optional. Each
    case's layout is detected from its file names (:data:`labels.LAYOUTS`): BraTS 2023's, or BraTS 2018–2021's
    ``<case>_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg`` (ET = 4). Other files in a case folder (masks,
    another model's predictions) are ignored.

    Raises:
      CaseError: root missing or holding no case, a case missing a modality, a case named in both layouts,
        a folder whose NIfTI files are named for another case, or (``require_labels``) no labelled case.
        With an ``errors`` list, such a case is appended there and left out instead (so that the other
        cases can still be processed).
    """
    root = Path(root)
    if not root.is_dir():
        raise CaseError("data folder does not exist", path=str(root))
    groups = _case_folders(root, errors)
    for f in sorted(root.iterdir()):
        stem = _strip_ext(f.name) if f.is_file() else None
        for layout in LAYOUTS.values():
            if stem and (case := layout.owns(stem)):
                groups.setdefault(case, root)
    if not groups:
        raise CaseError(
            "no BraTS case found (expected <case>/<case>-t1n.nii.gz or <case>_t1.nii.gz ...)", path=str(root)
        )
    cases = []
    for case_id, folder in sorted(groups.items()):
        try:
            cases.append(_case_files(case_id, folder))
        except CaseError as err:
            if errors is None:
                raise
            errors.append(err)
    if require_labels and not any(c.seg for c in cases):
        raise CaseError("no labelled case (no <case>-seg.nii.gz) where labels are needed", path=str(root))
    return cases


def _case_files(case_id: str, folder: Path) -> CaseFiles:
    """The files of one case in ``folder``, in the one layout its names follow."""
    found = {
        name: {w: _find_file(folder, layout.stem(case_id, w)) for w in (*MODALITIES, SEG_SUFFIX)}
        for name, layout in LAYOUTS.items()
    }
    used = [name for name, files in found.items() if any(files.values())]
    if len(used) > 1:
        names = "; ".join(f"{n}: {LAYOUTS[n].stem(case_id, MODALITIES[0])}" for n in used)
        raise CaseError(f"files named in two BraTS layouts ({names}); keep one", case=case_id, path=str(folder))
    layout = LAYOUTS[used[0]]
    files = found[layout.name]
    for m in MODALITIES:
        if files[m] is None:
            raise CaseError(
                f"missing modality {m}", case=case_id, path=str(folder / f"{layout.stem(case_id, m)}.nii.gz")
            )
    return CaseFiles(case_id, {m: files[m] for m in MODALITIES}, files[SEG_SUFFIX], layout.name)


def _case_folders(root: Path, errors: list | None) -> dict[str, Path]:
    """``{case id: folder}`` of the sub-folders holding ``<folder name>-*.nii[.gz]`` (or ``_*``) files. A folder
    whose NIfTI files are named for another case (renamed, or files copied into the wrong one) is an error,
    never skipped silently; with an ``errors`` list it is appended there instead of raised."""
    groups: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        nifti = sorted(f.name for f in sub.iterdir() if _strip_ext(f.name))
        if any(layout.owns(_strip_ext(name)) == sub.name for name in nifti for layout in LAYOUTS.values()):
            groups[sub.name] = sub
        elif nifti:
            err = CaseError(
                f"the folder's NIfTI files are not named <folder name>-<modality> or <folder name>_<modality> "
                f"({', '.join(nifti[:3])}{', ...' if len(nifti) > 3 else ''}); rename the folder or the files",
                case=sub.name,
                path=str(sub),
            )
            if errors is None:
                raise err
            errors.append(err)
    return groups


def read_nifti(path: Path, case_id: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Reads one NIfTI volume as float32 ``[D, H, W]``; any read failure becomes a CaseError."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise CaseError(f"cannot read NIfTI ({type(e).__name__}: {e})", case=case_id, path=str(path)) from e
    if data.ndim != 3:
        raise CaseError(f"expected a 3-D volume, got shape {data.shape}", case=case_id, path=str(path))
    if not np.all(np.isfinite(data)):
        raise CaseError(f"{int(np.sum(~np.isfinite(data)))} NaN or inf voxels", case=case_id, path=str(path))
    return data, img


def normalize(image: np.ndarray, method: str = "zscore_rescale") -> np.ndarray:
    """Per-modality normalization over the brain (the non-zero voxels of that modality).

    image: ``[..., C]`` float32. ``zscore``: (x − mean) / std (population std). ``zscore_rescale`` (the
    paper's): z-score, then clip to the brain's 1st and 99th percentiles and map linearly to [0, 1].
    Background stays exactly 0 in both; z-scored data has its 1st percentile far below 0, so the
    background is kept at 0 explicitly rather than by the clip. A modality with no brain voxel stays 0;
    a constant one becomes 0 on the brain too.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {NORMALIZATIONS}")
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        x = image[..., c]
        brain = x != 0
        if not brain.any():
            continue
        v = x[brain].astype(np.float64)
        z = (v - v.mean()) / max(v.std(), 1e-8)
        if method == "zscore_rescale":
            lo, hi = np.percentile(z, [1, 99])
            z = np.clip((z - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
        out[..., c][brain] = z.astype(np.float32)
    return out


def bounding_box(mask: np.ndarray) -> Box:
    """(start, stop) per axis of the non-zero voxels of ``mask`` ``[D, H, W]``; the whole grid if empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[box]`` over the leading spatial axes (trailing channel axes kept)."""
    return array[tuple(slice(a, b) for a, b in box)]


def paste(array: np.ndarray, box: Box, full_shape: tuple[int, ...], fill=0) -> np.ndarray:
    """Inverse of :func:`crop`: places ``array`` at ``box`` in a new array of ``full_shape`` (+ channels)."""
    out = np.full(tuple(full_shape) + array.shape[len(box) :], fill, dtype=array.dtype)
    out[tuple(slice(a, b) for a, b in box)] = array
    return out


def load_case(
    files: CaseFiles,
    normalization: str = "zscore_rescale",
    old_brats: bool = False,
    require_labels: bool = False,
    read_labels: bool = True,
    allow_empty_modality: bool = False,
) -> Case:
    """Reads, checks, normalizes and crops one case (see :class:`Case`).

    read_labels: False ignores the seg file altogether (prediction: ``regions`` is None).
    allow_empty_modality: accept a modality whose voxels are all equal (all 0: a missing sequence
      saved as zeros); it then normalizes to 0 everywhere.

    Raises:
      CaseError: unreadable or truncated file, NaN/inf voxels, a constant modality (unless allowed),
        modalities of different shapes or affines, a seg of another shape, non-integer label values,
        label values outside {0,1,2,3} (4 only with ``old_brats``), or no seg when ``require_labels``.
    """
    image, ref = _read_modalities(files, allow_empty_modality)
    regions = None
    if files.seg is not None and read_labels:
        regions = _read_regions(files, ref.shape, old_brats)
    elif require_labels:
        raise CaseError(
            "no segmentation (-seg) where labels are needed",
            case=files.case_id,
            path=str(files.images[MODALITIES[0]].parent),
        )
    box = bounding_box(np.any(image != 0, axis=-1))
    image = normalize(crop(image, box), normalization)
    spacing = tuple(float(s) for s in ref.header.get_zooms()[:3])
    crop_regions = None if regions is None else crop(regions, box)
    return Case(files.case_id, image, crop_regions, spacing, np.asarray(ref.affine), box, ref.shape)


def _read_modalities(files: CaseFiles, allow_empty: bool):
    """(image ``[D, H, W, 4]`` float32 as stored, the first modality's NIfTI image), checked: no constant
    modality (unless ``allow_empty``), one shape and one affine for all."""
    vols, ref = [], None
    for m in MODALITIES:
        data, img = read_nifti(files.images[m], files.case_id)
        where = {"case": files.case_id, "path": str(files.images[m])}
        if not allow_empty and data.size and data.min() == data.max():
            raise CaseError(
                f"modality {m} is constant (every voxel {data.flat[0]:g}): an empty or failed export? "
                f"(data.allow_empty_modality=True accepts it)",
                **where,
            )
        if ref is None:
            ref = img
        elif data.shape != ref.shape:
            raise CaseError(f"shape {data.shape} differs from {MODALITIES[0]}'s {ref.shape}", **where)
        elif not np.allclose(img.affine, ref.affine, atol=1e-4):
            raise CaseError(f"affine differs from {MODALITIES[0]}'s", **where)
        vols.append(data)
    return np.stack(vols, axis=-1), ref


def _read_regions(files: CaseFiles, shape, old_brats: bool) -> np.ndarray:
    """The seg as regions; label 4 is ET where the case's layout says so (2018–2021), or with ``old_brats``."""
    old = old_brats or LAYOUTS[files.layout].et_label == OLD_ET_LABEL
    return read_label_map(files.seg, files.case_id, shape, None, old, "seg")


def read_label_map(path, case_id: str, shape, affine=None, old_brats: bool = False, what: str = "label map"):
    """A BraTS label map as regions ``[D, H, W, 3]`` uint8, checked: the images' ``shape`` (and ``affine``
    when given), integer labels in {0..3} (4 as ET only with ``old_brats``).

    Raises:
      CaseError: naming the case and file, for each of those and for an unreadable file.
    """
    seg, img = read_nifti(Path(path), case_id)
    where = {"case": case_id, "path": str(path)}
    if seg.shape != tuple(shape):
        raise CaseError(f"{what} shape {seg.shape} differs from the images' {tuple(shape)}", **where)
    if affine is not None and not np.allclose(img.affine, affine, atol=1e-4):
        raise CaseError(f"{what} affine differs from the images' ({MODALITIES[0]})", **where)
    if not np.array_equal(seg, np.rint(seg)):
        odd = np.unique(seg[seg != np.rint(seg)])[:5].tolist()
        raise CaseError(f"non-integer label values {odd} (a resampled or float-saved seg?)", **where)
    try:
        return labels_to_regions(check_labels(np.rint(seg), old_brats))
    except ValueError as e:
        raise CaseError(str(e), **where) from e


def write_label_map(labels: np.ndarray, path: str | os.PathLike, reference: str | os.PathLike) -> None:
    """Writes a uint8 label map ``[D, H, W]`` with the affine and header of the ``reference`` NIfTI.

    Written to a temporary name and renamed, so an interrupted write leaves nothing half-done.
    """
    ref = nib.load(str(reference))
    if labels.shape != ref.shape[:3]:
        raise ValueError(f"label map shape {labels.shape} does not match the reference {ref.shape} ({reference})")
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


# ----------------------------------------------------------------------------- cache


def _source_key(files: CaseFiles, normalization: str, old_brats: bool, allow_empty: bool, spacing=None) -> dict:
    paths = [files.images[m] for m in MODALITIES] + ([files.seg] if files.seg else [])
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key = {
        "version": _CACHE_VERSION,
        "normalization": normalization,
        "old_brats": old_brats,
        "allow_empty_modality": allow_empty,
        "sources": stats,
    }
    if spacing:  # only when asked: a cache made at the source's spacing stays valid
        key["spacing"] = [float(x) for x in spacing]
    return key


def cached_meta(folder: str | os.PathLike) -> dict:
    """The metadata of a cache entry: box (tuple of (start, stop)), full_shape, spacing (the source's, tuples),
    affine, labelled, key, and work_shape: the shape of the arrays cached (the crop's own unless
    ``data.spacing`` resampled it). A damaged ``meta.json`` reads as missing: the entry is rebuilt."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    meta["box"] = tuple(tuple(b) for b in meta["box"])
    meta["full_shape"] = tuple(meta["full_shape"])
    meta["spacing"] = tuple(meta["spacing"])
    meta["work_shape"] = tuple(meta.get("work_shape") or (b - a for a, b in meta["box"]))
    return meta


def crop_shape(meta: dict) -> tuple[int, ...]:
    return tuple(b - a for a, b in meta["box"])


def to_source(array: np.ndarray, meta: dict) -> np.ndarray:
    """A cached case's float array ``[d, h, w, C]`` from its working grid back to its crop on the source grid."""
    return resample.resize(np.asarray(array, np.float32), crop_shape(meta))


def to_work(array: np.ndarray, meta: dict) -> np.ndarray:
    """A cropped array on the source grid to the case's working grid: floats linearly, region masks (uint8)
    by :func:`resample.resize_labels`."""
    if np.issubdtype(np.asarray(array).dtype, np.floating):
        return resample.resize(array, meta["work_shape"])
    return resample.resize_labels(array, meta["work_shape"])


def source_truth(folder) -> np.ndarray:
    """A cached case's ground-truth regions on its crop of the source grid (what is scored), whatever the
    working grid."""
    folder = Path(folder)
    return np.load(folder / ("truth.npy" if (folder / "truth.npy").is_file() else "regions.npy"))


def file_digest(path) -> str:
    """The sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_entry(folder: Path, case: Case, key: dict, spacing) -> dict:
    """Writes a cache entry (atomically, as a folder) of a loaded case, resampled to ``spacing``; its meta,
    with the sha256 of each source file (``digests``, by file name: what :mod:`changes` compares)."""
    shape = case.image.shape[:3]
    work = resample.work_shape(shape, case.spacing, spacing) if spacing else shape
    meta = {
        "key": key,
        "digests": {Path(p).name: file_digest(p) for p, _, _ in key["sources"]},
        "spacing": case.spacing,
        "affine": case.affine.tolist(),
        "box": case.box,
        "full_shape": case.full_shape,
        "labelled": case.regions is not None,
        "work_shape": list(work),
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        np.save(tmp / "image.npy", resample.resize(case.image, work))
        if case.regions is not None:
            np.save(tmp / "regions.npy", resample.resize_labels(case.regions, work))
            if tuple(work) != tuple(shape):
                np.save(tmp / "truth.npy", case.regions)
        (tmp / "meta.json").write_text(json.dumps(meta))
    return cached_meta(folder)


def cached_case(
    files: CaseFiles,
    cache_dir: str | os.PathLike,
    normalization: str = "zscore_rescale",
    old_brats: bool = False,
    require_labels: bool = False,
    allow_empty_modality: bool = False,
    spacing=None,
    log=None,
) -> Case:
    """Like :func:`load_case`, through a cache of ``.npy`` files opened memory-mapped.

    ``spacing`` (mm per axis; None or empty: the source's): the crop is resampled to it
    (:mod:`resample`; image and ``regions.npy`` on that grid, the source-grid truth kept as ``truth.npy``).
    The entry ``cache_dir/<case>/`` is rebuilt when a source file (size or mtime) or an option changes.
    It is built in a temporary folder and renamed into place, so an interrupted build leaves nothing; a
    damaged ``meta.json`` is rebuilt too, said through ``log`` (a callable taking a line) when given.
    """
    folder = Path(cache_dir) / files.case_id
    key = _source_key(files, normalization, old_brats, allow_empty_modality, spacing)
    meta = cached_meta(folder) if (folder / "meta.json").is_file() else None
    if meta is None and (folder / "meta.json").is_file() and log:
        log(f"{files.case_id}: the cache's {folder / 'meta.json'} was damaged: rebuilt")
    if meta is None or meta["key"] != key:
        case = load_case(files, normalization, old_brats, require_labels, allow_empty_modality=allow_empty_modality)
        meta = _write_entry(folder, case, key, spacing)
    if require_labels and not meta["labelled"]:
        raise CaseError("no segmentation (-seg) where labels are needed", case=files.case_id)
    regions = np.load(folder / "regions.npy", mmap_mode="r") if meta["labelled"] else None
    return Case(
        files.case_id,
        np.load(folder / "image.npy", mmap_mode="r"),
        regions,
        tuple(meta["spacing"]),
        np.asarray(meta["affine"]),
        meta["box"],
        meta["full_shape"],
    )
