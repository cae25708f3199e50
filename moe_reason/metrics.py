"""FLOPs, MFU, expert load and evaluation metrics."""

import math
import time

import torch

from .modeling_moe_reason import next_token_statistics as token_statistics  # noqa: F401  (re-exported)


def matmul_params_per_token(config) -> int:
    """Weights each token multiplies by in one pass of the decoder stack (only its k routed experts count)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = config.head_dim
    attention = H * (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim \
        + config.num_attention_heads * head_dim * H
    expert = H * I * (2 if config.expert_activation == "swiglu" else 1) + I * H
    moe = H * config.num_experts + (config.num_experts_per_tok + config.num_shared_experts) * expert
    return L * (attention + moe)


def decoder_flops_per_token(config, seq_len: int) -> float:
    """One decoder-stack pass: 2 FLOPs per multiply-add over the weights, plus attention.

    Attention counts 2 matmuls (QK^T, AV) of 2*S*H FLOPs per token and layer over the full
    sequence (the PaLM convention, which does not halve for causality).
    """
    return 2 * matmul_params_per_token(config) + 4 * config.num_hidden_layers * seq_len * config.hidden_size


def head_flops_per_token(config) -> float:
    """One application of the LM head."""
    return 2 * config.hidden_size * config.vocab_size


def training_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward of one training step, per token.

    Backward costs twice its forward. The recursive model runs `passes` decoder passes of
    which only `grad_passes` are differentiated, and applies the LM head once per supervision
    step; counted at the most supervision steps (halting can only lower the cost). The
    Q-head (H weights on a pooled state) is negligible and not counted.
    """
    passes, grad_passes, heads = forward_passes(config)
    return decoder_flops_per_token(config, seq_len) * (passes + 2 * grad_passes) + 3 * heads * head_flops_per_token(config)


def forward_passes(config) -> tuple[int, int, int]:
    """(decoder passes, of which with gradient, LM-head applications) in one training forward."""
    if not hasattr(config, "passes_per_step"):
        return 1, 1, 1
    steps = config.halt_max_steps
    return config.passes_per_step(), config.grad_passes_per_supervision_step() * steps, steps


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048) -> float:
    """Best FLOP/s of a square matmul on this device: the 'peak' MFU is stated against."""
    # a private generator: drawing from the global RNG here would change dropout and routing noise
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class ExpertLoadMeter:
    """Accumulates tokens per expert per layer between logs."""

    def __init__(self):
        self.total = None

    def update(self, load: torch.Tensor | None) -> None:
        if load is not None:
            load = load.detach().float()
            self.total = load if self.total is None else self.total + load

    def summary(self) -> dict[str, float]:
        """{layer_i/max_over_mean, layer_i/expert_j_share} and resets. max/mean = 1 is perfect balance."""
        if self.total is None:
            return {}
        out = {}
        for layer, counts in enumerate(self.total.cpu()):
            mean = counts.mean().clamp(min=1e-9)
            out[f"expert_load/layer_{layer}/max_over_mean"] = float(counts.max() / mean)
            for expert, count in enumerate(counts):
                out[f"expert_load/layer_{layer}/expert_{expert}_share"] = float(count / counts.sum().clamp(min=1e-9))
        self.total = None
        return out


def summarise_eval(stats: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Summed [N, 3] statistics -> loss, perplexity, accuracy, tokens, ln(vocab)."""
    nll, tokens, correct = stats.double().sum(0).tolist()
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(tokens, 1.0),
            "tokens": int(tokens), "ln_vocab": math.log(vocab_size)}
