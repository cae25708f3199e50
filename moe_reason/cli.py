"""The console scripts (pyproject.toml's [project.scripts]): each command's `main`, run so that a user error is
one `error: ...` line with exit status 2 (`errors.run_cli`), and a runner exits 1 when one of its runs failed.

    moe-reason-compare    experiments/trm_sudoku_4x4.yaml          runners/compare.py
    moe-reason-ablate     experiments/exp8_ablations_offline.yaml  runners/ablate.py
    moe-reason-evaluate   --model_path outputs/run/final           evaluation/evaluate.py
    moe-reason-generate   --model_path outputs/run/final           evaluation/generate.py
    moe-reason-export     CHECKPOINT OUTPUT                        training/export.py
    moe-reason-prepare-data [config.yaml] [--flag value ...]       data/prepare_data.py
    moe-reason-upcycle    DENSE OUTPUT --num_experts E --top_k K    models/upcycle.py

Training itself is `accelerate launch train.py` (or `python train.py`), the way Accelerate and DeepSpeed launch a
script on every process. `python -m moe_reason.<package>.<module>` runs the same commands.
"""

from .errors import run_cli


def compare() -> None:
    from .runners.compare import main
    from .runners.engine import exit_status
    raise SystemExit(exit_status(run_cli(main)))


def ablate() -> None:
    from .runners.ablate import main
    from .runners.engine import exit_status
    raise SystemExit(exit_status(run_cli(main)))


def evaluate() -> None:
    from .evaluation.evaluate import main
    run_cli(main)


def generate() -> None:
    from .evaluation.generate import main
    run_cli(main)


def export() -> None:
    from .training.export import main
    run_cli(main)


def upcycle() -> None:
    from .models.upcycle import main
    run_cli(main)


def prepare_data() -> None:
    from .data.prepare_data import main
    run_cli(main)
