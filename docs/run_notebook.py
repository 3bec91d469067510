"""Executes docs/research.ipynb on the toy pack (tests/test_docs.py does, in the slow tier).

python -m docs.run_notebook           # run it, leave the file as it is
python -m docs.run_notebook --write   # run it and store its outputs in the file
"""

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "research.ipynb"


def execute(path: Path = NOTEBOOK, timeout: int = 900) -> nbformat.NotebookNode:
    """The notebook run top to bottom in a fresh kernel started in docs/, with this checkout
    importable; a failing cell raises nbclient's CellExecutionError naming it."""
    nb = nbformat.read(path, as_version=4)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=env)  # the kernel imports this checkout's flow and mgjax
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the outputs in the notebook")
    args = parser.parse_args()
    nb = execute()
    if args.write:
        for cell in nb.cells:  # no run-specific metadata in git
            cell.metadata.pop("execution", None)
        nbformat.write(nb, NOTEBOOK)


if __name__ == "__main__":
    main()
