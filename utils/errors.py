"""One-line errors for bad input: scripts print the message (problem and fix) and exit, no traceback."""
from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """An input the user can fix; the message names the problem and the fix."""


class DataError(UserError):
    """Bad data input; the message names the problem and the fix (the scripts print it as one line)."""


def run_cli(main) -> None:
    """Call ``main()``; a ValueError from bad input becomes one line on stderr and exit code 2
    (set MAE_DEBUG=1 to see the traceback instead)."""
    try:
        main()
    except ValueError as error:  # UserError, DataError and the models' argument checks
        if os.environ.get("MAE_DEBUG"):
            raise
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # An error raised in a DataLoader worker arrives as "Caught X in DataLoader worker ...\n<traceback>\n<message>".
        message = lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
        sys.exit(2)
