"""Train a moe_reason model: `accelerate launch train.py [config.yaml] [--flag value ...]`.

The loop lives in moe_reason/training/trainer.py; `python train.py --help` lists every argument.
"""

from moe_reason.errors import run_cli
from moe_reason.training.trainer import main

if __name__ == "__main__":
    run_cli(main)
