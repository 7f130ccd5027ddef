"""Source files that changed under a trained run: named before any work, never taken silently.

A cache entry (:func:`brats.cached_case`) records each source file it was made from (path, size, mtime) and
its content digest (sha256). Before a command works on a work directory that holds a split, every such
file is looked at again: one whose size or mtime differs and whose content differs too (a touched file
with the same bytes is no change) is a change under the stages trained on it and the scores made from it.
``train.py`` refuses it unless ``--overwrite`` (which retrains every stage: the stages' settings hold
:func:`fingerprint`), ``evaluate.py`` refuses it. Entries made before digests were kept count any size or
mtime change as a change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rediffinet_jax.data import brats
from rediffinet_jax.errors import ConfigError


def changed_sources(cache_dir, case_ids) -> list[str]:
    """One line per source file of a cached case whose bytes differ from those its entry was made from
    (``case <id>: <path> changed``); a file no longer at its path is left to the data's own checks (a new
    ``data.root`` is a new setting)."""
    out = []
    for cid in case_ids:
        folder = Path(cache_dir) / cid
        meta = brats.cached_meta(folder) if (folder / "meta.json").is_file() else None
        if meta is None:
            continue
        digests = meta.get("digests", {})
        for path, size, mtime in meta["key"]["sources"]:
            p = Path(path)
            if not p.is_file():
                continue
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) == (size, mtime):
                continue
            if st.st_size == size and digests.get(p.name) == brats.file_digest(p):
                continue  # touched, same bytes
            out.append(f"case {cid}: {p} changed")
    return out


def refuse_changes(cache_dir, case_ids, remedy: str) -> None:
    """Raises ConfigError naming the first changed source file (:func:`changed_sources`) and ``remedy``."""
    lines = changed_sources(cache_dir, case_ids)
    if lines:
        more = f" (and {len(lines) - 1} more files)" if len(lines) > 1 else ""
        raise ConfigError(f"{lines[0]}{more} since this run's cache was made from it: {remedy}")


def fingerprint(cache_dir, case_ids) -> str:
    """A digest of the source files of every case (their recorded content digests, or size and mtime for
    entries made before digests were kept): what a stage's settings record of the data it trained on."""
    h = hashlib.sha256()
    for cid in sorted(case_ids):
        meta = brats.cached_meta(Path(cache_dir) / cid) or {}
        sources = meta.get("digests") or [s[1:] for s in meta.get("key", {}).get("sources", [])]
        h.update(json.dumps([cid, sources], sort_keys=True).encode())
    return h.hexdigest()[:16]
