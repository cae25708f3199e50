"""Each benchmark script runs one tiny iteration and ends with its ratio line (no timing is asserted)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

TINY = {
    "throughput.py": ["--preset", "debug", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "1",
                      "--warmup", "1"],
    "recursion_overhead.py": ["--preset", "debug", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "1",
                              "--warmup", "1"],
    "data_throughput.py": ["--preset", "debug", "--steps", "1", "--batch_size", "2", "--block_size", "32",
                           "--max_documents", "40", "--stream_tokens", "2000"],
}
LAST_LINE = {"throughput.py": r"ratio ours/mixtral: \d+\.\d\d", "recursion_overhead.py": r"ratio measured/FLOPs: \d+\.\d\d",
             "data_throughput.py": r"ratio streaming/training: \d+\.\d"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_once_and_prints_its_ratio_last(script):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *TINY[script]], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.search(LAST_LINE[script], last), last
