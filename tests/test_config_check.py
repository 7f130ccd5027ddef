"""Every setting checked before any work (config_check.py): each rule refuses what it should, naming the key."""

import pytest

from configs import control, rediffinet, rediffinet_plus
from rediffinet_jax import config_check
from rediffinet_jax.errors import ConfigError


@pytest.mark.parametrize("module", [rediffinet, rediffinet_plus, control])
@pytest.mark.parametrize("variant", [None, "demo", "bench", "smoke"])
def test_every_shipped_config_passes(module, variant):
    config_check.check(module.get_config(variant))


BAD = [
    ("diffusion.sampler.fusion", "max", "one of \\['mean', 'suf'\\]"),
    ("diffusion.model", "foo", "one of"),
    ("data.normalization", "minmax", "one of"),
    ("unet.val_every", 0, "an integer ≥ 1"),
    ("unet.batch", 0, "an integer ≥ 1"),
    ("diffusion.keep", 0, "an integer ≥ 1"),
    ("unet.steps", 0, "an integer ≥ 1"),
    ("unet.patch", (32, 32), "three positive integers"),
    ("unet.patch", (32, 32, 20), "multiples of 8"),
    ("diffusion.patch", (32, 32, 24), "multiples of 16"),
    ("diffusion.sampler.chunk", 3, "divide sampler.samples"),
    ("diffusion.ema", 1.0, "in \\[0, 1\\)"),
    ("diffusion.loss_weights", (0.0, 0.0, 0.0), "not all 0"),
    ("eval.convention", "brats2020", "one of"),
    ("unet.lr", -1.0, "a positive number"),
    ("stages", "diffusion", "all or unet"),
]


@pytest.mark.parametrize("key,value,allowed", BAD)
def test_bad_setting_is_one_line_naming_the_key(key, value, allowed):
    c = rediffinet.get_config("bench")  # U-Net of 4 levels (patches: multiples of 8), 4 samples
    *path, name = key.split(".")
    node = c
    for part in path:
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=rf"config key {key} = [^:]*: must .*{allowed}"):
        config_check.check(c)


def test_sdedit_start_only_for_discrepancy_refiners():
    from configs import diff_unet

    c = diff_unet.get_config("smoke")
    c.diffusion.sampler.start = 500
    with pytest.raises(ConfigError, match="discrepancy refiners only"):
        config_check.check(c)
    c = rediffinet.get_config("smoke")
    c.diffusion.sampler.update(start=1, steps=3)
    with pytest.raises(ConfigError, match="at most sampler.start"):
        config_check.check(c)


def test_lesion_wise_off_is_refused_not_ignored():
    c = rediffinet.get_config("smoke")
    c.eval.lesion_wise = False
    with pytest.raises(ConfigError, match="eval.lesion_wise = False: must be True"):
        config_check.check(c)


def test_folds_that_are_not_numbers_are_named():
    from rediffinet_jax.prediction import parse_folds

    assert parse_folds(["0", "2"]) == [0, 2]
    with pytest.raises(ConfigError, match="--folds: 'x' is not a fold number"):
        parse_folds(["0", "x"])


@pytest.mark.parametrize("args", [["--shape", "1,2"], ["--shape", "a,b,c"], ["--cases", "-1"], ["--tumour_scale", "0"]])
def test_phantom_writer_refuses_bad_arguments_in_one_line(tmp_path, capsys, args):
    from rediffinet_jax.data import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "p"), *args])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --shape")
    assert not (tmp_path / "p").exists()
