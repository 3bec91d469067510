"""Runs a command line's cases in one process (they cannot share one with other command
lines: absl flags are global). Reads [{"args": [...], "work": folder}, ...] as JSON on stdin
and prints [{"code", "stderr", "seconds", "written"}, ...] as JSON: the exit status, what went
to stderr, how long it took and which files the case left in its work folder.

  python -m tests.cli_runner launch|estimate|convert|evaluate|dragbench|train_ldm|train_raft \
      < cases.json
"""

import contextlib
import io
import json
import os
import sys
import time


def _entry(command: str):
    """A function argv -> None that runs the command line as its __main__ does."""
    absl_modules = {
        "launch": "launch",
        "estimate": "flow.estimate",
        "train_ldm": "mgjax.toy.train_ldm",
        "train_raft": "mgjax.toy.train_raft",
    }
    if command in absl_modules:  # absl scripts: parse the flags, then main
        import importlib

        module = importlib.import_module(absl_modules[command])
        if command.startswith("train_"):
            module._define_flags()  # a training script defines its flags when run as one

        parse = getattr(module, "parse_flags", module.FLAGS)  # the command line's own parser

        def run(argv):
            module.FLAGS.unparse_flags()
            rest = parse([command, *argv])
            module.main(rest)

        return run
    from flow.errors import run_cli

    if command == "convert":
        from flow import convert

        return lambda argv: convert.main(["convert", *argv])
    if command == "evaluate":
        from mgjax.evaluation import evaluate

        return lambda argv: run_cli(lambda: evaluate.main(argv))
    from mgjax.evaluation import dragbench

    return lambda argv: run_cli(lambda: dragbench.main(argv))


def _files(folder: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, dirs, names in os.walk(folder)
        for name in names + dirs
    )


def main() -> None:
    command, cases = sys.argv[1], json.load(sys.stdin)
    from mgjax.model import without_torch

    without_torch()  # as every command line starts (launch.py's main, mgjax's `python -m`)
    run = _entry(command)
    results = []
    for case in cases:
        err, code, t = io.StringIO(), 0, time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run(case["args"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - reported as what a user would see
                code, err = -1, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - t
        written = _files(case["work"])
        results.append(dict(code=code, stderr=err.getvalue(), seconds=seconds, written=written))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
