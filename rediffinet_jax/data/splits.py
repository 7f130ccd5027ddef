"""The 5-fold cross-validation split, written once to ``splits.json`` and reused by every stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rediffinet_jax.errors import ConfigError
from rediffinet_jax.files import write_text

SPLITS_FILE = "splits.json"


def make_folds(case_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Splits the sorted ``case_ids`` into ``n_folds`` folds of sizes differing by at most one.

    A seeded permutation of the sorted ids is dealt round-robin; each fold is returned sorted.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ConfigError("duplicate case ids")
    if n_folds < 2 or n_folds > len(ids):
        raise ConfigError(f"need 2 <= n_folds <= number of cases ({len(ids)}), got {n_folds}")
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[j] for j in order[k::n_folds]) for k in range(n_folds)]


def train_ids(folds: list[list[str]], fold: int) -> list[str]:
    """The cases outside ``fold`` (sorted): the training cases of that fold."""
    return sorted(c for k, f in enumerate(folds) if k != fold for c in f)


def load_or_create(workdir: str | os.PathLike, case_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Reads ``workdir/splits.json``, or writes it the first time.

    Raises:
      ConfigError: the file exists but is damaged, holds a case in two folds (its "out-of-fold" maps would
        come from a model trained on it), its cases differ from ``case_ids`` (names the differences), or
        its fold count differs; the split is never recomputed silently.
    """
    from rediffinet_jax.workdir import read_json

    path = Path(workdir) / SPLITS_FILE
    if path.is_file():
        folds = read_json(path)["folds"]
        seen: dict[str, int] = {}
        for k, fold in enumerate(folds):
            for c in fold:
                if c in seen:
                    raise ConfigError(f"{path}: case {c} is in folds {seen[c]} and {k}; each case must be in one fold")
                seen[c] = k
        have, want = {c for f in folds for c in f}, set(case_ids)
        if have != want:
            missing, extra = sorted(have - want), sorted(want - have)
            raise ConfigError(
                f"{path} was made for another set of cases: {len(missing)} in the split but not on disk "
                f"{missing[:5]}, {len(extra)} on disk but not in the split {extra[:5]}; use the original data "
                f"or a new work directory"
            )
        if len(folds) != n_folds:
            raise ConfigError(f"{path} has {len(folds)} folds, the config asks for {n_folds}")
        return folds
    folds = make_folds(case_ids, n_folds, seed)
    write_text(path, json.dumps({"seed": seed, "n_folds": n_folds, "folds": folds}, indent=1))
    return folds
