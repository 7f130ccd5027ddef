"""The two stages by name: what each builds, how it is optimized, its loss and how it is validated.

``unet`` (stage 1) is the optimized U-Net on image patches. ``diffusion`` (stage 2) is one of the
diffusion variants of :data:`VARIANTS`, chosen by the config's ``diffusion.model``: a new variant is one
entry there and a config file. Arrays are channels-last; regions [WT, TC, ET].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rediffinet_jax import diffusion, inference, losses, metrics
from rediffinet_jax.labels import nested
from rediffinet_jax.models.denoiser import DiffusionNet
from rediffinet_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: ``diffusion.model`` -> (condition, target[, process]): what the encoder sees, what is learned and how
#: (the paper's Table 1, diffusion unless said). The name is also the stage's folder in the work directory;
#: how it is trained (patch centres, U(I) augmentation, loss, EMA) is the config's, not the name's.
VARIANTS = {
    "rediffinet": ("concat", "discrepancy"),  # [I, U(I)] -> Δ = |U(I) − GT|, refined = U(I) XOR Δ̂
    "rediffinet_plus": ("concat", "discrepancy"),  # the same, trained on more errors (configs/rediffinet_plus.py)
    "control": ("concat", "discrepancy", "direct"),  # the same network, one step, no diffusion
    "diff_unet": ("image", "mask"),  # I -> GT
    "ua_unet": ("unet", "mask"),  # U(I) -> GT
    "ua_concat": ("concat", "mask"),  # [I, U(I)] -> GT
    "ua_mask": ("mask", "mask"),  # I ∘ M′ -> GT
}


def implied_settings(config) -> dict:
    """The flat settings keys 0.2.0 saved beside ``diffusion.model`` and that the model now implies
    (``diffusion.condition`` and ``.target``), with their values: a work directory of 0.2.0 resumes."""
    condition, target = VARIANTS[config.diffusion.model][:2]
    return {"diffusion.condition": condition, "diffusion.target": target}


#: Flat settings keys added after 0.2.0 with the value that does what 0.2.0 did: a refiner trained before
#: they existed resumes, and one trained with another value is refused as before.
ADDED_SETTINGS = {
    "data.spacing": [],
    "diffusion.error_fraction": 0.0,
    "diffusion.unet_augment.p": 0.0,
    "diffusion.unet_augment.max_radius": 2,
    "diffusion.unet_augment.component_p": 0.0,
    "diffusion.ema": 0.0,
    "diffusion.min_snr": 0.0,
}


def lr_schedule(lr: float, steps: int, warmup_frac: float) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_frac`` of the steps, then cosine to 0, per step."""
    warmup = max(1, int(round(steps * warmup_frac))) if warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)


def region_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean over [WT, TC, ET] of :func:`metrics.dice` of the label map ``pred`` would be written as (nested
    regions, as evaluation scores it) against ``gt``; both binary ``[..., 3]``."""
    pred = nested(np.asarray(pred) > 0)
    return float(np.mean([metrics.dice(pred[..., r] > 0, gt[..., r] > 0) for r in range(pred.shape[-1])]))


@dataclasses.dataclass
class UNetStage:
    """Stage 1: the optimized U-Net on image patches, scored by region Dice on whole held-out cases."""

    cfg: object  # the config's ``unet`` block
    name: str = "unet"
    with_unet: bool = False

    def build(self, seed: int) -> UNet:
        c = self.cfg
        return UNet(
            4 + int(c.foreground_channel),
            tuple(c.filters),
            out_channels=3,
            deep_supervision=c.deep_supervision,
            dtype=DTYPES[c.dtype],
            remat=c.remat,
            rngs=nnx.Rngs(seed),
        )

    def optimizer(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
        c = self.cfg  # Adam with L2 weight decay added to the gradient, as torch.optim.Adam
        return optax.chain(
            optax.add_decayed_weights(c.weight_decay),
            optax.scale_by_adam(),
            optax.scale_by_learning_rate(learning_rate),
        )

    def loss(self, model, batch, key):
        del key  # deterministic given the batch
        image = inference.unet_inputs(self.cfg, batch["image"])
        return losses.unet_loss(model(image, train=True), batch["regions"]), {}

    def validate(self, model, cases, key) -> float:
        del key
        return float(
            np.mean(
                [
                    region_dice(
                        inference.unet_probabilities(self.cfg, model, case.image) > 0.5, np.asarray(case.regions)
                    )
                    for case in cases
                ]
            )
        )


@dataclasses.dataclass
class DiffusionStage:
    """Stage 2: a diffusion variant on patches (+ U(I)), validated by the Dice of its final segmentation."""

    cfg: object  # the config's ``diffusion`` block
    name: str = "rediffinet"

    def __post_init__(self):
        if self.cfg.model not in VARIANTS:
            raise ValueError(f"unknown diffusion.model {self.cfg.model!r}; choose one of {sorted(VARIANTS)}")
        self.variant = diffusion.Variant(*VARIANTS[self.cfg.model])
        self.name = self.cfg.model

    @property
    def with_unet(self) -> bool:
        return self.variant.uses_unet

    def build(self, seed: int) -> DiffusionNet:
        c = self.cfg
        return DiffusionNet(
            self.variant.cond_channels, 3, tuple(c.features), DTYPES[c.dtype], c.remat, rngs=nnx.Rngs(seed)
        )

    def optimizer(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
        c = self.cfg
        adamw = optax.adamw(learning_rate, c.b1, c.b2, c.eps, weight_decay=c.weight_decay)
        return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw) if c.clip_norm else adamw

    def loss(self, model, batch, key):
        cond, x_t, t, m = diffusion.training_inputs(self.variant, batch, key)
        gamma = getattr(self.cfg, "min_snr", 0.0)
        weights = diffusion.min_snr_weights(t, gamma) if gamma and not self.variant.direct else None
        return losses.diffusion_loss(model(cond, x_t, t), m, tuple(self.cfg.loss_weights), sample_weights=weights)

    def validate(self, model, cases, key) -> float:
        s = self.cfg.val_sampler
        scores = []
        for i, case in enumerate(cases):
            unet = np.asarray(case.unet) if self.with_unet else None
            k = jax.random.fold_in(key, i)
            y = inference.diffusion_fused(self, model, case.image, unet, k, s.steps, s.samples)["y"]
            # the segmentation (U(I) XOR Δ̂ for Re-DiffiNet), not Δ̂: "best" means best at the task
            scores.append(region_dice(inference.finish(self, y, unet), np.asarray(case.regions)))
        return float(np.mean(scores))


STAGES = {"unet": UNetStage, "diffusion": DiffusionStage}


def make(kind: str, cfg):
    """The stage ``kind`` ("unet" or "diffusion") for its config block."""
    if kind not in STAGES:
        raise ValueError(f"unknown stage {kind!r}; choose one of {sorted(STAGES)}")
    return STAGES[kind](cfg)
