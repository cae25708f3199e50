"""HRM/TRM's training loop for the recursive model (supervision_updates="per_step"): one supervision step per
forward and per optimizer update, the slots' states carried to the next forward, a halted slot taking a fresh
row; against the one update after every step (the default, "per_batch")."""

import json

import pytest
import torch
from transformers import AutoConfig

from moe_reason import RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.training.metrics import training_flops_per_token

from conftest import launch, main_cases, random_ids, read_metrics, train_args, train_losses


def recursive(**overrides) -> RecursiveMoEReasonForCausalLM:
    settings = dict(h_cycles=2, l_cycles=1, halt_max_steps=3, halt_target="accuracy", halt_exploration_prob=0.0,
                    router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    torch.manual_seed(0)
    return RecursiveMoEReasonForCausalLM(RecursiveMoEReasonConfig.from_preset("debug", **{**settings, **overrides}))


def test_the_steps_of_one_batch_carried_add_up_to_the_one_forward_over_every_step():
    """No update in between and nothing halting: the K carried forwards' losses average to the one forward's
    loss, and their gradients to its gradient (the same K steps, state detached in between, mean over steps)."""
    whole = recursive().train()
    carried = recursive(supervision_updates="per_step").train()
    carried.load_state_dict(whole.state_dict())
    ids = random_ids(4, 16)
    out = whole(ids, labels=ids)
    out.loss.backward()
    carry, losses, act = None, [], []
    for step in range(1, 4):
        step_out = carried(ids, labels=ids, carry=carry)
        (step_out.loss / 3).backward()
        carry = step_out.carry
        losses.append(step_out.loss.detach())
        act.append(step_out.act_loss.detach())
        assert carry.steps.tolist() == [step] * 4 and carry.halted.tolist() == [step == 3] * 4
    torch.testing.assert_close(torch.stack(losses).mean(), out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(act).mean(), out.act_loss.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(carried.named_parameters())
    for name, p in whole.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert whole.q_head.bias.grad.abs() > 0


def test_a_halted_slot_takes_the_next_batchs_row_and_starts_afresh_while_the_others_go_on():
    model = recursive(supervision_updates="per_step", halt_max_steps=2).train()
    first, second, third = random_ids(4, 16), random_ids(4, 16), random_ids(4, 16)
    out = model(first, labels=first)
    assert out.carry.steps.tolist() == [1, 1, 1, 1] and not out.carry.halted.any()
    z_H = out.carry.z_H
    out = model(second, labels=second, carry=out.carry)  # every slot still runs its first row
    assert torch.equal(out.carry.data["input_ids"], first) and out.carry.halted.all()
    assert not torch.equal(out.carry.z_H, z_H)
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)  # the Q-head halts every row after its first step from now on
    out.carry.halted[2:] = False  # pretend slots 2 and 3 still run their rows
    carry = model(third, labels=third, carry=out.carry).carry
    assert torch.equal(carry.data["input_ids"][:2], third[:2]) and torch.equal(carry.data["input_ids"][2:], first[2:])
    assert carry.steps.tolist() == [1, 1, 3, 3] and carry.halted.all()
    # a carry whose rows do not fit the next batch (another shape) is dropped: every slot starts afresh
    fourth = random_ids(2, 16)
    assert model(fourth, labels=fourth, carry=carry).carry.steps.tolist() == [1, 1]


def test_evaluation_runs_every_step_in_one_forward_and_the_flops_count_one_step_per_update():
    model = recursive(supervision_updates="per_step").eval()
    ids = random_ids(2, 16)
    out = model(ids, labels=ids)
    assert out.carry is None and out.recursion_steps.tolist() == [3, 3]
    per_batch = recursive().config
    assert training_flops_per_token(model.config, 16) * 3 == pytest.approx(training_flops_per_token(per_batch, 16))
    with pytest.raises(ValueError, match="trains on input_ids with labels"):
        model.train()(ids)


@pytest.mark.parametrize("overrides,allowed", [({"supervision_updates": "per_update"}, "one of"),
                                               ({"supervision_updates": "per_step", "halt_target": "loss_gain"},
                                                "known only at step k \\+ 1")])
def test_invalid_supervision_updates_raise_naming_the_field(overrides, allowed):
    with pytest.raises(ValueError, match=rf"RecursiveMoEReasonConfig\.supervision_updates=.*{allowed}"):
        RecursiveMoEReasonConfig.from_preset("debug", **overrides)


def test_a_carried_run_resumes_exactly_with_its_slots_mid_row_and_logs_steps_per_row(tmp_path, corpus):
    """Stopped at step 4 of rows that run 3 steps, the slots are mid-row: the checkpoint keeps their rows and
    states, and the resumed run takes every step the straight one did."""
    settings = dict(model_type="recursive", supervision_updates="per_step", h_cycles=1, l_cycles=1,
                    halt_max_steps=3, max_steps=8, eval_interval=4, save_interval=4, hidden_dropout=0.1)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert main_cases([train_args(tmp_path, corpus, output_dir=straight, **settings),
                       train_args(tmp_path, corpus, output_dir=halves, **{**settings, "max_steps": 4}),
                       train_args(tmp_path, corpus, output_dir=halves, resume_from_checkpoint="latest",
                                  **settings)]) == [None, None, None]
    assert (halves / "checkpoint-4" / "supervision_carry_0_of_1.safetensors").is_file()
    assert train_losses(halves) == train_losses(straight) and len(train_losses(straight)) == 8
    logged = {r["step"]: r for r in read_metrics(straight) if "train/loss" in r}
    # text halts by a relative target at evaluation only: in training every row runs its 3 steps
    assert [logged[s].get("train/recursion_steps") for s in (1, 2, 3, 6)] == [None, None, 3.0, 3.0]
    assert logged[3]["train/halt_rate"] == 0.0 and logged[3]["train/finished_rows"] == 1.0
    results = json.loads((straight / "train_results.json").read_text())
    config = AutoConfig.from_pretrained(straight / "final")
    assert config.supervision_updates == "per_step"  # a config field: exported, and checked on resume
    config.supervision_updates = "per_batch"
    assert results["flops_per_token"] * 3 == pytest.approx(training_flops_per_token(config, 32), rel=1e-6)


def test_two_ddp_processes_carry_their_own_slots_and_match_one_process_on_the_same_global_batch(tmp_path, corpus):
    """One H cycle, so DDP is told every parameter gets a gradient: the learned initial states get one in every
    update (zero where no slot starts a row), and each rank carries its own half of the slots."""
    settings = dict(model_type="recursive", supervision_updates="per_step", h_cycles=1, l_cycles=1,
                    halt_max_steps=2, max_steps=4, eval_interval=4, save_interval=4, cpu_threads=1)
    launch(train_args(tmp_path, corpus, output_dir=tmp_path / "one", per_device_train_batch_size=4, **settings))
    result = launch(train_args(tmp_path, corpus, output_dir=tmp_path / "two", per_device_train_batch_size=2,
                               **settings), config_file="accelerate_configs/cpu_ddp.yaml")
    assert "2 process(es) (MULTI_CPU)" in result.stdout
    for rank in (0, 1):
        assert (tmp_path / "two" / "checkpoint-4" / f"supervision_carry_{rank}_of_2.safetensors").is_file()
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:  # as the plain DDP test: the same rows per slot, rounding apart
        assert two[step] == pytest.approx(one[step], abs=5e-3), step
