"""Prediction for both stages: trained parameters restored alone, sliding windows with Gaussian blending.

:func:`load_model` reads a fold's parameters (no optimizer state, no train step). The U-Net gives sigmoid
probabilities (:func:`unet_probabilities`); a diffusion model gives its fused value Y
(:func:`diffusion_fused`, mask = Y > 0), which :func:`finish` turns into the final region masks.

Windows of the training patch size overlap by ``overlap`` (0.5) and are blended with Gaussian
importance weights (σ = window/8 per axis); a volume smaller than the window is zero-padded. Every
window batch has the same shape (the last one is padded), so the per-window function compiles once.
Volumes are ``[D, H, W, C]`` numpy arrays, channels-last.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rediffinet_jax import compiling, diffusion, parallel
from rediffinet_jax.progress import bar


def window_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
    """Start offsets covering ``[0, size)`` with windows of ``window`` stepping window·(1 − overlap)."""
    if size <= window:
        return [0]
    step = max(1, int(round(window * (1 - overlap))))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def gaussian_weights(window, sigma_scale: float = 1 / 8) -> np.ndarray:
    """Importance map ``window`` float32: Gaussian with σ = window·sigma_scale per axis, max 1, > 0."""
    axes = [np.exp(-0.5 * ((np.arange(w) - (w - 1) / 2) / (w * sigma_scale)) ** 2) for w in window]
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    return np.maximum(g, g[g > 0].min()).astype(np.float32)


def sliding_window(
    fn: Callable[..., np.ndarray],
    volume: np.ndarray,
    window,
    overlap: float = 0.5,
    batch_windows: int = 1,
    out_channels: int = 3,
    progress: bool = False,
    needed: np.ndarray | None = None,
    fill=0.0,
) -> np.ndarray:
    """Applies ``fn`` to overlapping windows of ``volume`` ``[D, H, W, C]`` and blends the outputs.

    fn maps ``[batch_windows, w0, w1, w2, C]`` to ``[batch_windows, w0, w1, w2, out_channels]``.
    Returns ``[D, H, W, out_channels]`` float32: Σ g·out / Σ g over the windows covering each voxel.
    ``needed`` (bool ``[D, H, W]``): only batches holding a needed voxel are run, as ``fn(x, index=i)`` with
    i the batch's place among all of them (a sampler's noise stays that of the full run); every window over
    a needed voxel is run, so needed voxels get exactly the full run's value, the others ``fill``.
    """
    window = tuple(int(w) for w in window)
    shape = volume.shape[:3]
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    if padded != shape:
        vol = np.zeros(padded + volume.shape[3:], volume.dtype)
        vol[: shape[0], : shape[1], : shape[2]] = volume
    else:
        vol = volume
    starts = list(itertools.product(*[window_starts(s, w, overlap) for s, w in zip(padded, window)]))
    g = gaussian_weights(window)[..., None]
    acc = np.zeros(padded + (out_channels,), np.float32)
    norm = np.zeros(padded + (1,), np.float32)
    want = None if needed is None else np.pad(np.asarray(needed, bool), [(0, p - s) for s, p in zip(shape, padded)])
    for b0 in bar(range(0, len(starts), batch_windows), "windows", "batch", enabled=progress):
        chunk = starts[b0 : b0 + batch_windows]
        slices = [tuple(slice(a, a + w) for a, w in zip(s, window)) for s in chunk]
        if want is not None and not any(want[sl].any() for sl in slices):
            continue
        x = np.zeros((batch_windows,) + window + vol.shape[3:], vol.dtype)
        for i, sl in enumerate(slices):
            x[i] = vol[sl]
        out = fn(x) if want is None else fn(x, index=b0 // batch_windows)
        out = parallel.to_host(out).astype(np.float32)
        for i, sl in enumerate(slices):
            acc[sl] += g * out[i]
            norm[sl] += g
    if want is None:
        return (acc / norm)[: shape[0], : shape[1], : shape[2]]
    blended = np.where(norm > 0, acc / np.maximum(norm, 1e-30), np.float32(fill))
    return blended[: shape[0], : shape[1], : shape[2]]


def windows_run(shape, window, overlap: float, batch_windows: int, needed: np.ndarray) -> tuple[int, int]:
    """(window batches :func:`sliding_window` runs with ``needed``, batches in all) for a volume ``shape``."""
    window = tuple(int(w) for w in window)
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    want = np.pad(np.asarray(needed, bool), [(0, p - s) for s, p in zip(shape, padded)])
    starts = list(itertools.product(*[window_starts(s, w, overlap) for s, w in zip(padded, window)]))
    batches = [starts[b : b + batch_windows] for b in range(0, len(starts), batch_windows)]
    run = sum(any(want[tuple(slice(a, a + w) for a, w in zip(s, window))].any() for s in b) for b in batches)
    return run, len(batches)


@functools.partial(compiling.jit, static_argnums=0)
def _unet_probabilities(graphdef, state, x):
    return jax.nn.sigmoid(nnx.merge(graphdef, state)(x))


@functools.partial(compiling.jit, static_argnums=(0, 4, 5, 6, 7, 8, 9, 10))
def _fused(graphdef, state, x, key, steps, samples, fusion, chunk, uncertainty, start, direct):
    model = nnx.merge(graphdef, state)
    if direct:
        out = diffusion.predict_direct(model, x, uncertainty)
    else:
        out = diffusion.sample(model, x, key, steps, samples, fusion, chunk, uncertainty=uncertainty, start=start)
    return jnp.concatenate([out[k] for k in FUSED_FIELDS if k in out], -1)


#: What a refiner's window function returns, 3 region channels each, in this order (``uncertainty`` only
#: when asked): the fused value Y (mask = Y > 0) and Y normalised to [−1, 1].
FUSED_FIELDS = ("y", "y_norm", "uncertainty")


# The jitted functions above are module-level with the graph definition as a static argument, so a
# model of the same architecture (every fold, every case) reuses one compilation per window shape.


def unet_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """Window function: image windows ``[n, ..., C]`` -> sigmoid probabilities ``[n, ..., 3]``."""
    graphdef, state = nnx.split(model)
    return lambda x: _unet_probabilities(graphdef, state, jnp.asarray(x))


def diffusion_predictor(
    model,
    key: jax.Array,
    steps: int,
    samples: int,
    fusion: str,
    chunk: int | None = None,
    uncertainty: bool = False,
    start: int = diffusion.NUM_TIMESTEPS - 1,
    direct: bool = False,
) -> Callable[[np.ndarray], np.ndarray]:
    """Window function: condition windows ``[n, ..., Cc]`` -> :data:`FUSED_FIELDS` ``[n, ..., 6 or 9]``.
    Window batch i draws its noise from fold_in(key, i); ``direct`` (the one-step variant) samples nothing."""
    chunk = diffusion.check_sampler_args(steps, samples, fusion, chunk, start)
    graphdef, state = nnx.split(model)
    counter = iter(range(1 << 62))

    def fn(x, index=None):  # index: the batch's place in the full run (sliding_window's ``needed``)
        i = next(counter) if index is None else index
        k = jax.random.fold_in(key, i)
        return _fused(graphdef, state, jnp.asarray(x), k, steps, samples, fusion, chunk, uncertainty, start, direct)

    return fn


def load_model(stage, folder, which: str = "best", mesh=None, log=print):
    """The model of a trained fold ``folder`` (its ``best`` or ``latest`` checkpoint; a broken one falls back
    to the one before), parameters replicated over ``mesh`` (default: every device).

    Raises:
      RediffinetError: the fold has no checkpoint.
    """
    from pathlib import Path

    from rediffinet_jax import checkpoints
    from rediffinet_jax.errors import RediffinetError

    abstract = nnx.eval_shape(lambda: stage.build(0))
    graphdef, params = nnx.split(abstract)[0], nnx.state(abstract, nnx.Param)
    mgr = checkpoints.manager(Path(folder) / "checkpoints", stage.cfg.keep)
    sharding = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    tree = "ema" if getattr(stage.cfg, "ema", 0.0) else "params"  # trained with a moving average: predict with it
    restored = checkpoints.restore_params(mgr, params, which, sharding=sharding, log=log, tree=tree)
    if restored is None:
        raise RediffinetError(f"no checkpoint in {Path(folder) / 'checkpoints'}")
    return nnx.merge(graphdef, restored[0])


def unet_inputs(cfg, image):
    """The U-Net's input: the modalities ``[..., 4]``, plus the foreground channel when
    ``cfg.foreground_channel``."""
    return foreground_channel(image) if cfg.foreground_channel else image


def unet_probabilities(cfg, model, image: np.ndarray) -> np.ndarray:
    """Whole-case sigmoid probabilities ``[D, H, W, 3]`` float32 of image ``[D, H, W, 4]`` by sliding window
    (``cfg``: the config's ``unet`` block)."""
    vol = unet_inputs(cfg, np.asarray(image))
    return sliding_window(unet_predictor(model), vol, cfg.patch, cfg.overlap, cfg.batch_windows)


def diffusion_fused(
    stage,
    model,
    image,
    unet,
    key,
    steps,
    samples,
    fusion="mean",
    chunk=None,
    uncertainty=False,
    start=None,
    needed=None,
) -> dict:
    """Whole-case outputs of a refiner by sliding window, each ``[D, H, W, 3]`` float32: ``y`` (the fused
    value Y, mask = Y > 0), ``p`` (the fused probability (Y_norm + 1)/2 that a gate thresholds) and,
    when asked, ``uncertainty``. image ``[D, H, W, 4]``; unet ``[D, H, W, 3]`` U(I) (None for a variant
    without it); start: the sampler's first timestep (None: the stage's ``sampler.start``, else 999);
    needed: bool ``[D, H, W]``, the voxels whose output matters (:func:`sliding_window`; elsewhere Y = −1 and
    p = 0: no flip)."""
    c = stage.cfg
    start = diffusion.sampler_start(c.sampler) if start is None else start
    cond = np.asarray(stage.variant.condition_image(jnp.asarray(image), None if unet is None else jnp.asarray(unet)))
    direct = stage.variant.direct
    fn = diffusion_predictor(model, key, steps, samples, fusion, chunk or None, uncertainty, start, direct)
    out = sliding_window(
        fn, cond, c.patch, c.overlap, c.batch_windows, 9 if uncertainty else 6, needed=needed, fill=-1.0
    )
    fields = {"y": out[..., :3], "p": np.clip((out[..., 3:6] + 1.0) / 2.0, 0.0, 1.0)}
    if uncertainty:
        fields["uncertainty"] = out[..., 6:]
    return fields


def finish(stage, y: np.ndarray, unet) -> np.ndarray:
    """The final region masks ``[..., 3]`` uint8 from the fused value Y: Y > 0, XOR-ed with U(I) for a
    discrepancy variant."""
    return np.asarray(stage.variant.finish((np.asarray(y) > 0).astype(np.uint8), unet))


def foreground_channel(image):
    """Appends the one-hot foreground channel (1 where any modality is non-zero) to ``[..., 4]``;
    numpy in, numpy out (sliding window), jax in, jax out (the train step)."""
    xp = jnp if isinstance(image, jax.Array) else np
    return xp.concatenate([image, xp.any(image != 0, -1, keepdims=True).astype(image.dtype)], -1)
