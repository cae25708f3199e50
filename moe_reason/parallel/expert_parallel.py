"""Expert parallelism as one object, built once at set-up: the trainer and the checkpoints call it
without knowing the size.

`NoExpertParallel` (size 1: every rank holds every expert) does nothing. `ExpertParallel` keeps
`num_experts / size` experts of every MoE layer on each rank (`sharded_experts.py`, DeepSpeed's
expert groups and an all-to-all), records the rows each rank's experts processed, saves and
loads each rank's shard of a checkpoint, and gathers the full experts for an export.
"""

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..layout import saved_expert_parallel_sizes, wrong_expert_parallel_size


def check_layout(num_experts: int, ep_size: int, world_size: int, zero_stage: int | None) -> None:
    """Every impossible expert-parallel layout fails here, before data or model work.

    zero_stage is None when DeepSpeed is not in use.
    """
    if ep_size < 1:
        raise UserError(f"expert_parallel_size={ep_size} is invalid: must be >= 1")
    if ep_size == 1:
        return
    if num_experts % ep_size:
        raise UserError(f"expert_parallel_size={ep_size} does not divide num_experts={num_experts}: each rank must "
                        f"hold the same number of experts (use one of {divisors(num_experts)})")
    if world_size % ep_size:
        raise UserError(f"expert_parallel_size={ep_size} does not divide the world size {world_size}: the processes "
                        f"must split into groups of {ep_size} (use one of {divisors(world_size)})")
    if zero_stage is None:
        raise UserError(f"expert_parallel_size={ep_size} needs DeepSpeed ZeRO stage 0, 1 or 2: plain DDP would "
                        "average different experts' gradients across ranks. Launch with "
                        "--config_file accelerate_configs/deepspeed_zero2.yaml (or --deepspeed ds_configs/zero2.json)")
    if zero_stage == 3:
        raise UserError(f"expert_parallel_size={ep_size} does not work with ZeRO-3 (DeepSpeed's ZeRO-3 does not "
                        "partition expert-parallel parameters): use ZeRO-2 with expert parallelism, or ZeRO-3 with "
                        "expert_parallel_size 1")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------
# The object the trainer and the checkpoints call


class NoExpertParallel:
    """Expert-parallel size 1: every rank holds every expert, and every hook is a no-op."""

    size = 1
    load_state_kwargs: dict = {}  # extra arguments of accelerator.load_state

    def check_checkpoint(self, checkpoint: Path) -> None:
        """A checkpoint resumes only at the expert-parallel size it was saved with (its experts are sharded)."""
        saved = saved_expert_parallel_sizes(checkpoint)
        if saved != {self.size}:
            raise UserError(wrong_expert_parallel_size(checkpoint, saved, self.size))

    def shard(self, model: nn.Module) -> str | None:
        """Keep this rank's experts; -> a line for the log, or None."""
        return None

    def rows_per_layer(self) -> torch.Tensor | None:
        """[L] rows this rank's experts processed in the last forward, per MoE layer (None without EP)."""
        return None

    def save(self, model: nn.Module, folder) -> None:
        """Write this rank's expert shard into a checkpoint folder being saved. Every rank calls this."""

    def load(self, model: nn.Module, folder) -> None:
        """Restore this rank's expert shard after accelerator.load_state."""

    def full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict with full [E, ...] experts, for an export. Every rank calls this."""
        return state


class ExpertParallel(NoExpertParallel):
    """Expert-parallel size > 1: each rank holds `num_experts / size` experts of every layer."""

    # DeepSpeed's module file holds the dense weights only (its checkpoint code knows only its own MoE
    # layout); the ZeRO optimizer files restore the experts' fp32 master copies, `load` the module's
    load_state_kwargs = {"load_module_strict": False}

    def __init__(self, size: int):
        # imported here, and only here: DeepSpeed costs seconds of start-up that runs without expert
        # parallelism do not need to pay
        from . import sharded_experts
        self.layers = sharded_experts
        self.size = size
        self.experts = []  # this rank's ExpertParallelExperts, one per MoE layer

    def shard(self, model: nn.Module) -> str:
        self.experts = self.layers.shard_experts(model, self.size)
        return (f"expert parallelism: {self.size} ranks per group, "
                f"{self.experts[0].num_experts // self.size} experts per rank")

    def rows_per_layer(self) -> torch.Tensor | None:
        return self.layers.tokens_per_rank(self.experts)

    def save(self, model: nn.Module, folder) -> None:
        self.layers.save_shards(model, folder)

    def load(self, model: nn.Module, folder) -> None:
        self.layers.load_shards(model, folder)

    def full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.layers.full_state_dict(model, state)


def make_expert_parallel(size: int, num_experts: int, world_size: int, zero_stage: int | None) -> NoExpertParallel:
    """The run's expert-parallel object, once its layout is checked (zero_stage None: no DeepSpeed)."""
    check_layout(num_experts, size, world_size, zero_stage)
    return ExpertParallel(size) if size > 1 else NoExpertParallel()
