"""Configuration of the moe_reason mixture-of-experts causal LM.

This file is copied next to saved checkpoints for `trust_remote_code=True`
loading, so it imports nothing from the rest of the package.
"""

import dataclasses
from typing import Any

from transformers import PretrainedConfig

# Named model sizes. `small` is the default offline run; `exp8` is the model of
# the Exp8 study this toolkit reproduces. Derived sizes (head_dim, ...) are
# always recomputed from these fields, never stored, so a preset with a smaller
# hidden_size cannot silently keep a larger feed-forward (an exp8 defect).
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128,
    ),
    "small": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
    "exp8": dict(
        vocab_size=49152, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, num_experts=4, num_experts_per_tok=2,
        expert_activation="silu", hidden_dropout=0.1, attention_dropout=0.1,
        tie_word_embeddings=True, scale_embeddings=True, max_position_embeddings=512,
    ),
}

EXPERT_ACTIVATIONS = ("silu", "swiglu")
TOKEN_MIXERS = ("attention", "mlp")
LOAD_BALANCING = ("aux_loss", "aux_free", "both")


class MoEReasonConfig(PretrainedConfig):
    r"""Configuration of [`MoEReasonForCausalLM`].

    Field names follow transformers' Mixtral/Qwen-MoE configs where they exist.

    Args:
        vocab_size (`int`): number of token ids the embedding and LM head cover.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): hidden width of *one* expert MLP (and of each shared expert).
        num_hidden_layers (`int`): number of decoder blocks.
        num_attention_heads (`int`): query heads; must divide `hidden_size`.
        num_key_value_heads (`int`): key/value heads (grouped-query attention); must divide
            `num_attention_heads`. Defaults to `num_attention_heads` (plain multi-head attention).
        num_experts (`int`): routed experts per MoE layer.
        num_experts_per_tok (`int`): experts each token is sent to (top-k), `1 <= k <= num_experts`.
        expert_activation (`str`): `"silu"`: plain MLP `down(silu(up(x)))` as in exp8;
            `"swiglu"`: gated MLP `down(silu(gate(x)) * up(x))` as in Mixtral/Qwen-MoE.
        num_shared_experts (`int`): always-on experts beside the routed ones (DeepSeek-MoE style),
            fused into one MLP of width `num_shared_experts * intermediate_size`; 0 disables them.
        norm_topk_prob (`bool`): renormalise the chosen top-k router probabilities to sum to 1.
        router_aux_loss_coef (`float`): weight of the load-balancing loss added to the LM loss;
            the loss is computed whenever this is > 0 and `load_balancing` is `"aux_loss"` or `"both"`.
        load_balancing (`str`): how the experts' load is balanced: `"aux_loss"` (the Switch/Mixtral
            auxiliary loss, weighted by `router_aux_loss_coef`), `"aux_free"` (DeepSeek-V3's bias, no
            auxiliary loss: each expert's bias is added to its router probability for the top-k *choice* only,
            never to the gate weights, and after each optimizer step moves by `router_bias_update_rate` up
            for an expert that got fewer tokens than the mean over the whole step and every rank, down for one
            that got more), or `"both"`.
        router_bias_update_rate (`float`): the bias's step with `"aux_free"` or `"both"` (DeepSeek-V3,
            torchtitan and Megatron-Core use 1e-3); 0 means no bias, which `"aux_loss"` requires.
        router_z_loss_coef (`float`): weight of the router z-loss (mean squared logsumexp of the
            router logits, ST-MoE); computed whenever this is > 0.
        router_jitter_noise (`float`): in training, router inputs are multiplied by noise drawn
            from U(1 - eps, 1 + eps) (Switch Transformer); 0 disables it.
        hidden_dropout (`float`): dropout on the embedding output and on each attention and MoE
            output before it joins the residual stream, in [0, 1).
        attention_dropout (`float`): dropout on attention probabilities, in [0, 1).
        scale_embeddings (`bool`): multiply token embeddings by sqrt(hidden_size) (exp8 does this).
        tie_word_embeddings (`bool`): share the LM head weight with the token embedding.
        max_position_embeddings (`int`): longest sequence the model is meant for; inputs longer
            than this are refused.
        rope_theta (`float`): base of the rotary position embedding frequencies.
        rms_norm_eps (`float`): epsilon of every RMSNorm.
        initializer_range (`float`): standard deviation of the normal weight initialisation.
        use_cache (`bool`): return key/value caches for fast generation.
        bidirectional (`bool`): the grid formulation of puzzle tasks (HRM/TRM): attention runs over the
            whole sequence in both directions and position i predicts label i (no shift). A puzzle's
            cells map to its answer's cells in one forward, so `generate` is refused; read the
            answer as the argmax of the logits. Requires `use_cache=False`.
        token_mixer (`str`): how positions exchange information in each layer: `"attention"` (the default)
            or `"mlp"`, TRM's MLP across positions for fixed-size grids (its best Sudoku model): a SwiGLU over
            the sequence dimension, shared by the channels. `"mlp"` needs `bidirectional=True` and inputs of
            exactly `max_position_embeddings` positions (a reasoning task's grid sets it).
        token_mlp_expansion (`int`): with `token_mixer="mlp"`, its hidden width as a multiple of the positions.
        stablemax_loss (`bool`): the loss's probabilities are TRM's stable-max, s(x) / sum s(x) with
            s(x) = x + 1 for x >= 0 and 1 / (1 - x) below, instead of softmax. It grows linearly where
            softmax grows exponentially, which TRM found stabler on small puzzle data. The argmax, and
            so every prediction, is the same either way.
    """

    model_type = "moe_reason"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    num_experts: int = 4
    num_experts_per_tok: int = 2
    expert_activation: str = "silu"
    num_shared_experts: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    load_balancing: str = "aux_loss"
    router_bias_update_rate: float = 0.0
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    scale_embeddings: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    bidirectional: bool = False
    token_mixer: str = "attention"
    token_mlp_expansion: int = 4
    stablemax_loss: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    def uses_router_bias(self) -> bool:
        """Whether the routers keep DeepSeek-V3's load-balancing bias."""
        return self.load_balancing in ("aux_free", "both")

    def every_parameter_learns(self) -> bool:
        """Whether every parameter receives a gradient at every training step (DDP expects that of each one)."""
        return True

    def uses_aux_loss(self) -> bool:
        return self.load_balancing in ("aux_loss", "both") and self.router_aux_loss_coef > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        """Raise `ValueError` naming the first invalid field and what is allowed."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            require(self, name, _is_int(getattr(self, name)) and getattr(self, name) > 0, "a positive integer")
        require(self, "num_experts", _is_int(self.num_experts) and self.num_experts >= 1, "an integer >= 1")
        require(self, "num_experts_per_tok",
                 _is_int(self.num_experts_per_tok) and 1 <= self.num_experts_per_tok <= self.num_experts,
                 f"an integer in [1, num_experts={self.num_experts}]")
        require(self, "hidden_size", self.hidden_size % self.num_attention_heads == 0,
                 f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(self, "num_key_value_heads", self.num_attention_heads % self.num_key_value_heads == 0,
                 f"a divisor of num_attention_heads={self.num_attention_heads}")
        require(self, "hidden_size", self.head_dim % 2 == 0,
                 "such that hidden_size / num_attention_heads is even (rotary embeddings rotate pairs)")
        require(self, "expert_activation", self.expert_activation in EXPERT_ACTIVATIONS,
                 f"one of {EXPERT_ACTIVATIONS}")
        require(self, "num_shared_experts", _is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
                 "an integer >= 0")
        for name in ("hidden_dropout", "attention_dropout"):
            require(self, name, 0.0 <= getattr(self, name) < 1.0, "a probability in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            require(self, name, getattr(self, name) >= 0.0, "a number >= 0")
        require(self, "router_jitter_noise", self.router_jitter_noise < 1.0, "a number in [0, 1)")
        require(self, "load_balancing", self.load_balancing in LOAD_BALANCING, f"one of {LOAD_BALANCING}")
        require(self, "router_bias_update_rate", self.router_bias_update_rate >= 0.0, "a number >= 0")
        require(self, "router_bias_update_rate", (self.router_bias_update_rate > 0) == self.uses_router_bias(),
                f"> 0 with load_balancing={self.load_balancing!r}" if self.uses_router_bias() else
                "0 with load_balancing='aux_loss' (the bias is aux_free's and both's)")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            require(self, name, getattr(self, name) > 0.0, "a number > 0")
        require(self, "token_mixer", self.token_mixer in TOKEN_MIXERS, f"one of {TOKEN_MIXERS}")
        require(self, "token_mixer", self.token_mixer == "attention" or self.bidirectional,
                "'attention' unless bidirectional=True (an MLP across positions lets each see the tokens after it)")
        require(self, "token_mlp_expansion", _is_int(self.token_mlp_expansion) and self.token_mlp_expansion >= 1,
                "an integer >= 1")
        require(self, "use_cache", not (self.bidirectional and self.use_cache),
                 "False with bidirectional=True (a grid model has no left-to-right decoding to cache)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            require(self, name, value is None or (_is_int(value) and 0 <= value < self.vocab_size),
                     f"None or a token id in [0, vocab_size={self.vocab_size})")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MoEReasonConfig":
        """Build a named preset (`debug`, `small`, `exp8`) with field overrides."""
        check_preset(name)
        # PretrainedConfig keeps unknown kwargs as attributes; a typo must not pass silently
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(cls.field_names())}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> set[str]:
        """The model fields this config defines (not the generic PretrainedConfig ones)."""
        base = {f.name for f in dataclasses.fields(PretrainedConfig)}
        return {f.name for f in dataclasses.fields(cls)} - base


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(ValueError):
    """An invalid setting (a config field or an argument): a user error, not a bug (`moe_reason.errors`)."""


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")


def require(obj, field: str, ok: bool, allowed: str) -> None:
    """Raise `ConfigError("Class.field=value is invalid: must be <allowed>")` unless `ok`.

    The one wording for invalid settings, shared by the configs and the argument dataclasses.
    """
    if not ok:
        raise ConfigError(f"{type(obj).__name__}.{field}={getattr(obj, field)!r} is invalid: must be {allowed}")
