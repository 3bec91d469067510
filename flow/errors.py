"""User-facing errors: one line, no traceback, non-zero exit."""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in the user's input; the message names the problem and the fix."""


def run_cli(main: Callable[[], None]) -> None:
    """Runs `main`; a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
