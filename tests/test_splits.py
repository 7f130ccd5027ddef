import json

import pytest

from rediffinet_jax.data import splits
from rediffinet_jax.errors import ConfigError


def test_fold_properties():
    ids = [f"c{i:03d}" for i in range(23)]
    folds = splits.make_folds(ids[::-1], 5, seed=0)
    sizes = sorted(len(f) for f in folds)
    assert sizes == [4, 4, 5, 5, 5]  # 23 = 3·5 + 2·4
    assert sorted(c for f in folds for c in f) == ids
    assert folds == splits.make_folds(ids, 5, seed=0)  # order of input does not matter
    assert folds != splits.make_folds(ids, 5, seed=1)
    assert splits.train_ids(folds, 2) == sorted(set(ids) - set(folds[2]))


def test_written_once_and_checked(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    folds = splits.load_or_create(tmp_path, ids)
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["folds"] == folds
    # a different seed later does not re-split
    assert splits.load_or_create(tmp_path, ids, seed=9) == folds
    with pytest.raises(ConfigError, match="another set of cases"):
        splits.load_or_create(tmp_path, ids + ["c99"])
    with pytest.raises(ConfigError, match="folds"):
        splits.load_or_create(tmp_path, ids, n_folds=3)
