"""Runs launch.py in this process with a real kill armed in one phase of the edit: SIGKILL, so
nothing of the program's own (no finally, no atexit, no signal handler) runs afterwards.

  python -m tests.fault_runner PHASE DELAY COUNT -- launch.py's flags

PHASE is where the kill is armed:
  inversion    DELAY seconds into the DDIM inversion of the source image
  compilation  DELAY seconds into the compilation of the guided sampler
  sampling     DELAY seconds into the second chunk of guided DDIM steps
  outputs      just before the COUNT-th file of the outputs is renamed into place
  none         no kill: prints, as its last line, JSON of each phase's seconds and the number of
               output files, which the caller draws its random kill points from
A phase that ends before DELAY has passed is killed at its end, so the kill always falls
inside its phase.
"""

import json
import os
import signal
import sys
import threading
import time


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hook(owner, name: str, call: int, phase: str, delay: float, seen: dict) -> None:
    """Wrap owner.name: its `call`-th call is the phase; time it, or kill inside it."""
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return original(*args, **kwargs)
        if delay >= 0:
            threading.Timer(delay, _kill).start()
        t = time.perf_counter()
        result = original(*args, **kwargs)
        seen[phase] = time.perf_counter() - t
        if delay >= 0:
            _kill()  # the phase ended first: killed at its end
        return result

    setattr(owner, name, wrapped)


def _hook_outputs(count: int, seen: dict) -> None:
    """Count (or kill before the count-th of) the renames while the outputs are written."""
    from mgjax.edit import results

    write_samples, real_replace, renames = results.write_samples, os.replace, [0]

    def replace(src, dst):
        renames[0] += 1
        if renames[0] == count:
            _kill()
        return real_replace(src, dst)

    def wrapped(*args, **kwargs):
        os.replace = replace
        try:
            return write_samples(*args, **kwargs)
        finally:
            os.replace = real_replace
            seen["output_files"] = renames[0]

    results.write_samples = wrapped


def main() -> None:
    phase, delay, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    flags = sys.argv[sys.argv.index("--") + 1 :]
    import launch
    from mgjax.method import source
    from mgjax.method.sampler import Sampler

    seen: dict = {}
    armed = lambda p: delay if phase == p else -1.0  # noqa: E731
    _hook(source, "invert", 1, "inversion", armed("inversion"), seen)
    _hook(Sampler, "compiled", 1, "compilation", armed("compilation"), seen)
    _hook(Sampler, "advance", 2, "sampling", armed("sampling"), seen)
    _hook_outputs(count if phase == "outputs" else 0, seen)
    sys.argv = ["launch.py", *flags]
    launch.FLAGS(sys.argv)
    try:
        launch.main(["launch.py"])
    except SystemExit as e:
        if e.code:
            raise
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
