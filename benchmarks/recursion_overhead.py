"""Step time of the recursive model relative to the base model of the same size, beside the
ratio of their training FLOPs (`metrics.training_flops_per_token`). A measured ratio close to
the FLOP ratio means the recursion adds no overhead beyond its extra passes (target: within 10%).

Rounds alternate between the two models; the median round counts. Halting is switched off
(`use_act=False`) so the recursive model runs exactly the supervision steps its FLOPs count.
Last line: measured ratio / FLOP ratio.

    python benchmarks/recursion_overhead.py                    # small preset, CPU
    python benchmarks/recursion_overhead.py --preset exp8 --batch 16 --seq 512 --device cuda --dtype bfloat16
    python benchmarks/recursion_overhead.py --preset exp8 --batch 16 --seq 512 --device cuda --dtype bfloat16 \
        --torch_compile
"""

import argparse
import statistics

import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.training.metrics import training_flops_per_token
from timing import time_rounds, training_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--h_cycles", type=int, default=1)
    parser.add_argument("--l_cycles", type=int, default=1)
    parser.add_argument("--halt_max_steps", type=int, default=2)
    parser.add_argument("--recursion_gradient", default="last_cycle", choices=["last_cycle", "one_step"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch_compile", action="store_true", help="compile both models (warm-up steps compile)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    shared = dict(hidden_dropout=0.0, attention_dropout=0.0, router_jitter_noise=0.0)
    base_cfg = MoEReasonConfig.from_preset(args.preset, **shared)
    rec_cfg = RecursiveMoEReasonConfig.from_preset(
        args.preset, h_cycles=args.h_cycles, l_cycles=args.l_cycles, halt_max_steps=args.halt_max_steps,
        recursion_gradient=args.recursion_gradient, use_act=False, **shared)
    models = {"base": MoEReasonForCausalLM(base_cfg), "recursive": RecursiveMoEReasonForCausalLM(rec_cfg)}
    flop_ratio = training_flops_per_token(rec_cfg, args.seq) / training_flops_per_token(base_cfg, args.seq)
    ids = torch.randint(0, base_cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    steps = {name: training_step(model, ids, device, dtype, args.torch_compile) for name, model in models.items()}
    times = time_rounds(steps, device, args.rounds, args.steps, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    measured = median["recursive"] / median["base"]
    print(f"device {device}, {args.dtype}, compile {args.torch_compile}, preset {args.preset}, "
          f"batch {args.batch} x {args.seq}; recursion h={args.h_cycles} l={args.l_cycles} supervision "
          f"steps={args.halt_max_steps} ({args.recursion_gradient}): "
          f"{rec_cfg.passes_per_step()} decoder passes per step")
    for name, t in median.items():
        print(f"{name:10s} {t * 1000:9.1f} ms/step   {args.batch * args.seq / t:10,.0f} tokens/s")
    print(f"measured step-time ratio {measured:.2f}, FLOP ratio {flop_ratio:.2f}")
    print(f"ratio measured/FLOPs: {measured / flop_ratio:.2f}")


if __name__ == "__main__":
    main()
