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
    _log(f"done: {sum(len(v) for v in results.values())} stage-folds finished in {workdir}")
