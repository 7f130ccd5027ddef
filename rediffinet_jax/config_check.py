"""Every setting of a run checked before any work: one table of rules, one ``error:`` line naming the key.

:func:`check` runs when ``train.py`` starts, before a phantom, split, cache or ``config.json`` is written, so
that a typo (``diffusion.sampler.fusion=max``) or an impossible value (``unet.keep=0``, a 2-D patch) is
refused at once instead of after hours of training or with a traceback. A rule is one entry of
:data:`RULES`: ``(key, test, what is allowed)``; the few that relate several keys follow it.
"""

from __future__ import annotations

import math
import numbers

from rediffinet_jax.errors import ConfigError


def _int_at_least(lo: int):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def _number_in(lo: float, hi: float, hi_open: bool = False):
    def test(v):
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
        return ok and (v < hi if hi_open else v <= hi)

    return test


def _one_of(choices):
    return lambda v: v in choices


def _positive_ints(n: int | None = None):
    def test(v):
        ok = isinstance(v, (list, tuple)) and all(_int_at_least(1)(x) for x in v)
        return ok and (n is None or len(v) == n)

    return test


_FRACTION = (_number_in(0.0, 1.0), "a number in [0, 1]")
_POSITIVE = (_number_in(1e-300, math.inf), "a positive number")
_COUNT = (_int_at_least(1), "an integer ≥ 1")


def _stage_rules(block: str) -> list:
    """The rules both stages share (``unet`` and ``diffusion`` blocks)."""
    return [
        (f"{block}.patch", _positive_ints(3), "three positive integers (D, H, W)"),
        (f"{block}.batch", *_COUNT),
        (f"{block}.steps", *_COUNT),
        (f"{block}.val_every", *_COUNT),
        (f"{block}.keep", *_COUNT),
        (f"{block}.batch_windows", *_COUNT),
        (f"{block}.val_cases", _int_at_least(0), "an integer ≥ 0 (0: every held-out case)"),
        (f"{block}.lr", *_POSITIVE),
        (f"{block}.weight_decay", _number_in(0.0, math.inf), "a number ≥ 0"),
        (f"{block}.warmup_frac", _number_in(0.0, 1.0, hi_open=True), "a number in [0, 1)"),
        (f"{block}.foreground_fraction", *_FRACTION),
        (f"{block}.overlap", _number_in(0.0, 1.0, hi_open=True), "a number in [0, 1)"),
        (f"{block}.dtype", _one_of(("float32", "bfloat16")), "float32 or bfloat16"),
        (f"{block}.remat", _one_of((True, False)), "True or False"),
        (f"{block}.augment.flip_p", *_FRACTION),
        (f"{block}.augment.nvidia_p", *_FRACTION),
        (f"{block}.augment.zoom_p", *_FRACTION),
        (f"{block}.augment.zoom_max", _number_in(1.0, math.inf), "a number ≥ 1"),
        (f"{block}.augment.scale_shift", _number_in(0.0, 1.0), "a number in [0, 1]"),
    ]


def rules() -> list:
    """``[(key, test, allowed)]``: every single-key rule (the choices read from their owners)."""
    from rediffinet_jax import metrics
    from rediffinet_jax.data.brats import NORMALIZATIONS

    return [
        ("seed", _int_at_least(0), "an integer ≥ 0"),
        ("stages", _one_of(("all", "unet")), "all or unet"),
        ("data.normalization", _one_of(NORMALIZATIONS), f"one of {list(NORMALIZATIONS)}"),
        ("data.n_folds", _int_at_least(2), "an integer ≥ 2"),
        ("data.split_seed", _int_at_least(0), "an integer ≥ 0"),
        ("data.num_workers", _int_at_least(0), "an integer ≥ 0"),
        (
            "data.spacing",
            lambda v: len(v) == 0 or (len(v) == 3 and all(_POSITIVE[0](x) for x in v)),
            "empty or 3 numbers > 0",
        ),
        ("data.phantoms.n_cases", _int_at_least(1), "an integer ≥ 1"),
        ("data.phantoms.shape", _positive_ints(3), "three positive integers"),
        ("data.phantoms.tumour_scale", *_POSITIVE),
        *_stage_rules("unet"),
        ("unet.filters", _positive_ints(), "positive integers, one per level"),
        ("unet.deep_supervision", _int_at_least(0), "an integer ≥ 0"),
        *_stage_rules("diffusion"),
        *_diffusion_rules(),
        ("eval.convention", _one_of(metrics.CONVENTIONS), f"one of {list(metrics.CONVENTIONS)}"),
        ("eval.checkpoint", _one_of(("best", "latest")), "best or latest"),
        ("eval.gate", _one_of((True, False)), "True or False"),
        # lesion-wise scores are part of every row (seconds per case): there is nothing to turn off
        ("eval.lesion_wise", _one_of((True,)), "True (lesion-wise scores are always computed)"),
    ]


def _diffusion_rules() -> list:
    """The rules of the ``diffusion`` block beyond those both stages share."""
    from rediffinet_jax import stages
    from rediffinet_jax.diffusion import FUSIONS, NUM_TIMESTEPS

    return [
        ("diffusion.model", _one_of(stages.VARIANTS), f"one of {sorted(stages.VARIANTS)}"),
        ("diffusion.features", _positive_ints(6), "six positive integers"),
        (
            "diffusion.loss_weights",
            lambda v: len(v) == 3 and all(x >= 0 for x in v) and any(v),
            "3 numbers ≥ 0, not all 0",
        ),
        ("diffusion.error_fraction", *_FRACTION),
        ("diffusion.unet_augment.p", *_FRACTION),
        ("diffusion.unet_augment.component_p", *_FRACTION),
        ("diffusion.unet_augment.max_radius", *_COUNT),
        ("diffusion.ema", _number_in(0.0, 1.0, hi_open=True), "a number in [0, 1) (0: no EMA)"),
        ("diffusion.min_snr", _number_in(0.0, math.inf), "a number ≥ 0 (0: off)"),
        ("diffusion.clip_norm", _number_in(0.0, math.inf), "a number ≥ 0 (0: off)"),
        ("diffusion.sampler.fusion", _one_of(FUSIONS), f"one of {sorted(FUSIONS)}"),
        ("diffusion.sampler.steps", _int_at_least(1), "an integer ≥ 1"),
        ("diffusion.sampler.samples", *_COUNT),
        ("diffusion.sampler.chunk", _int_at_least(0), "an integer ≥ 0 (0: every sample at once)"),
        ("diffusion.sampler.start", _number_in(0, NUM_TIMESTEPS - 1), f"an integer in [0, {NUM_TIMESTEPS - 1}]"),
        ("diffusion.val_sampler.steps", *_COUNT),
        ("diffusion.val_sampler.samples", *_COUNT),
    ]


_MISSING = object()


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return _MISSING
        node = node[part]
    return node


def check(config) -> None:
    """Refuses the first setting that breaks a rule.

    Raises:
      ConfigError: ``config key <key> = <value>: must be <allowed>``.
    """
    for key, test, allowed in rules():
        value = _get(config, key)
        if value is _MISSING:
            continue  # a key this config has no block for (an older version's file)
        try:
            ok = test(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"config key {key} = {value!r}: must be {allowed}")
    _check_relations(config)


def _check_relations(config) -> None:
    from rediffinet_jax.diffusion import FIRST_T, sampler_start, space_timesteps
    from rediffinet_jax.models.denoiser import MULTIPLE
    from rediffinet_jax.stages import VARIANTS

    u, d = config.unet, config.diffusion
    multiple = 2 ** (len(u.filters) - 1)
    if any(p % multiple for p in u.patch):
        raise ConfigError(f"config key unet.patch = {tuple(u.patch)}: must be multiples of {multiple} (2^(levels − 1))")
    if u.deep_supervision > len(u.filters) - 2:
        raise ConfigError(f"config key unet.deep_supervision = {u.deep_supervision}: at most {len(u.filters) - 2}")
    if any(p % MULTIPLE for p in d.patch):
        raise ConfigError(f"config key diffusion.patch = {tuple(d.patch)}: must be multiples of {MULTIPLE}")
    s = d.sampler
    if s.chunk and s.samples % min(s.chunk, s.samples):
        raise ConfigError(f"config key diffusion.sampler.chunk = {s.chunk}: must divide sampler.samples ({s.samples})")
    start = sampler_start(s)
    try:
        space_timesteps(int(start) + 1, s.steps)
    except ValueError:
        raise ConfigError(
            f"config key diffusion.sampler.steps = {s.steps}: at most sampler.start + 1 ({start + 1})"
        ) from None
    if start != FIRST_T and VARIANTS[d.model][1] != "discrepancy":
        raise ConfigError(
            f"config key diffusion.sampler.start = {start}: starting from an empty mask is for discrepancy "
            f"refiners only, not {d.model} (use {FIRST_T})"
        )
