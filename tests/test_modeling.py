"""Behaviour of MoEReasonForCausalLM: dispatch, losses, cache, padding, checkpointing, saving."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moe_reason.models.expert_kernels import _grouped_mm_supported, grouped_mm
from moe_reason.models.modeling_moe_reason import load_balancing_loss, router_z_loss

from conftest import random_ids, tiny_model


def reference_moe(block, x):
    """Token-by-token reference for the MoE block: loop over tokens and their k experts."""
    logits, weights, experts = block.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(block.top_k):
            e = experts[t, j]
            h = x[t] @ block.experts.up_proj[e]
            if block.experts.gated:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            else:
                h = F.silu(h)
            out[t] += weights[t, j] * (h @ block.experts.down_proj[e])
    if block.shared_experts is not None:
        out += block.shared_experts(x)
    return out


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 1])
def test_sorted_dispatch_matches_token_loop(activation, shared):
    block = tiny_model(expert_activation=activation, num_shared_experts=shared).model.layers[0].mlp
    x = torch.randn(24, 32)
    out, _, _ = block(x[None])
    torch.testing.assert_close(out[0], reference_moe(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_and_fallback_agree_including_empty_experts(dtype):
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, 8, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])  # experts 1 and 3 get no tokens
    assert _grouped_mm_supported(x, w)  # on a CPU: fp32, and bf16 as on a GPU
    grads = []
    for use_grouped in (True, False):
        y = grouped_mm(x, w, counts, use_grouped=use_grouped)
        grads.append((y, *torch.autograd.grad((y.float() * torch.arange(8.0)).sum(), (x, w))))
    for grouped, fallback in zip(*grads):
        torch.testing.assert_close(grouped, fallback)
    assert grads[1][2][1].abs().sum() == 0  # an expert with no tokens gets a zero gradient


def test_the_per_expert_fallback_is_a_well_formed_custom_op():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with the
    op, as torch.compile relies on them to keep the fallback in the graph."""
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_reason.per_expert_mm, (x, w, torch.tensor([3, 0, 7, 0])))


def test_grouped_mm_follows_autocast_like_a_matmul():
    """torch._grouped_mm has no autocast rule: ours casts its operands as autocast casts `x @ w`."""
    x = torch.randn(10, 16)
    w = torch.randn(4, 16, 8, requires_grad=True)
    counts = torch.tensor([3, 0, 7, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, counts)
        reference = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    assert y.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad[0].abs().sum() > 0


def test_aux_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    T, E = 64, 4
    uniform_logits = torch.zeros(T, E)
    chosen = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    assert load_balancing_loss((uniform_logits,), (chosen,), E).item() == pytest.approx(1.0)
    skewed = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(T, 1)
    skewed_chosen = torch.tensor([[0, 1]]).repeat(T, 1)
    assert load_balancing_loss((skewed,), (skewed_chosen,), E).item() > 1.5


def test_padding_tokens_are_left_out_of_router_losses():
    logits = torch.randn(8, 4)
    chosen = logits.topk(2).indices
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    kept = slice(3, None)
    torch.testing.assert_close(load_balancing_loss((logits,), (chosen,), 4, mask),
                               load_balancing_loss((logits[kept],), (chosen[kept],), 4))
    torch.testing.assert_close(router_z_loss((logits,), mask), router_z_loss((logits[kept],)))


def test_losses_are_reported_and_combined():
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    ids = random_ids()
    out = model(ids, labels=ids)
    assert out.aux_loss > 0 and out.z_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    assert out.expert_load.shape == (2, 4)
    assert out.expert_load.sum(1).tolist() == [2 * 16 * 2] * 2  # every token reaches k=2 experts per layer
    off = tiny_model(router_aux_loss_coef=0.0)(ids, labels=ids)
    assert off.aux_loss is None and off.z_loss is None and torch.equal(off.loss, off.lm_loss)


def test_greedy_generate_with_cache_equals_without():
    model = tiny_model()
    prompt = random_ids(2, 5)
    with_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    # and both equal step-by-step argmax decoding with full recomputation
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(with_cache, ids)


def test_left_padded_batch_matches_each_sequence_alone():
    model = tiny_model(num_key_value_heads=4)
    short, long = random_ids(1, 6), random_ids(1, 11)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1), torch.ones_like(long)])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    torch.testing.assert_close(logits[0], model(short).logits[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(long).logits[0, -1], atol=1e-5, rtol=1e-5)
    # generate derives positions from the mask itself
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = model.generate(short, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[0, -4:], alone[0, -4:])


@pytest.mark.parametrize("activation", ["silu", "swiglu"])  # their backward reuses the recomputed buffer
def test_gradient_checkpointing_gives_the_same_gradients(activation):
    model = tiny_model(hidden_dropout=0.0, expert_activation=activation).train()
    ids = random_ids()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    ids = random_ids(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = model(ids, labels=ids).lm_loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_dropout_only_in_training():
    model = tiny_model(hidden_dropout=0.5, attention_dropout=0.5)
    ids = random_ids()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)


def test_scaled_embeddings_multiply_by_sqrt_hidden():
    plain, scaled = tiny_model(), tiny_model(scale_embeddings=True)
    scaled.load_state_dict(plain.state_dict())
    ids = random_ids()
    torch.testing.assert_close(scaled.model.embed(ids), plain.model.embed(ids) * 32**0.5)


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token id 256 is out of range.*vocab_size=256"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        model(random_ids(1, 129))


def test_save_and_reload_auto_class_and_remote_code(tmp_path):
    model = tiny_model(num_shared_experts=1)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    ids = random_ids()
    expected = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)

    # a fresh process that cannot import moe_reason loads the folder as remote code
    torch.save(ids, tmp_path.parent / "ids.pt")
    script = f"""
import sys, torch
sys.modules["moe_reason"] = None  # make the package unimportable
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert "moe_reason" not in type(m).__module__.split(".")[0], type(m).__module__
ids = torch.load({str(tmp_path.parent / 'ids.pt')!r})
torch.save(m(ids).logits, {str(tmp_path.parent / 'logits.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path.parent,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path.parent),
                        # the same thread count as here: another picks other kernels, which round differently
                        **{k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}})
    torch.testing.assert_close(torch.load(tmp_path.parent / "logits.pt"), expected, atol=0, rtol=0)
