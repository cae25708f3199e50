"""LoRA through peft: attention and shared experts by module, every routed expert by parameter; the trainer
fine-tunes with it, and its exports (and `moe_reason.export` of its checkpoints) are the merged model."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from moe_reason import MoEReasonForCausalLM
from moe_reason.models.configuration_recursive import RecursiveMoEReasonConfig
from moe_reason.training.lora import add_lora, lora_config, merged
from moe_reason.models.modeling_recursive import RecursiveMoEReasonForCausalLM

from conftest import (assert_export_cli_matches_final, main_cases, random_ids, tiny_model, train_args, train_losses,
                      write_corpus)

pytest.importorskip("peft")


def adapted_trained_a_little(model, steps=4):
    """`model` under LoRA rank 4, its adapters trained a few steps at a high learning rate -> (peft model, ids)."""
    model = add_lora(model.train(), lora_config(rank=4))
    ids = random_ids(batch=4, seq=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), ids


@pytest.mark.parametrize("kind", ["base", "recursive"])
def test_lora_reaches_attention_shared_and_routed_experts_and_merges_to_the_same_logits(tmp_path, kind):
    if kind == "base":
        model = tiny_model(num_shared_experts=1)
    else:
        model = RecursiveMoEReasonForCausalLM(RecursiveMoEReasonConfig.from_preset(
            "debug", num_shared_experts=1, h_cycles=1, l_cycles=2, halt_max_steps=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, ids = adapted_trained_a_little(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    plain = merged(model)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = type(plain).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapter_logits, atol=2e-5, rtol=1e-4)
    after = reloaded.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layer = "model.layers.0."  # the recursive model's shared stack has the same names
    for part in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.experts.up_proj", "mlp.experts.down_proj",
                 "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"):
        assert layer + part in changed, part
    experts = after[layer + "mlp.experts.up_proj"] - before[layer + "mlp.experts.up_proj"]  # [E, H, 2I]
    assert all(experts[e].abs().max() > 0 for e in range(experts.shape[0]))  # each expert its own update
    frozen = ("router.weight", "embed_tokens.weight", "norm.weight", "q_head.weight")
    assert not any(k.endswith(frozen) for k in changed)


@pytest.mark.slow
def test_trainer_fine_tunes_with_lora_and_exports_the_merged_model(tmp_path):
    corpus = write_corpus(tmp_path, n=80)
    base, tuned, halves = tmp_path / "base", tmp_path / "lora", tmp_path / "lora_halves"
    assert main_cases([
        train_args(tmp_path, corpus, output_dir=base, max_steps=3, save_interval=3),
        train_args(tmp_path, corpus, output_dir=tuned, init_from=base / "final", lora_rank=4, max_steps=4,
                   save_interval=2),
        train_args(tmp_path, corpus, output_dir=halves, init_from=base / "final", lora_rank=4, max_steps=2),
        train_args(tmp_path, corpus, output_dir=halves, init_from=base / "final", lora_rank=4, max_steps=4,
                   save_interval=2, resume_from_checkpoint="latest"),
        train_args(tmp_path, corpus, output_dir=tmp_path / "x", lora_rank=4),
        train_args(tmp_path, corpus, output_dir=tmp_path / "y", lora_rank=4, init_from=base / "final",
                   expert_parallel_size=2),
    ]) == [None, None, None, None,
           "ConfigError: ModelArguments.lora_rank=4 is invalid: must be 0 without --init_from: LoRA adapts a trained "
           "model, so name it with --init_from DIR",
           "UserError: --lora_rank needs every rank to hold the whole model: not with ZeRO-3 or "
           "--expert_parallel_size > 1 (use ZeRO-2 or DDP with expert_parallel_size 1)"]
    start, final = load_file(base / "final" / "model.safetensors"), load_file(tuned / "final" / "model.safetensors")
    assert start.keys() == final.keys()  # the merged model: no adapter tensors left in the export
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert "model.layers.1.mlp.experts.down_proj" in changed and "model.layers.0.self_attn.o_proj.weight" in changed
    assert not any("router" in k or "embed" in k or "norm" in k for k in changed)  # frozen under LoRA
    assert MoEReasonForCausalLM.from_pretrained(tuned / "final").config.num_experts == 4
    assert (tuned / "checkpoint-4" / "adapter_config.json").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_export_cli_matches_final(tuned)  # the CLI rebuilds the adapters from the checkpoint and merges them
    assert not [str(w.message) for w in caught if "base_model_name_or_path" in str(w.message)]
    assert train_losses(halves) == train_losses(tuned)  # a LoRA run resumes exactly
    resumed = load_file(halves / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)
