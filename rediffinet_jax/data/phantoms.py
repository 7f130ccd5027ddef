"""Synthetic brain-tumour cases in exactly the BraTS 2023 layout: the embedded default data.

Each phantom is a head-shaped brain on an exactly-zero background, with CSF, grey and white matter,
ventricles, and one or two tumours made of nested irregular regions (an enhancing rim (ET) around a
necrotic core (NCR) inside edema (ED)); some tumours lack ET or NCR. The four contrasts follow the
usual appearance (edema bright on t2w and t2f, the enhancing rim bright on t1c, the necrotic core dark
on t1c and bright on t2w). Tissue boundaries are blurred (partial volume) and a bias field and noise
are applied, so region boundaries are ambiguous in the images the way real ones are.

Everything is seeded: ``generate_case(shape, np.random.default_rng([seed, i]))`` is deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from rediffinet_jax.data import mimics
from rediffinet_jax.files import atomic_path, write_text
from rediffinet_jax.labels import LAYOUTS, MODALITIES, SEG_SUFFIX, to_convention
from rediffinet_jax.progress import bar

# Mean intensity per tissue, columns in MODALITIES order [t1n, t1c, t2w, t2f].
_TISSUES = ("csf", "gm", "wm", "ed", "et", "ncr")
_INTENSITY = np.array(
    [
        [0.25, 0.25, 1.00, 0.15],  # csf
        [0.55, 0.55, 0.65, 0.60],  # gm
        [0.75, 0.75, 0.45, 0.50],  # wm
        [0.50, 0.50, 0.90, 0.95],  # ed: bright on t2w and t2f
        [0.55, 1.25, 0.75, 0.80],  # et: bright rim on t1c
        [0.30, 0.22, 1.05, 0.55],  # ncr: dark on t1c, bright on t2w
    ],
    np.float32,
)
_LABEL_OF = {"ed": 2, "et": 3, "ncr": 1}


def case_id(index: int) -> str:
    """BraTS 2023 style id of phantom ``index``: BraTS-GLI-00000-000, ..."""
    return f"BraTS-GLI-{index:05d}-000"


def _smooth_field(shape, rng, scale: int = 4, sigma: float = 1.0) -> np.ndarray:
    """Low-frequency random field with std about 1, made at 1/scale resolution and upsampled."""
    small = [max(2, s // scale) for s in shape]
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma)
    f = ndimage.zoom(f, [s / m for s, m in zip(shape, small)], order=1)[tuple(slice(0, s) for s in shape)]
    return (f - f.mean()) / (f.std() + 1e-8)


def _tumour(coords, centre, radius, rng, shape):
    """Returns (ed, core, ncr) boolean masks of one irregular, nested lesion."""
    d = np.sqrt(sum(((c - x) / r) ** 2 for c, x, r in zip(coords, centre, radius)))
    d = d * (1 + 0.2 * np.clip(_smooth_field(shape, rng, scale=6), -2, 2))  # irregular outline
    kind = rng.choice(["full", "no_ncr", "no_et"], p=[0.7, 0.15, 0.15])
    core_frac = rng.uniform(0.35, 0.65)
    ed = d < 1.0
    core = d < core_frac if kind != "no_et" else d < core_frac * 0.8
    ncr = d < core_frac * rng.uniform(0.45, 0.7) if kind != "no_ncr" else np.zeros_like(ed)
    if kind == "no_et":  # the whole core is necrotic
        ncr = core
    return ed, core, ncr


def generate_case(
    shape=(240, 240, 155),
    rng: np.random.Generator | None = None,
    hard: np.random.Generator | None = None,
    tumour_scale: float = 1.0,
):
    """One phantom.

    tumour_scale: multiplies every lesion's radii (after they are drawn, so the draws do not change):
      at a small ``shape`` a larger scale keeps enhancing rims several voxels thick, as in real cases.
    hard: a generator for the features of :mod:`mimics` (vessels, choroid plexus, satellite lesions,
      broken rims, fading edema); None makes a plain phantom, identical to one made without the option.

    Returns:
      images: ``[D, H, W, 4]`` float32 in MODALITIES order, > 0 on the brain, exactly 0 outside.
      labels: ``[D, H, W]`` uint8 BraTS labels (0 bg, 1 NCR, 2 ED, 3 ET).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = tuple(int(s) for s in shape)
    coords = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    brain, tissue = _anatomy(coords, shape, rng)
    labels, centres = _lesions(coords, brain, shape, rng, hard, tumour_scale)
    for name, value in _LABEL_OF.items():
        tissue[labels == value] = _TISSUES.index(name)
    return _render(coords, brain, tissue, labels, centres, shape, rng, hard), labels


def _anatomy(coords, shape, rng):
    """(brain mask, tissue index map): a head-shaped brain of grey and white matter, CSF rim, ventricles."""
    radii = rng.uniform([0.78, 0.82, 0.75], [0.88, 0.92, 0.85])
    r = np.sqrt(sum((c / a) ** 2 for c, a in zip(coords, radii)))
    r = r * (1 + 0.04 * _smooth_field(shape, rng, scale=8))
    brain = r < 1.0
    tissue = np.zeros(shape, np.int8)  # index into _TISSUES
    texture = _smooth_field(shape, rng, scale=3, sigma=0.7)
    tissue[:] = np.where(texture > rng.uniform(-0.3, 0.3), 2, 1)  # wm / gm
    tissue[r > 0.9] = 0  # csf around the brain
    for side in (-1, 1):  # ventricles
        v = ((coords[0] - side * 0.12) / 0.08) ** 2 + (coords[1] / 0.25) ** 2 + (coords[2] / 0.12) ** 2
        tissue[v < 1] = 0
    return brain, tissue


def _lesions(coords, brain, shape, rng, hard, tumour_scale):
    """(labels ``[D, H, W]`` uint8, lesion centres): none (5 %), one or two nested lesions, plus the hard
    cases' satellites and broken rims."""
    labels = np.zeros(shape, np.uint8)
    centres = []
    n_lesions = 0 if rng.uniform() < 0.05 else (2 if rng.uniform() < 0.25 else 1)
    if hard is not None:  # every BraTS case has a tumour
        n_lesions = max(n_lesions, 1)
    for _ in range(n_lesions):
        centre = rng.uniform(-0.4, 0.4, 3)
        radius = rng.uniform(0.14, 0.32, 3) / (1.6 if n_lesions == 2 else 1.0) * tumour_scale
        ed, core, ncr = _tumour(coords, centre, radius, rng, shape)
        labels[ed & brain & (labels == 0)] = _LABEL_OF["ed"]
        labels[core & brain] = _LABEL_OF["et"]
        labels[ncr & brain] = _LABEL_OF["ncr"]
        centres.append(centre)
    if hard is not None:
        mimics.satellites(coords, labels, brain, centres, hard)
        mimics.broken_rims(coords, labels, centres, hard)
    return labels, centres


def _render(coords, brain, tissue, labels, centres, shape, rng, hard) -> np.ndarray:
    """The four contrasts ``[D, H, W, 4]`` float32: partial volume, tissue texture, bias field, noise."""
    intensity = _INTENSITY
    if hard is not None:
        mimics.vessels(coords, tissue, labels, brain, centres, hard, len(_TISSUES))
        mimics.plexus(coords, tissue, labels, hard, len(_TISSUES) + 1)
        intensity = np.concatenate([_INTENSITY, mimics.INTENSITY])
    # Partial volume: blur each tissue's indicator, then mix the tissue intensities.
    frac = np.stack([ndimage.gaussian_filter((tissue == t).astype(np.float32), 1.0) for t in range(len(intensity))], -1)
    jitter = 1 + rng.normal(0, 0.05, _INTENSITY.shape).astype(np.float32)
    if hard is not None:
        jitter = np.concatenate([jitter, 1 + hard.normal(0, 0.05, mimics.INTENSITY.shape).astype(np.float32)])
    image = frac @ (intensity * jitter)
    if hard is not None:
        image = mimics.fade_edema(image, labels, intensity[_TISSUES.index("wm")] * jitter[_TISSUES.index("wm")], hard)
    image *= 1 + 0.08 * _smooth_field(shape, rng, scale=5)[..., None]  # tissue texture
    bias = np.exp(0.15 * np.stack([_smooth_field(shape, rng, scale=16) for _ in MODALITIES], -1))
    image = image * bias + rng.normal(0, 0.03, shape + (len(MODALITIES),))
    image = np.clip(image, 0.01, None) * brain[..., None]
    return image.astype(np.float32)


def write_case(folder: Path, cid: str, images: np.ndarray, labels: np.ndarray | None, layout: str = "2023") -> None:
    """Writes one case as BraTS NIfTI files (int16 images scaled ×1000, 1 mm, BraTS-like affine), named and
    labelled as ``layout`` names and labels them (:data:`labels.LAYOUTS`: 2021 writes ``<case>_t1ce``, ET = 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = images.shape[1] - 1
    vols = {m: np.rint(images[..., i] * 1000).astype(np.int16) for i, m in enumerate(MODALITIES)}
    for m, v in vols.items():
        v[(v == 0) & (images[..., MODALITIES.index(m)] > 0)] = 1  # brain never rounds to background
    if labels is not None:
        vols[SEG_SUFFIX] = to_convention(labels, layout)
    for what, v in vols.items():
        img = nib.Nifti1Image(v, affine)
        img.header.set_zooms((1.0, 1.0, 1.0))
        img.header.set_xyzt_units("mm", "sec")
        with atomic_path(folder / f"{LAYOUTS[layout].stem(cid, what)}.nii.gz") as tmp:
            nib.save(img, str(tmp))


RECORD = "phantoms.json"


def write_dataset(
    root: str | os.PathLike,
    n_cases: int,
    shape=(240, 240, 155),
    seed: int = 0,
    n_unlabelled: int = 0,
    progress: bool = False,
    hard: bool = False,
    tumour_scale: float = 1.0,
    overwrite: bool = False,
    layout: str = "2023",
) -> list[str]:
    """Writes ``n_cases`` labelled (then ``n_unlabelled`` unlabelled) phantoms under ``root``.

    Case ``i`` comes from ``default_rng([seed, i])`` (and, with ``hard``, the mimics from
    ``default_rng([seed, i, 1])``; see :func:`generate_case` for ``tumour_scale``). ``root/phantoms.json``
    records seed, shape, ``hard`` and ``tumour_scale``: cases
    already complete on disk and made with the same ones are kept (an interrupted generation resumes);
    a folder of phantoms made with others is refused, or emptied of them first with ``overwrite``.
    ``layout``: the file names and ET label of a BraTS release (:data:`labels.LAYOUTS`).

    Raises:
      ConfigError: ``root`` holds phantoms made with another seed, shape, ``hard`` or ``tumour_scale``.
    """
    root = Path(root)
    record = {
        "seed": int(seed),
        "shape": [int(s) for s in shape],
        "hard": bool(hard),
        "tumour_scale": float(tumour_scale),
    }
    if layout != "2023":  # recorded only when not the default, so that older records still match
        record["layout"] = layout
    _check_record(root, record, overwrite)
    ids = []
    for i in bar(range(n_cases + n_unlabelled), "phantoms", enabled=progress, leave=True):
        cid = case_id(i)
        ids.append(cid)
        labelled = i < n_cases
        suffixes = list(MODALITIES) + ([SEG_SUFFIX] if labelled else [])
        if all((root / cid / f"{LAYOUTS[layout].stem(cid, s)}.nii.gz").is_file() for s in suffixes):
            continue
        extra = np.random.default_rng([seed, i, 1]) if hard else None
        images, labels = generate_case(shape, np.random.default_rng([seed, i]), extra, tumour_scale)
        write_case(root / cid, cid, images, labels if labelled else None, layout)
    return ids


def _check_record(root: Path, record: dict, overwrite: bool) -> None:
    """Writes ``root/phantoms.json``, or refuses (``overwrite``: removes) the phantoms of another one."""
    import json
    import shutil

    from rediffinet_jax.errors import ConfigError

    path = root / RECORD
    old = json.loads(path.read_text()) if path.is_file() else None
    made = sorted(p for p in root.glob("BraTS-GLI-*-000") if p.is_dir()) if root.is_dir() else []
    if old == record:
        return
    if (old is not None or made) and not overwrite:
        was = ", ".join(f"{k} {old[k]}" for k in record if old.get(k) != record[k]) if old else "no record"
        asked = ", ".join(f"{k} {v}" for k, v in record.items())
        raise ConfigError(
            f"{root} holds phantoms made with other settings ({was}; asked: {asked}); use another folder or --overwrite"
        )
    for p in made:
        shutil.rmtree(p)
    root.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record))
