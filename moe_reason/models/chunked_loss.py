"""Next-token cross-entropy straight from the hidden states, without the [T, V] logits.

The usual causal-LM loss materialises the logits [T, V] (T = batch x sequence tokens), their
log-softmax and, in backward, a gradient of the same size, then the zero-filled buffer the
gather's backward scatters into. At exp8's size (T = 16 x 512, V = 49152) each of those is
1.6 GB in fp32, and on a CPU every fresh buffer that large is also paid for in page faults:
at the `small` size they took a third of the training step.

Here the LM head and the loss run together over chunks of rows. A chunk's logits exist only
while it is processed, and when gradients are wanted they are computed in the same pass:
d loss / d logits = w * (softmax - one_hot) is known as soon as the softmax is, so the chunk's
gradients for the hidden states and the head weight are formed at once, and backward only
scales them by the incoming gradient. Same three head matmuls as the plain path, the same
function to float rounding, memory O(chunk x V) instead of O(T x V). The idea is Liger-Kernel's
fused linear cross-entropy, written with plain torch ops so that it runs on any device.

This file is copied next to saved checkpoints with the modeling file: torch only.
"""

import torch

# logits elements per chunk: 8 MB of fp32 on a CPU (stays in malloc's reused heap, so no page
# faults), 256 MB on an accelerator (large matmuls, few kernel launches)
CHUNK_ELEMENTS = {"cpu": 2**21, "accelerator": 2**26}


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"]
    return max(1, budget // vocab_size)


def stablemax(logits: torch.Tensor) -> torch.Tensor:
    """TRM's s(x): x + 1 for x >= 0, 1 / (1 - x) below; positive, increasing, linear for large x."""
    return torch.where(logits >= 0, logits + 1, 1 / (1 - logits.clamp(max=0)))


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    """log(s(x) / sum s(x)) over the last dimension: the stable-max counterpart of log_softmax."""
    s = stablemax(logits)
    return s.log() - s.sum(dim=-1, keepdim=True).log()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor, use_stablemax: bool = False):
    """Weighted next-token cross-entropy of `hidden @ weight.T`, computed chunk by chunk (with
    `use_stablemax`, of `log_stablemax` instead of log_softmax).

    hidden [T, H], weight [V, H], targets [T] (-100 = ignored), token_weights [T] (0 for
    ignored positions) -> (loss, nll, correct):
      loss     scalar (fp32, or fp64 for fp64 inputs) = sum_t token_weights_t * nll_t,
               differentiable w.r.t. hidden and weight;
      nll      [T] per-token negative log-likelihood (0 where ignored), no gradient;
      correct  [T] bool, the target has the highest logit (False where ignored).
    Under autocast the matmuls run in the autocast dtype; softmax statistics at least fp32.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, token_weights, use_stablemax)
    nll, correct, _, _, _ = _chunked(hidden, weight, targets, token_weights, False, False, use_stablemax)
    return (nll * token_weights).sum(), nll, correct


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, use_stablemax):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        nll, correct, grad_hidden, grad_weight, scale = _chunked(hidden, weight, targets, token_weights,
                                                                 want_hidden, want_weight, use_stablemax)
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(nll, correct)
        return (nll * token_weights).sum(), nll, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_correct):
        # scaled in place, in fp32: the buffers are this graph's own (a second backward through
        # it fails with autograd's in-place error instead of scaling twice)
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = scale * grad_loss
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(factor).to(ctx.dtypes[0])
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(factor).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None


def _chunked(hidden, weight, targets, token_weights, want_hidden: bool, want_weight: bool, use_stablemax: bool):
    """The loop over row chunks.

    Returns nll, correct, and the gradients of sum_t token_weights_t * nll_t divided by `scale`
    (the largest token weight) with `scale`. The matmuls see w / scale <= 1 times
    (softmax - one_hot), values of order one: with fp16 operands, the token weights themselves
    (1 / tokens) would flush the small gradients to zero before any loss scaling could apply.
    The gradients are kept in fp32 (at least) until backward applies `scale` and the incoming
    gradient.
    """
    T = hidden.shape[0]
    stat_dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32
    nll = torch.empty(T, dtype=stat_dtype, device=hidden.device)
    correct = torch.empty(T, dtype=torch.bool, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=stat_dtype, device=hidden.device) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=stat_dtype) if want_weight else None
    scale = token_weights.abs().amax().to(stat_dtype).clamp(min=torch.finfo(stat_dtype).tiny)  # no host sync
    rows = chunk_rows(weight.shape[0], hidden.device)
    for start in range(0, T, rows):
        chunk = slice(start, start + rows)
        h, t = hidden[chunk], targets[chunk]  # [c, H], [c]
        logits = (h @ weight.T).to(stat_dtype)  # [c, V]; a fresh buffer, overwritten below
        valid = t != -100
        safe = torch.where(valid, t, 0)[:, None]  # [c, 1]: an index gather/scatter accept
        target_logit = logits.gather(1, safe).squeeze(1)  # [c]
        top = logits.amax(dim=-1, keepdim=True)  # [c, 1]
        correct[chunk] = valid & (target_logit == top.squeeze(1))  # the target has the top logit
        want_grad = want_hidden or want_weight
        if use_stablemax:
            grad = _stablemax_nll(logits, safe, valid, nll, chunk, want_grad)
        else:
            # softmax in place (no temporaries the size of the chunk): exp(logits - max) / sum
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)  # [c, 1]
            nll[chunk] = torch.where(valid, (top + total.log()).squeeze(1) - target_logit, 0.0)
            if want_grad:  # d nll / d logits = softmax - one_hot
                grad = probs.div_(total)
                grad.scatter_add_(1, safe, -valid.to(stat_dtype)[:, None])
        if want_grad:
            w = (token_weights[chunk] * valid).to(stat_dtype)[:, None] / scale  # [c, 1]; ignored rows get 0
            grad = grad.mul_(w).to(weight.dtype)  # the cast is a no-op in fp32 and under autocast
            if want_hidden:
                grad_hidden[chunk] = grad @ weight  # [c, H]
            if want_weight:
                grad_weight += grad.T @ h  # [V, H]
    return nll, correct, grad_hidden, grad_weight, scale


def _stablemax_nll(logits, safe, valid, nll, chunk, want_grad: bool):
    """One chunk of the stable-max loss: fills nll[chunk] = log sum s(x) - log s(x_target) and returns
    d nll / d logits [c, V] (None without `want_grad`). With s'(x) = 1 for x >= 0 and s(x)^2 below,
    the gradient is s'(x) / sum s - one_hot * s'(x_t) / s(x_t)."""
    s = stablemax(logits)  # [c, V]
    total = s.sum(dim=-1, keepdim=True)  # [c, 1]
    target_s = s.gather(1, safe)  # [c, 1]
    nll[chunk] = torch.where(valid, (total.log() - target_s.log()).squeeze(1), 0.0)
    if not want_grad:
        return None
    positive = logits >= 0
    grad = torch.where(positive, 1.0, s * s).div_(total)  # [c, V]
    target_term = torch.where(positive.gather(1, safe), 1 / target_s, target_s)  # s'(x_t) / s(x_t), [c, 1]
    return grad.scatter_add_(1, safe, -(valid[:, None] * target_term))
