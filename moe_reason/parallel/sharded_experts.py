"""Expert-parallel layers: each rank keeps `num_experts / ep_size` experts of every MoE layer.

What `expert_parallel.ExpertParallel` runs (the trainer never imports this module itself, so a
run without expert parallelism does not import DeepSpeed). Training-only: the model file never imports
this, so an exported model loads without DeepSpeed or a process group. `shard_experts` swaps each
block's `MoEReasonExperts` for an `ExpertParallelExperts` holding this rank's slice; the block's
routing, sort-by-expert dispatch and weighted combine are unchanged (one code path), and only
`run_experts`' callee now moves rows to their expert's rank and back.

Process groups are DeepSpeed's (`deepspeed.utils.groups`): with world W and EP size N, the
expert-parallel groups are consecutive blocks of N ranks (the all-to-all runs inside one),
and the expert-data-parallel groups join the ranks holding the same experts (W / N of them).
Expert parameters carry DeepSpeed's MoE tags (`allreduce=False`, `group_name`), the
optimizer's groups are split with `split_params_into_different_moe_groups_for_optimizer`,
and the experts module is a DeepSpeed `MoE` so the engine configures ZeRO-1/2 with
`has_moe_layers`: expert gradients are reduced and partitioned only inside their
expert-data-parallel group, dense ones across the whole world.

Communication per MoE layer and step (forward; backward repeats it): each rank sends and
receives about T*k*(N-1)/N rows of H values twice (dispatch and combine), T = tokens on the
rank, k = experts per token. See README "Expert parallelism".
"""

from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..errors import MissingFileError
from ..models.modeling_moe_reason import MoEReasonExperts, MoEReasonSparseMoeBlock
from ..layout import expert_shard_name, saved_expert_parallel_sizes, wrong_expert_parallel_size


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's naming: its optimizer split and ZeRO key groups by this


def create_groups(ep_size: int) -> dist.ProcessGroup:
    """DeepSpeed's expert-parallel and expert-data-parallel groups; returns this rank's EP group."""
    if group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(group_name(ep_size))


class ExpertParallelExperts(MoEReasonExperts, MoE):
    """This rank's `num_local_experts` experts, reached from every rank of the EP group by all-to-all.

    Parameters keep the base names (`up_proj`, `down_proj`), so a state dict differs from the
    base model's only in the expert dimension. Subclassing DeepSpeed's `MoE` is how its engine
    learns the model has expert-parallel layers (it looks for that type); DeepSpeed's own MoE
    forward and checkpoint layout are not used: DeepSpeed would save per-expert sub-modules
    (`deepspeed_experts.<i>`), which this stacked layout does not have, so what its checkpoint
    code calls `num_local_experts` is 0. The fp32 master copies of the experts are in the ZeRO
    optimizer files every rank writes; the module's own expert weights are saved beside them
    by `save_shards` and restored by `load_shards`.
    """

    def __init__(self, full: MoEReasonExperts, ep_size: int, ep_rank: int, group: dist.ProcessGroup):
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
        self.num_experts, self.gated = full.num_experts, full.gated
        self.ep_size, self.ep_rank, self.group = ep_size, ep_rank, group
        self.local_experts = full.num_experts // ep_size
        first = ep_rank * self.local_experts
        self.up_proj = nn.Parameter(full.up_proj.detach()[first:first + self.local_experts].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[first:first + self.local_experts].clone())
        self.expert_group_name = group_name(ep_size)
        self.num_local_experts = 0  # DeepSpeed's name for per-expert sub-modules to checkpoint: none here
        for param in (self.up_proj, self.down_proj):
            param.allreduce = False  # DeepSpeed's MoE tags: reduce only within the expert-data-parallel group
            param.group_name = self.expert_group_name
        self.tokens_received = None  # [] rows this rank's experts processed in the last forward

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        create_groups(self.ep_size)  # called by the engine; the groups already exist (made before sharding)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] grouped by global expert, counts [E] -> expert outputs [N, H] in the same order."""
        N, L = self.ep_size, self.local_experts
        send_counts = counts.view(N, L)  # row r: rows for rank r's experts
        recv_counts = torch.empty_like(send_counts)  # row r: rows rank r sends to my experts
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # uneven all-to-all needs the split sizes on the host: one sync per layer, inherent to EP
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits
        # torch's functional collective: autograd sends the gradients back along the reversed splits
        # [M, H] by source rank
        x_recv = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, self.group)
        # within each source rank's chunk the rows are already grouped by local expert:
        # reorder to (local expert, source rank) so the experts see contiguous rows
        local_ids = torch.arange(L, device=x.device).repeat(N).repeat_interleave(recv_counts.reshape(-1))  # [M]
        order = local_ids.argsort(stable=True)
        y_sorted = super().forward(x_recv[order], recv_counts.sum(0))  # [M, H]
        y_recv = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to source-rank order
        self.tokens_received = recv_counts.sum().detach()
        return all_to_all_single_autograd(y_recv, send_splits, recv_splits, self.group)  # [N, H]

    @torch.no_grad()
    def gather_full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full [E, ...] expert tensors from every rank of the EP group (a collective)."""
        full = []
        for local in (self.up_proj, self.down_proj):
            parts = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(parts, local.detach().contiguous(), group=self.group)
            full.append(torch.cat(parts))
        return full[0], full[1]


def sharded_experts(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    """(block name, its expert-parallel experts) for every sharded MoE layer, in layer order."""
    return [(name, m.experts) for name, m in model.named_modules()
            if isinstance(m, MoEReasonSparseMoeBlock) and isinstance(m.experts, ExpertParallelExperts)]


def shard_experts(model: nn.Module, ep_size: int) -> list[ExpertParallelExperts]:
    """Keep this rank's slice of every layer's experts (the model was built or loaded in full)."""
    group = create_groups(ep_size)
    ep_rank = dist.get_rank(group)
    blocks = [m for m in model.modules() if isinstance(m, MoEReasonSparseMoeBlock)]
    for block in blocks:
        block.experts = ExpertParallelExperts(block.experts, ep_size, ep_rank, group)
    return [block.experts for block in blocks]


def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each sharded expert tensor in `state` by the gathered [E, ...] one. Every rank must call this."""
    for name, experts in sharded_experts(model):
        state[f"{name}.experts.up_proj"], state[f"{name}.experts.down_proj"] = experts.gather_full()
    return state


def tokens_per_rank(experts: list[ExpertParallelExperts]) -> torch.Tensor | None:
    """[L] rows each MoE layer's local experts processed in their last forward (None before any)."""
    received = [e.tokens_received for e in experts if e.tokens_received is not None]
    return torch.stack(received) if received else None


def save_shards(model: nn.Module, folder) -> None:
    """Each EP rank's expert weights into the checkpoint folder (one writer per EP rank). Every rank calls this."""
    experts = sharded_experts(model)
    if not experts:
        return
    first = experts[0][1]
    if groups._get_expert_data_parallel_rank(first.expert_group_name) == 0:  # replicas hold the same values
        tensors = {f"{name}.experts.{p}": getattr(e, p).detach().contiguous()
                   for name, e in experts for p in ("up_proj", "down_proj")}
        save_file(tensors, Path(folder) / expert_shard_name(first.ep_rank, first.ep_size))


@torch.no_grad()
def load_shards(model: nn.Module, folder) -> None:
    """Restore this rank's expert weights saved by `save_shards`; a different EP size is refused."""
    experts = sharded_experts(model)
    if not experts:
        return
    first = experts[0][1]
    path = Path(folder) / expert_shard_name(first.ep_rank, first.ep_size)
    if not path.is_file():
        raise MissingFileError(f"no {path.name} for expert_parallel_size={first.ep_size}: "
                               + wrong_expert_parallel_size(folder, saved_expert_parallel_sizes(folder),
                                                             first.ep_size))
    tensors = load_file(path)
    for name, e in experts:
        for p in ("up_proj", "down_proj"):
            getattr(e, p).copy_(tensors[f"{name}.experts.{p}"])
