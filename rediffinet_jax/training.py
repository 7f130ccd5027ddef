"""Training a stage (:mod:`stages`) on one fold: one sharded jitted step, the loop, validation, resume.

:class:`Trainer` owns the jitted step (compiled once and reused for every fold) and runs the loop:
per-step RNG ``fold_in(key, step)``, a NaN/inf check on every step, validation and an Orbax checkpoint
every ``val_every`` steps, ``metrics.jsonl``, a progress bar, exact resume.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rediffinet_jax import checkpoints, compiling, inference, parallel, progress, stages
from rediffinet_jax import workdir as wd
from rediffinet_jax.errors import RediffinetError


class TrainingError(RediffinetError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


def _loader_workers(folder: Path, asked: int, resuming: bool, log) -> int:
    """The data loader's worker count for a fold: a resumed fold keeps the one it began with (its saved
    position in the data is that loader's), a new one records ``asked`` (``data.num_workers``)."""
    saved = wd.read_json(wd.loader_file(folder)) if resuming else None
    if saved is not None and saved.get("num_workers") != asked:
        log(
            f"{folder.name}: resuming with data.num_workers={saved['num_workers']}, as it began (its place in the "
            f"data is saved for that loader); {asked} holds for the folds that start from now on"
        )
        return saved["num_workers"]
    if not resuming and parallel.is_main():  # (a fold begun before this record: as asked)
        wd.write_atomic(wd.loader_file(folder), json.dumps({"num_workers": asked}))
    return asked


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
        self.ema = float(getattr(stage.cfg, "ema", 0.0))  # decay of the weights' moving average (0: none)
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: stage.build(0)))
        schedule = stages.lr_schedule(stage.cfg.lr, stage.cfg.steps, stage.cfg.warmup_frac)
        self.tx = stage.optimizer(schedule)  # the optimizer state's structure; the step builds its own below
        # the schedule's values, made once: the step takes its learning rate as an input, so that runs that
        # differ only in steps or lr share one compiled program (the persistent cache finds it)
        self.lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(max(stage.cfg.steps, 1))), np.float32)
        rep, bat = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)

        def step(state, batch, key, lr):
            def loss_fn(params):
                return stage.loss(nnx.merge(self.graphdef, params), batch, key)

            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            tx = stage.optimizer(lambda count: lr)  # count unused: lr is this step's value of the schedule
            updates, opt = tx.update(grads, state["opt"], state["params"])
            new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
            if "ema" in state:  # the averaged weights that are validated, saved and predicted with
                n = state["step"].astype(jnp.float32)  # the decay warms up as TF's (1 + n)/(10 + n): short runs
                decay = jnp.minimum(self.ema, (1.0 + n) / (10.0 + n))
                new["ema"] = optax.incremental_update(new["params"], state["ema"], 1.0 - decay)
            return new, {"loss": loss, **terms}

        self.step = compiling.jit(step, in_shardings=(rep, bat, rep, rep), out_shardings=(rep, rep), donate_argnums=0)
        self.replicated = rep

    def lr(self, step: int) -> np.float32:
        """The learning rate of step ``step`` (0-based; past the schedule's end: its last value)."""
        return self.lrs[min(step, len(self.lrs) - 1)]

    def init_state(self, seed: int) -> dict:
        params = nnx.state(self.stage.build(seed), nnx.Param)
        state = {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if self.ema:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return jax.device_put(state, self.replicated)

    def model(self, params):
        return nnx.merge(self.graphdef, params)

    def _start(self, folder: Path, refs, seed: int, num_workers: int, log):
        """(checkpoint manager, state, data iterator, first step): from scratch or the last checkpoint."""
        from rediffinet_jax.data import pipeline  # grain: imported where used (benchmark machines lack it)

        c = self.stage.cfg
        mgr = checkpoints.manager(wd.checkpoints_dir(folder), c.keep)
        state = self.init_state(seed)
        restored = checkpoints.restore(mgr, state, "latest", sharding=self.replicated, log=log)
        num_workers = _loader_workers(folder, num_workers, restored is not None, log)
        ds = pipeline.train_dataset(
            refs,
            c.patch,
            parallel.per_process_batch(c.batch),
            seed,
            foreground_fraction=c.foreground_fraction,
            with_unet=self.stage.with_unet,
            augment=pipeline.Augment(**c.augment.to_dict()),
            error_fraction=getattr(c, "error_fraction", 0.0),
            unet_augment=pipeline.UnetAugment(**dict(getattr(c, "unet_augment", {}))),
            num_workers=num_workers,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        it = iter(ds)
        start = 0
        if restored is not None:
            state, data_state, start = restored
            if data_state is not None:
                it.set_state(data_state)
            log(f"{self.stage.name} {folder.name}: resuming from step {start}")
        if parallel.is_main():  # steps after the checkpoint (all of them without one) are redone
            _truncate_metrics(wd.metrics_file(folder), start)
        return mgr, state, it, start

    def fit(
        self,
        folder: Path,
        refs,
        val_cases,
        seed: int,
        *,
        num_workers: int = 0,
        stop_after: int | None = None,
        log: Callable[[str], None] = print,
    ) -> dict | None:
        """Trains in ``folder`` (checkpoints/, metrics.jsonl, done.json) from scratch or its last checkpoint.

        refs: the training cases (pipeline.CaseRef); val_cases: cached Case objects (with ``unet``
        masks for stage 2). ``stop_after`` ends the run after that many steps of this call (after a
        checkpoint), as an interruption would. Returns done.json's content, or None if stopped early;
        its ``run`` is a fresh id per finished training, by which evaluation knows a fold trained again.
        """
        c = self.stage.cfg
        folder.mkdir(parents=True, exist_ok=True)
        mgr, state, it, start = self._start(folder, refs, seed, num_workers, log)
        bar = progress.bar(
            None,
            f"{self.stage.name} {folder.name}",
            "step",
            self.progress,
            total=c.steps,
            initial=start,
            dynamic_ncols=True,
            leave=True,
        )
        try:
            finished = self._loop(folder, mgr, state, it, start, val_cases, seed, stop_after, bar, log)
        finally:
            if bar is not None:
                bar.close()
            if hasattr(it, "close"):
                it.close()
        if not finished:
            return None
        done = {
            "steps": c.steps,
            "best_step": mgr.best_step(),
            "latest_step": mgr.latest_step(),
            "run": parallel.shared_id(),
        }
        wd.mark_trained(folder, done)
        return done

    def _loop(self, folder, mgr, state, it, start, val_cases, seed, stop_after, bar, log) -> bool:
        """The steps from ``start``; returns False when ``stop_after`` ended it early (after a checkpoint)."""
        c, total = self.stage.cfg, self.stage.cfg.steps
        root = jax.random.key(seed)
        key, val_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
        t0, done_here = time.time(), 0
        batch = parallel.global_batch(next(it), self.mesh) if start < total else None
        for step in range(start, total):
            state, m = self.step(state, batch, jax.random.fold_in(key, step), self.lr(step))
            last = step + 1 == total
            # the data position after this step's batch (what a checkpoint of this step stores); the next
            # batch is then read while the dispatched step computes
            data_state = it.get_state()
            if not last:
                batch = parallel.global_batch(next(it), self.mesh)
            record = self._record(folder, mgr, step, m, t0)
            done_here += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if (step + 1) % c.val_every == 0 or last:
                weights = state.get("ema", state["params"])
                val = self.stage.validate(self.model(weights), val_cases, jax.random.fold_in(val_key, step))
                record["val_dice"] = val
                checkpoints.save(mgr, step + 1, state, data_state, val)
                log(f"{self.stage.name} {folder.name}: step {step + 1} loss {record['loss']:.4f} val dice {val:.4f}")
            if parallel.is_main():
                with open(wd.metrics_file(folder), "a") as f:
                    f.write(json.dumps(record) + "\n")
            if stop_after is not None and done_here >= stop_after and not last:
                if (step + 1) % c.val_every:
                    checkpoints.save(mgr, step + 1, state, data_state, float("-inf"))
                return False
        return True

    def _record(self, folder, mgr, step: int, m: dict, t0: float) -> dict:
        """The step's metrics record; a non-finite loss stops the run."""
        loss = float(parallel.to_host(m["loss"]))
        if not math.isfinite(loss):
            raise TrainingError(
                f"{self.stage.name} {folder.name}: loss is {loss} at step {step + 1}; "
                f"the last good checkpoint (step {mgr.latest_step()}) is kept"
            )
        return {
            "step": step + 1,
            "loss": loss,
            **{k: float(parallel.to_host(v)) for k, v in m.items() if k != "loss"},
            "time": round(time.time() - t0, 3),
        }

    def load(self, folder: Path, which: str = "best", log: Callable[[str], None] = print):
        """The trained model of ``folder`` (its best or latest checkpoint; a broken one falls back): the
        parameters alone, as :func:`inference.load_model` reads them."""
        return inference.load_model(self.stage, folder, which, self.mesh, log)
