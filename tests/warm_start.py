"""Run by the tests (conftest.py's `python_run`, `main_cases` and `launch`), one per pytest worker: it imports
torch, transformers, DeepSpeed and the trainer once, then runs each request in a process forked from it. A fresh
`python` spends about 10 s on those imports on a 2-core CPU, most of a tiny run; a forked child starts with them
done and everything else fresh: its own Accelerate state, seeds, signal handlers and process id. What a fork
skips is the interpreter's own start and exit (a child ends with os._exit once its streams are flushed), so a
check of those launches fresh interpreters instead (conftest.py's `launch(..., warm=False)`), as the CUDA tests
do. Linux only (os.fork, os.pidfd_open, socket.send_fds), as are the machines the suite runs on.

Two kinds of request, both run as `python ARGS` would run them (ARGS: a script and its arguments, or -m MODULE
...), or with {"main": ARGV} the trainer's `main` on ARGV, whose result is the error it stopped with or None:
- On stdin, one JSON line at a time, answered on stdout with {"returncode", "stdout", "stderr", "result",
  "timed_out"}: the child's streams go to files, its stdin is /dev/null, and past "timeout" it is killed.
- On the Unix socket given as argv[1], from tests/warm_rank.py, the script a multi-process launch starts for
  each rank: the rank's environment, working folder and standard streams (passed as file descriptors) come
  with the request. The pid is answered at once (the client forwards signals to it), the exit status at the
  end; a client that goes away takes its child with it.
It says "ready" on stdout once it listens, and ends when stdin closes, with the worker that started it.
"""

import contextlib
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed  # noqa: F401  (the ranks of a DeepSpeed launch would import it)
from moe_reason.training.trainer import main  # the imports every child would repeat


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


def run(request: dict) -> tuple[int, str | None]:
    """In the forked child, its streams in place: the request -> (exit status, result)."""
    if "env" in request:
        os.environ.clear()
        os.environ.update(request["env"])
    if "cwd" in request:
        os.chdir(request["cwd"])
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
    return status, result


@dataclass
class Child:
    pid: int
    done: int  # a pidfd, readable when the child has ended
    conn: socket.socket | None = None  # a rank's client, or None for a stdin request
    folder: tempfile.TemporaryDirectory | None = None  # a stdin request's streams and result
    deadline: float | None = None
    timed_out: bool = False


@dataclass
class Server:
    listener: socket.socket
    children: dict[int, Child] = field(default_factory=dict)  # by pidfd

    def fork(self, request: dict, streams: list[int], result_file: Path | None, **child) -> Child:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self.listener.close()
                if child.get("conn"):
                    child["conn"].close()
                for other in self.children.values():  # so a client's end is seen when that client goes
                    os.close(other.done)
                    if other.conn:
                        other.conn.close()
                for fd, stream in enumerate(streams):
                    os.dup2(stream, fd)
                if result_file is None:  # a rank, started as `python -u`
                    sys.stdout.reconfigure(write_through=True)
                    sys.stderr.reconfigure(write_through=True)
                status, result = run(request)
                if result_file is not None:
                    result_file.write_text(json.dumps(result))
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        started = Child(pid, os.pidfd_open(pid), **child)
        self.children[started.done] = started
        return started

    def from_stdin(self, line: str) -> None:
        request = json.loads(line)
        folder = tempfile.TemporaryDirectory(prefix="warm_start_")
        path = Path(folder.name)
        streams = [os.open(os.devnull, os.O_RDONLY)] + [
            os.open(path / name, os.O_WRONLY | os.O_CREAT, 0o644) for name in ("stdout", "stderr")]
        self.fork(request, streams, path / "result.json", folder=folder,
                  deadline=time.monotonic() + request["timeout"])
        for fd in streams:
            os.close(fd)

    def from_socket(self) -> None:
        conn, _ = self.listener.accept()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while data and not data.endswith(b"\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        if len(fds) != 3 or not data.endswith(b"\n"):  # a client that went away before asking: nothing to run
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        started = self.fork(json.loads(data), fds, None, conn=conn)
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):  # a client gone by now: serve() sees it and ends the child
            conn.sendall(json.dumps({"pid": started.pid}).encode() + b"\n")

    def finish(self, child: Child) -> None:
        _, wait_status = os.waitpid(child.pid, 0)
        os.close(child.done)
        del self.children[child.done]
        code = os.waitstatus_to_exitcode(wait_status)
        if child.conn:
            with contextlib.suppress(OSError):
                child.conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
            child.conn.close()
            return
        path = Path(child.folder.name)
        read = {name: (path / name).read_text(errors="replace") if (path / name).exists() else ""
                for name in ("stdout", "stderr", "result.json")}
        child.folder.cleanup()
        print(json.dumps({"returncode": code, "stdout": read["stdout"], "stderr": read["stderr"],
                          "result": json.loads(read["result.json"] or "null"), "timed_out": child.timed_out}),
              flush=True)

    def serve(self) -> None:
        while True:
            deadlines = [c.deadline for c in self.children.values() if c.deadline and not c.timed_out]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            conns = {c.conn.fileno(): c for c in self.children.values() if c.conn}
            ready, _, _ = select.select([sys.stdin, self.listener, *self.children, *conns], [], [], wait)
            for key in ready:
                if key is sys.stdin:
                    line = sys.stdin.readline()
                    if not line:  # the worker is gone: so are its runs
                        for child in self.children.values():
                            os.kill(child.pid, signal.SIGKILL)
                        return
                    self.from_stdin(line)
                elif key is self.listener:
                    self.from_socket()
                elif key in self.children:
                    self.finish(self.children[key])
                elif key in conns and conns[key].done in self.children:  # the client went away mid-run
                    os.kill(conns[key].pid, signal.SIGKILL)
            for child in self.children.values():
                if child.deadline and not child.timed_out and time.monotonic() >= child.deadline:
                    os.kill(child.pid, signal.SIGKILL)
                    child.timed_out = True


if __name__ == "__main__":
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sys.argv[1])
        listener.listen(16)
        print("ready", flush=True)
        Server(listener).serve()
