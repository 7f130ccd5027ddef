"""Orbax checkpoints, one manager per stage and fold: train state, RNG and the grain iterator state.

The train state is saved as a flat ``{path: array}`` dict (paths from ``jax.tree_util.keystr``) so
that it does not depend on how Flax or optax name their containers; it is put back into the
structure of a freshly built state on restore. The latest ``keep`` checkpoints and the best one by
validation score (higher is better) are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

VAL_METRIC = "val_dice"


def _flatten(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def manager(directory: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
    """A manager keeping the latest ``keep`` steps and the best one by ``val_dice``."""
    policy = cm.AnyPreservationPolicy(
        [
            cm.LatestN(keep),
            cm.BestN(get_metric_fn=lambda m: m[VAL_METRIC], reverse=False, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda m: m[VAL_METRIC],
        best_mode="max",
        enable_async_checkpointing=False,
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict | None, val: float) -> None:
    """Saves the train state, the data iterator state (JSON) and the validation score at ``step``."""
    items = {"state": ocp.args.StandardSave(_flatten(state))}
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    mgr.save(step, args=ocp.args.Composite(**items), metrics={VAL_METRIC: float(val)})
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, template, step: int | str = "latest", sharding=None, log=print):
    """Restores ``(state, data_state, step)``; ``template`` is a freshly built state (for structure).

    step: an int, "latest" or "best". Returns None when there is no checkpoint. A "latest" or "best" step
    that cannot be restored (a missing or damaged file) is moved aside to ``<step>.broken`` (never
    deleted), logged with the reason, and the next one (the previous kept step, or the next best) is
    tried instead; an explicit int step is not replaced.
    """
    return _with_fallback(mgr, step, log, lambda s: _restore_step(mgr, template, s, sharding))


def restore_params(
    mgr: ocp.CheckpointManager, params_template, step: int | str = "best", sharding=None, log=print, tree="params"
):
    """``(params, step)`` of a checkpoint, reading the parameters alone (no optimizer state, no data
    iterator); ``params_template`` has the structure of ``state["params"]``; ``tree``: which parameters of
    the state, ``params`` or ``ema`` (their moving average). Falls back as :func:`restore` does; None when
    there is no checkpoint."""

    def read(s):
        flat = _flatten({tree: params_template})
        abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sharding) for k, v in flat.items()}
        args = ocp.args.PyTreeRestore(
            abstract,
            restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=sharding), abstract),
            partial_restore=True,
        )
        out = mgr.restore(s, args=ocp.args.Composite(state=args))
        return _unflatten({tree: params_template}, out["state"])[tree], s

    return _with_fallback(mgr, step, log, read)


def _with_fallback(mgr, step, log, read):
    while True:
        chosen = mgr.latest_step() if step == "latest" else mgr.best_step() if step == "best" else step
        if chosen is None:
            return None
        try:
            return read(int(chosen))
        except Exception as e:  # noqa: BLE001 - any failure of a damaged step: Orbax raises many kinds
            if step not in ("latest", "best"):
                raise
            _set_aside(mgr, int(chosen), e, log)


def _restore_step(mgr, template, step: int, sharding):
    flat = _flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sharding) for k, v in flat.items()}
    items = {"state": ocp.args.StandardRestore(abstract)}
    if (Path(mgr.directory) / str(step) / "data").exists():
        items["data"] = ocp.args.JsonRestore()
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    return _unflatten(template, out["state"]), out.get("data"), step


def _set_aside(mgr, step: int, error: Exception, log) -> None:
    """Moves a step that failed to restore to ``<step>.broken`` (process 0), then reloads the manager."""
    from rediffinet_jax import parallel

    folder = Path(mgr.directory)
    broken = folder / f"{step}.broken"
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    log(
        f"checkpoint step {step} in {folder} cannot be restored ({reason}); moved to {broken.name}, "
        f"trying the step before it"
    )
    with parallel.main_first(f"set aside {folder.parent.name}/{step}"):
        if parallel.is_main() and (folder / str(step)).exists():
            if broken.exists():
                broken = folder / f"{step}.broken.{len(list(folder.glob(f'{step}.broken*')))}"
            os.rename(folder / str(step), broken)
    mgr.reload()
