"""The code's shape: no module reaches into another's private names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mgjax", "flow", "bench", "tests", "launch")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_or_reaches_into_another_modules_private_names():
    files = [*ROOT.glob("mgjax/**/*.py"), *ROOT.glob("flow/**/*.py"), *ROOT.glob("bench/*.py")]
    found = []
    for path in [*files, ROOT / "launch.py"]:
        tree = ast.parse(path.read_text())
        modules = set()  # names bound to our modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in OURS:
                        modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, found
