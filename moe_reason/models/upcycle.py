"""Sparse upcycling (Komatsuzaki et al.; Megatron's --moe-use-upcycling, OLMoE): a trained dense model becomes
an MoE whose every expert starts as a copy of the dense MLP, with a new router.

    moe-reason-upcycle outputs/dense/final outputs/upcycled --num_experts 8 --top_k 2

The dense model is ours with one expert (top-1), or a transformers Llama (`LlamaForCausalLM`, built or saved
locally), mapped by name as `convert.py` maps Mixtral. Why the first forward equals the dense model's: every
expert computes the dense MLP's function, and the chosen experts' gate weights are renormalised to sum to 1
(`norm_topk_prob`, which upcycling sets), so whatever the router chooses, the MoE block outputs
`sum_k w_k * mlp(x) = mlp(x)`. That holds for any top-k <= E and any router: the router is initialised like
any of ours (normal, `initializer_range`), so that tokens spread over the experts from the first step and
the copies can grow apart. Exact up to the rounding of that weighted sum (about 1e-7 in fp32); what differs
from the dense model at step 0 is only what it never had: the router's load-balancing and z-losses.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import MissingFileError, UserError
from .configuration_moe_reason import MoEReasonConfig
from .modeling_moe_reason import MoEReasonForCausalLM

# a Llama's per-layer names -> ours (q/k/v fuse into one projection; the MLP becomes the experts)
_LLAMA_SAME = ("self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def upcycle(dense, num_experts: int, top_k: int) -> MoEReasonForCausalLM:
    """A dense model (ours with one expert, or a transformers Llama) -> the MoE whose experts copy its MLP."""
    if not 1 <= top_k <= num_experts:
        raise UserError(f"--top_k {top_k} must be in [1, --num_experts {num_experts}]")
    if isinstance(dense, MoEReasonForCausalLM):
        config, state = from_ours(dense)
    elif dense.config.model_type == "llama":
        config, state = from_llama(dense)
    else:
        raise UserError(f"cannot upcycle a {dense.config.model_type!r} model: give one of ours with one expert "
                        "(--num_experts 1 --num_experts_per_tok 1) or a Llama")
    config.update({"num_experts": num_experts, "num_experts_per_tok": top_k, "norm_topk_prob": True})
    moe = MoEReasonForCausalLM(MoEReasonConfig(**config)).to(next(dense.parameters()).dtype)
    for name, tensor in moe.state_dict().items():
        if name.endswith(("mlp.experts.up_proj", "mlp.experts.down_proj")):
            state[name] = state[name].expand_as(tensor).clone()  # [1, in, out] -> every expert the same
        elif name.endswith(("mlp.router.weight", "mlp.router.expert_bias")):
            state[name] = tensor  # the new router, as initialised
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config["tie_word_embeddings"] and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"the dense weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return moe


def from_ours(dense: MoEReasonForCausalLM) -> tuple[dict, dict]:
    """Our dense model's config fields and weights (its one expert, shape [1, ...], is the MLP)."""
    config = dense.config
    if config.num_experts != 1 or config.num_experts_per_tok != 1:
        raise UserError(f"the model to upcycle has num_experts={config.num_experts} and num_experts_per_tok="
                        f"{config.num_experts_per_tok}: a dense model of ours has one expert, top-1")
    fields = {name: getattr(config, name) for name in type(config).field_names()}
    return fields, dict(dense.state_dict())


def from_llama(dense) -> tuple[dict, dict]:
    """A transformers Llama's config fields and weights in our names, the MLP as a one-expert [1, ...] stack."""
    lc = dense.config
    blockers = [f"{name}={getattr(lc, name, None)!r} (needs {want!r})"
                for name, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))
                if getattr(lc, name, want) != want]
    rope = getattr(lc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        blockers.append(f"rope_parameters={rope!r} (needs rope_type 'default')")
    if getattr(lc, "head_dim", None) not in (None, lc.hidden_size // lc.num_attention_heads):
        blockers.append(f"head_dim={lc.head_dim!r} (needs hidden_size / num_attention_heads)")
    if blockers:  # Qwen2, for one, has biases on q, k and v, which our attention does not have
        raise UserError("this Llama cannot be upcycled as the same function: " + ", ".join(blockers))
    eos = lc.eos_token_id[0] if isinstance(lc.eos_token_id, (list, tuple)) else lc.eos_token_id
    fields = dict(vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
                  num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
                  num_key_value_heads=lc.num_key_value_heads, expert_activation="swiglu", scale_embeddings=False,
                  hidden_dropout=0.0, attention_dropout=float(lc.attention_dropout), rms_norm_eps=lc.rms_norm_eps,
                  rope_theta=float(rope.get("rope_theta", getattr(lc, "rope_theta", 10000.0))),
                  max_position_embeddings=lc.max_position_embeddings, tie_word_embeddings=lc.tie_word_embeddings,
                  initializer_range=lc.initializer_range, pad_token_id=lc.pad_token_id,
                  bos_token_id=lc.bos_token_id, eos_token_id=eos)
    source, state = dense.state_dict(), {}
    state["model.embed_tokens.weight"] = source["model.embed_tokens.weight"]
    state["model.norm.weight"] = source["model.norm.weight"]
    if not lc.tie_word_embeddings:
        state["lm_head.weight"] = source["lm_head.weight"]
    for i in range(lc.num_hidden_layers):
        layer = f"model.layers.{i}."
        state[layer + "self_attn.qkv_proj.weight"] = torch.cat(
            [source[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        for name in _LLAMA_SAME:
            state[layer + name] = source[layer + name]
        gate, up = source[layer + "mlp.gate_proj.weight"], source[layer + "mlp.up_proj.weight"]  # [I, H] each
        state[layer + "mlp.experts.up_proj"] = torch.cat([gate, up]).T[None]  # [1, H, 2I]: gate half, up half
        state[layer + "mlp.experts.down_proj"] = source[layer + "mlp.down_proj.weight"].T[None]  # [1, I, H]
    return fields, state


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="moe-reason-upcycle", description=__doc__.split("\n")[0])
    parser.add_argument("dense", help="a from_pretrained folder: one of ours with one expert, or a Llama")
    parser.add_argument("output", help="the folder to write the MoE into (new or empty)")
    parser.add_argument("--num_experts", type=int, required=True, help="experts per layer, each a copy of the MLP")
    parser.add_argument("--top_k", type=int, required=True, help="experts each token goes to")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import moe_reason  # noqa: F401  (registers our Auto classes)

    dense_path, output = Path(args.dense), Path(args.output)
    if not (dense_path / "config.json").is_file():
        raise MissingFileError(f"{dense_path}: no config.json there; give a from_pretrained folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output folder {output} exists and is not empty: name a new folder")
    moe = upcycle(AutoModelForCausalLM.from_pretrained(dense_path), args.num_experts, args.top_k)
    moe.save_pretrained(output)
    if (dense_path / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(dense_path).save_pretrained(output)
    print(f"upcycled {dense_path} -> {output}: {args.num_experts} experts top-{args.top_k}, each a copy of its MLP")
    return output
