"""What the command lines call: start-up (distributed runtime, logging), then one package function."""

from __future__ import annotations

import sys

from absl import logging as absl_logging

from rediffinet_jax import parallel
from rediffinet_jax.errors import RediffinetError


def _log(msg: str) -> None:
    import jax
    if jax.process_index() == 0:
        print(msg, flush=True)


def train(config, workdir, *, fold=None, stage=None, overwrite=False, evaluate=True, stop_after=None) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.maybe_initialize_distributed()
    from rediffinet_jax import driver
    try:
        results = driver.run(config, workdir, fold=fold, stage=stage, overwrite=overwrite, stop_after=stop_after,
                             log=_log)
    except RediffinetError as e:
        _log(f"error: {e}")
        sys.exit(2)
    n_folds = config.data.n_folds if fold is None else 1
    finished = all(len(v) == n_folds for v in results.values()) and results
    _log(f"done: {sum(len(v) for v in results.values())} stage-folds finished in {workdir}")
    if evaluate and finished and stop_after is None:
        from rediffinet_jax import evaluation
        try:
            evaluation.evaluate(workdir, log=_log)
        except RediffinetError as e:
            _log(f"error: {e}")
            sys.exit(2)


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of an ml_collections config."""
    keys = []
    for k, v in config.items():
        keys.extend(config_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"])
    return keys


def load_config_file(spec: str):
    """``path[:arg]`` -> the ConfigDict of that file's ``get_config(arg)``."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _config_spec(argv, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def unknown_config_key(config, argv, error, default_spec: str = "configs/rediffinet.py") -> None:
    """Exits with the offending ``--config.*`` arguments and the valid keys."""
    if config is None:
        try:
            config = load_config_file(_config_spec(argv, default_spec))
        except Exception:  # noqa: BLE001 - the original error is the one to show
            config = None
    keys = config_keys(config) if config is not None else []
    bad = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
    bad = [b for b in bad if b not in keys] or [str(error)]
    print(f"error: unknown config key(s) {', '.join(bad)}; valid keys:\n  " + "\n  ".join(keys), file=sys.stderr)
    sys.exit(2)


def evaluate(workdir, models=None, folds=None, checkpoint=None, convention=None, sampler=None) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.maybe_initialize_distributed()
    from rediffinet_jax import evaluation
    try:
        evaluation.evaluate(workdir, models or None, [int(f) for f in folds] if folds else None, checkpoint,
                            convention, sampler, log=_log)
    except RediffinetError as e:
        _log(f"error: {e}")
        sys.exit(2)


def predict(input_dir, output_dir, workdir, model="rediffinet", folds=None, checkpoint="best",
            save_probabilities=False, save_uncertainty=False) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.maybe_initialize_distributed()
    from rediffinet_jax import prediction
    try:
        errors = prediction.predict_folder(input_dir, output_dir, workdir, model, folds, checkpoint,
                                           save_probabilities, save_uncertainty, log=_log)
    except RediffinetError as e:
        _log(f"error: {e}")
        sys.exit(2)
    if errors:
        _log(f"{len(errors)} case(s) failed:\n  " + "\n  ".join(str(e) for e in errors))
        sys.exit(1)
