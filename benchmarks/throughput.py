"""Training throughput of MoEReasonForCausalLM against transformers' own MoE models.

Same dimensions (the preset's, with gated SwiGLU experts on every side, no dropout), batch,
sequence length, dtype and device; each step is forward + backward (LM loss and router aux
loss) + AdamW. Rounds alternate between the models so drift in machine speed hits all of
them alike; the median round counts. MFU is stated against the best matmul FLOP/s measured
on this device at start-up, with the same FLOP count for every model (they compute the same
function). Last line: ours / Mixtral tokens/s.

    python benchmarks/throughput.py                                   # small preset, CPU, fp32
    python benchmarks/throughput.py --preset exp8 --batch 16 --seq 512 --device cuda --dtype bfloat16 --torch_compile
"""

import argparse
import statistics

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.models.convert import to_mixtral
from moe_reason.training.metrics import measure_peak_flops, training_flops_per_token
from timing import time_rounds, training_step


def build_models(args) -> dict:
    torch.manual_seed(0)
    config = MoEReasonConfig.from_preset(args.preset, expert_activation="swiglu", hidden_dropout=0.0,
                                         attention_dropout=0.0, scale_embeddings=False, num_shared_experts=0,
                                         router_jitter_noise=0.0)
    ours = MoEReasonForCausalLM(config)
    models = {"ours": ours}
    if "mixtral" in args.models:
        mixtral = to_mixtral(ours)  # the same weights, so the same function and FLOPs
        mixtral.config.output_router_logits = True  # compute the aux loss as training does
        models["mixtral"] = mixtral
    if "qwen3_moe" in args.models:
        models["qwen3_moe"] = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob, output_router_logits=True, decoder_sparse_step=1,
            mlp_only_layers=[], tie_word_embeddings=config.tie_word_embeddings,
            max_position_embeddings=config.max_position_embeddings))
    for model in models.values():
        model.config._attn_implementation = "sdpa"
    return config, models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 runs under autocast (weights stay fp32, as in mixed-precision training)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--models", nargs="+", default=["ours", "mixtral", "qwen3_moe"],
                        choices=["ours", "mixtral", "qwen3_moe"])
    parser.add_argument("--torch_compile", action="store_true")
    args = parser.parse_args(argv)
    if "mixtral" not in args.models:
        args.models.append("mixtral")  # the ratio's denominator
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    peak = measure_peak_flops(device, dtype)
    config, models = build_models(args)
    flops_per_token = training_flops_per_token(config, args.seq)
    tokens = args.batch * args.seq
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else torch.get_num_threads()}"
          f"{'' if device.type == 'cuda' else ' threads'}), {args.dtype}, preset {args.preset} with SwiGLU experts "
          f"({sum(p.numel() for p in models['ours'].parameters()) / 1e6:.1f}M params), batch {args.batch} x "
          f"{args.seq}, compile {args.torch_compile}; measured matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)

    steps = {name: training_step(model, ids, device, dtype, args.torch_compile) for name, model in models.items()}
    times = time_rounds(steps, device, args.rounds, args.steps, args.warmup)
    rates = {name: [tokens / t for t in ts] for name, ts in times.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"{name:10s} {rate:12,.0f} tokens/s   MFU {rate * flops_per_token / peak:6.1%}   "
              f"(rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
    for other in (m for m in median if m not in ("ours", "mixtral")):
        print(f"ratio ours/{other}: {median['ours'] / median[other]:.2f}")
    print(f"ratio ours/mixtral: {median['ours'] / median['mixtral']:.2f}")


if __name__ == "__main__":
    main()
