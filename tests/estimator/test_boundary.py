"""The online/offline boundary inside estimator/: imports go one way only.

Online (estimator/*.py: policies, criteria, policy_spec, head, gate, learned_stopping) is what the server
runs; offline (estimator/offline/: label, train, evaluate, compare, replay) imports it,
never the other way round. No engine needed: importing server.app does not start one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONLINE = sorted((ROOT / "estimator").glob("*.py"))


def test_there_are_online_modules_to_check():
    names = {p.stem for p in ONLINE}
    assert {"policies", "criteria", "policy_spec", "head", "learned_stopping"} <= names


@pytest.mark.parametrize("module", ["server.app", "server.cli"])
def test_serving_imports_no_offline_module(module):
    code = (
        "import json, sys\n"
        f"import {module}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('estimator'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    offline = [m for m in loaded if m == "estimator.offline" or m.startswith("estimator.offline.")]
    assert offline == [], f"import {module} pulled in offline code: {offline}"


def imported_modules(path: Path) -> list[str]:
    """Every module an `import` or `from ... import` in the file names (at any depth:
    lazy imports inside functions count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the estimator package
                base = "estimator" if node.level == 1 else ""
                module = ".".join(p for p in (base, node.module or "") if p)
            else:
                module = node.module or ""
            names.append(module)
            # `from estimator import offline` names the subpackage through the alias.
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", ONLINE, ids=lambda p: p.name)
def test_online_modules_import_neither_offline_nor_server(path):
    bad = [
        name
        for name in imported_modules(path)
        if name in {"estimator.offline", "server"} or name.startswith(("estimator.offline.", "server."))
    ]
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


OFFLINE = sorted((ROOT / "estimator" / "offline").rglob("*.py"))
CROSSING = ROOT / "estimator" / "offline" / "engine_runs.py"


def test_offline_reaches_the_server_only_through_engine_runs():
    assert CROSSING in OFFLINE
    crossings = {
        str(path.relative_to(ROOT)): sorted(
            {n for n in imported_modules(path) if n == "server" or n.startswith("server.")}
        )
        for path in OFFLINE
        if path != CROSSING
    }
    assert {path: names for path, names in crossings.items() if names} == {}
    # ... and engine_runs does reach it: the check above is not vacuous.
    assert any(n.startswith("server.") for n in imported_modules(CROSSING))
