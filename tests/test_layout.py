"""The package's shape: who may import whom, how long things are, and a tree clean under ruff."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rediffinet_jax"


def _imports(path: Path) -> set[str]:
    """The rediffinet_jax modules a file imports (``from rediffinet_jax import x`` counts as ``x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rediffinet_jax"):
            mod = node.module.removeprefix("rediffinet_jax").lstrip(".")
            out |= {a.name for a in node.names} if not mod else {mod.split(".")[0]}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rediffinet_jax.")}
    return out


@pytest.mark.parametrize("module", ["evaluation", "prediction", "inference"])
def test_inference_side_never_imports_training(module):
    """Scoring and segmenting restore parameters through inference, never through the trainer or driver."""
    assert not _imports(PACKAGE / f"{module}.py") & {"driver", "training"}


def test_file_names_are_spelled_by_workdir_only():
    for module in ("driver", "evaluation", "prediction"):
        text = (PACKAGE / f"{module}.py").read_text()
        for name in ('"done.json"', '"settings.json"', '"runs.json"', '"splits.json"', 'f"fold_{'):
            assert name not in text, (module, name)


def test_functions_and_modules_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 500, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not long


def test_tree_is_clean_under_ruff():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
