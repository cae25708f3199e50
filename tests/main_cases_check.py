"""Run by the tests: the trainer's `main` on several argument lists, each in a process forked from this one
after the imports (one start-up instead of one per case, and each case with a fresh Accelerate state).
Prints one JSON list: per case, the error it stopped with, or None if it trained to the end.

With --cli, each case is [MODULE, ARGV] and its result [exit status, stderr] of MODULE's main under
`run_cli`, as `python -m MODULE ARGV` gives them (a traceback included, were one to escape)."""

import contextlib
import importlib
import io
import json
import multiprocessing
import sys
import traceback

from moe_reason.errors import run_cli
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


def cli_outcome(case: list) -> list:
    module, argv = case
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            run_cli(importlib.import_module(module).main, argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:  # noqa: BLE001  (what the interpreter would print for an escaped error)
            traceback.print_exc()
            code = 1
    return [code, stderr.getvalue()]


def in_child(work, case, pipe) -> None:
    pipe.send(work(case))
    pipe.close()


def run_case(work, case):
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=in_child, args=(work, case, send))
    child.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:  # the child died without a word
        return f"the case's process died (exit code {child.join() or child.exitcode})"
    finally:
        child.join()


if __name__ == "__main__":
    cli, cases = sys.argv[1] == "--cli", json.loads(sys.argv[-1])
    for module in {case[0] for case in cases} if cli else ():
        importlib.import_module(module)  # before forking: one start-up for every case
    print(json.dumps([run_case(cli_outcome if cli else error_of, case) for case in cases]))
