"""Run by the tests: the trainer's `main` on several argument lists, each in a process forked from this one
after the imports (one start-up instead of one per case, and each case with a fresh Accelerate state).
Prints one JSON list: per case, the error it stopped with, or None if it trained to the end."""

import contextlib
import io
import json
import multiprocessing
import sys

from moe_reason.training.trainer import main


def error_of(argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as err:  # the argument parser prints its error, then exits
        return f"SystemExit({err.code}): {stderr.getvalue()}"
    except Exception as err:  # noqa: BLE001  (each case's error is the result)
        return f"{type(err).__name__}: {err}"
    return None


def in_child(argv: list[str], pipe) -> None:
    pipe.send(error_of(argv))
    pipe.close()


def run_case(argv: list[str]) -> str | None:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=in_child, args=(argv, send))
    child.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:  # the child died without a word
        return f"the case's process died (exit code {child.join() or child.exitcode})"
    finally:
        child.join()


if __name__ == "__main__":
    print(json.dumps([run_case(argv) for argv in json.loads(sys.argv[1])]))
