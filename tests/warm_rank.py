"""The script the tests' multi-process launches start for each rank, in place of `train.py` (or a check script):
`accelerate launch ... tests/warm_rank.py train.py ARGV`. It hands its arguments, environment (RANK, MASTER_PORT
and the rest that the launcher set), working folder and standard streams to the warm-start process of its
pytest worker (tests/warm_start.py, its socket in $WARM_START_SOCKET), which forks the rank from its imports;
then it passes on SIGTERM and SIGINT to that rank (those that came before its pid too) and ends as the rank
ended (its exit status, or its signal). It imports nothing heavy, so the launcher sees a rank start in
milliseconds."""

import json
import os
import signal
import socket
import sys

SOCKET_VARIABLE = "WARM_START_SOCKET"


def main() -> int:
    # The handlers go in before the request: the rank may write (and a test may signal us) before its pid comes
    # back, so a signal that arrives first waits in `pending` and is passed on once the pid is known.
    pid, pending = None, []

    def forward(number, _frame):  # reads main's pid as it is when the signal comes
        if pid is None:
            pending.append(number)
        else:
            os.kill(pid, number)

    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, forward)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(os.environ[SOCKET_VARIABLE])
        args = sys.argv[1:]
        if args[0].startswith("--local_rank="):  # DeepSpeed's launcher puts it after the script, which we precede
            args = [args[1], args[0], *args[2:]]
        request = {"args": args, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        replies = conn.makefile()
        pid = json.loads(replies.readline())["pid"]
        for number in pending:  # Python runs handlers between bytecodes: from here on, forward() kills the rank
            os.kill(pid, number)
        line = replies.readline()
    if not line:
        print(f"warm_rank: the warm-start process gave no exit status for rank pid {pid}", file=sys.stderr)
        return 1
    code = json.loads(line)["returncode"]
    if code < 0:  # the rank died of signal -code: so do we, for the launcher to see it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
