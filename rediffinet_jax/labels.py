"""The one source of truth for BraTS labels, tumour regions and modality channels.

Labels (BraTS 2023): 0 background, 1 NCR, 2 ED (SNFH), 3 ET. Older BraTS releases used 4 for ET;
that is accepted only when asked for (``old_brats=True``).

Regions overlap and are always in the channel order [WT, TC, ET]:
WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
"""Image channel order, everywhere."""

SEG_SUFFIX = "seg"
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
"""Region channel order, everywhere (arrays, metrics, tables, files)."""

REGION_LABELS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
VALID_LABELS = (0, 1, 2, 3)
OLD_ET_LABEL = 4


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """How a BraTS release names a case's files, ``<case><sep><suffix>.nii[.gz]``, and labels ET."""

    name: str
    sep: str
    suffixes: dict  # modality (MODALITIES) -> the file suffix
    et_label: int

    def stem(self, case_id: str, what: str) -> str:
        """The file name without extension of a modality, or of the seg (``what = "seg"``)."""
        return f"{case_id}{self.sep}{self.suffixes.get(what, what)}"

    def owns(self, stem: str) -> str | None:
        """The case id of a file stem this layout names (a modality's or the seg), else None."""
        case, sep, suffix = stem.rpartition(self.sep)
        return case if sep and case and suffix in (*self.suffixes.values(), SEG_SUFFIX) else None


#: The file layouts read, detected per case: BraTS 2023 (``<case>-t1n``) and BraTS 2018–2021 (``<case>_t1``,
#: ``_t1ce``, ``_t2``, ``_flair``; ET labelled 4, as the Kaggle copies of 2020 and 2021 too).
LAYOUTS = {
    "2023": FileLayout("2023", "-", {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f"}, 3),
    "2021": FileLayout("2021", "_", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}, 4),
}


def to_convention(labels: np.ndarray, layout: str) -> np.ndarray:
    """A label map (BraTS 2023 labels, ET = 3) in the labels of ``layout`` (ET = 4 for 2021), uint8."""
    out = np.asarray(labels, np.uint8).copy()
    et = LAYOUTS[layout].et_label
    if et != 3:
        out[out == 3] = et
    return out


# Back to labels, in this order so that nesting is imposed: an ET voxel outside TC still becomes 3.
_PAINT_ORDER = (("WT", 2), ("TC", 1), ("ET", 3))


def check_labels(labels: np.ndarray, old_brats: bool = False) -> np.ndarray:
    """Returns the labels as uint8 with 4 mapped to 3 when ``old_brats``; raises on other values.

    Raises:
      ValueError: naming the unexpected values.
    """
    values = np.unique(labels)
    allowed = set(VALID_LABELS) | ({OLD_ET_LABEL} if old_brats else set())
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        hint = " (label 4 is old-BraTS ET: pass old_brats=True to accept it)" if OLD_ET_LABEL in bad else ""
        raise ValueError(f"label values {bad} are outside {{0, 1, 2, 3}}{hint}")
    out = np.asarray(labels).astype(np.uint8)
    if old_brats:
        out[out == OLD_ET_LABEL] = 3
    return out


def labels_to_regions(labels: np.ndarray) -> np.ndarray:
    """Label map ``[...]`` (ints in 0..3) to region masks ``[..., 3]`` uint8 in [WT, TC, ET]."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, REGION_LABELS[r]) for r in REGIONS], axis=-1).astype(np.uint8)


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """Region masks ``[..., 3]`` (binary, [WT, TC, ET]) to a uint8 label map ``[...]``.

    0 everywhere; 2 where WT; 1 where TC; 3 where ET, painted in that order.
    """
    regions = np.asarray(regions)
    if regions.shape[-1] != len(REGIONS):
        raise ValueError(f"regions must end in {len(REGIONS)} channels {REGIONS}, got shape {regions.shape}")
    out = np.zeros(regions.shape[:-1], np.uint8)
    for name, value in _PAINT_ORDER:
        out[regions[..., REGIONS.index(name)] > 0] = value
    return out


def nested(regions: np.ndarray) -> np.ndarray:
    """The region masks ``[..., 3]`` uint8 that the label map of ``regions`` encodes: what is written and
    scored. Painting nests them (TC ⊆ WT, ET ⊆ TC): a TC voxel outside WT becomes WT too, an ET voxel
    outside TC becomes WT and TC. A refiner flips each region on its own, so its masks need not be nested."""
    return labels_to_regions(regions_to_labels(regions))


def nested_region(regions: np.ndarray, r: int) -> np.ndarray:
    """``nested(regions)[..., r]`` as bool ``[...]`` without writing the label map: region r or any region
    nested inside it (later in :data:`REGIONS`), which painting puts in r."""
    return (np.asarray(regions)[..., r:] > 0).any(-1)
