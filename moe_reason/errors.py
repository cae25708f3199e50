"""User errors: a mistake in what the user gave (an argument, a file, a path), told in one line.

Every command catches them at its entry (`run_cli`) and prints `error: ...` with exit status 2, as argparse
does for a bad flag (a stop asked for with Ctrl-C or SIGTERM: `stopped: ...`, 130); any other exception is a
bug and keeps its traceback. An invalid model-config field
raises `ConfigError` from the config file itself (which must import nothing from the package: it travels
with exported models as remote code); both count as user errors.
"""

import os
import sys

from .models.configuration_moe_reason import ConfigError


class UserError(ValueError):
    """A value, file or path the user gave that cannot be used; the message says which and what is allowed."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named that is not there (or not what it should be)."""


USER_ERRORS = (UserError, ConfigError)


def run_cli(main, argv: list[str] | None = None):
    """Run a command's `main`: a user error becomes `error: ...` on stderr and exit status 2, no traceback
    (under a multi-process launch, said once, by the main process)."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the runs saved a checkpoint and say how to resume
        print(f"stopped: {stop}" if str(stop) else "stopped", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
