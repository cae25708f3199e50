"""Run by the tests (conftest.py's `python_run` and `main_cases`), one per pytest worker: it imports torch,
transformers and the trainer once, then runs each request in a process forked from it. A fresh `python` spends
about 10 s on those imports on a 2-core CPU, most of a tiny run; a forked child starts with them done and with
everything else fresh: its own Accelerate state, seeds, signal handlers and process id.

Requests and answers are JSON lines on stdin and stdout, one at a time. A request says what the child runs:
  {"args": ["train.py", ...]}            as `python train.py ...` runs it (any script path)
  {"args": ["-m", "MODULE", ...]}        as `python -m MODULE ...` runs it
  {"main": [...]}                        the trainer's `main` on that argv: the error it stopped with, or None
each with "timeout" in seconds. The answer: {"returncode", "stdout", "stderr", "result", "timed_out"}; a child
past its timeout is killed (returncode -9). The child's standard input is /dev/null.
"""

import contextlib
import io
import json
import os
import runpy
import select
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from moe_reason.training.trainer import main  # noqa: F401  (the imports every child would repeat)


def error_of(argv: list[str]) -> str | None:
    """The trainer's main on argv -> "ExceptionType: message" of the error it stopped with, or None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as err:  # the argument parser prints its error, then exits
        return f"SystemExit({err.code}): {stderr.getvalue()}"
    except Exception as err:  # noqa: BLE001  (each case's error is the result)
        return f"{type(err).__name__}: {err}"
    return None


def exit_status(code) -> int:
    """What the interpreter exits with for SystemExit(code)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def run_child(request: dict, folder: Path) -> int:
    """In the forked child: standard streams to files in `folder`, the request run, the result written."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o644), fd)
    result, status = None, 0
    try:
        if "main" in request:
            result = error_of(request["main"])
        else:
            args = request["args"]
            sys.argv = args[1:] if args[0] == "-m" else list(args)
            if args[0] == "-m":
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, str(Path(args[0]).resolve().parent))  # as python puts the script's folder first
                runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        status = exit_status(stop.code)
    except BaseException:  # noqa: BLE001  (what the interpreter prints for an escaped error)
        traceback.print_exc()
        status = 1
    (folder / "result.json").write_text(json.dumps(result))
    return status


def answer(request: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="warm_start_") as name:
        folder = Path(name)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = run_child(request, folder)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        done = os.pidfd_open(pid)
        timed_out = not select.select([done], [], [], request["timeout"])[0]
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, wait_status = os.waitpid(pid, 0)
        os.close(done)
        read = {name: (folder / name).read_text(errors="replace") if (folder / name).exists() else ""
                for name in ("stdout", "stderr", "result.json")}
        return {"returncode": os.waitstatus_to_exitcode(wait_status), "stdout": read["stdout"],
                "stderr": read["stderr"], "result": json.loads(read["result.json"] or "null"), "timed_out": timed_out}


if __name__ == "__main__":
    for line in sys.stdin:  # the worker closes our stdin when it ends
        print(json.dumps(answer(json.loads(line))), flush=True)
