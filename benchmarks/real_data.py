"""The real-data benchmark's 20 cases: checked against ``benchmarks/real_cases.txt`` before anything runs.

    python benchmarks/real_data.py --root /path/to/DeepBrainSeg/sample_volume/brats

The cases are the 20 labelled BraTS 2018 training cases that github.com/koriavinash1/DeepBrainSeg carries
in ``sample_volume/brats/`` (``git clone`` it, or take the same cases from BraTS 2018 itself); the folder is
read as it is (the 2018–2021 layout, other files beside the cases ignored). BraTS data: never commit it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "benchmarks" / "real_cases.txt"


def expected() -> dict[str, dict[str, str]]:
    """``{case: {file name: sha256}}`` from ``real_cases.txt``."""
    out: dict[str, dict[str, str]] = {}
    for line in LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            case, name, digest = line.split()
            out.setdefault(case, {})[name] = digest
    return out


def check(root) -> list[str]:
    """The case ids, once every expected file under ``root/<case>/`` has its sha256.

    Raises:
      SystemExit: ``error:`` naming the first case missing, or with a file missing or different.
    """
    root = Path(root)
    want = expected()
    for case, files in sorted(want.items()):
        for name, digest in sorted(files.items()):
            path = root / case / name
            if not path.is_file():
                raise SystemExit(f"error: case {case}: {path} is missing (see benchmarks/real_data.py for the cases)")
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                raise SystemExit(f"error: case {case}: {path} differs from the benchmark's (sha256 in {LIST.name})")
    return sorted(want)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    a = p.parse_args(argv)
    ids = check(a.root)
    print(f"{len(ids)} cases, every file as in {LIST.name}: {', '.join(ids)}")


if __name__ == "__main__":
    sys.exit(main())
