"""Sparse upcycling: a dense model (ours with one expert, or a transformers Llama) becomes an MoE whose experts
copy its MLP, with the dense model's logits at step 0; the result trains and exports."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.models.upcycle import main as upcycle_main, upcycle

from conftest import main_cases, train_args, write_corpus


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_our_dense_model_upcycled_gives_the_same_logits_at_step_0(top_k):
    torch.manual_seed(0)
    dense = MoEReasonForCausalLM(MoEReasonConfig.from_preset(
        "debug", num_experts=1, num_experts_per_tok=1, expert_activation="swiglu")).eval()
    moe = upcycle(dense, num_experts=4, top_k=top_k).eval()
    assert moe.config.num_experts == 4 and moe.config.num_experts_per_tok == top_k
    experts = moe.model.layers[0].mlp.experts.up_proj
    assert torch.equal(experts[0], experts[3]) and torch.equal(experts[0], dense.model.layers[0].mlp.experts.up_proj[0])
    torch.testing.assert_close(moe(ids()).logits, dense(ids()).logits, atol=1e-5, rtol=0)
    routed = moe(ids(), output_router_logits=True)
    assert routed.expert_load[0].count_nonzero() == 4  # the new router spreads tokens over every copy


def test_a_llama_built_locally_upcycles_to_the_same_function():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    moe = upcycle(llama, num_experts=8, top_k=2).eval()
    assert moe.config.expert_activation == "swiglu" and not moe.config.tie_word_embeddings
    torch.testing.assert_close(moe(ids()).logits, llama(ids()).logits, atol=1e-5, rtol=0)
    qwen_like = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=True \\(needs False\\)"):
        upcycle(LlamaForCausalLM(qwen_like), num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="num_experts=8 and num_experts_per_tok=2: a dense model"):
        upcycle(moe, num_experts=4, top_k=2)


@pytest.mark.slow
def test_an_upcycled_model_trains_from_the_command_line_and_exports(tmp_path):
    corpus = write_corpus(tmp_path, n=80)
    dense, moe_dir, run = tmp_path / "dense", tmp_path / "moe", tmp_path / "run"
    assert main_cases([train_args(tmp_path, corpus, output_dir=dense, num_experts=1, num_experts_per_tok=1,
                                  max_steps=4)]) == [None]
    upcycle_main([str(dense / "final"), str(moe_dir), "--num_experts", "4", "--top_k", "2"])
    before = AutoModelForCausalLM.from_pretrained(dense / "final").eval()
    after = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    torch.testing.assert_close(after(ids()).logits, before(ids()).logits, atol=1e-5, rtol=0)
    assert main_cases([train_args(tmp_path, corpus, output_dir=run, init_from=moe_dir, num_experts=4,
                                  num_experts_per_tok=2, max_steps=4)]) == [None]
    trained = AutoModelForCausalLM.from_pretrained(run / "final")
    assert trained.config.num_experts == 4
    losses = [json.loads(line)["train/lm_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/lm_loss" in line]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    with pytest.raises(ValueError, match="is not empty"):
        upcycle_main([str(dense / "final"), str(moe_dir), "--num_experts", "4", "--top_k", "2"])
