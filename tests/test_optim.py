"""Learning-rate schedule at its edges, and which parameters get weight decay."""

import math

import pytest
import torch

from moe_reason.training.arguments import TrainingArguments
from moe_reason.training.lora import add_lora, lora_config
from moe_reason.training.optim import lr_multiplier, make_optimizer_and_scheduler, parameter_groups

from conftest import tiny_model


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "seeds_linear"])
@pytest.mark.parametrize("warmup,max_steps", [(0, 1), (0, 10), (3, 10), (10, 10), (15, 10), (1, 1), (9, 10)])
def test_schedule_is_defined_and_bounded_for_every_pair(kind, warmup, max_steps):
    values = [lr_multiplier(s, warmup, max_steps, kind, 0.1) for s in range(max_steps)]
    assert all(math.isfinite(v) and 0.0 < v <= 1.0 for v in values)
    if warmup == 0:
        assert values[0] == 1.0  # no warmup: the first step is at the peak
    else:
        assert values[0] == pytest.approx(1 / warmup)  # step 0 already learns
        assert values[: min(warmup, max_steps)] == sorted(values[: min(warmup, max_steps)])


def test_warmup_then_decay_to_the_floor():
    linear = [lr_multiplier(s, 2, 12, "linear", 0.1) for s in range(12)]
    assert linear[:3] == [0.5, 1.0, 1.0]
    assert linear[-1] == pytest.approx(0.1 + 0.9 * 0.1)  # last step is one decay step above the floor
    assert lr_multiplier(12, 2, 12, "linear", 0.1) == pytest.approx(0.1)  # the floor, reached at max_steps
    cosine = [lr_multiplier(s, 0, 100, "cosine", 0.0) for s in range(101)]
    assert cosine[50] == pytest.approx(0.5) and cosine[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_the_seeds_decay_reaches_its_floor_before_the_end():
    """Exp8's max(0.1, (max_steps - step) / (max_steps - warmup)): the floor from 90% of the decay on."""
    seeds = [lr_multiplier(s, 20, 120, "seeds_linear", 0.1) for s in range(120)]
    assert seeds[19] == 1.0 and seeds[20] == 1.0 and seeds[70] == pytest.approx(0.5)
    assert seeds[110] == pytest.approx(0.1) and seeds[111:] == [0.1] * 9  # ours (linear) is 0.181 at step 110
    assert lr_multiplier(110, 20, 120, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 10 / 100)


def test_warmup_longer_than_training_never_decays():
    assert [lr_multiplier(s, 20, 10, "cosine", 0.1) for s in range(10)] == [(s + 1) / 20 for s in range(10)]


def test_warmup_ratio_warms_every_run_length_up_for_the_same_share():
    def schedule(**kw):
        args = TrainingArguments(output_dir="unused", learning_rate=1.0, **kw)
        optimizer, scheduler = make_optimizer_and_scheduler(torch.nn.Linear(2, 2), args, torch.device("cpu"))
        lrs = []
        for _ in range(args.max_steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step(), scheduler.step()
        return args.warmup(), lrs

    assert schedule(max_steps=200, warmup_steps=20)[0] == 20
    warmup, lrs = schedule(max_steps=38, warmup_steps=20, warmup_ratio=0.1)  # the ratio replaces the steps
    first_decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 34))  # cosine to the default floor over 34 steps
    assert warmup == 4 and lrs[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, first_decay])
    assert schedule(max_steps=100, warmup_ratio=0.07)[0] == 7  # not 8: 0.07 x 100 is 7.000000000000001
    assert schedule(max_steps=3000, warmup_ratio=0.1)[0] == 300
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingArguments(output_dir="unused", warmup_ratio=1.0)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_scheduler='step'"):
        lr_multiplier(5, 0, 10, "step")


def test_no_weight_decay_on_norms_biases_and_embeddings():
    decay, no_decay = parameter_groups(tiny_model(num_shared_experts=1), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in n or "embed_tokens" in n for n in no_decay["names"])
    assert "model.embed_tokens.weight" in no_decay["names"]
    assert any(n.endswith("experts.up_proj") for n in decay["names"])
    assert any(n.endswith("qkv_proj.weight") for n in decay["names"])
    assert any(n.endswith("router.weight") for n in decay["names"])


def test_fused_adamw_on_cpu_steps_like_the_default_implementation():
    """The trainer's AdamW is torch's fused kernel on CPU/CUDA: same update, per group, as the default."""
    args = TrainingArguments(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0)
    models, optimizers = [], []
    for device in ("cpu", "meta"):  # "meta": a device without the fused kernel gets torch's default
        torch.manual_seed(0)
        models.append(tiny_model(num_shared_experts=1).train())
        optimizers.append(make_optimizer_and_scheduler(models[-1], args, torch.device(device))[0])
    assert optimizers[0].defaults["fused"] is True and not optimizers[1].defaults["fused"]
    ids = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, fused), default in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, default, atol=1e-6, rtol=1e-5, msg=name)


def test_global_batch_size_sets_accumulation_or_is_refused():
    from moe_reason.training.arguments import resolve_global_batch
    args = TrainingArguments(per_device_train_batch_size=4, global_batch_size=32)
    resolve_global_batch(args, world_size=2)
    assert args.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match="implies gradient_accumulation_steps=4, but 3 was given"):
        resolve_global_batch(TrainingArguments(per_device_train_batch_size=4, global_batch_size=32,
                                               gradient_accumulation_steps=3), world_size=2)
    with pytest.raises(ValueError, match="not a multiple of per_device_train_batch_size=4 x 2 process"):
        resolve_global_batch(TrainingArguments(per_device_train_batch_size=4, global_batch_size=12), world_size=2)


def test_a_group_with_nothing_to_train_is_left_out():
    """LoRA trains matrices only: an empty no-decay group would be dropped by DeepSpeed, leaving the schedule
    (built on the groups given) one learning rate too many; ZeRO-2 LoRA runs failed so at their first step."""
    pytest.importorskip("peft")
    groups = parameter_groups(add_lora(tiny_model(), lora_config(rank=2)), weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay"] and all(".lora_" in n for n in groups[0]["names"])
