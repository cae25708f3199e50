"""Run by tests/test_train.py under torchrun (2 CPU processes, gloo): the recursive model under DeepSpeed
ZeRO-3, its parameters partitioned over the two ranks.

1. Gradients: every parameter's gradient after one backward (the shared stack used by every pass, the
   heads by every supervision step) equals the plain model's gradient averaged over the ranks.
2. Halting in step: evaluation with Q-head halting (`evaluates_in_step`), on inputs for which the ranks
   halt after different numbers of supervision steps; ZeRO-3 gathers each module's parameters with a
   collective, so a rank that stopped calling modules would hang the other.

Prints one JSON line from rank 0.
"""

import copy
import gc
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from moe_reason import RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def gathered(values) -> list:
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    config = RecursiveMoEReasonConfig.from_preset("debug", vocab_size=64, h_cycles=2, l_cycles=1, halt_max_steps=3,
                                                  use_act=False, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = RecursiveMoEReasonForCausalLM(config).train()
    reference = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=DS_CONFIG)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    reference(input_ids=ids, labels=ids).loss.backward()
    worst, checked = 0.0, 0
    for (name, param), plain in zip(engine.module.named_parameters(), reference.parameters()):
        expected = torch.zeros_like(plain) if plain.grad is None else plain.grad.clone()  # z_init: no gradient
        dist.all_reduce(expected)
        full = safe_get_full_grad(param)
        full = torch.zeros_like(expected) if full is None else full
        worst = max(worst, float((full - expected / dist.get_world_size()).abs().max()))
        checked += 1
    result = {"max_grad_diff": worst, "parameters_checked": checked}

    # halting in step: a Q-head with large weights halts on some inputs and not others; draw batches until the
    # ranks halt after different numbers of steps (every draw is one collective evaluation on both ranks)
    halting = RecursiveMoEReasonConfig.from_preset("debug", vocab_size=64, halt_max_steps=3, eval_halting="q_head")
    torch.manual_seed(1)
    model = RecursiveMoEReasonForCausalLM(halting)
    with torch.no_grad():
        model.q_head.weight.normal_(0, 50.0)
        model.q_head.bias.zero_()
    model.evaluates_in_step = True
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=DS_CONFIG)
    engine.eval()
    for draw in range(20):
        ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1000 * draw + rank))
        with torch.no_grad():
            out = engine(input_ids=ids, labels=ids)
        steps = gathered(out.recursion_steps.tolist())
        if steps[0] != steps[1]:
            break
    result |= {"steps_per_rank": steps, "draws": draw + 1, "eval_loss_finite": bool(torch.isfinite(out.loss))}
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
    # DeepSpeed's engines (released when main returned) go before the process group, as the trainer does at its
    # end: left to the interpreter's exit, a finished rank could abort ('terminate called without an active
    # exception') and fail a check that had passed
    gc.collect()
    dist.destroy_process_group()
