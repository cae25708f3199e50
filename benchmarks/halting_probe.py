"""Can a recursive model's Q-head tell text sequences apart? A probe of what it reads.

The Q-head is a linear map of z_H pooled over each sequence's positions. This script runs the
first supervision step on validation blocks and prints:
- how much the pooled z_H varies between sequences (std per dimension) against its size (norm);
- the spread of the Q-head's own logits;
- how well a linear probe on the same pooled states, standardised per dimension, predicts the
  `loss_rank` target (this step's loss at most the median of these sequences): fitted on the first
  two thirds, scored on the last third.
A probe far above 50% beside a Q-head at 50% means the information is there at a scale the Q-head
has not reached.

    python benchmarks/halting_probe.py --model_path outputs/run/checkpoint-200 --blocks 192
    python benchmarks/halting_probe.py --model_path DIR --data_files docs/ --block_size 128   # other text

The data arguments are the trainer's (`DataArguments`), with the tokenizer saved beside the model.
"""

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, HfArgumentParser

import moe_reason  # noqa: F401  (registers the Auto classes)
from moe_reason.data.prepare import DataArguments, prepare_data
from moe_reason.models.modeling_moe_reason import next_token_statistics
from moe_reason.safe_loading import from_pretrained


def pooled_states_and_losses(model, ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> pooled z_H [N, H] the Q-head reads after the first supervision step, and that step's loss per sequence [N]."""
    pooled = []
    hook = model.q_head.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    model.config.halt_max_steps, model.config.eval_halting = 1, "max_steps"
    losses = []
    with torch.no_grad():
        for chunk in ids.split(batch):
            stats = next_token_statistics(model(chunk).logits, chunk, use_stablemax=model.config.stablemax_loss)
            losses.append(stats[:, 0] / stats[:, 1])  # [b] mean NLL per sequence, as HaltingLoss ranks it
    hook.remove()
    return torch.cat(pooled), torch.cat(losses)


def probe_accuracy(features: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Logistic regression on per-dimension standardised features: (fit accuracy, held-out accuracy)."""
    n = len(features) * 2 // 3
    mean, std = features[:n].mean(0), features[:n].std(0) + 1e-12
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[:n] @ w + b, target[:n]) + 1e-2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        right = ((x @ w + b) > 0).float() == target
    return right[:n].float().mean().item(), right[n:].float().mean().item()


@dataclass
class ProbeArguments:
    model_path: str = field(metadata={"help": "A recursive model: an export or a checkpoint folder."})
    blocks: int = field(default=192, metadata={"help": "Validation blocks to probe (at least 6)."})
    batch: int = field(default=16, metadata={"help": "Blocks per forward."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads."})


def main(argv=None):
    args, data_args = HfArgumentParser((ProbeArguments, DataArguments)).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False)
    if args.blocks < 6:
        raise SystemExit(f"--blocks {args.blocks}: need at least 6 (two thirds fit the probe, one third scores it)")
    torch.set_num_threads(args.threads)
    model = from_pretrained(AutoModelForCausalLM, args.model_path).eval()
    if not hasattr(model, "q_head"):
        raise SystemExit(f"{args.model_path} is not a recursive model (no Q-head)")
    data_args.tokenizer_name = data_args.tokenizer_name or args.model_path  # the tokenizer it was trained with
    data = prepare_data(data_args, log=lambda msg: print(msg, file=sys.stderr))
    ids = torch.tensor(data.validation.select(range(min(args.blocks, len(data.validation))))["input_ids"])
    if len(ids) < 6:
        raise SystemExit(f"the validation split has {len(ids)} blocks: need at least 6")
    features, losses = pooled_states_and_losses(model, ids, args.batch)
    target = (losses <= losses.median()).float()
    fit, held_out = probe_accuracy(features, target)
    print(f"{len(ids)} validation blocks of {ids.shape[1]} tokens; "
          f"loss per sequence {losses.mean():.3f} ± {losses.std():.3f}")
    print(f"pooled z_H: std between sequences {features.std(0).mean():.3g} per dimension, "
          f"norm {features.mean(0).norm():.3g}")
    print(f"Q-head logits: std {model.q_head(features).std():.3g}")
    print(f"linear probe for loss_rank (median split): fit {fit:.3f}, held-out {held_out:.3f} "
          f"({len(ids) - len(ids) * 2 // 3} sequences)")
    return {"pooled_std": features.std(0).mean().item(), "probe_held_out": held_out}


if __name__ == "__main__":
    main()
