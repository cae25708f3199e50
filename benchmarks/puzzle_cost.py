"""What one training step of each arm of a puzzle study costs, side by side in one run: puzzles per
second and the share of this device's measured matmul peak (`metrics.measure_peak_flops`) that the
step's counted FLOPs (`metrics.training_flops_per_token`) reach. It is how the recursion's depth was
chosen: the deepest setting whose measured cost per puzzle the CPU affords for a study.

Arms: the direct model with the same parameters, a direct model as deep as one supervision step
(`--deep_layers`), and the recursive model at each `--recursion H,L,STEPS` (outer cycles, inner cycles,
supervision steps), each with attention and with TRM's MLP token mixer (`--mixers`). Every example
runs every supervision step (no halting), as early in training, where nothing is solved yet; halting
only makes a recursive step cheaper later. Rounds alternate between the arms; the median counts.
`saved MiB` is what one step's forward leaves saved for its backward (`metrics.saved_activation_bytes`):
deep supervision holds every supervision step's gradient passes until the one backward, so it grows
with the steps; `--gradient_checkpointing` adds each recursive arm again with its decoder layers
checkpointed, and a line comparing the two; `--torch_compile` adds every arm again compiled (inductor, through
torch.compile as `--torch_compile` trains), and a line per arm comparing the two (its compilation, in the
untimed warm-up, is printed). Last line: the ratio of the cheapest recursive arm's puzzles/s (eager, without
checkpointing) to the direct model's.

    python benchmarks/puzzle_cost.py                                   # 6x6 Sudoku (36 cells), CPU
    python benchmarks/puzzle_cost.py --cells 81 --recursion 2,3,8 3,6,16 --device cuda
    python benchmarks/puzzle_cost.py --cells 81 --recursion 2,3,8 --mixers attention --gradient_checkpointing
    python benchmarks/puzzle_cost.py --cells 64 --recursion 2,3,8 --mixers attention --torch_compile --threads 1
"""

import argparse
import statistics
import time

import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.training.metrics import measure_peak_flops, saved_activation_bytes, training_flops_per_token
from timing import time_rounds, training_step


CHECKPOINTED = ", checkpointed"  # the suffix of a recursive arm's twin under --gradient_checkpointing
COMPILED = ", compiled"  # the suffix of an arm's twin under --torch_compile


def arms(args) -> dict:
    """{name: (config, model class)} for every arm the arguments ask for."""
    shared = dict(vocab_size=12, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_attention_heads=4,
                  num_key_value_heads=4, bidirectional=True, use_cache=False, max_position_embeddings=args.cells)
    found = {}
    for mixer in args.mixers:
        common = {**shared, "token_mixer": mixer}
        found[f"direct ({mixer})"] = (MoEReasonConfig.from_preset("debug", **common), MoEReasonForCausalLM)
        found[f"direct {args.deep_layers} layers ({mixer})"] = (
            MoEReasonConfig.from_preset("debug", **common, num_hidden_layers=args.deep_layers), MoEReasonForCausalLM)
        for spec in args.recursion:
            h, l, steps = (int(x) for x in spec.split(","))
            config = RecursiveMoEReasonConfig.from_preset("debug", **common, h_cycles=h, l_cycles=l,
                                                          halt_max_steps=steps, use_act=False)
            found[f"recursive h{h} l{l} x{steps} ({mixer})"] = (config, RecursiveMoEReasonForCausalLM)
            if args.gradient_checkpointing:
                found[f"recursive h{h} l{l} x{steps} ({mixer}){CHECKPOINTED}"] = (config, RecursiveMoEReasonForCausalLM)
    if args.torch_compile:
        found.update({f"{name}{COMPILED}": arm for name, arm in list(found.items()) if not name.endswith(CHECKPOINTED)})
    return found


def build(name: str, config, cls):
    model = cls(config)
    if name.endswith(CHECKPOINTED):
        model.activation_checkpointing_enable()
    return model


def compile_first(steps: dict) -> None:
    """Run each compiled arm's first step (its compilation) before the timing, and say how long it took."""
    for name, step in steps.items():
        if name.endswith(COMPILED):
            start = time.perf_counter()
            step().item()
            print(f"{name}: first step (compiling) {time.perf_counter() - start:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=36, help="positions per puzzle (4x4: 16, 6x6: 36, 9x9: 81)")
    parser.add_argument("--batch", type=int, default=64, help="puzzles per step")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--deep_layers", type=int, default=16)
    parser.add_argument("--recursion", nargs="+", default=["1,1,4", "2,3,8"], help="H,L,STEPS per recursive arm")
    parser.add_argument("--mixers", nargs="+", default=["attention", "mlp"], choices=["attention", "mlp"])
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="also time each recursive arm with its decoder layers checkpointed")
    parser.add_argument("--torch_compile", action="store_true",
                        help="also time every arm compiled (torch.compile, inductor)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ids = torch.randint(1, 11, (args.batch, args.cells), generator=torch.Generator().manual_seed(0)).to(device)
    found = arms(args)
    models = {name: build(name, config, cls) for name, (config, cls) in found.items()}
    steps = {name: training_step(model, ids, device, compile=name.endswith(COMPILED)) for name, model in models.items()}
    compile_first(steps)
    median = {name: statistics.median(t) for name, t in time_rounds(steps, device, args.rounds, args.steps,
                                                                    args.warmup).items()}
    # counted after the timing, so that these forwards without a backward cannot raise the timed steps' peak memory;
    # on the eager model only (what a compiled graph saves is inductor's choice)
    saved = {name: saved_activation_bytes(model, input_ids=ids, labels=ids, use_cache=False) / 2**20
             for name, model in models.items() if not name.endswith(COMPILED)}
    peak = measure_peak_flops(device)
    print(f"device {device}, {torch.get_num_threads()} thread(s), fp32, {args.batch} puzzles x {args.cells} cells per "
          f"step, hidden {args.hidden}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'arm':48s} {'depth/step':>10s} {'ms/step':>9s} {'puzzles/s':>10s} {'GFLOP/s':>8s} {'of peak':>8s} "
          f"{'saved MiB':>10s}")
    for name, (config, _) in found.items():
        flops = training_flops_per_token(config, args.cells) * args.batch * args.cells
        depth = config.num_hidden_layers * (config.h_cycles * (config.l_cycles + 1) if hasattr(config, "h_cycles")
                                            else 1)
        print(f"{name:48s} {depth:10d} {median[name] * 1000:9.1f} {args.batch / median[name]:10.1f} "
              f"{flops / median[name] / 1e9:8.1f} {flops / median[name] / peak:8.1%} "
              f"{f'{saved[name]:.1f}' if name in saved else '-':>10s}")
    for name in found:
        if name.endswith(CHECKPOINTED):
            plain = name.removesuffix(CHECKPOINTED)
            print(f"{name}: {median[plain] / median[name]:.3f}x the puzzles/s and {saved[name] / saved[plain]:.3f}x "
                  "the saved activations of the same arm without")
        if name.endswith(COMPILED):
            print(f"{name}: {median[name.removesuffix(COMPILED)] / median[name]:.3f}x the puzzles/s of the same arm "
                  "eager")
    direct = args.batch / median[f"direct ({args.mixers[0]})"]
    recursive = max(args.batch / t for name, t in median.items()
                    if name.startswith("recursive") and not name.endswith((CHECKPOINTED, COMPILED)))
    print(f"ratio recursive/direct puzzles per second: {recursive / direct:.3f}")


if __name__ == "__main__":
    main()
