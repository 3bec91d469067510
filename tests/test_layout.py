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


def _contracts() -> list[dict]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_folder_of_mgjax_is_in_a_contract():
    """A new folder under mgjax/ joins a layer (or the toy world's contract) before it counts."""
    named = {
        module.strip()
        for contract in _contracts()
        for entry in contract.get("layers", []) + contract.get("source_modules", [])
        for module in entry.split("|")
    }
    folders = {f"mgjax.{p.parent.name}" for p in ROOT.glob("mgjax/*/__init__.py")}
    modules = {f"mgjax.{p.stem}" for p in ROOT.glob("mgjax/*.py") if p.stem != "__init__"}
    assert folders | modules <= named, sorted((folders | modules) - named)


def test_the_layers_and_the_seam_hold():
    """import-linter's contracts (pyproject.toml, [tool.importlinter]): each layer imports only
    the layers below it, and only mgjax.model imports diffusers/transformers. A broken contract
    fails with its name and the import that breaks it."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
    )  # fmt: skip
    report = done.stdout.split("Broken contracts")[-1] + done.stderr
    assert done.returncode == 0, report
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in done.stdout


def test_the_bench_scripts_that_import_torch_are_its_peers():
    """bench.TORCH_PEERS (the scripts that start with PyTorch) names exactly the bench scripts
    that import torch or torchvision; mgjax's own modules import neither."""
    import bench

    def imports_torch(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("torch", "torchvision") for n in names):
                return True
        return False

    peers = {p.stem for p in ROOT.glob("bench/*.py") if imports_torch(p)}
    assert peers == set(bench.TORCH_PEERS), sorted(peers)
    assert not [p for p in ROOT.glob("mgjax/**/*.py") if imports_torch(p)]
