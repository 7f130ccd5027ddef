"""The one progress bar of the package: tqdm on process 0, nothing on the others or when switched off."""

from __future__ import annotations

import sys


def bar(items=None, desc: str = "", unit: str = "case", enabled: bool = True, **kwargs):
    """``tqdm(items, ...)`` on process 0 when ``enabled`` (``leave=False`` unless given); otherwise ``items``
    unchanged, or None when there are no items (a bar updated by hand: ``total=`` given)."""
    jax = sys.modules.get("jax")  # a program that never imported JAX (the phantom writer) is one process
    if not enabled or (jax is not None and jax.process_index() != 0):
        return items
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(items, desc=desc, unit=unit, **kwargs)
