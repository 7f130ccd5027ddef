"""What the command lines call: start-up (distributed runtime, logging), then one package function."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

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
    from rediffinet_jax import workdir as wd

    with _guard():
        driver.check_request(config, fold, stage)
        with wd.lock(workdir):
            _log(_devices())
            results = driver.run(
                config, workdir, fold=fold, stage=stage, overwrite=overwrite, stop_after=stop_after, log=_log
            )
            n_folds = config.data.n_folds if fold is None else 1
            finished = all(len(v) == n_folds for v in results.values()) and results
            _log(f"done: {sum(len(v) for v in results.values())} stage-folds finished in {workdir}")
            if evaluate and finished and stop_after is None:
                from rediffinet_jax import evaluation

                evaluation.evaluate(workdir, log=_log)


def _devices() -> str:
    """The first line of a training's log: what it runs on (a GPU user on CPU-only jax sees it at once)."""
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return f"devices: {len(devs)} × {', '.join(kinds)} ({jax.default_backend()}), {jax.process_count()} process(es)"


def _fail(error, status: int = 2) -> None:
    """A user error: one line ``error: ...`` and exit status 2.

    In a run of several processes, whichever process meets the error prints it (with its index) and
    leaves at once with ``os._exit``: a normal exit would wait at JAX's shutdown barrier for processes
    that are themselves waiting in a collective for this one. Its heartbeat then stops, and JAX's
    coordination service ends the others (``parallel.HEARTBEAT_S``)."""
    import jax

    if jax.process_count() > 1:
        print(f"error (process {jax.process_index()} of {jax.process_count()}): {error}", flush=True)
        sys.stderr.flush()
        os._exit(status)
    print(f"error: {error}", flush=True)
    sys.exit(status)


@contextlib.contextmanager
def _guard():
    """User errors end as :func:`_fail` says; in a run of several processes any other exception too
    (its traceback printed first), so that one failing process never leaves the others waiting."""
    import jax

    try:
        yield
    except RediffinetError as e:
        _fail(e)
    except Exception as e:  # noqa: BLE001 - only to stop the other processes; re-raised with one
        full = _no_space(e)
        if full is not None:  # every write is atomic: nothing half-written is left, a rerun goes on
            where = f" writing {full}" if full else ""
            _fail(f"no space left on the device{where}: free some and run the same command again")
        if jax.process_count() <= 1:
            raise
        traceback.print_exc()
        _fail(f"{type(e).__name__}: {e}", status=1)


def _no_space(error: BaseException) -> str | None:
    """The file a full disk refused (``""`` when not named) if ``error`` or what caused it is ENOSPC, else
    None (libraries such as Orbax wrap the OSError in their own errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return str(error.filename or "")
        if "No space left on device" in str(error):
            return ""
        error = error.__cause__ or error.__context__
    return None


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of an ml_collections config."""
    keys = []
    for k, v in config.items():
        keys.extend(config_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"])
    return keys


def load_config_file(spec: str):
    """``path[:arg]`` -> the ConfigDict of that file's ``get_config(arg)``."""
    import importlib.util

    path, _, arg = spec.partition(":")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _config_spec(argv, default: str) -> str:
    """The ``--config`` value absl will use (the last one given), else ``default``."""
    spec = default
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def check_config_spec(argv, default_spec: str) -> None:
    """Exits with one ``error:`` line when the ``--config`` file is missing or its ``get_config(arg)``
    fails (an unknown variant), rather than with absl's traceback."""
    spec = _config_spec(argv, default_spec)
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        print(f"error: config file {path} not found (from --config={spec})", file=sys.stderr)
        sys.exit(2)
    try:
        load_config_file(spec)
    except Exception as e:  # noqa: BLE001 - whatever the config file raises is the user's message
        print(f"error: config {spec}: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv, flag_values, default_spec: str | None = None):
    """absl's parser, but every bad command line ends with one ``error:`` line and exit status 2: a
    missing config file or unknown variant, an unknown ``--config.key`` (with the list of valid keys), a
    bad flag value."""
    from absl import flags

    if default_spec is not None:
        check_config_spec(argv, default_spec)
    try:
        return flag_values(argv)
    except (AttributeError, KeyError) as e:
        if default_spec is None:
            raise
        unknown_config_key(flag_values["config"].value, argv, e, default_spec)
    except flags.Error as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def unknown_config_key(config, argv, error, default_spec: str = "configs/rediffinet.py") -> None:
    """Exits with the offending ``--config.*`` arguments and the valid keys."""
    if config is None:
        try:
            config = load_config_file(_config_spec(argv, default_spec))
        except Exception:  # noqa: BLE001 - the original error is the one to show
            config = None
    keys = config_keys(config) if config is not None else []
    bad = [a.split("=")[0][len("--config.") :] for a in argv if a.startswith("--config.")]
    bad = [b for b in bad if b not in keys] or [str(error)]
    print(f"error: unknown config key(s) {', '.join(bad)}; valid keys:\n  " + "\n  ".join(keys), file=sys.stderr)
    sys.exit(2)


def evaluate(
    workdir, models=None, folds=None, checkpoint=None, convention=None, sampler=None, scorer="ours", gate=None
) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.maybe_initialize_distributed()
    from rediffinet_jax import evaluation, prediction
    from rediffinet_jax import workdir as wd

    with _guard(), wd.lock(workdir, "evaluate.py", create=False):
        evaluation.evaluate(
            workdir,
            models or None,
            prediction.parse_folds(folds) if folds else None,
            checkpoint,
            convention,
            sampler,
            log=_log,
            scorer=scorer,
            gate=gate,
        )


def predict(
    input_dir,
    output_dir,
    workdir,
    model="rediffinet",
    folds=None,
    checkpoint="best",
    save_probabilities=False,
    save_uncertainty=False,
    baseline=None,
    use_gate=True,
    labels="input",
) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.maybe_initialize_distributed()
    from rediffinet_jax import prediction

    with _guard():
        errors = prediction.predict_folder(
            input_dir,
            output_dir,
            workdir,
            model,
            folds,
            checkpoint,
            save_probabilities,
            save_uncertainty,
            log=_log,
            baseline_maps=baseline,
            use_gate=use_gate,
            labels=labels,
        )
    if errors:
        _log(f"{len(errors)} case(s) failed:\n  " + "\n  ".join(str(e) for e in errors))
        sys.exit(1)
