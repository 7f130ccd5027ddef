"""Training both stages: models, optimizers, one sharded jitted step, the loop with validation and resume.

A stage (:class:`UNetStage` or :class:`DiffusionStage`) says what is trained and how it is scored;
:class:`Trainer` owns the jitted step (compiled once and reused for every fold) and runs the loop:
per-step RNG ``fold_in(key, step)``, a NaN/inf check on every step, validation and an Orbax
checkpoint every ``val_every`` steps, ``metrics.jsonl``, a progress bar, exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rediffinet_jax import checkpoints, diffusion, inference, metrics, parallel
from rediffinet_jax.errors import RediffinetError
from rediffinet_jax.labels import nested
from rediffinet_jax.models import layers
from rediffinet_jax.models.denoiser import DiffusionNet
from rediffinet_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RediffinetError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


def lr_schedule(lr: float, steps: int, warmup_frac: float) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_frac`` of the steps, then cosine to 0, per step."""
    warmup = max(1, int(round(steps * warmup_frac))) if warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)


def soft_dice_bce(logits: jax.Array, target: jax.Array, smooth: float = 1e-5) -> jax.Array:
    """Stage-1 loss: per region soft Dice (sigmoid) + BCE-with-logits, summed over the regions.

    logits, target ``[B, D, H, W, 3]``. The Dice is taken over the whole batch (MONAI ``batch=True``,
    as in the NVIDIA recipe): per-sample Dice on patches without a small region (TC, ET) rewards
    predicting nothing and stalls learning of those regions.
    """
    z, m = logits.astype(jnp.float32), target.astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    axes = (0, 1, 2, 3)
    dice = (2 * jnp.sum(p * m, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(m, axes) + smooth)
    bce = jnp.mean(diffusion.bce_with_logits(z, m), axes)
    return jnp.sum(1.0 - dice + bce)


def _region_dice(pred: np.ndarray, gt: np.ndarray) -> float:
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
        return UNet(4 + int(c.foreground_channel), tuple(c.filters), out_channels=3,
                    deep_supervision=c.deep_supervision, dtype=DTYPES[c.dtype], remat=c.remat, rngs=nnx.Rngs(seed))

    def optimizer(self) -> optax.GradientTransformation:
        c = self.cfg  # Adam with L2 weight decay added to the gradient, as torch.optim.Adam
        return optax.chain(optax.add_decayed_weights(c.weight_decay), optax.scale_by_adam(),
                           optax.scale_by_learning_rate(lr_schedule(c.lr, c.steps, c.warmup_frac)))

    def inputs(self, image):
        """The network input: the modalities, plus the foreground channel when configured."""
        return inference.foreground_channel(image) if self.cfg.foreground_channel else image

    def loss(self, model, batch, key):
        del key  # deterministic given the batch
        outs = model(self.inputs(batch["image"]), train=True)
        outs = outs if isinstance(outs, list) else [outs]
        w = np.array([0.5**i for i in range(len(outs))])
        w = w / w.sum()
        loss = sum(float(wi) * soft_dice_bce(o, batch["regions"]) for wi, o in zip(w, outs))
        return loss, {}

    def probabilities(self, model, image: np.ndarray) -> np.ndarray:
        """Whole-case sigmoid probabilities ``[D, H, W, 3]`` by sliding window."""
        c = self.cfg
        vol = self.inputs(np.asarray(image))
        return inference.sliding_window(inference.unet_predictor(model), vol, c.patch, c.overlap, c.batch_windows)

    def validate(self, model, cases, key) -> float:
        del key
        return float(np.mean([_region_dice(self.probabilities(model, case.image) > 0.5, np.asarray(case.regions))
                              for case in cases]))


@dataclasses.dataclass
class DiffusionStage:
    """Stage 2: a diffusion variant on patches (+ U(I)), validated by the Dice of its final segmentation."""

    cfg: object  # the config's ``diffusion`` block
    name: str = "rediffinet"

    def __post_init__(self):
        self.variant = diffusion.Variant(self.cfg.condition, self.cfg.target)
        self.name = self.cfg.model

    @property
    def with_unet(self) -> bool:
        return self.variant.uses_unet

    def build(self, seed: int) -> DiffusionNet:
        c = self.cfg
        return DiffusionNet(self.variant.cond_channels, 3, tuple(c.features), DTYPES[c.dtype], c.remat,
                            rngs=nnx.Rngs(seed))

    def optimizer(self) -> optax.GradientTransformation:
        c = self.cfg
        adamw = optax.adamw(lr_schedule(c.lr, c.steps, c.warmup_frac), c.b1, c.b2, c.eps, weight_decay=c.weight_decay)
        return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw) if c.clip_norm else adamw

    def loss(self, model, batch, key):
        cond, x_t, t, m = diffusion.training_inputs(self.variant, batch, key)
        return diffusion.diffusion_loss(model(cond, x_t, t), m, tuple(self.cfg.loss_weights))

    def fused(self, model, image, unet, key, steps, samples, fusion="mean", chunk=None, uncertainty=False):
        """Whole-case fused value Y ``[D, H, W, 3]`` (+ uncertainty channels) by sliding window."""
        c = self.cfg
        cond = np.asarray(self.variant.condition_image(jnp.asarray(image), None if unet is None else jnp.asarray(unet)))
        fn = inference.diffusion_predictor(model, key, steps, samples, fusion, chunk or None, uncertainty)
        return inference.sliding_window(fn, cond, c.patch, c.overlap, c.batch_windows, 6 if uncertainty else 3)

    def validate(self, model, cases, key) -> float:
        s = self.cfg.val_sampler
        scores = []
        for i, case in enumerate(cases):
            unet = np.asarray(case.unet) if self.with_unet else None
            y = self.fused(model, case.image, unet, jax.random.fold_in(key, i), s.steps, s.samples)
            # the segmentation (U(I) XOR Δ̂ for Re-DiffiNet), not Δ̂: "best" means best at the task
            pred = np.asarray(self.variant.finish(jnp.asarray(y > 0), None if unet is None else jnp.asarray(unet)))
            scores.append(_region_dice(pred, np.asarray(case.regions)))
        return float(np.mean(scores))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the records of steps after ``step`` (they are redone after a resume), and a last line cut off
    by a kill."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


class Trainer:
    """Runs one stage on every fold with one compiled, sharded train step."""

    def __init__(self, stage, mesh=None, progress: bool = True):
        self.stage, self.progress = stage, progress
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: stage.build(0)))
        self.tx = stage.optimizer()
        rep, bat = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)

        def step(state, batch, key):
            def loss_fn(params):
                return stage.loss(nnx.merge(self.graphdef, params), batch, key)

            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt = self.tx.update(grads, state["opt"], state["params"])
            new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
            return new, {"loss": loss, **terms}

        self.step = layers.jit(step, in_shardings=(rep, bat, rep), out_shardings=(rep, rep), donate_argnums=0)
        self.replicated = rep

    def init_state(self, seed: int) -> dict:
        params = nnx.state(self.stage.build(seed), nnx.Param)
        state = {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        return jax.device_put(state, self.replicated)

    def model(self, params):
        return nnx.merge(self.graphdef, params)

    def fit(self, folder: Path, refs, val_cases, seed: int, *, num_workers: int = 0,
            stop_after: int | None = None, log: Callable[[str], None] = print) -> dict | None:
        """Trains in ``folder`` (checkpoints/, metrics.jsonl, done.json) from scratch or its last checkpoint.

        refs: the training cases (pipeline.CaseRef); val_cases: cached Case objects (with ``unet``
        masks for stage 2). ``stop_after`` ends the run after that many steps of this call (after a
        checkpoint), as an interruption would. Returns done.json's content, or None if stopped early;
        its ``run`` is a fresh id per finished training, by which evaluation knows a fold trained again.
        """
        from rediffinet_jax.data import pipeline  # grain: imported where used (benchmark machines lack it)

        c = self.stage.cfg
        folder.mkdir(parents=True, exist_ok=True)
        mgr = checkpoints.manager(folder / "checkpoints", c.keep)
        state = self.init_state(seed)
        restored = checkpoints.restore(mgr, state, "latest", sharding=self.replicated, log=log)
        local_batch = parallel.per_process_batch(c.batch)
        ds = pipeline.train_dataset(
            refs, c.patch, local_batch, seed, foreground_fraction=c.foreground_fraction, with_unet=self.stage.with_unet,
            augment=pipeline.Augment(**c.augment.to_dict()), num_workers=num_workers,
            process_index=jax.process_index(), process_count=jax.process_count())
        it = iter(ds)
        start = 0
        if restored is not None:
            state, data_state, start = restored
            if data_state is not None:
                it.set_state(data_state)
            log(f"{self.stage.name} {folder.name}: resuming from step {start}")
        if jax.process_index() == 0:  # steps after the checkpoint (all of them without one) are redone
            _truncate_metrics(folder / "metrics.jsonl", start)
        root = jax.random.key(seed)
        key, val_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
        steps_total = c.steps
        bar = None
        if self.progress and jax.process_index() == 0:
            from tqdm import tqdm
            bar = tqdm(total=steps_total, initial=start, desc=f"{self.stage.name} {folder.name}", unit="step",
                       dynamic_ncols=True)
        metrics_path = folder / "metrics.jsonl"
        t0, done_here = time.time(), 0
        try:
            batch = parallel.global_batch(next(it), self.mesh) if start < steps_total else None
            for step in range(start, steps_total):
                state, m = self.step(state, batch, jax.random.fold_in(key, step))
                last = step + 1 == steps_total
                # the data position after this step's batch (what a checkpoint of this step stores); the
                # next batch is then read while the dispatched step computes
                data_state = it.get_state()
                if not last:
                    batch = parallel.global_batch(next(it), self.mesh)
                loss = float(parallel.to_host(m["loss"]))
                if not math.isfinite(loss):
                    raise TrainingError(f"{self.stage.name} {folder.name}: loss is {loss} at step {step + 1}; "
                                        f"the last good checkpoint (step {mgr.latest_step()}) is kept")
                done_here += 1
                record = {"step": step + 1, "loss": loss,
                          **{k: float(parallel.to_host(v)) for k, v in m.items() if k != "loss"},
                          "time": round(time.time() - t0, 3)}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if (step + 1) % c.val_every == 0 or last:
                    val = self.stage.validate(self.model(state["params"]), val_cases, jax.random.fold_in(val_key, step))
                    record["val_dice"] = val
                    checkpoints.save(mgr, step + 1, state, data_state, val)
                    log(f"{self.stage.name} {folder.name}: step {step + 1} loss {loss:.4f} val dice {val:.4f}")
                if jax.process_index() == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if stop_after is not None and done_here >= stop_after and not last:
                    if (step + 1) % c.val_every:
                        checkpoints.save(mgr, step + 1, state, data_state, float("-inf"))
                    return None
        finally:
            if bar is not None:
                bar.close()
            if hasattr(it, "close"):
                it.close()
        done = {"steps": steps_total, "best_step": mgr.best_step(), "latest_step": mgr.latest_step(),
                "run": parallel.shared_id()}
        if jax.process_index() == 0:
            (folder / "done.json").write_text(json.dumps(done))
        return done

    def load(self, folder: Path, which: str = "best", seed: int = 0, log: Callable[[str], None] = print):
        """The trained model of ``folder`` (its best or latest checkpoint; a broken one falls back)."""
        mgr = checkpoints.manager(folder / "checkpoints", self.stage.cfg.keep)
        restored = checkpoints.restore(mgr, self.init_state(seed), which, sharding=self.replicated, log=log)
        if restored is None:
            raise RediffinetError(f"no checkpoint in {folder / 'checkpoints'}")
        return self.model(restored[0]["params"])
