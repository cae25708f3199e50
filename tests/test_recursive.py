"""RecursiveMoEReasonForCausalLM: the relation to the base model, gradients, halting, state, saving."""

import json

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from moe_reason import MoEReasonForCausalLM, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.models.modeling_recursive import HaltingLoss
from moe_reason.training.metrics import saved_activation_bytes

from conftest import (assert_training_path_equals_eval_path, assert_zero_run_learned_and_exported_its_gathered_weights,
                      launch, random_ids, read_metrics, train_args, train_losses, write_corpus)


def recursive(**overrides) -> RecursiveMoEReasonForCausalLM:
    return RecursiveMoEReasonForCausalLM(RecursiveMoEReasonConfig.from_preset("debug", **overrides)).eval()


def fit(model, batch, steps: int, lr: float):
    """AdamW on model(ids, labels=ids) over `steps` batches drawn by batch() -> the last step's output."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = batch()
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return out


def test_without_act_there_is_no_q_head_no_halting_loss_and_every_step_runs():
    """use_act=False means it: nothing halts (even towards "accuracy", which halts in training with ACT), the
    loss is the LM loss and the router terms only, and there is no Q-head to train (it once was trained)."""
    torch.manual_seed(0)
    model = recursive(use_act=False, halt_max_steps=3, halt_target="accuracy", router_aux_loss_coef=0.0).train()
    assert model.q_head is None and not any("q_head" in name for name, _ in model.named_parameters())
    ids = random_ids(4, 16)
    out = model(ids, labels=ids)
    assert out.recursion_steps.tolist() == [3.0] * 4 and out.act_loss is None and "act_loss" not in \
        out.training_metrics
    # the loss is each supervision step's LM loss, averaged: nothing else
    steps = [model(ids, labels=ids, halt_max_steps=k).lm_loss for k in (1, 2, 3)]
    assert torch.allclose(out.loss, sum(steps) / 3, atol=1e-5), (out.loss, steps)
    with_act = recursive(use_act=True, halt_max_steps=3, halt_target="accuracy").train()
    assert with_act.q_head is not None and with_act(ids, labels=ids).act_loss is not None


def test_one_cycle_without_act_is_the_base_model_applied_twice():
    """h_cycles = l_cycles = 1, no ACT, initial states 0 (their init): z_L = f(x) is the base model's final
    hidden state, and z_H = f(z_L), so logits = base(inputs_embeds=base hidden state)."""
    model = recursive(h_cycles=1, l_cycles=1, use_act=False, halt_max_steps=1, input_norm=False)
    base = MoEReasonForCausalLM(model.config).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    ids = random_ids()
    hidden = base.model(ids).last_hidden_state
    torch.testing.assert_close(model(ids).logits, base(inputs_embeds=hidden).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,grad_passes", [("last_cycle", [False] * 3 + [True] * 3),
                                              ("one_step", [False] * 4 + [True] * 2)])
def test_gradient_flows_only_through_the_configured_passes(mode, grad_passes):
    model = recursive(h_cycles=2, l_cycles=2, halt_max_steps=1, use_act=False, recursion_gradient=mode).train()
    seen = []
    decode = model.model.decode

    def recording(hidden, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return decode(hidden, *args, **kwargs)

    model.model.decode = recording
    ids = random_ids()
    model(ids, labels=ids).loss.backward()
    assert seen == grad_passes  # 2 H cycles x (2 L passes + 1 H pass), gradient only at the end
    assert model.model.layers[0].mlp.experts.up_proj.grad.abs().sum() > 0
    assert model.z_init.weight.grad is None  # read only by passes without gradient here


def test_latent_init_learns_when_a_gradient_pass_reads_it():
    model = recursive(h_cycles=1, l_cycles=1, halt_max_steps=1, use_act=False).train()
    ids = random_ids()
    model(ids, labels=ids).loss.backward()
    assert model.z_init.weight.grad.abs().sum() > 0


def test_activations_grow_with_the_supervision_steps_and_checkpointing_holds_a_fraction_with_the_same_gradients():
    """Deep supervision sums every step's loss before the one backward, so each step's gradient passes stay
    saved until then: a step's activations grow with halt_max_steps. Checkpointing the decoder layers
    (--gradient_checkpointing) keeps only their inputs and recomputes the rest in backward."""
    ids = random_ids(4, 16)

    def measured(steps: int, checkpointed: bool):
        torch.manual_seed(0)
        model = recursive(h_cycles=2, l_cycles=2, halt_max_steps=steps, hidden_dropout=0.0,
                          attention_dropout=0.0).train()
        if checkpointed:
            model.activation_checkpointing_enable()
        saved = saved_activation_bytes(model, input_ids=ids, labels=ids)
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
        return saved, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    (one, _), (plain, grads), (checkpointed, recomputed) = measured(1, False), measured(4, False), measured(4, True)
    assert 3.5 < plain / one < 4.5, (one, plain)  # every example runs every step in training here
    assert checkpointed < 0.2 * plain, (checkpointed, plain)
    assert recomputed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(recomputed[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("stablemax_loss", [False, True], ids=["softmax", "stablemax"])
def test_training_statistics_without_logits_equal_the_logits_path(stablemax_loss):
    """Training with labels takes each step's statistics from the chunked loss (no logits); eval
    mode from the logits. With Q-head halting in both, no exploration, dropout or jitter, both run
    the same steps and give the same losses and gradients, including per-sequence means over
    sequences with different numbers of labels and rows that halt early."""
    model = recursive(h_cycles=1, l_cycles=1, halt_max_steps=3, use_act=True, eval_halting="q_head",
                      halt_exploration_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                      router_jitter_noise=0.0, halt_target="accuracy",  # the target under which training halts
                      stablemax_loss=stablemax_loss)
    torch.nn.init.normal_(model.q_head.weight, std=1.0)
    torch.nn.init.zeros_(model.q_head.bias)
    ids = random_ids(batch=6)
    labels = ids.clone()
    labels[1, :9] = -100
    labels[4, 3:] = -100
    figures = assert_training_path_equals_eval_path(model, ids, labels,
                                                    ("loss", "lm_loss", "act_loss", "recursion_steps"))
    assert 1 < len(set(figures["recursion_steps"].tolist())), "some rows must halt before others"


def test_q_head_gets_gradient_and_aux_loss_counts_every_pass():
    # towards "accuracy": under the default "loss_rank" a median split gives the bias no net gradient at q = 0
    model = recursive(h_cycles=2, l_cycles=1, halt_max_steps=2, router_aux_loss_coef=0.1,
                      halt_target="accuracy").train()
    ids = random_ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.q_head.weight.grad.abs().sum() > 0 and model.q_head.bias.grad.abs() > 0
    assert out.aux_loss > 0 and out.act_loss is not None
    # 2 supervision steps x 2 H cycles x (1 L + 1 H) = 8 passes, every token routed to k=2 experts in each
    assert out.expert_load.sum().item() == 8 * 2 * 16 * 2 * 2  # passes x batch x seq x k x layers


def test_state_belongs_to_one_batch():
    model = recursive(halt_max_steps=2)
    first, second = random_ids(), random_ids()
    alone = model(second).logits
    model(first)
    torch.testing.assert_close(model(second).logits, alone, atol=0, rtol=0)


def test_halted_examples_stop_consuming_compute():
    model = recursive(halt_max_steps=3, use_act=True, eval_halting="q_head")
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)  # every example wants to halt at once
    passes = []
    decode = model.model.decode
    model.model.decode = lambda h, *a, **k: passes.append(h.shape[0]) or decode(h, *a, **k)
    out = model(random_ids(4, 8))
    assert out.recursion_steps.tolist() == [1, 1, 1, 1] and len(passes) == 2 * 3  # one step: 2 x (2 + 1)
    model.config.eval_halting = "max_steps"
    assert model(random_ids(4, 8)).recursion_steps.tolist() == [3, 3, 3, 3]


def test_halting_learns_to_stop_easy_examples_earlier():
    """Easy: a sequence repeating one token (predictable at once); hard: random tokens (never correct)."""
    torch.manual_seed(0)
    model = recursive(halt_max_steps=3, h_cycles=1, l_cycles=1, halt_exploration_prob=0.0, halt_target="accuracy",
                      halt_target_accuracy=0.8, router_aux_loss_coef=0.0, num_hidden_layers=1).train()

    def batch(n=8):
        easy = torch.randint(0, 256, (n, 1)).repeat(1, 16)
        hard = torch.randint(0, 256, (n, 16))
        return easy, hard

    fit(model, lambda: torch.cat(batch()), steps=150, lr=3e-3)
    model.eval()
    model.config.eval_halting = "q_head"
    easy, hard = batch(32)
    with torch.no_grad():
        easy_steps = model(easy).recursion_steps.mean().item()
        hard_steps = model(hard).recursion_steps.mean().item()
    assert easy_steps < hard_steps, (easy_steps, hard_steps)
    assert hard_steps == pytest.approx(3.0)


def test_round_trip_and_deterministic_generate(tmp_path):
    model = recursive(halt_max_steps=2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is RecursiveMoEReasonForCausalLM
    ids = random_ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    first = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(first, model.generate(ids[:, :5], max_new_tokens=6, do_sample=False))
    step_by_step = ids[:, :5]
    for _ in range(6):
        step_by_step = torch.cat([step_by_step, model(step_by_step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(first, step_by_step)


def test_an_export_from_before_input_norm_loads_with_the_raw_input_it_was_trained_on(tmp_path):
    model = recursive(halt_max_steps=2, input_norm=False)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    del config["input_norm"]
    config_file.write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.input_norm is False and reloaded.input_norm is None
    ids = random_ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, input_norm=True).config.input_norm is True
    assert recursive().config.input_norm is True  # new models normalise the injected input


@pytest.mark.parametrize("field,value", [("h_cycles", 0), ("l_cycles", -1), ("halt_max_steps", 0),
                                         ("halt_exploration_prob", 1.5), ("recursion_gradient", "full"),
                                         ("act_loss_coef", -1.0), ("halt_target_accuracy", 0.0),
                                         ("eval_halting", "never"), ("use_cache", True)])
def test_invalid_recursive_fields_raise_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"RecursiveMoEReasonConfig\.{field}="):
        RecursiveMoEReasonConfig.from_preset("debug", **{field: value})


def test_presets_are_shared_with_the_base_model():
    c = RecursiveMoEReasonConfig.from_preset("exp8", h_cycles=2)
    assert c.hidden_size == 512 and c.h_cycles == 2 and c.passes_per_step() == 2 * 3 * c.halt_max_steps


@pytest.mark.slow
@pytest.mark.parametrize("config_file", [None, "accelerate_configs/deepspeed_zero2.yaml"])
def test_trainer_runs_the_recursive_model_and_lowers_the_loss(tmp_path, config_file):
    """On one process, and on two under ZeRO-2, whose run must also export the gathered weights."""
    corpus = write_corpus(tmp_path, n=80)
    out = tmp_path / "recursive"
    result = launch(train_args(tmp_path, corpus, output_dir=out, model_type="recursive", max_steps=12,
                               eval_interval=12, save_interval=12, learning_rate=1e-2, log_interval=4, eval_batches=1,
                               per_device_eval_batch_size=8, halt_max_steps=2, h_cycles=1, l_cycles=1),
                    config_file=config_file)
    losses = train_losses(out)
    assert losses[12] < losses[4], losses
    if config_file is not None:
        assert "2 process(es) (DEEPSPEED)" in result.stdout
        assert_zero_run_learned_and_exported_its_gathered_weights(out, tmp_path, corpus, last_step=12)
    records = [r for r in read_metrics(out) if "train/recursion_steps" in r]
    assert records and "train/halt_rate" in records[0] and "train/act_loss" in records[0]
    assert [r for r in read_metrics(out) if "eval/halt_rate" in r]  # evaluation reports the halt rate
    assert type(AutoModelForCausalLM.from_pretrained(out / "final")) is RecursiveMoEReasonForCausalLM
    if config_file is None:  # the exported Q-head halts text at evaluation: after step 1 exactly where its logit is > 0
        model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
        model.config.eval_halting = "q_head"
        validation = load_from_disk(str(next((tmp_path / "data_cache").glob("*/validation"))))
        first_logits = []
        model.q_head.register_forward_hook(lambda module, inputs, output: first_logits.append(output.squeeze(-1)))
        with torch.no_grad():
            steps = model(torch.tensor(validation["input_ids"], dtype=torch.long)).recursion_steps
        assert steps.tolist() == torch.where(first_logits[0] > 0, 1.0, 2.0).tolist(), (steps, first_logits[0])


def test_loss_gain_targets_halting_where_the_next_step_helps_least_and_learns_it_from_every_example():
    halting = HaltingLoss(RecursiveMoEReasonConfig.from_preset("debug", halt_target="loss_gain"), torch.zeros(()))
    per_sequence = lambda losses: torch.tensor([[2 * loss, 2.0, 0.0] for loss in losses])  # nll sum, count, right
    first = torch.tensor([1.0, -1.0, 1.0, -1.0])  # step 1's halt logits
    halting.observe(first, per_sequence([2.0, 2.0, 2.0, 2.0]))
    assert halting.decisions == 0  # step 1's targets wait for step 2's losses
    halting.carry(torch.ones(4, dtype=torch.bool))
    halting.observe(torch.zeros(4), per_sequence([1.0, 1.9, 2.0, 2.2]))  # gains 0.5, 0.05, 0, -0.1: median 0.025
    target = torch.tensor([0.0, 0.0, 1.0, 1.0])  # halt where step 2 helped less than the median
    assert halting.decisions == 4 and halting.right == 2  # the logits' signs got examples 1 and 2 right
    torch.testing.assert_close(halting.sum, torch.nn.functional.binary_cross_entropy_with_logits(
        first, target, reduction="sum"))
    # training under this target runs every example to the last step, whatever the Q-head says
    model = recursive(halt_max_steps=3, eval_halting="q_head", halt_target="loss_gain").train()
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)
    ids = random_ids(4, 8)
    out = model(ids, labels=ids)
    assert out.recursion_steps.tolist() == [3, 3, 3, 3] and out.act_loss > 0  # steps 1 and 2 got targets
    assert model.eval()(ids).recursion_steps.tolist() == [1, 1, 1, 1]  # evaluation halts by the Q-head


def test_loss_rank_targets_halting_for_the_batchs_best_predicted_sequences_at_each_step():
    assert RecursiveMoEReasonConfig.from_preset("debug").halt_target == "loss_rank"  # the default for text
    halting = HaltingLoss(RecursiveMoEReasonConfig.from_preset("debug"), torch.zeros(()))
    per_sequence = lambda losses: torch.tensor([[2 * loss, 2.0, 0.0] for loss in losses])  # nll sum, count, right
    first = torch.tensor([1.0, -1.0, 1.0, -1.0])
    halting.observe(first, per_sequence([1.0, 1.9, 2.0, 2.2]))  # median 1.95: the first two are the best predicted
    assert halting.decisions == 4 and halting.right == 2  # known at once; the signs got examples 0 and 3 right
    torch.testing.assert_close(halting.sum, torch.nn.functional.binary_cross_entropy_with_logits(
        first, torch.tensor([1.0, 1.0, 0.0, 0.0]), reduction="sum"))


def test_loss_rank_q_head_learns_to_halt_easy_sequences_and_run_hard_ones_longer():
    """Half of each batch repeats one token (easy: learnt within a few steps), half is random (hard): the
    Q-head must learn from z_H which is which, so that evaluation halts the easy ones after one step and
    runs the hard ones to the last."""
    torch.manual_seed(0)
    model = recursive(h_cycles=1, l_cycles=1, halt_max_steps=2, eval_halting="q_head", hidden_dropout=0.0,
                      attention_dropout=0.0, router_jitter_noise=0.0).train()

    def batch():  # [8, 16]: rows 0-3 easy, 4-7 hard
        return torch.cat([torch.full((4, 16), 7), torch.randint(5, model.config.vocab_size, (4, 16))])

    out = fit(model, batch, steps=20, lr=1e-2)
    assert out.q_accuracy > 0.9, out.q_accuracy
    with torch.no_grad():
        steps = model.eval()(batch()).recursion_steps
    assert steps.tolist() == [1, 1, 1, 1, 2, 2, 2, 2], steps


@pytest.mark.slow
def test_normalised_input_keeps_tokens_apart_where_the_raw_embedding_collapses_them():
    """Skewed unigram statistics (Zipf) plus a bigram rule (half the time the next token is perm[this one]):
    learning the unigram part grows a component shared by every token, and with the raw embedding injected
    (1/50 of the states' scale) each pass then shrinks what tells tokens apart, so the bigram rule is not
    learnt (the text plateau in miniature). With input_norm the input re-enters at the states' scale."""

    def trained_loss(input_norm: bool) -> float:
        torch.manual_seed(0)
        model = recursive(h_cycles=2, l_cycles=2, halt_max_steps=2, input_norm=input_norm, hidden_dropout=0.0,
                          attention_dropout=0.0, router_jitter_noise=0.0).train()
        vocab = model.config.vocab_size
        generator = torch.Generator().manual_seed(2)
        perm = torch.randperm(vocab, generator=generator)
        zipf = torch.arange(1, vocab + 1).float() ** -1.2

        def batch():  # [16, 32]
            ids = [torch.multinomial(zipf, 16, replacement=True, generator=generator)]
            for _ in range(31):
                frequent = torch.multinomial(zipf, 16, replacement=True, generator=generator)
                ids.append(torch.where(torch.rand(16, generator=generator) < 0.5, perm[ids[-1]], frequent))
            return torch.stack(ids, 1)

        fit(model, batch, steps=150, lr=3e-3)
        with torch.no_grad():
            ids = batch()
            return float(model.eval()(ids, labels=ids).lm_loss)

    normalised, raw = trained_loss(True), trained_loss(False)
    assert normalised < 3.3 and raw > normalised + 0.4, (normalised, raw)
