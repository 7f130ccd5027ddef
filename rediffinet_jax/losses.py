"""Every loss of both stages, on logits, channels-last ``[B, D, H, W, 3]`` (regions [WT, TC, ET]).

Stage 1 (the U-Net): soft Dice over the batch + BCE, summed over the regions, on every deep-supervision
head with weights 1, 1/2, 1/4 … normalized to sum 1. Stage 2 (the diffusion models): Dice per sample and
channel + BCE + MSE on the predicted x0 logits, weights configurable (the paper's three terms, 1 : 1 : 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bce_with_logits(z: jax.Array, m: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of logits ``z`` against targets ``m``: log(1 + e^z) − z·m, stable."""
    return jnp.maximum(z, 0) - z * m + jnp.log1p(jnp.exp(-jnp.abs(z)))


def soft_dice_bce(logits: jax.Array, target: jax.Array, smooth: float = 1e-5) -> jax.Array:
    """Stage-1 loss of one head: per region soft Dice (sigmoid) + BCE-with-logits, summed over the regions.

    logits, target ``[B, D, H, W, 3]``. The Dice is taken over the whole batch (MONAI ``batch=True``,
    as in the NVIDIA recipe): per-sample Dice on patches without a small region (TC, ET) rewards
    predicting nothing and stalls learning of those regions.
    """
    z, m = logits.astype(jnp.float32), target.astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    axes = (0, 1, 2, 3)
    dice = (2 * jnp.sum(p * m, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(m, axes) + smooth)
    bce = jnp.mean(bce_with_logits(z, m), axes)
    return jnp.sum(1.0 - dice + bce)


def deep_supervision_weights(n_heads: int) -> np.ndarray:
    """1, 1/2, 1/4 … for the full-size head and the coarser ones, divided by their sum."""
    w = np.array([0.5**i for i in range(n_heads)])
    return w / w.sum()


def unet_loss(outputs, target: jax.Array) -> jax.Array:
    """Stage-1 loss: :func:`soft_dice_bce` of each head (a list, full size first, or one array), weighted
    by :func:`deep_supervision_weights`."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    w = deep_supervision_weights(len(outputs))
    return sum(float(wi) * soft_dice_bce(o, target) for wi, o in zip(w, outputs))


def diffusion_loss(logits: jax.Array, m: jax.Array, weights=(1.0, 1.0, 1.0), smooth: float = 1e-5, sample_weights=None):
    """Dice(sigmoid z, m) + BCE-with-logits(z, m) + MSE(sigmoid z, m), weighted; returns (loss, terms).

    logits, m: ``[B, ..., C]``. Dice is per sample and channel over space (smooth in numerator and
    denominator), 1 − its mean is the Dice loss; BCE and MSE are means over every element.
    ``sample_weights`` ``[B]`` (e.g. Min-SNR's, by timestep) weigh each sample's terms, a weighted mean over
    the batch (Σ w_b·term_b / B); None is the plain mean.
    """
    z, m = logits.astype(jnp.float32), m.astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    axes = tuple(range(1, z.ndim - 1))
    dice = (2 * jnp.sum(p * m, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(m, axes) + smooth)
    if sample_weights is None:
        terms = {
            "dice": 1.0 - jnp.mean(dice),
            "bce": jnp.mean(bce_with_logits(z, m)),
            "mse": jnp.mean(jnp.square(p - m)),
        }
    else:
        w = sample_weights.astype(jnp.float32) / sample_weights.shape[0]  # not renormalised: small is small
        per_sample = lambda a: jnp.mean(a, tuple(range(1, a.ndim)))  # noqa: E731
        terms = {
            "dice": jnp.sum(w * (1.0 - jnp.mean(dice, -1))),
            "bce": jnp.sum(w * per_sample(bce_with_logits(z, m))),
            "mse": jnp.sum(w * per_sample(jnp.square(p - m))),
        }
    loss = weights[0] * terms["dice"] + weights[1] * terms["bce"] + weights[2] * terms["mse"]
    return loss, terms
