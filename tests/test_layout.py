"""The package's shape: who may import whom, how long things are, and a tree clean under ruff."""

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rediffinet_jax"


_SCAN = r"""
import ast, json, sys
from pathlib import Path
package, out = Path(sys.argv[1]), {"imports": {}, "long": [], "lines": {}}
for path in sorted(package.rglob("*.py")):
    text, name = path.read_text(), str(path.relative_to(package.parent))
    out["lines"][name] = len(text.splitlines())
    mods = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rediffinet_jax"):
            mod = node.module.removeprefix("rediffinet_jax").lstrip(".")
            mods |= {a.name for a in node.names} if not mod else {mod.split(".")[0]}
        elif isinstance(node, ast.Import):
            mods |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rediffinet_jax.")}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
            out["long"].append(f"{name}:{node.name}")
    out["imports"][name] = sorted(mods)
print(json.dumps(out))
"""


@functools.cache
def _scan() -> dict:
    """Every package module's rediffinet_jax imports (``from rediffinet_jax import x`` counts as ``x``), its
    length and its functions of 50 lines or more. Parsed in a fresh process: once, in a worker that had run
    other tests, Python 3.11.7's ast module failed with "AST constructor recursion depth mismatch", and the
    same error then broke pytest's own report of the failure."""
    done = subprocess.run([sys.executable, "-c", _SCAN, str(PACKAGE)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", ["evaluation", "prediction", "inference"])
def test_inference_side_never_imports_training(module):
    """Scoring and segmenting restore parameters through inference, never through the trainer or driver."""
    assert not set(_scan()["imports"][f"rediffinet_jax/{module}.py"]) & {"driver", "training"}


def test_file_names_are_spelled_by_workdir_only():
    for module in ("driver", "evaluation", "prediction"):
        text = (PACKAGE / f"{module}.py").read_text()
        for name in ('"done.json"', '"settings.json"', '"runs.json"', '"splits.json"', 'f"fold_{'):
            assert name not in text, (module, name)


def test_functions_and_modules_are_short():
    scan = _scan()
    assert len(scan["lines"]) > 20 and not [name for name, n in scan["lines"].items() if n > 500]
    assert not scan["long"]


def test_tree_is_clean_under_ruff():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_the_commands_forked_for_tests_start_from_a_fork_safe_server():
    """tests/processes.py forks the tests' commands from a server that imported ``PRELOAD``: a fork
    is only as fresh as a new interpreter while those imports start neither JAX's backend nor a thread (a
    module-level jnp array would do both, and every forked command would inherit a half-copied runtime)."""
    from processes import PRELOAD

    code = (
        f"import importlib, threading\nfor m in {PRELOAD!r}: importlib.import_module(m)\n"
        "from jax._src import xla_bridge\nprint(len(xla_bridge._backends), threading.active_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["0", "1"], out.stdout + out.stderr[-2000:]
