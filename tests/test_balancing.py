"""Auxiliary-loss-free load balancing (DeepSeek-V3): a per-expert bias steers the top-k choice, never the gate
weights, and moves towards balance once per optimizer step from the step's global expert counts."""

import pytest
import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.models.modeling_moe_reason import MoEReasonRouter


def aux_free(**overrides) -> MoEReasonConfig:
    return MoEReasonConfig.from_preset("debug", load_balancing="aux_free", router_bias_update_rate=0.01, **overrides)


def test_the_bias_changes_the_choice_but_never_the_gate_weights():
    torch.manual_seed(0)
    router = MoEReasonRouter(aux_free()).eval()
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, router.weight.shape[1])
    logits, weights, experts = router(x)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # expert 3 chosen by every token
    biased_logits, biased_weights, biased_experts = router(x)
    assert torch.equal(logits, biased_logits) and (biased_experts == 3).any(dim=-1).all()
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, biased_experts)
    torch.testing.assert_close(biased_weights, chosen / chosen.sum(-1, keepdim=True))  # probabilities only
    assert not torch.equal(experts, biased_experts)


def test_the_bias_moves_a_skewed_routers_load_towards_uniform():
    torch.manual_seed(0)
    router = MoEReasonRouter(aux_free()).train()
    direction = torch.randn(router.weight.shape[1])
    with torch.no_grad():
        router.weight.normal_(std=0.02)
        router.weight[0] += 0.03 * direction  # a skewed router: tokens along `direction` prefer expert 0
    x = torch.randn(512, direction.numel()) + direction  # [T, H]

    def load() -> torch.Tensor:
        return torch.bincount(router(x)[2].reshape(-1), minlength=4).float()  # [E]

    before = load()
    imbalance = []  # max/mean over the experts, step after step
    for _ in range(400):
        counts = load()
        imbalance.append(float(counts.max() / counts.mean()))
        router.update_bias(counts, rate=0.001)
    settled = sum(imbalance[-100:]) / 100
    assert before.max() / before.mean() > 1.8 and settled < 1.2, (before, settled)
    assert router.expert_bias[0] < 0  # the overloaded expert is pushed down


def test_the_model_updates_every_layers_bias_from_its_row_of_the_load():
    model = MoEReasonForCausalLM(aux_free())
    model.update_router_biases(torch.tensor([[10.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]]))  # [L, E]
    first, second = (r.expert_bias for r in model.routers())
    assert torch.equal(first, torch.tensor([-0.01, 0.01, 0.01, 0.01])) and torch.equal(second, torch.zeros(4))


def test_the_bias_is_saved_with_the_model_and_the_choice_of_balancing_is_checked(tmp_path):
    model = MoEReasonForCausalLM(aux_free())
    with torch.no_grad():
        model.routers()[1].expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    model.save_pretrained(tmp_path)
    again = MoEReasonForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.routers()[1].expert_bias, model.routers()[1].expert_bias)
    assert not hasattr(MoEReasonRouter(MoEReasonConfig.from_preset("debug")), "expert_bias")  # aux_loss: none
    with pytest.raises(ValueError, match="router_bias_update_rate=0.0 is invalid: must be > 0"):
        MoEReasonConfig.from_preset("debug", load_balancing="both")
    with pytest.raises(ValueError, match="router_bias_update_rate=0.001 is invalid: must be 0 with"):
        MoEReasonConfig.from_preset("debug", router_bias_update_rate=1e-3)
    both = MoEReasonConfig.from_preset("debug", load_balancing="both", router_bias_update_rate=0.01)
    assert not aux_free().uses_aux_loss() and both.uses_aux_loss()
