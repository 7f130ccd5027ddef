"""The compile policy: every jitted function of the package is compiled through :func:`jit`.

On the CPU it passes :data:`XLA_OPTIONS`; elsewhere none (an XLA without these experimental fields must not
be asked for them). Deferred to the first call, because asking for the backend initializes it, which must
not happen at import (``jax.distributed.initialize`` comes first).
"""

from __future__ import annotations

import functools

import jax

#: Compile options for the jitted functions of this package on the CPU. XLA's CPU backend hands 2-D
#: convolutions to YNNPACK by default, which ran the 2-D convolutions of ``models.layers.conv3d`` slower than
#: XLA's own (Eigen) convolution (docs/benchmarks.md); this keeps YNNPACK for matrix products only. It is a
#: field of XLA's DebugOptions that only the CPU compiler reads, so :func:`jit` passes it on the CPU only.
XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


class _Jit:
    """``jax.jit(fun, **kwargs)``, made at the first use, with :data:`XLA_OPTIONS` when the default backend
    is the CPU. Deferred because asking for the backend initializes it, which must not happen at import
    (``jax.distributed.initialize`` comes first). Calls, ``lower``, ``trace``… go to the jitted function."""

    def __init__(self, fun, kwargs):
        self._fun, self._kwargs, self._jitted = fun, kwargs, None
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jitted is None:
            options = XLA_OPTIONS if jax.default_backend() == "cpu" else None
            self._jitted = jax.jit(self._fun, **{"compiler_options": options, **self._kwargs})
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):  # not the jitted function's (and no recursion while half-made, e.g. in copy)
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun=None, **kwargs):
    """``jax.jit`` with :data:`XLA_OPTIONS` on the CPU (as ``@jit``, ``jit(f, ...)`` or
    ``partial(jit, ...)``); an explicit ``compiler_options`` wins.

    For top-level functions only: JAX refuses compiler options on a jit called inside another trace, so
    a function called from jitted code is left plain and the caller's ``jit`` carries the options.
    """
    return functools.partial(jit, **kwargs) if fun is None else _Jit(fun, kwargs)
