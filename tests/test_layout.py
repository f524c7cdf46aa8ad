"""The import rules of docs/design.md: acmix_ms <- models <- engine <- scripts; nothing imports upward."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"tools", "benchmarks", "examples", "train", "eval", "export"}
# each package and the top-level names its modules must never import (at module level or inside functions)
FORBIDDEN = {
    "acmix_ms": {"models", "engine"} | SCRIPTS,
    "models": {"engine"} | SCRIPTS,
    "engine": SCRIPTS,
}


def imported_packages(path):
    """Top-level names of every absolute import in the file at ``path``."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_files(package):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package):
    upward = {os.path.relpath(path, ROOT): sorted(imported_packages(path) & FORBIDDEN[package])
              for path in package_files(package)}
    upward = {path: names for path, names in upward.items() if names}
    assert not upward, f"imports that run back up from {package}/: {upward}"


def test_the_rule_sees_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from engine.checkpoint import read_checkpoint\n    import tools.demo\n")
    assert imported_packages(str(module)) == {"engine", "tools"}
