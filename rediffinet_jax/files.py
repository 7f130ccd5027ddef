"""The one way this package writes a file or folder that someone may be reading: beside it, then renamed.

A reader (another process, a resumed run) sees the old version or the new one, never half of one; a write
interrupted by a kill leaves at most a hidden temporary (``.<name>.tmp<pid>…``) that is overwritten next time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` with the same suffixes (``.nii.gz`` stays last, so writers
    that choose the format by name still work); when the block ends it is renamed over ``path``. On an
    error the temporary is removed and ``path`` is untouched. A folder replaces an existing folder: empty
    the old one inside the block (it is removed just before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
