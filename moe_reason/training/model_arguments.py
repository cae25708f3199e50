"""Which model to train: a preset, its type, where its weights start, and any config field overridden.

Every field of the model configs is a field here, written out so that readers and type checkers see it;
its help is the config docstring's entry for it (one source: `configuration_moe_reason.py` and
`configuration_recursive.py`), and a test holds the two lists of fields equal.
"""

import dataclasses
import functools
import re
from dataclasses import dataclass, field

from ..models.configuration_moe_reason import PRESETS, MoEReasonConfig, check_preset, require
from ..models.configuration_recursive import RecursiveMoEReasonConfig

MODEL_TYPES = ("base", "recursive")


@functools.cache
def config_help() -> dict[str, str]:
    """{field: its `name (`type`): text` entry} from the config docstrings, the recursive config's last."""
    helps = {}
    for config_class in (MoEReasonConfig, RecursiveMoEReasonConfig):
        current = None
        for line in (config_class.__doc__ or "").splitlines():
            match = re.match(r"\s+(\w+) \(`[^`]*`\): (.*)", line)
            if match:
                current = match.group(1)
                helps[current] = match.group(2).strip()
            elif current and line.strip():
                helps[current] += " " + line.strip()
            else:
                current = None
    return helps


def model_field(name: str):
    """A config field as an argument: None keeps the preset's value."""
    return field(default=None, metadata={"help": f"[model] {config_help().get(name, name)} Default: the preset's "
                                                 "value."})


@dataclass
class ModelArguments:
    """Which model to train: a preset plus any config field overridden (None keeps the preset's)."""

    model_preset: str = field(default="small", metadata={"help": f"Model size preset: one of {sorted(PRESETS)}."})
    model_type: str = field(default="base", metadata={"help": (
        "'base': the MoE causal LM; 'recursive': its recursive-reasoning subclass.")})
    init_from: str | None = field(default=None, metadata={"help": (
        "Start from the weights of a saved model folder (from_pretrained) instead of random init.")})
    lora_rank: int = field(default=0, metadata={"help": (
        "Fine-tune the --init_from model with peft LoRA of this rank on attention, the shared experts and every "
        "routed expert (moe_reason/training/lora.py); only the adapters train, and the exports are the merged "
        "model. 0: train every weight.")})
    lora_alpha: float | None = field(default=None, metadata={"help": (
        "LoRA scale numerator: updates are scaled by lora_alpha / lora_rank. Default: 2 x lora_rank.")})
    # MoEReasonConfig
    vocab_size: int | None = model_field("vocab_size")
    hidden_size: int | None = model_field("hidden_size")
    intermediate_size: int | None = model_field("intermediate_size")
    num_hidden_layers: int | None = model_field("num_hidden_layers")
    num_attention_heads: int | None = model_field("num_attention_heads")
    num_key_value_heads: int | None = model_field("num_key_value_heads")
    num_experts: int | None = model_field("num_experts")
    num_experts_per_tok: int | None = model_field("num_experts_per_tok")
    expert_activation: str | None = model_field("expert_activation")
    num_shared_experts: int | None = model_field("num_shared_experts")
    norm_topk_prob: bool | None = model_field("norm_topk_prob")
    router_aux_loss_coef: float | None = model_field("router_aux_loss_coef")
    load_balancing: str | None = model_field("load_balancing")
    router_bias_update_rate: float | None = model_field("router_bias_update_rate")
    router_z_loss_coef: float | None = model_field("router_z_loss_coef")
    router_jitter_noise: float | None = model_field("router_jitter_noise")
    hidden_dropout: float | None = model_field("hidden_dropout")
    attention_dropout: float | None = model_field("attention_dropout")
    scale_embeddings: bool | None = model_field("scale_embeddings")
    tie_word_embeddings: bool | None = model_field("tie_word_embeddings")
    max_position_embeddings: int | None = model_field("max_position_embeddings")
    rope_theta: float | None = model_field("rope_theta")
    rms_norm_eps: float | None = model_field("rms_norm_eps")
    initializer_range: float | None = model_field("initializer_range")
    use_cache: bool | None = model_field("use_cache")
    bidirectional: bool | None = model_field("bidirectional")
    token_mixer: str | None = model_field("token_mixer")
    token_mlp_expansion: int | None = model_field("token_mlp_expansion")
    stablemax_loss: bool | None = model_field("stablemax_loss")
    pad_token_id: int | None = model_field("pad_token_id")
    bos_token_id: int | None = model_field("bos_token_id")
    eos_token_id: int | None = model_field("eos_token_id")
    # RecursiveMoEReasonConfig
    h_cycles: int | None = model_field("h_cycles")
    l_cycles: int | None = model_field("l_cycles")
    halt_max_steps: int | None = model_field("halt_max_steps")
    halt_exploration_prob: float | None = model_field("halt_exploration_prob")
    use_act: bool | None = model_field("use_act")
    recursion_gradient: str | None = model_field("recursion_gradient")
    act_loss_coef: float | None = model_field("act_loss_coef")
    halt_target: str | None = model_field("halt_target")
    halt_quantile: float | None = model_field("halt_quantile")
    halt_target_accuracy: float | None = model_field("halt_target_accuracy")
    input_norm: bool | None = model_field("input_norm")
    eval_halting: str | None = model_field("eval_halting")
    eval_halt_threshold: float | None = model_field("eval_halt_threshold")
    supervision_updates: str | None = model_field("supervision_updates")

    def __post_init__(self):
        check_preset(self.model_preset)
        require(self, "model_type", self.model_type in MODEL_TYPES, f"one of {MODEL_TYPES}")
        require(self, "lora_rank", self.lora_rank >= 0, "0 (no LoRA) or a positive rank")
        require(self, "lora_rank", self.lora_rank == 0 or self.init_from is not None,
                "0 without --init_from: LoRA adapts a trained model, so name it with --init_from DIR")
        require(self, "lora_alpha", self.lora_alpha is None or (self.lora_rank > 0 and self.lora_alpha > 0),
                "positive, and given only with --lora_rank")

    def overrides(self) -> dict:
        """Model fields given explicitly (not None) -> {field: value}."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in CHOICE_FIELDS and v is not None}


CHOICE_FIELDS = ("model_preset", "model_type", "init_from", "lora_rank", "lora_alpha")  # not config fields
