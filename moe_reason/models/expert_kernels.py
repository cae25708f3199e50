"""The experts' kernels: grouped matmuls over rows sorted by expert, and the expert activations.

Each has a hand-written backward (a custom op or an autograd Function), so they live here beside
the model rather than in it. Imported by `modeling_moe_reason.py` and copied with it next to saved
models for `trust_remote_code=True` loading: this file imports torch only.
"""

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool | None = None) -> torch.Tensor:
    """Per-expert matmul over rows already grouped by expert.

    x [N, in] (rows of expert 0, then expert 1, ...), w [E, in, out], counts [E] -> [N, out].
    `torch._grouped_mm` does all experts in one kernel with no padding. Where it is not
    available (old torch, CUDA before SM80 or outside bf16, strides not 16-byte aligned)
    the fallback runs one matmul per expert on its contiguous slice, which needs the
    counts on the host (one sync).

    The op has no autocast rule (torch 2.13), so under autocast both operands are cast to the
    autocast dtype here, as autocast casts any matmul's: without this, mixed-precision
    training on a GPU (fp32 weights, bf16 autocast) would miss the bf16 kernel.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if use_grouped is None:
        use_grouped = _grouped_mm_supported(x, w)
    if use_grouped:
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return _per_expert_mm(x, w, counts)


# The fallback is a custom op: torch.compile keeps it as one opaque node, so the graph does not
# break around the experts and the counts (read on the host inside) never become guards.
@torch.library.custom_op("moe_reason::per_expert_mm", mutates_args=())
def _per_expert_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, in] grouped by expert, w [E, in, out], counts [E] -> [N, out], one matmul per expert."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    sizes = counts.tolist()  # the one host sync
    for e, (x_e, out_e) in enumerate(zip(x.split(sizes), out.split(sizes))):
        torch.mm(x_e, w[e], out=out_e)
    return out


@torch.library.custom_op("moe_reason::per_expert_weight_grad", mutates_args=())
def _per_expert_weight_grad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, in], grad [N, out] grouped by expert -> [E, in, out]: each expert's x^T grad (0 without rows)."""
    out = x.new_empty(counts.shape[0], x.shape[-1], grad.shape[-1])
    sizes = counts.tolist()
    for e, (x_e, grad_e) in enumerate(zip(x.split(sizes), grad.split(sizes))):
        torch.mm(x_e.T, grad_e, out=out[e])  # an expert without rows gets zeros
    return out


@_per_expert_mm.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[-1])


@_per_expert_weight_grad.register_fake
def _(x, grad, counts):
    return x.new_empty(counts.shape[0], x.shape[-1], grad.shape[-1])


def _per_expert_mm_setup(ctx, inputs, output):
    x, w, counts = inputs
    ctx.save_for_backward(x, w, counts)


def _per_expert_mm_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad_x = _per_expert_mm(grad, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    grad_w = _per_expert_weight_grad(x, grad, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_per_expert_mm.register_autograd(_per_expert_mm_backward, setup_context=_per_expert_mm_setup)


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    aligned = all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], w.shape[-1]))
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # the op's compile-time (fake tensor) rule accepts bf16 only (torch 2.13)
    if x.device.type == "cpu":  # bf16 too: the GPU's compiled path can then be traced and tested on a CPU
        return aligned and x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":  # the bf16 kernel: Hopper-only before torch 2.9, SM80+ since
        min_capability = (8, 0) if torch.__version__ >= "2.9" else (9, 0)
        return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= min_capability
    return False


class SwiGLU(torch.autograd.Function):
    """h = [gate | up] [N, 2I] -> silu(gate) * up [N, I], with a hand-written backward.

    h, the experts' up projection, is read by nothing else and is dead once this backward has
    run, so the backward writes the gradient into h's own buffer, as Liger-Kernel's SwiGLU does.
    Autograd would keep silu(gate) beside h and allocate three [N, I] temporaries and a fourth
    [N, 2I] buffer to concatenate the halves' gradients into. Here: one activation less per
    layer and one temporary, which matters most on a CPU, where each fresh buffer this large
    costs page faults. A second backward through the same graph fails with autograd's in-place
    error rather than reading the overwritten h.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        # the one temporary, silu(gate), is made a block of rows at a time: on a CPU a 2 MB
        # buffer the allocator reuses instead of a fresh [N, I] one; elsewhere one block
        rows = max(1, 2**19 // grad.shape[-1]) if h.device.type == "cpu" else h.shape[0]
        for h_block, grad_block in zip(h.split(rows), grad.split(rows)):
            gate, up = h_block.chunk(2, dim=-1)
            silu = F.silu(gate)
            up.mul_(grad_block)  # grad * up
            torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)  # d gate = grad * up * silu'(gate)
            torch.mul(silu, grad_block, out=up)  # d up = grad * silu(gate)
        return h


class SiLU(torch.autograd.Function):
    """silu(h) whose backward writes the gradient into h's buffer (see `SwiGLU` for why)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return F.silu(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=h)


def expert_activation(h: torch.Tensor, gated: bool) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] [N, 2I], or silu(h) of h [N, I] -> [N, I].

    `h` must be a fresh tensor no other operation reads (a projection's output): its buffer is
    reused for its gradient. Under torch.compile the plain ops are traced and fused instead.
    """
    if torch.compiler.is_compiling():
        if gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.silu(h)
    return SwiGLU.apply(h) if gated else SiLU.apply(h)
