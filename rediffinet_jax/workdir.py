"""Who may write a folder: one command at a time per work directory (or prediction output folder).

A lock is an ``fcntl`` lock on ``<folder>/.lock``, held for the whole command. The kernel releases it
when the holding process ends in any way (SIGKILL included), so a killed run never blocks the next
one: the next command takes the lock over and rewrites the holder record. The record (host, pid,
command, start time) is what a second command shows when it is refused. In a run of several processes
only process 0 takes it (the others write nothing that process 0 does not coordinate).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rediffinet_jax import parallel
from rediffinet_jax.errors import ConfigError

LOCK_FILE = ".lock"


def writable_folder(folder: Path) -> Path:
    """Creates ``folder`` (and its parents) and checks that a file can be written in it.

    Raises:
      ConfigError: the folder cannot be made or written (read-only mount, permissions), naming it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


def _holder(handle) -> str:
    handle.seek(0)
    try:
        h = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return "another process"
    return f"{h.get('command', '?')} (host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('since', '?')})"


@contextlib.contextmanager
def lock(folder, what: str | None = None, create: bool = True):
    """Holds the folder's lock while the block runs (process 0 only; the folder is created unless
    ``create`` is false).

    Raises:
      ConfigError: another command holds it, named by its host and pid; the folder is not writable; or
        (``create`` false) it does not exist.
    """
    if not parallel.is_main():
        yield
        return
    if not create and not Path(folder).is_dir():
        raise ConfigError(f"{folder} does not exist (no work directory there)")
    folder = writable_folder(Path(folder))
    handle = open(folder / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder} is in use by {_holder(handle)}; wait for it to end or use another "
                              f"folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "command": what or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock; the record stays for the curious
