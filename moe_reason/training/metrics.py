"""What training measures: FLOPs and MFU, expert load, the logged window of micro-batches, evaluation sums."""

import platform
import time
from pathlib import Path

import torch


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
    return (decoder_flops_per_token(config, seq_len) * (passes + 2 * grad_passes)
            + 3 * heads * head_flops_per_token(config))


def forward_passes(config) -> tuple[int, int, int]:
    """(decoder passes, of which with gradient, LM-head applications) in one training forward."""
    if not hasattr(config, "passes_per_step"):
        return 1, 1, 1
    steps = config.training_supervision_steps()
    return config.passes_per_step(), config.grad_passes_per_supervision_step() * steps, steps


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, max_size: int = 2048,
                       budget_s: float = 0.05) -> float:
    """Best FLOP/s of a square matmul on this device: the 'peak' MFU is stated against.

    The matrices grow from 256 to `max_size` while one matmul takes under `budget_s`: where the
    dtype has no fast kernel (bf16 on a CPU without AMX or AVX512-BF16 is emulated, hundreds of
    times slower than fp32) a full-size measurement would hold up the start for minutes.
    """
    # a private generator: drawing from the global RNG here would change dropout and routing noise
    generator = torch.Generator(device=device).manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        best = min(_timed_matmul(a, b) for _ in range(4))
        if size >= max_size or best > budget_s:
            return 2 * size**3 / best
        size *= 2


def machine(device: torch.device, num_processes: int = 1) -> str:
    """What runs a training loop, as a report names it beside its throughput: the GPU's name, or the CPU's model
    and torch's threads (CPUs of one kind differ several-fold: time is only comparable on one machine)."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        what = f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"
    else:
        what = device.type
    return what if num_processes == 1 else f"{num_processes} processes, each {what}"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def saved_activation_bytes(model, **inputs) -> int:
    """Bytes autograd keeps from one training forward of `model(**inputs)` until its backward: each storage
    once, the weights left out. It is what a step holds at its peak besides weights, gradients and optimizer
    state, counted the same on any device. Tensors a checkpointed region saves for itself are not counted:
    they are recomputed in backward, not held."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}  # data_ptr -> storage, kept alive here so that no address is reused while counting

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            held[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(storage.nbytes() for storage in held.values())


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    start = time.perf_counter()
    a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - start


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


def rank_load_summary(accelerator, rank_rows: torch.Tensor | None) -> dict:
    """Rows each rank's experts processed per layer (EP), gathered: imbalance across ranks in TensorBoard."""
    if rank_rows is None:
        return {}
    table = accelerator.gather(rank_rows.reshape(1, -1).float()).cpu()  # [world, L]
    record = {f"expert_parallel/rows_layer{layer}_rank{rank}": float(table[rank, layer])
              for rank in range(table.shape[0]) for layer in range(table.shape[1])}
    per_rank = table.sum(1)
    record["expert_parallel/rank_imbalance"] = float(per_rank.max() / per_rank.mean().clamp_min(1))
    return record


def any_nonfinite(accelerator, value: torch.Tensor) -> bool:
    """Whether `value` is NaN or infinite on any rank (every rank gets the same answer)."""
    bad = (~torch.isfinite(value.detach().float())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bool(bad.item() > 0)


class LogWindow:
    """What the micro-batches since the last log line add up to.

    Losses, recursion metrics and expert load are summed as tensors on the device, so a
    micro-batch costs no host sync; `record` averages losses and recursion metrics over
    processes once per log line and opens the next window.
    """

    LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss")
    # figures of whole rows that one forward does not finish (supervision_updates="per_step"): a ratio of two
    # window means, logged where some row finished in the window
    RATIOS = {"recursion_steps": ("finished_steps", "finished_rows"), "halt_rate": ("finished_early", "finished_rows")}

    def __init__(self, rows_per_layer=lambda: None):
        # rows_per_layer(): [L] rows this rank's experts took in the last forward (expert parallelism), or None
        self.rows_per_layer = rows_per_layer
        self.load = ExpertLoadMeter()
        self.restart()

    def restart(self) -> None:
        self.sums = {name: 0.0 for name in self.LOSSES}
        self.extra: dict[str, torch.Tensor] = {}  # recursion steps, halt rate, ...
        self.micro = self.skipped = 0
        self.rank_rows = None  # [L] rows this rank's experts processed per MoE layer (EP only)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation and checkpointing time is not training time."""
        self.tick = time.perf_counter()

    def add(self, output, nonfinite: bool) -> None:
        self.micro += 1
        if nonfinite:
            self.skipped += 1
            return
        self.sums["loss"] += output.loss.detach().float()
        self.sums["lm_loss"] += (output.lm_loss if output.lm_loss is not None else output.loss).detach().float()
        for name in ("aux_loss", "z_loss"):
            if getattr(output, name, None) is not None:
                self.sums[name] += getattr(output, name).detach().float()
        for name, value in (getattr(output, "training_metrics", None) or {}).items():
            if value is not None:
                self.extra[name] = self.extra.get(name, 0.0) + torch.as_tensor(value).detach().float()
        self.load.update(getattr(output, "expert_load", None))
        received = self.rows_per_layer()
        if received is not None:
            self.rank_rows = received if self.rank_rows is None else self.rank_rows + received

    def record(self, accelerator, tokens_per_micro_batch: int, flops_per_token: float, peak: float,
               **fields) -> dict:
        """The train/* record of this window (means over good micro-batches and processes); restarts."""
        elapsed = time.perf_counter() - self.tick
        good = max(self.micro - self.skipped, 1)
        tokens_per_s = tokens_per_micro_batch * self.micro / max(elapsed, 1e-9)
        # every rank reports the same names (the model's outputs), so the reductions pair up
        sums = {**self.sums, **dict(sorted(self.extra.items()))}
        record = {f"train/{name}": float(accelerator.reduce(torch.as_tensor(value, device=accelerator.device).float(),
                                                            "mean")) / good
                  for name, value in sums.items()}
        for name, (numerator, denominator) in self.RATIOS.items():
            if record.get(f"train/{denominator}", 0) > 0:
                record[f"train/{name}"] = record[f"train/{numerator}"] / record[f"train/{denominator}"]
        record.update({f"train/{name}": value for name, value in fields.items()})
        record.update({"train/tokens_per_s": tokens_per_s,
                       "train/mfu": tokens_per_s * flops_per_token / (peak * accelerator.num_processes),
                       "train/skipped_micro_batches": self.skipped,
                       **self.load.summary(), **rank_load_summary(accelerator, self.rank_rows)})
        self.restart()
        return record
