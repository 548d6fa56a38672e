"""The package layout (issue #22): packages per pipeline stage, imports that only go down, no shims.

An AST walk over every module's imports (module- and function-level) builds the import graph; the tests check that
it has no circle, that every package imports only from the packages below it, that no module keeps an old path
alive (module-level ``__getattr__``), and that every module imports on its own in a fresh interpreter.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dicp_ray"
# Layers, bottom first: a module may import from its own layer's package and from lower layers only.
LAYERS = [{"console"}, {"config", "envs", "data"}, {"runtime"}, {"models"}, {"agents", "collect", "train"},
          {"evaluate"}, {"pipeline"}, {"tune"}, {"cli"}]
MAX_LINES = 440  # "no module over ~400 lines": the largest today, rllib_learner.py, is 430


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges[mod].update(t for t in targets if t in mods and t != mod)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, seen, stack = [], set(), []

    def visit(node):
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt in stack:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()

    for node in sorted(edges):
        if node not in seen:
            visit(node)
    return found


def _layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{mod}: no layer for dicp_ray.{top}; add it to LAYERS (and to docs/architecture.md)")


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_packages_import_only_downwards():
    upward = [f"{mod} -> {dep}" for mod, deps in import_graph().items() if mod != "dicp_ray"
              for dep in deps if dep != "dicp_ray" and _layer(dep) > _layer(mod)]
    assert upward == []


def test_no_compatibility_shims_and_no_oversized_modules():
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), mod
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{mod} is over {MAX_LINES} lines: split it"


def test_every_module_imports_on_its_own():
    """Each module imported first, with no dicp_ray module loaded before it (third-party packages stay loaded, so one
    interpreter does it): a module that works only after another was imported fails here."""
    script = f"""
import importlib, sys
failures = []
for mod in {sorted(_modules())!r}:
    for name in [n for n in sys.modules if n == "dicp_ray" or n.startswith("dicp_ray.")]:
        del sys.modules[name]
    try:
        importlib.import_module(mod)
    except Exception as err:
        failures.append(f"{{mod}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failures))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
