"""Import and export of transformers' Mixtral models.

A moe_reason model is the same function as `MixtralForCausalLM` when its experts are
gated (SwiGLU), embeddings are not scaled, there are no shared experts or hidden
dropout, top-k probabilities are renormalised and routing has no jitter. Anything
else is refused with a `ValueError` that names the fields in the way.

The weights differ only in layout: our attention has one fused QKV projection and our
experts are stored [E, in, out]; Mixtral keeps q/k/v apart and stores experts [E, out, in].
The load-balancing coefficient is rescaled by k because Mixtral's aux loss is k times
ours (see `load_balancing_loss`), so the training loss keeps its meaning both ways.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from ..errors import UserError
from .configuration_moe_reason import MoEReasonConfig
from .modeling_moe_reason import MoEReasonForCausalLM

# fields whose value must be exactly this for the model to be Mixtral's function
_MIXTRAL_FUNCTION = {
    "expert_activation": "swiglu",
    "scale_embeddings": False,
    "num_shared_experts": 0,
    "hidden_dropout": 0.0,
    "norm_topk_prob": True,
    "router_jitter_noise": 0.0,
    "load_balancing": "aux_loss",  # Mixtral has no balancing bias
}


# The one name table, read in both directions: (our suffix, Mixtral's, stored transposed). Experts are
# [E, in, out] here and [E, out, in] there; names not listed are the same in both models.
_NAMES = (
    ("mlp.router.weight", "mlp.gate.weight", False),
    ("mlp.experts.up_proj", "mlp.experts.gate_up_proj", True),
    ("mlp.experts.down_proj", "mlp.experts.down_proj", True),
)
# our fused attention input projection, and Mixtral's three it is the concatenation of
_QKV = "self_attn.qkv_proj.weight"
_Q_K_V = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def to_mixtral(model: MoEReasonForCausalLM) -> MixtralForCausalLM:
    """Export to an equivalent `MixtralForCausalLM` (same logits)."""
    config = model.config
    blockers = [f"{name}={getattr(config, name)!r} (needs {want!r})"
                for name, want in _MIXTRAL_FUNCTION.items() if getattr(config, name) != want]
    if blockers:
        raise UserError("this model is not Mixtral's function, so it cannot be exported: " + ", ".join(blockers))
    mixtral_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef / config.num_experts_per_tok,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_dropout=config.attention_dropout, tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, sliding_window=None,
    )
    mixtral = MixtralForCausalLM(mixtral_config).to(model.dtype)
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(_QKV):  # one fused projection -> Mixtral's three
            state.update({name[: -len(_QKV)] + part: w for part, w in zip(_Q_K_V, tensor.split([q, kv, kv]))})
        else:
            state.update([_rename(name, tensor, to_mixtral=True)])
    mixtral.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return mixtral


def from_mixtral(model: MixtralForCausalLM) -> MoEReasonForCausalLM:
    """Import a `MixtralForCausalLM` as an equivalent `MoEReasonForCausalLM` (same logits)."""
    mc = model.config
    blockers = []
    if mc.hidden_act != "silu":
        blockers.append(f"hidden_act={mc.hidden_act!r} (needs 'silu')")
    if getattr(mc, "sliding_window", None) is not None:
        blockers.append(f"sliding_window={mc.sliding_window!r} (needs None)")
    if mc.head_dim not in (None, mc.hidden_size // mc.num_attention_heads):
        blockers.append(f"head_dim={mc.head_dim!r} (needs hidden_size / num_attention_heads)")
    rope = mc.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        blockers.append(f"rope_parameters={rope!r} (needs rope_type 'default')")
    if mc.router_jitter_noise:
        blockers.append(f"router_jitter_noise={mc.router_jitter_noise!r} "
                        "(needs 0: Mixtral's jitter also perturbs the experts' input)")
    if blockers:
        raise UserError("this Mixtral model cannot be imported as the same function: " + ", ".join(blockers))
    config = MoEReasonConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads, num_experts=mc.num_local_experts,
        num_experts_per_tok=mc.num_experts_per_tok,
        router_aux_loss_coef=mc.router_aux_loss_coef * mc.num_experts_per_tok,
        max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)), attention_dropout=float(mc.attention_dropout),
        tie_word_embeddings=mc.tie_word_embeddings, initializer_range=mc.initializer_range,
        pad_token_id=mc.pad_token_id, bos_token_id=mc.bos_token_id, eos_token_id=_single(mc.eos_token_id),
        **_MIXTRAL_FUNCTION,
    )
    ours = MoEReasonForCausalLM(config).to(model.dtype)
    source = model.state_dict()
    state = {}
    for name, tensor in source.items():
        if name.endswith(_Q_K_V[0]):  # Mixtral's three projections -> one fused
            prefix = name[: -len(_Q_K_V[0])]
            state[prefix + _QKV] = torch.cat([source[prefix + part] for part in _Q_K_V])
        elif not name.endswith(_Q_K_V[1:]):
            state.update([_rename(name, tensor, to_mixtral=False)])
    ours.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return ours


def _rename(name: str, tensor: torch.Tensor, to_mixtral: bool) -> tuple[str, torch.Tensor]:
    """One weight's name and layout in the other model, by `_NAMES` read in either direction."""
    for ours, theirs, transposed in _NAMES:
        source, target = (ours, theirs) if to_mixtral else (theirs, ours)
        if name.endswith(source):
            return name[: -len(source)] + target, tensor.transpose(1, 2) if transposed else tensor
    return name, tensor


def _single(token_id):
    """Mixtral allows a list of EOS ids; ours holds one (the first)."""
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id
