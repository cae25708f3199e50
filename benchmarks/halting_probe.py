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
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moe_reason  # noqa: F401  (registers the Auto classes)
from moe_reason.data import DataArguments, prepare_data
from moe_reason.safe_loading import from_pretrained


def pooled_states_and_losses(model, ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> pooled z_H [N, H] the Q-head reads after the first supervision step, and that step's loss per sequence [N]."""
    pooled = []
    hook = model.q_head.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    model.config.halt_max_steps, model.config.eval_halting = 1, "max_steps"
    losses = []
    with torch.no_grad():
        for chunk in ids.split(batch):
            logits = model(chunk).logits  # [b, S, V]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="none")
            losses.append(nll.view(len(chunk), -1).mean(1))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="A recursive model: an export or a checkpoint folder.")
    parser.add_argument("--blocks", type=int, default=192, help="Validation blocks to probe (at least 6).")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.blocks < 6:
        parser.error(f"--blocks {args.blocks}: need at least 6 (two thirds fit the probe, one third scores it)")
    torch.set_num_threads(args.threads)
    model = from_pretrained(AutoModelForCausalLM, args.model_path).eval()
    if not hasattr(model, "q_head"):
        raise SystemExit(f"{args.model_path} is not a recursive model (no Q-head)")
    data = prepare_data(DataArguments(tokenizer_name=args.model_path), log=lambda msg: print(msg, file=sys.stderr))
    ids = torch.tensor(data.validation.select(range(min(args.blocks, len(data.validation))))["input_ids"])
    features, losses = pooled_states_and_losses(model, ids, args.batch)
    target = (losses <= losses.median()).float()
    fit, held_out = probe_accuracy(features, target)
    print(f"{len(ids)} validation blocks of {ids.shape[1]} tokens; loss per sequence {losses.mean():.3f} ± {losses.std():.3f}")
    print(f"pooled z_H: std between sequences {features.std(0).mean():.3g} per dimension, norm {features.mean(0).norm():.3g}")
    print(f"Q-head logits: std {model.q_head(features).std():.3g}")
    print(f"linear probe for loss_rank (median split): fit {fit:.3f}, held-out {held_out:.3f} "
          f"({len(ids) - len(ids) * 2 // 3} sequences)")


if __name__ == "__main__":
    main()
