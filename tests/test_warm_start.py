"""The tests' warm-start process (tests/warm_start.py) must run a script as a fresh `python` would: the same
streams, exit status, arguments and environment, and a signal to a rank's client reaches the rank."""

import signal
import subprocess
import sys

from conftest import REPO, clean_env, python_run, warm_args, warm_env

SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))  # as the trainer saves and exits on SIGTERM
print("argv", sys.argv[1:], "env", os.environ.get("WARM_PROBE"), flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "wait":
    time.sleep(60)
if sys.argv[1] == "raise":
    raise RuntimeError("boom")
sys.exit(int(sys.argv[1]))
"""


def test_a_forked_run_gives_what_a_fresh_interpreter_gives(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    for args in (["3"], ["0"], ["raise"]):
        fresh = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True,
                               env={**clean_env(), "WARM_PROBE": "x"})
        forked = python_run([script, *args], env={"WARM_PROBE": "x"})
        assert forked.returncode == fresh.returncode and forked.stdout == fresh.stdout, (args, forked, fresh)
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1], (forked.stderr, fresh.stderr)
    assert python_run([script, "0"]).stdout == "argv ['0'] env None\n"  # the environment is the worker's own


def test_a_signal_to_a_ranks_client_reaches_the_rank_and_its_exit_status_comes_back(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    client = subprocess.Popen([sys.executable, *warm_args([script, "wait"])], cwd=REPO, env=warm_env(),
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline() == "argv ['wait'] env None\n"  # the rank writes to the client's own stdout
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 7
