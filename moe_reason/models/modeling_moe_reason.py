"""moe_reason: a decoder-only mixture-of-experts causal LM in the transformers mould.

Read top to bottom: norm and rotary embeddings, attention, router, experts and the
MoE block, the decoder layer, the model, the router losses, the causal LM.

This file is copied next to saved models for `trust_remote_code=True` loading, with
the files it imports from this package: its configuration, the experts' kernels
(`expert_kernels.py`) and the chunked loss (`chunked_loss.py`). Beyond those it needs
torch and transformers only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .chunked_loss import linear_cross_entropy, log_stablemax
from .configuration_moe_reason import MoEReasonConfig
from .expert_kernels import expert_activation, grouped_mm

# ----------------------------------------------------------------------------
# Norm and rotary position embeddings


class MoEReasonRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel (one kernel on GPU); it accumulates bf16 inputs in fp32
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MoEReasonRotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embeddings, computed from positions on every call.

    No buffer: the frequencies are a pure function of the config, so nothing can be
    stale after `from_pretrained` on the meta device, and the cost is one tiny kernel
    per forward (the tables are shared by all layers).
    """

    def __init__(self, config: MoEReasonConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)  # [D/2]
        freqs = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D] -> rotated q, k."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------
# Attention


class MoEReasonAttention(nn.Module):
    """Causal self-attention (bidirectional with `config.bidirectional`) with rotary embeddings and
    grouped-query heads.

    Q, K and V come from one fused projection (one matmul instead of three). The
    kernel is transformers' attention interface chosen by `config._attn_implementation`
    (SDPA by default), which handles padding masks, GQA and the KV cache layout.
    """

    def __init__(self, config: MoEReasonConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' kernels
        self.scaling = self.head_dim**-0.5
        self.is_causal = not config.bidirectional
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, position_embeddings, attention_mask, cache: Cache | None = None, **kwargs):
        B, S, _ = x.shape
        qkv = self.qkv_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # [B, Hq + 2 Hkv, S, D]
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, S_past + S, D]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sdpa_attention_forward)
        out, _ = attention(
            self, q, k, v, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # [B, S, Hq, D]
        return self.o_proj(out.reshape(B, S, -1))


class MoEReasonTokenMLP(nn.Module):
    """TRM's MLP token mixer for fixed-size grids, in place of attention (`token_mixer="mlp"`): a SwiGLU
    across the positions, the same for every channel. Every position sees every other (bidirectional), so
    it serves the grid formulation only, on inputs of exactly `max_position_embeddings` positions
    without padding; positions need no rotary embedding, the weights know them."""

    def __init__(self, config: MoEReasonConfig):
        super().__init__()
        positions = config.max_position_embeddings
        self.gate_up_proj = nn.Linear(positions, 2 * config.token_mlp_expansion * positions, bias=False)
        self.down_proj = nn.Linear(config.token_mlp_expansion * positions, positions, bias=False)

    def forward(self, x, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if x.shape[1] != self.down_proj.out_features:
            raise ValueError(f"the MLP token mixer takes exactly max_position_embeddings={self.down_proj.out_features} "
                             f"positions, got {x.shape[1]}")
        gate, up = self.gate_up_proj(x.transpose(1, 2)).chunk(2, dim=-1)  # [B, H, e*S] each
        return self.down_proj(F.silu(gate) * up).transpose(1, 2)  # [B, S, H]


# ----------------------------------------------------------------------------
# Router, experts and the MoE block (their kernels: expert_kernels.py)


class MoEReasonRouter(nn.Module):
    """Linear router: softmax over experts, top-k, optional renormalisation and jitter."""

    def __init__(self, config: MoEReasonConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.uses_router_bias():  # DeepSeek-V3's balancing bias: state, not a parameter (no gradient)
            self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)

    def forward(self, x: torch.Tensor):
        """x [T, H] -> router logits [T, E] (fp32), top-k weights [T, k] (fp32), top-k experts [T, k].

        With the balancing bias, the experts are the top k of probability + bias, and their weights the
        probabilities alone: the bias steers the choice, never the mixture."""
        if self.training and self.jitter_noise > 0:
            # multiplicative noise on the router input only: the experts see the clean tokens
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight).float()
        probs = logits.softmax(dim=-1)
        if hasattr(self, "expert_bias"):
            experts = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices  # [T, k]
            weights = probs.gather(-1, experts)
        else:
            weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """counts [E]: tokens each expert got. Under-loaded experts' biases go up by `rate`, over-loaded ones' down."""
        self.expert_bias += rate * torch.sign(counts.float().mean() - counts.float()).to(self.expert_bias.device)


class MoEReasonExperts(nn.Module):
    """All experts of one layer as stacked [E, in, out] tensors.

    `up_proj` maps hidden -> intermediate (twice the width for SwiGLU: gate half then up
    half), `down_proj` maps intermediate -> hidden.
    """

    def __init__(self, config: MoEReasonConfig, num_experts: int | None = None):
        super().__init__()
        self.num_experts = config.num_experts if num_experts is None else num_experts
        self.gated = config.expert_activation == "swiglu"
        width = config.intermediate_size * (2 if self.gated else 1)
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, width))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.intermediate_size, config.hidden_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] grouped by expert, counts [E] -> [N, H]."""
        h = grouped_mm(x, self.up_proj, counts)  # [N, I] or [N, 2I]
        h = expert_activation(h, self.gated)  # [N, I]
        return grouped_mm(h, self.down_proj, counts)  # [N, H]


class MoEReasonMLP(nn.Module):
    """Dense MLP with the experts' activation: the always-on shared experts."""

    def __init__(self, config: MoEReasonConfig, intermediate_size: int):
        super().__init__()
        self.gated = config.expert_activation == "swiglu"
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size * (2 if self.gated else 1), bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        return self.down_proj(expert_activation(h, self.gated))


class MoEReasonSparseMoeBlock(nn.Module):
    """Dropless top-k MoE: every token reaches all of its k experts.

    Dispatch: the T*k (token, slot) assignments are sorted by expert, the experts run as
    grouped matmuls over contiguous rows, and the outputs are put back in (token, slot)
    order and summed with the router weights. No Python loop over experts, no boolean
    masks, no host sync on the grouped path.
    """

    def __init__(self, config: MoEReasonConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = MoEReasonRouter(config)
        self.experts = MoEReasonExperts(config)
        self.shared_experts = (
            MoEReasonMLP(config, config.intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0 else None
        )

    def forward(self, hidden_states: torch.Tensor):
        """[B, S, H] -> output [B, S, H], router logits [B*S, E], chosen experts [B*S, k]."""
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)  # [T, H]
        router_logits, weights, experts = self.router(x)
        out = self.dispatch(x, weights, experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(B, S, H), router_logits, experts

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/experts [T, k] -> weighted sum of expert outputs [T, H]."""
        T, H = x.shape
        flat = experts.reshape(-1)  # [T*k], assignment i belongs to token i // k
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # [E]; scatter_add, not bincount, to avoid a host sync
        # index_select rather than x[...]: its backward (index_add) is several times faster on CPU
        y_sorted = self.run_experts(x.index_select(0, order // self.top_k), counts)  # [T*k, H]
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to (token, slot) order
        return (y.view(T, self.top_k, H) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts over assignments grouped by expert; expert parallelism overrides this."""
        return self.experts(x_sorted, counts)


# ----------------------------------------------------------------------------
# Decoder layer and model


class MoEReasonDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + mix(norm(x)), then x + moe(norm(x)), dropout on each branch. The token mixer is
    attention (`self_attn`), or TRM's MLP across positions (`token_mlp`) with `token_mixer="mlp"`."""

    def __init__(self, config: MoEReasonConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MoEReasonRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.token_mixer == "mlp":
            self.token_mlp = MoEReasonTokenMLP(config)
        else:
            self.self_attn = MoEReasonAttention(config, layer_idx)
        self.post_attention_layernorm = MoEReasonRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEReasonSparseMoeBlock(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        mixer = self.token_mlp if hasattr(self, "token_mlp") else self.self_attn
        mixed = mixer(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + self.dropout(mixed)
        moe, router_logits, experts = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.dropout(moe), router_logits, experts


@dataclass
class MoEReasonModelOutput(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the experts each token chose in each layer."""

    selected_experts: tuple[torch.LongTensor, ...] | None = None


@torch.compiler.disable  # traced, the ids' min/max would become guards and recompile every step
def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one pass over the ids
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range: ids must be in [0, vocab_size={vocab_size})")


class MoEReasonPreTrainedModel(PreTrainedModel):
    config_class = MoEReasonConfig
    config: MoEReasonConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEReasonDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _can_compile_fullgraph = False  # the token-id check runs eagerly (see check_token_ids)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The one place weights are initialised.

        - every matrix (embeddings, attention, router, experts, LM head): N(0, initializer_range);
        - the projections that write into the residual stream (attention `o_proj`, expert and
          shared-expert `down_proj`): N(0, initializer_range / sqrt(2 * num_hidden_layers)),
          as in GPT-2, so the residual stream's variance does not grow with depth;
        - RMSNorm weights: 1.
        Modules are visited children first, so the residual rescaling below wins.
        """
        std = self.config.initializer_range
        residual_std = std / (2 * self.config.num_hidden_layers) ** 0.5
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoEReasonRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoEReasonRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoEReasonExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=residual_std)
        if isinstance(module, MoEReasonAttention):
            init.normal_(module.o_proj.weight, mean=0.0, std=residual_std)
        elif isinstance(module, (MoEReasonMLP, MoEReasonTokenMLP)):
            init.normal_(module.down_proj.weight, mean=0.0, std=residual_std)


class MoEReasonModel(MoEReasonPreTrainedModel):
    """Embedding, decoder stack and final norm; `MoEReasonForCausalLM` adds the LM head."""

    def __init__(self, config: MoEReasonConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5 if config.scale_embeddings else 1.0
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.rotary_emb = MoEReasonRotaryEmbedding(config)
        self.layers = nn.ModuleList(MoEReasonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoEReasonRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token ids [B, S] -> scaled, dropped-out embeddings [B, S, H]."""
        if input_ids.device.type == "cpu" and input_ids.numel() > 0:
            # a clear error instead of an IndexError; on accelerators this would cost a sync
            # per step, so there the data pipeline checks ids once when it prepares them
            check_token_ids(input_ids, self.config.vocab_size)
        return self.embed_dropout(self.embed_tokens(input_ids) * self.embed_scale)

    def prepare_positions(self, inputs_embeds, attention_mask, position_ids, cache):
        """Position ids, the (cos, sin) tables and the 4-D causal (or bidirectional) padding mask for one forward."""
        past = cache.get_seq_length() if cache is not None else 0
        if past + inputs_embeds.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + inputs_embeds.shape[1]} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        if self.config.bidirectional:
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask)
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      cache=cache, position_ids=position_ids)
        return self.rotary_emb(position_ids, inputs_embeds.dtype), mask

    def decode(self, hidden_states, position_embeddings, mask, cache=None, output_hidden_states=False,
               **kwargs):
        """Run the decoder stack (no final norm) -> hidden [B, S, H], router logits, experts, all hidden states."""
        all_hidden, router_logits, experts = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, logits, chosen = layer(hidden_states, position_embeddings, mask,
                                                  cache=cache, **kwargs)
            router_logits.append(logits)
            experts.append(chosen)
        return hidden_states, tuple(router_logits), tuple(experts), all_hidden

    @deprecate_kwarg("past_key_values", "6.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> MoEReasonModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        position_embeddings, mask = self.prepare_positions(inputs_embeds, attention_mask, position_ids, cache)
        hidden, router_logits, experts, all_hidden = self.decode(
            inputs_embeds, position_embeddings, mask, cache, output_hidden_states, **kwargs)
        hidden = self.norm(hidden)
        return MoEReasonModelOutput(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) + (hidden,) if output_hidden_states else None,
            router_logits=router_logits,
            selected_experts=experts,
        )


# ----------------------------------------------------------------------------
# Router losses and expert statistics


def load_balancing_loss(router_logits, selected_experts, num_experts: int, token_mask=None) -> torch.Tensor:
    r"""Switch-Transformer load-balancing loss, averaged over layers.

    For one layer with T tokens, E experts and top-k routing:

        f_e = #{(t, j) : expert(t, j) = e} / (T * k)     share of the T*k assignments sent to e
        P_e = (1 / T) * sum_t softmax(logits_t)_e          mean router probability of e
        L   = E * sum_e f_e * P_e

    Dividing by k makes f a distribution, so L = 1 for perfectly uniform routing whatever k
    is. transformers' `load_balancing_loss_func` (Mixtral, Qwen-MoE) omits the 1/k and pools
    counts over layers before multiplying: for each layer, its value is exactly k * L.
    Padding tokens (token_mask == 0) are left out of both f and P.

    router_logits / selected_experts: one [T, E] / [T, k] tensor per layer; token_mask [T] or None.
    """
    losses = []
    for logits, chosen in zip(router_logits, selected_experts):
        probs = logits.float().softmax(dim=-1)  # [T, E]
        mask = torch.ones_like(probs[:, 0]) if token_mask is None else token_mask.to(probs.dtype)  # [T]
        k = chosen.shape[-1]
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), mask.repeat_interleave(k))  # [E]
        tokens = mask.sum().clamp(min=1.0)
        f = counts / (tokens * k)
        p = (probs * mask[:, None]).sum(0) / tokens
        losses.append(num_experts * (f * p).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits, token_mask=None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2, averaged over layers."""
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).pow(2)  # [T]
        if token_mask is None:
            losses.append(z.mean())
        else:
            mask = token_mask.to(z.dtype)
            losses.append((z * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(losses).mean()


def next_token_targets(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """labels [B, S] -> the label each position predicts [B, S]; the last position predicts nothing (-100).

    The labels are shifted rather than the logits: slicing [B, S, V] logits would cost a copy
    forward and a zero-filled one backward. Without `shift` (the grid formulation, see
    `config.bidirectional`) each position predicts its own label.
    """
    return F.pad(labels[:, 1:], (0, 1), value=-100) if shift else labels


def sequence_sums(nll: torch.Tensor, valid: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per-token nll / valid / correct [B, S] -> per sequence [B, 3]: NLL sum, labelled positions, right ones."""
    return torch.stack([(nll * valid).sum(1), valid.sum(1).float(), (correct & valid).sum(1).float()], dim=1)


def next_token_statistics(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True,
                          use_stablemax: bool = False) -> torch.Tensor:
    """Per sequence [B, 3]: summed next-token NLL (fp32), labelled positions, right argmax predictions.

    logits [B, S, V] predict labels shifted by one (unless not `shift`); positions labelled -100 are left out.
    The NLL is of log_softmax, or with `use_stablemax` of `log_stablemax` (config.stablemax_loss).
    """
    B, S, V = logits.shape
    targets = next_token_targets(labels, shift)  # [B, S]
    valid = targets != -100
    log_probs = log_stablemax(logits.float()) if use_stablemax else F.log_softmax(logits.float(), dim=-1)
    nll = F.nll_loss(log_probs.reshape(-1, V), targets.reshape(-1), ignore_index=-100,
                     reduction="none").view(B, S)  # 0 where ignored
    return sequence_sums(nll, valid, logits.argmax(-1) == targets)


def next_token_loss(lm_head: "MoEReasonLMHead", hidden: torch.Tensor, labels: torch.Tensor,
                    per_sequence: bool = False, num_items_in_batch=None, shift: bool = True):
    """The training loss straight from the hidden states: the [B, S, V] logits are never formed.

    hidden [B, S, H], labels [B, S] (unshifted; -100 is ignored) -> (loss, statistics):
      loss  the next-token NLL summed over labelled positions and divided by their number in the
            batch (or `num_items_in_batch`, for gradient accumulation), or with `per_sequence`, the
            sum over sequences of each one's mean NLL;
      statistics [B, 3] as `next_token_statistics`, without gradient.
    """
    B, S, H = hidden.shape
    targets = next_token_targets(labels, shift)  # [B, S]
    valid = targets != -100
    if per_sequence:
        denominator = valid.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    else:
        denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    token_weights = (valid / denominator).float()  # [B, S]
    loss, nll, correct = lm_head(hidden.reshape(-1, H), targets.reshape(-1), token_weights.reshape(-1))
    return loss, sequence_sums(nll.view(B, S), valid, correct.view(B, S))


def expert_load(selected_experts, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert in each layer -> [L, E] (float, no gradient)."""
    with torch.no_grad():
        return torch.stack([
            torch.zeros(num_experts, device=chosen.device).scatter_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=chosen.device))
            for chosen in selected_experts
        ])


# ----------------------------------------------------------------------------
# Causal LM


@dataclass
class MoEReasonCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the parts of the loss and the expert load.

    `loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` + router_z_loss_coef * `z_loss`.
    `expert_load` [L, E] counts the tokens routed to each expert in each layer.
    """

    lm_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None


class MoEReasonLMHead(nn.Linear):
    """The output projection hidden -> vocabulary logits.

    Called with `targets` (and per-token weights), it returns the weighted next-token loss
    computed chunk by chunk instead of the logits (`chunked_loss.linear_cross_entropy`). That is
    still a call of this module, so ZeRO-3 gathers the weight for it as for any layer.
    """

    def __init__(self, hidden_size: int, vocab_size: int, use_stablemax: bool = False, **factory_kwargs):
        super().__init__(hidden_size, vocab_size, bias=False, **factory_kwargs)
        self.use_stablemax = use_stablemax  # config.stablemax_loss

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None):
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, token_weights, self.use_stablemax)


class MoEReasonForCausalLM(MoEReasonPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEReasonConfig):
        super().__init__(config)
        self.model = MoEReasonModel(config)
        self.lm_head = MoEReasonLMHead(config.hidden_size, config.vocab_size,
                                       use_stablemax=config.stablemax_loss)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        """Keep the head a `MoEReasonLMHead`: `resize_token_embeddings` hands in a plain nn.Linear."""
        if not isinstance(new_embeddings, MoEReasonLMHead):
            if new_embeddings.bias is not None:
                raise ValueError("the LM head has no bias; got an output projection with one")
            head = MoEReasonLMHead(new_embeddings.in_features, new_embeddings.out_features,
                                   use_stablemax=self.config.stablemax_loss, device="meta")
            head.weight = new_embeddings.weight
            new_embeddings = head
        self.lm_head = new_embeddings

    def router_losses(self, router_logits, selected_experts, attention_mask):
        """(aux loss, z-loss), each None when its coefficient is 0."""
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            seq = router_logits[0].shape[0] // attention_mask.shape[0]
            token_mask = attention_mask[:, -seq:].reshape(-1)  # this forward's tokens, not the cached ones
        aux = z = None
        if self.config.uses_aux_loss():
            aux = load_balancing_loss(router_logits, selected_experts, self.config.num_experts, token_mask)
        if self.config.router_z_loss_coef > 0:
            z = router_z_loss(router_logits, token_mask)
        return aux, z

    @torch.no_grad()
    def update_router_biases(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's rule, once per optimizer step: load [L, E] is the tokens each expert got in the step, over
        every micro-batch and every rank (the same on every rank, so the biases stay equal); each expert's bias
        moves by router_bias_update_rate towards balance (up below the layer's mean load, down above it)."""
        for router, counts in zip(self.routers(), load):
            router.update_bias(counts, self.config.router_bias_update_rate)

    def routers(self) -> list["MoEReasonRouter"]:
        """Each layer's router, in layer order."""
        return [m for m in self.modules() if isinstance(m, MoEReasonRouter)]

    def combine_losses(self, lm_loss, aux, z):
        """Total training loss from its parts (None parts are skipped)."""
        loss = lm_loss
        if aux is not None:
            loss = loss + self.config.router_aux_loss_coef * aux
        if z is not None:
            loss = loss + self.config.router_z_loss_coef * z
        return loss

    def generate(self, *args, **kwargs):
        if self.config.bidirectional:
            raise ValueError("generate does not apply to a grid model (config.bidirectional=True): it predicts every "
                             "cell of the answer in one forward. Take the argmax of model(input_ids).logits, or "
                             "run moe-reason-evaluate --model_path DIR --task ...")
        return super().generate(*args, **kwargs)

    @deprecate_kwarg("past_key_values", "6.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep: int = 0, **kwargs) -> MoEReasonCausalLMOutput:
        """Labels are the inputs (shifted here, unless `config.bidirectional`); positions labelled -100 are ignored.

        In training mode with labels, only the loss is needed: it is computed from the hidden
        states chunk by chunk (`next_token_loss`) and `logits` is None. The [B, S, V] logits, their
        log-softmax and their gradient are never formed (1.6 GB each in fp32 at exp8's batch).
        Call in eval mode, or without labels, for the logits.
        """
        kwargs.pop("return_dict", None)
        kwargs.pop("output_attentions", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, **kwargs)
        hidden = out.last_hidden_state if logits_to_keep == 0 else out.last_hidden_state[:, -logits_to_keep:]
        aux, z = self.router_losses(out.router_logits, out.selected_experts, attention_mask)
        logits = lm_loss = loss = None
        shift = not self.config.bidirectional
        if labels is not None and self.training:
            lm_loss, _ = next_token_loss(self.lm_head, hidden, labels, num_items_in_batch=num_items_in_batch,
                                         shift=shift)
        else:
            logits = self.lm_head(hidden)  # [B, S, V]
            if labels is not None and shift and not self.config.stablemax_loss:
                lm_loss = self.loss_function(logits, labels, self.config.vocab_size,
                                             num_items_in_batch=num_items_in_batch)
            elif labels is not None:
                stats = next_token_statistics(logits, labels, shift, self.config.stablemax_loss)
                lm_loss = stats[:, 0].sum() / stats[:, 1].sum().clamp(min=1)
        if labels is not None:
            loss = self.combine_losses(lm_loss, aux, z)
        return MoEReasonCausalLMOutput(
            loss=loss,
            aux_loss=aux,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
            lm_loss=lm_loss,
            z_loss=z,
            expert_load=expert_load(out.selected_experts, self.config.num_experts),
        )
