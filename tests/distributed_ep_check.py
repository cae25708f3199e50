"""Run by tests/test_expert_parallel.py under torchrun (2 CPU processes, gloo): an expert-parallel
MoE block against the same block unsharded, forward and backward, then the checkpoint helpers.

Prints one JSON line from rank 0: the largest differences per case.
"""

import copy
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from moe_reason import MoEReasonConfig, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.parallel.sharded_experts import (ExpertParallelExperts, full_state_dict, load_shards, save_shards,
                                                 shard_experts)
from moe_reason.models.modeling_moe_reason import MoEReasonSparseMoeBlock


class Holder(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block


def compare(case: str, full: MoEReasonSparseMoeBlock, sharded: Holder, x: torch.Tensor) -> dict:
    """Forward/backward of both on this rank's tokens; expert gradients summed over ranks as DeepSpeed would."""
    rank, E = dist.get_rank(), full.num_experts
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_full, _, chosen = full(xs[0])
    out_ep, _, _ = sharded.mlp(xs[1])
    weight = torch.linspace(-1, 1, out_full.numel()).view_as(out_full)  # a loss that touches every output
    (out_full * weight).sum().backward()
    (out_ep * weight).sum().backward()
    experts = sharded.mlp.experts
    local = slice(experts.ep_rank * experts.local_experts, (experts.ep_rank + 1) * experts.local_experts)
    diffs = {"output": (out_full - out_ep).abs().max(), "input_grad": (xs[0].grad - xs[1].grad).abs().max(),
             "router_grad": (full.router.weight.grad - sharded.mlp.router.weight.grad).abs().max()}
    for name in ("up_proj", "down_proj"):
        reference = getattr(full.experts, name).grad.clone()
        dist.all_reduce(reference)  # the full block's expert gradient from both ranks' tokens
        diffs[f"{name}_grad"] = (reference[local] - getattr(experts, name).grad).abs().max()
    diffs = {k: v.detach() for k, v in diffs.items()}
    for t in diffs.values():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    counts = torch.bincount(chosen.reshape(-1), minlength=E)
    dist.all_reduce(counts)
    received = experts.tokens_received.reshape(1).clone()
    gathered = [torch.zeros_like(received) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, received)
    return {f"{case}/{k}": float(v) for k, v in diffs.items()} | {
        f"{case}/tokens_per_expert": counts.tolist(), f"{case}/rows_per_rank": [int(g) for g in gathered],
        f"{case}/rank": rank}


def recursive_evaluation_in_step(rank: int) -> dict:
    """An expert-parallel recursive model evaluated with Q-head halting, where rank 0's examples halt after
    step 1 and rank 1's run all 3: rank 0 must keep running (ghost) steps, or the all-to-alls of
    rank 1's steps 2 and 3 find no partner."""
    config = RecursiveMoEReasonConfig.from_preset("debug", vocab_size=64, halt_max_steps=3, eval_halting="q_head")
    torch.manual_seed(0)
    model = RecursiveMoEReasonForCausalLM(config).eval()
    shard_experts(model, ep_size=2)
    model.evaluates_in_step = True  # as the trainer sets it in a multi-process run
    with torch.no_grad():
        model.q_head.bias.fill_(10.0 if rank == 0 else -10.0)  # rank 0 halts at once, rank 1 never
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    steps = torch.tensor(out.recursion_steps.tolist())
    gathered = [torch.zeros_like(steps) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, steps)
    return {"recursive_eval/steps_per_rank": [g.tolist() for g in gathered],
            "recursive_eval/loss_finite": bool(torch.isfinite(out.loss))}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    config = MoEReasonConfig.from_preset("debug")  # hidden 32, 4 experts, top-2
    torch.manual_seed(0)
    full = MoEReasonSparseMoeBlock(config)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.2)
    sharded = Holder(copy.deepcopy(full))
    shard_experts(sharded, ep_size=2)
    assert isinstance(sharded.mlp.experts, ExpertParallelExperts) and sharded.mlp.experts.up_proj.shape[0] == 2
    result = recursive_evaluation_in_step(rank)

    torch.manual_seed(100 + rank)  # each rank routes different tokens
    result |= compare("random", full, sharded, torch.randn(2, 8, config.hidden_size))

    # only experts 0 and 1 (rank 0's) get tokens: rank 1's experts and experts 2, 3 receive nothing
    for module in (full, sharded.mlp):
        module.zero_grad()
        with torch.no_grad():
            module.router.weight.copy_(torch.cat([full.router.weight[:2].abs() + 0.1,
                                                  torch.zeros(2, config.hidden_size)]))
    result |= compare("rank1_empty", full, sharded, torch.randn(2, 8, config.hidden_size).abs())

    # export gathers full experts; shards round-trip; another EP size is refused
    state = full_state_dict(sharded, dict(sharded.state_dict()))
    result["gathered_up_proj_diff"] = float((state["mlp.experts.up_proj"] - full.experts.up_proj).abs().max())
    folder = Path(sys.argv[1])
    save_shards(sharded, folder)
    dist.barrier()
    saved = sharded.mlp.experts.up_proj.detach().clone()
    with torch.no_grad():
        sharded.mlp.experts.up_proj.zero_()
    load_shards(sharded, folder)
    result["shard_round_trip_diff"] = float((sharded.mlp.experts.up_proj - saved).abs().max())
    dist.barrier()
    if rank == 0:  # pretend the checkpoint was saved at EP size 4
        for shard in folder.glob("expert_shard_*"):
            shard.rename(shard.with_name(shard.name.replace("_of_2", "_of_4")))
    dist.barrier()
    try:
        load_shards(sharded, folder)
        result["wrong_size_error"] = None
    except FileNotFoundError as err:
        result["wrong_size_error"] = str(err)
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
    dist.destroy_process_group()  # ended here, not by the interpreter's exit (see distributed_zero3_recursive_check)
