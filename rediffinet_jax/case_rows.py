"""The per-case score rows of an evaluation, ``eval/<model>/fold_k/cases.csv``: their columns, reading them
(torn rows and incomplete cases left out, optionally repaired) and appending to them."""

from __future__ import annotations

import csv
from pathlib import Path

from rediffinet_jax import metrics, parallel
from rediffinet_jax.errors import ConfigError
from rediffinet_jax.files import atomic_path
from rediffinet_jax.labels import REGIONS

# seconds: the model's prediction of the case (sliding window and sampler); empty for the U-Net, whose
# rows come from its out-of-fold maps
CASE_COLUMNS = (
    "case",
    "region",
    "dice",
    "hd95",
    "lesionwise_dice",
    "lesionwise_hd95",
    "tp",
    "fp",
    "fn",
    *metrics.FLIP_KEYS,
    "seconds",
    "convention",
    "gt_empty",
    "lesions_dropped",
)
_OLD_COLUMNS = CASE_COLUMNS[:-2]  # 0.2.0 wrote no ground-truth counts: still read (they are left out)


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of ``eval/<model>/fold_k/cases.csv``; refuses one with other columns (an older version's).

    A row cut off (a kill or a full disk while it was written) or a case without its three region rows is
    left out, so that the case counts as not scored; ``repair`` also rewrites the file without them
    (atomically), so that new rows are not appended to a torn line.
    """
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        raw = list(reader)
    if tuple(reader.fieldnames or ()) not in (CASE_COLUMNS, _OLD_COLUMNS):
        raise ConfigError(
            f"{path} has the columns {reader.fieldnames}, not {list(CASE_COLUMNS)} (an older "
            f"version wrote it); delete {path.parents[2]} to rescore"
        )
    rows = [r for r in (_parse_row(r) for r in raw) if r is not None]
    regions = {}
    for r in rows:
        regions.setdefault(r["case"], []).append(r["region"])
    whole = {c for c, regs in regions.items() if sorted(regs) == sorted(REGIONS)}
    kept = [r for r in rows if r["case"] in whole]
    if repair and len(kept) != len(raw) and parallel.is_main():
        good = [row for row in raw if (p := _parse_row(row)) is not None and p["case"] in whole]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=reader.fieldnames, extrasaction="ignore")
            w.writeheader()
            w.writerows(good)
    return kept


def _parse_row(r: dict) -> dict | None:
    """A cases.csv row with its numbers parsed; None for a row cut off or damaged."""
    if any(v is None for v in r.values()) or None in r or r.get("region") not in REGIONS:
        return None
    try:
        r = dict(r)
        for k in ("dice", "hd95", "lesionwise_dice", "lesionwise_hd95", "seconds"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
        for k in metrics.FLIP_KEYS:
            r[k] = int(r[k])
        for k in ("gt_empty", "lesions_dropped"):
            r[k] = int(r[k]) if r.get(k) not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return r


def append_rows(path: Path, rows: list[dict]) -> None:
    """Adds rows to ``cases.csv`` in the columns its header has (an older file's stay as they are)."""
    new = not path.is_file()
    columns = CASE_COLUMNS if new else path.read_text().partition("\n")[0].strip().split(",")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
