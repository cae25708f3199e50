"""What the benchmarks share: one training step and alternating timed rounds."""

import time

import torch

from moe_reason.training.optim import fused_adamw


def training_step(model, ids: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32,
                  compile: bool = False):
    """A closure running forward (LM + router losses) + backward + AdamW on `ids`; returns the loss.

    bf16 runs under autocast with fp32 weights, as mixed-precision training does. AdamW is
    torch's fused kernel on CPU and CUDA, as in our trainer and in transformers' Trainer
    (its default optimizer since torch 2.8).
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))
    forward = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(steps: dict, device: torch.device, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """{name: step closure} -> {name: [seconds per step, one per round]}.

    Warm-up steps (allocation, compilation) are untimed; rounds alternate between the
    closures so drift in the machine's speed hits all of them alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                loss = step()
            loss.item()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps_per_round)
    return times
