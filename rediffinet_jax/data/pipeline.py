"""grain input pipeline: random patches of cached cases, augmentation, batching, sharding by process.

Elements are dicts of numpy arrays, channels-last:
  ``image``   ``[P0, P1, P2, 4]`` float32 (normalized modalities, background 0, padding 0)
  ``regions`` ``[P0, P1, P2, 3]`` uint8 ground truth [WT, TC, ET]
  ``unet``    ``[P0, P1, P2, 3]`` uint8 out-of-fold U-Net masks U(I) (stage 2 only)
and batches add a leading batch axis. Everything random comes from grain's per-element seed, so the
stream is the same for any worker count, and the iterator state (a small dict) restores it exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grain
import numpy as np
from scipy import ndimage

from rediffinet_jax.data import brats, resample
from rediffinet_jax.errors import CaseError
from rediffinet_jax.files import atomic_path
from rediffinet_jax.labels import labels_to_regions
from rediffinet_jax.progress import bar


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation settings. ``nvidia``: noise, blur, brightness, contrast, each with probability p.

    ``zoom_p``: probability of a zoom by a factor uniform in [1, ``zoom_max``] about the patch centre (the
    NVIDIA recipe crops 0.7–1.0 of the patch and resizes it back up).
    """

    flip_p: float = 0.5
    scale_shift: float = 0.1
    nvidia: bool = True
    nvidia_p: float = 0.15
    zoom_p: float = 0.15
    zoom_max: float = 1.4


@dataclasses.dataclass(frozen=True)
class UnetAugment:
    """nnU-Net's cascade augmentation of U(I) (stage 2 only), so that the refiner sees more, and more
    varied, errors than the out-of-fold masks hold. Per region channel, with probability ``p``: one of
    dilation, erosion, opening, closing by a ball of radius 1..``max_radius``; with probability
    ``component_p``: one connected component of the channel removed (one that holds at most 15 % of the
    channel's voxels). The masks are nested again afterwards (TC ⊆ WT, ET ⊆ TC), as a label map is; the
    target Δ is recomputed from them by the step."""

    p: float = 0.0
    max_radius: int = 2
    component_p: float = 0.0


_BINARY_OPS = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_opening, ndimage.binary_closing)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def augment_unet(unet: np.ndarray, a: UnetAugment, rng: np.random.Generator) -> np.ndarray:
    """:class:`UnetAugment` applied to region masks ``[P0, P1, P2, 3]`` uint8; returns new uint8 masks."""
    out = np.asarray(unet, bool).copy()
    for c in range(out.shape[-1]):
        if rng.uniform() < a.p and out[..., c].any():
            op = _BINARY_OPS[rng.integers(len(_BINARY_OPS))]
            out[..., c] = op(out[..., c], structure=_ball(int(rng.integers(1, a.max_radius + 1))))
        if rng.uniform() < a.component_p and out[..., c].any():
            comps, n = ndimage.label(out[..., c], structure=np.ones((3, 3, 3)))
            sizes = np.bincount(comps.ravel())[1:]
            small = np.flatnonzero(sizes <= 0.15 * sizes.sum()) + 1
            if small.size:
                out[..., c] &= comps != small[rng.integers(small.size)]
    out[..., 1] |= out[..., 2]  # nested as a label map is (labels.nested, without the round trip)
    out[..., 0] |= out[..., 1]
    return out.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class CaseRef:
    """A case as the pipeline sees it: its cache folder (``image.npy``, ``regions.npy``, ``unet.npy``)."""

    case_id: str
    folder: str


def prepare_cache(
    cases: list[brats.CaseFiles],
    cache_dir: str | os.PathLike,
    normalization: str,
    old_brats: bool = False,
    progress: bool = True,
    allow_empty_modality: bool = False,
    spacing=None,
    log=None,
) -> list[CaseRef]:
    """Builds (or reuses) the cache of every case, labels required, resampled to ``spacing`` (mm) when given;
    returns the pipeline's references. ``log``: where a rebuilt damaged entry is said."""
    refs = []
    for files in bar(cases, "cache", enabled=progress):
        brats.cached_case(
            files,
            cache_dir,
            normalization,
            old_brats,
            require_labels=True,
            allow_empty_modality=allow_empty_modality,
            spacing=spacing,
            log=log,
        )
        refs.append(CaseRef(files.case_id, str(Path(cache_dir) / files.case_id)))
    return refs


def attach_unet_masks(refs: list[CaseRef], oof_dir: str | os.PathLike) -> None:
    """Caches each case's out-of-fold U-Net label map ``oof_dir/<case>.nii.gz`` as cropped region masks, on
    the case's working grid (:func:`brats.to_work`).

    Raises:
      CaseError: a case without a prediction (stage 1 has not predicted it).
    """
    for ref in refs:
        src = Path(oof_dir) / f"{ref.case_id}.nii.gz"
        if not src.is_file():
            raise CaseError(
                "no out-of-fold U-Net prediction: run stage 1 on every fold first (train.py --stage unet)",
                case=ref.case_id,
                path=str(src),
            )
        dst = Path(ref.folder) / "unet.npy"
        stamp = Path(ref.folder) / "unet.src"
        key = f"{src} {src.stat().st_size} {src.stat().st_mtime_ns}"
        if dst.is_file() and stamp.is_file() and stamp.read_text() == key:
            continue
        labels, _ = brats.read_nifti(src, ref.case_id)
        meta = brats.cached_meta(ref.folder)
        regions = brats.crop(labels_to_regions(np.rint(labels).astype(np.uint8)), meta["box"])
        with atomic_path(dst) as tmp:
            np.save(tmp, brats.to_work(regions, meta))
        stamp.write_text(key)


def _window(array: np.ndarray, start, size) -> np.ndarray:
    """``array[start:start+size]`` over the 3 spatial axes, zero-padded where it leaves the volume."""
    out = np.zeros(tuple(size) + array.shape[3:], array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape[:3]):
        a, b = max(s, 0), min(s + n, dim)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


@dataclasses.dataclass(frozen=True)
class SamplePatch(grain.transforms.RandomMap):
    """CaseRef -> one augmented patch dict (see module docstring)."""

    patch_size: tuple[int, int, int]
    foreground_fraction: float = 0.4
    with_unet: bool = False
    augment: Augment = Augment()
    error_fraction: float = 0.0  # stage 2: the share of patches centred on a voxel where U(I) is wrong
    unet_augment: UnetAugment = UnetAugment()

    def _centre(self, folder: Path, regions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A patch centre: with ``error_fraction`` on a voxel where U(I) differs from the truth (any region;
        U(I) as cached, before augmentation), else with ``foreground_fraction`` on a tumour voxel, else
        anywhere. A case without such voxels falls through to the next rule."""
        pick = np.empty(0)
        if self.error_fraction and rng.uniform() < self.error_fraction:
            pick = np.flatnonzero(np.any(np.load(folder / "unet.npy", mmap_mode="r") != regions, -1))
        if not pick.size and rng.uniform() < self.foreground_fraction:
            pick = np.flatnonzero(regions[..., 0])
        if pick.size:
            return np.asarray(np.unravel_index(pick[rng.integers(pick.size)], regions.shape[:3]))
        return np.asarray([rng.integers(d) for d in regions.shape[:3]])

    def random_map(self, ref: CaseRef, rng: np.random.Generator) -> dict:
        folder = Path(ref.folder)
        image = np.load(folder / "image.npy", mmap_mode="r")
        regions = np.load(folder / "regions.npy", mmap_mode="r")
        patch = np.asarray(self.patch_size)
        dims = np.asarray(image.shape[:3])
        centre = self._centre(folder, regions, rng)
        # A zoom by z reads a window of patch / z voxels and resizes it up to the patch: cheap, since only
        # the smaller window is read and the resize runs on 15 % of the patches.
        zoom = rng.uniform(1.0, self.augment.zoom_max) if rng.uniform() < self.augment.zoom_p else 1.0
        p = np.maximum(1, np.rint(patch / zoom).astype(int))
        lo, hi = np.minimum(0, dims - p), np.maximum(0, dims - p)
        start = np.clip(centre - p // 2, lo, hi)
        out = {"image": _window(image, start, p).astype(np.float32), "regions": _window(regions, start, p)}
        if self.with_unet:
            out["unet"] = _window(np.load(folder / "unet.npy", mmap_mode="r"), start, p)
        if (p != patch).any():
            out = {k: resample.resize(v, patch) for k, v in out.items()}
        if self.with_unet and (self.unet_augment.p or self.unet_augment.component_p):
            out["unet"] = augment_unet(out["unet"], self.unet_augment, rng)
        return self._augment(out, rng)

    def _augment(self, out: dict, rng: np.random.Generator) -> dict:
        a = self.augment
        for axis in range(3):
            if rng.uniform() < a.flip_p:
                out = {k: np.flip(v, axis) for k, v in out.items()}
        out = {k: np.ascontiguousarray(v) for k, v in out.items()}
        img = out["image"]
        brain = img != 0
        n_ch = img.shape[-1]
        if a.scale_shift:
            img = img * (1 + rng.uniform(-a.scale_shift, a.scale_shift, n_ch)) + rng.uniform(
                -a.scale_shift, a.scale_shift, n_ch
            )
        if a.nvidia:
            if rng.uniform() < a.nvidia_p:  # gaussian noise
                img = img + rng.normal(0, rng.uniform(0, 0.33), img.shape).astype(np.float32)
            if rng.uniform() < a.nvidia_p:  # gaussian blur, spatial axes only
                s = rng.uniform(0.5, 1.5)
                img = ndimage.gaussian_filter(img, (s, s, s, 0))
            if rng.uniform() < a.nvidia_p:  # brightness
                img = img * rng.uniform(0.7, 1.3)
            if rng.uniform() < a.nvidia_p:  # contrast, kept inside the original range
                lo, hi = img.min(), img.max()
                img = np.clip(img * rng.uniform(0.65, 1.5), lo, hi)
        out["image"] = np.where(brain, img, 0).astype(np.float32)  # background and padding stay 0
        return out


def train_dataset(
    refs: list[CaseRef],
    patch_size,
    batch_size: int,
    seed: int,
    *,
    foreground_fraction=0.4,
    with_unet=False,
    augment: Augment = Augment(),
    error_fraction: float = 0.0,
    unet_augment: UnetAugment = UnetAugment(),
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """An endless, shuffled stream of batches of ``batch_size`` patches for this process.

    Element ``i`` of the global stream is the same whatever the worker or process count; process
    ``k`` of ``n`` takes elements ``k, k + n, …`` (so ``batch_size`` is the per-process batch).
    """
    if not refs:
        raise CaseError("no training case")
    ds = (
        grain.MapDataset.source(refs)
        .seed(seed)
        .shuffle()
        .repeat()
        .random_map(
            SamplePatch(tuple(patch_size), foreground_fraction, with_unet, augment, error_fraction, unet_augment)
        )
    )
    if process_count > 1:
        ds = ds[process_index::process_count]
    # One background thread per process prepares the next batches while the step runs; grain's default
    # of 16 threads was many times slower on a 2-core machine (GIL contention).
    it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it
