"""Errors about inputs, and how the command lines report them.

Library code raises `InputError` (a ValueError) for an input it cannot use, with a message that
names the problem and the fix; the command lines (`run_cli`) print it as one `error:` line and
exit with status 2, without a traceback.
"""

import sys
from collections.abc import Callable


class InputError(ValueError):
    """An input that cannot be used; the message names the problem and the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Runs `main`; an InputError becomes one line on stderr and exit status 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
