"""Run by the tests: the trainer's `main` on several argument lists, one after the other in one process
(one start-up instead of one per case). Prints one JSON list: per case, the error it stopped with, or
None if it trained to the end."""

import contextlib
import io
import json
import sys

from accelerate.state import AcceleratorState, GradientState

from moe_reason.train import main


def error_of(argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as err:  # the argument parser prints its error, then exits
        return f"SystemExit({err.code}): {stderr.getvalue()}"
    except Exception as err:  # noqa: BLE001  (each case's error is the result)
        return f"{type(err).__name__}: {err}"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return None


if __name__ == "__main__":
    print(json.dumps([error_of(argv) for argv in json.loads(sys.argv[1])]))
