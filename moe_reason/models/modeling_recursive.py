"""The recursive-reasoning variant: the MoE decoder stack run as a weight-shared recurrent network.

Follows HRM (sapientinc/HRM) and its simplification TRM (SamsungSAILMontreal/TinyRecursiveModels)
on a causal LM. Per token there are two latent states, z_H (the answer) and z_L (the scratchpad),
with learned initial values. With shared_pass = final_norm(decoder_stack(.)) and x the embedded input
(computed once per forward, RMS-normalised to the states' scale unless config.input_norm is off),
one *supervision step* is:

    for each of h_cycles:
        repeat l_cycles times:  z_L <- shared_pass(z_L + z_H + x)
        z_H <- shared_pass(z_H + z_L)
    logits = lm_head(z_H)

Only the last passes of a step carry gradient (config.recursion_gradient). Deep supervision runs up
to halt_max_steps steps per example, detaching the state in between and counting every step's
loss. A Q-head reads the mean of z_H over the sequence's positions (each causal position has seen
its prefix, so the mean has seen the whole sequence, unlike position 0) and predicts "halt now".

What the Q-head predicts (config.halt_target, `HaltingLoss`): on text, "this sequence's loss after
this step is among the batch's lowest" (`loss_rank`, the default; or `loss_gain`, "one more step
lowers it less than the others'"): HRM's exact match of a whole sequence is never reached there, and
a Q-head trained towards it learns never to halt. On puzzles, HRM/TRM's "the prediction is correct"
(`accuracy`: at least halt_target_accuracy of the predicted tokens right, 1.0 = exact match).
Binary cross-entropy either way (TRM: no extra continue pass). Halted examples leave the batch and
cost no further compute.

State belongs to one example and one forward call: nothing carries over to the next batch, except in
training with config.supervision_updates = "per_step" (HRM/TRM's loop): there a forward runs one supervision
step, the optimizer updates after each, and `SupervisionCarry` hands the states to the next forward.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_recursive import EVAL_HALTING, RecursiveMoEReasonConfig
from .modeling_moe_reason import (MoEReasonCausalLMOutput, MoEReasonForCausalLM, MoEReasonRMSNorm, expert_load,
                                  next_token_loss, next_token_statistics)


@dataclass
class RecursiveCausalLMOutput(MoEReasonCausalLMOutput):
    """`MoEReasonCausalLMOutput` plus the halting figures.

    `loss` = mean over (example, supervision step) of [LM loss + act_loss_coef * halting loss]
    + the router terms; `lm_loss` is the token-mean cross-entropy of each example's final
    prediction (comparable with the base model's); `recursion_steps` [B] counts the supervision
    steps each example ran; `halt_rate` is the share halted before halt_max_steps; `q_accuracy`
    the share of Q-head decisions (halt = logit > 0) that matched the target. As for the base
    model, `logits` is None in training mode with labels (see `predict`). `carry`: what the next training
    forward continues from under supervision_updates="per_step" (else None).
    """

    act_loss: torch.FloatTensor | None = None
    carry: "SupervisionCarry | None" = None
    recursion_steps: torch.FloatTensor | None = None
    halt_rate: torch.FloatTensor | None = None
    q_accuracy: torch.FloatTensor | None = None
    training_metrics: dict | None = None


class LatentInit(nn.Module):
    """Learned initial values of z_H and z_L, one vector each, shared by all positions.

    They receive gradient only where a gradient-carrying pass reads them: with h_cycles = 1
    (TRM's last-cycle gradient) on the first supervision step; otherwise the passes that read
    them run without gradient and they keep their initial value, as HRM's and TRM's fixed buffers do.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, hidden_size))  # [z_H, z_L]


class HaltingHead(nn.Linear):
    """Q-head: pooled z_H [b, H] -> halt logit [b, 1] (halt when > 0)."""


class HaltingLoss:
    """The Q-head's binary cross-entropy towards the configured target, summed over supervision steps.

    `"accuracy"`: the target of a step's decision is known at once (is the prediction correct?).
    `"loss_rank"`: known at once too ("this sequence's loss is at most the batch's halt_quantile
    quantile of this step's losses"), but relative to every example of the batch.
    `"loss_gain"`: the target of step k's decision ("one more step lowers this sequence's loss less
    than the batch's halt_quantile of gains") is known only at step k + 1, so every decision is
    carried one step; the last step's gets none (no step follows it).
    Under both relative targets training runs every example to halt_max_steps (halted examples would
    leave the batch that sets the quantile), and the Q-head halts at evaluation and generation.
    """

    def __init__(self, cfg: RecursiveMoEReasonConfig, zero: torch.Tensor):
        # `right` stays a tensor: counting it on the host would sync the device at every supervision step
        self.cfg, self.sum, self.decisions, self.right, self.pending = cfg, zero, 0, zero, None

    def observe(self, q: torch.Tensor, stats: torch.Tensor) -> None:
        """This step's halt logits q [b] and per-sequence statistics [b, 3] (nll sum, count, right)."""
        nll, count, right = stats.unbind(1)
        if self.cfg.halt_target == "accuracy":
            self.add(q, right / count.clamp(min=1) >= self.cfg.halt_target_accuracy)
            return
        loss = nll / count.clamp(min=1)  # [b] this step's mean next-token NLL per sequence
        if self.cfg.halt_target == "loss_rank":
            self.add(q, loss <= torch.quantile(loss.float(), self.cfg.halt_quantile))
            return
        if self.pending is not None:
            q_before, loss_before = self.pending
            gain = (loss_before - loss) / loss_before.clamp(min=1e-6)  # [b] relative loss reduction of this step
            self.add(q_before, gain <= torch.quantile(gain.float(), self.cfg.halt_quantile))
        self.pending = (q, loss)

    def carry(self, keep: torch.Tensor) -> None:
        """The examples in `keep` run the next step: their decisions wait for its loss."""
        if self.pending is not None:
            self.pending = (self.pending[0][keep], self.pending[1][keep])

    def add(self, q: torch.Tensor, target: torch.Tensor) -> None:
        self.sum = self.sum + F.binary_cross_entropy_with_logits(q.float(), target.float(), reduction="sum")
        self.decisions += len(q)
        self.right = self.right + ((q > 0) == target).sum()


@dataclass
class StepInputs:
    """What every supervision step reads besides the state: the embedded input and its positions and masks."""

    x: torch.Tensor  # [b, S, H] the embedded (normalised) input, injected into every L-update
    token_mask: torch.Tensor  # [b, S] 1 for a real token, 0 for padding
    position_embeddings: tuple  # (cos, sin) [b or 1, S, head_dim] each
    mask: torch.Tensor | None  # the 4-D attention mask, or None

    def rows(self, rows: torch.Tensor) -> "StepInputs":
        """The running examples' rows; tensors shared by the batch (a leading 1) broadcast as they are."""
        def take(t):  # rows is an increasing subset of 0..B-1, so all B of them means no copy is needed
            return t if t is None or t.shape[0] == 1 or len(rows) == t.shape[0] else t.index_select(0, rows)
        cos, sin = self.position_embeddings
        return StepInputs(take(self.x), take(self.token_mask), (take(cos), take(sin)), take(self.mask))

    def first(self) -> "StepInputs":
        return StepInputs(self.x[:1], self.token_mask[:1], tuple(t[:1] for t in self.position_embeddings),
                          None if self.mask is None else self.mask[:1])


@dataclass
class RecursionCarry:
    """What one supervision step hands the next (TRM's carry): the examples still running and their states."""

    rows: torch.Tensor  # [b] their indices in the batch, increasing
    z_H: torch.Tensor  # [b, S, H] the answer state
    z_L: torch.Tensor  # [b, S, H] the scratchpad

    @staticmethod
    def initial(z_init: torch.Tensor, batch: int, length: int) -> "RecursionCarry":
        """Every example, from the learned initial states z_init [2, H] = (z_H, z_L) at every position."""
        return RecursionCarry(torch.arange(batch, device=z_init.device), z_init[0].expand(batch, length, -1),
                              z_init[1].expand(batch, length, -1))


@dataclass
class SupervisionCarry:
    """What one training forward hands the next under supervision_updates="per_step" (TRM's carry across
    batches): each slot's puzzle, its detached states, and how far it has come. A halted slot takes the next
    batch's row in its place; the first forward (carry=None) starts every slot."""

    data: dict  # {input_ids, labels, ...: [B, S]} the slots' current rows
    z_H: torch.Tensor  # [B, S, H]
    z_L: torch.Tensor  # [B, S, H]
    steps: torch.Tensor  # [B] supervision steps run on the slot's current row
    min_steps: torch.Tensor  # [B] the steps before the Q-head may halt it (exploration)
    halted: torch.Tensor  # [B] bool: the slot takes a fresh row at the next forward

    def fits(self, batch: dict) -> bool:
        """Whether the next batch has this carry's rows (names and shapes): otherwise every slot starts afresh."""
        return batch.keys() == self.data.keys() and all(batch[k].shape == self.data[k].shape for k in batch)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors only (saved with a checkpoint as safetensors, loaded by `from_state_dict`)."""
        tensors = {f"data.{k}": v for k, v in self.data.items()}
        tensors.update(z_H=self.z_H, z_L=self.z_L, steps=self.steps, min_steps=self.min_steps, halted=self.halted)
        return {prefix + k: v.contiguous() for k, v in tensors.items()}

    @staticmethod
    def from_state_dict(tensors: dict, prefix: str = "") -> "SupervisionCarry":
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        data = {k[len("data."):]: v for k, v in mine.items() if k.startswith("data.")}
        return SupervisionCarry(data, mine["z_H"], mine["z_L"], mine["steps"], mine["min_steps"],
                                mine["halted"].bool())


@dataclass
class Finished:
    """The examples that halted at one supervision step: batch rows [f], logits [f, S, V] and statistics [f, 3]
    (None where not computed)."""

    rows: torch.Tensor
    logits: torch.Tensor | None
    stats: torch.Tensor | None


@dataclass
class GhostStep:
    """One example's inputs and detached states, which a rank whose examples all halted repeats (`ghost_step`)."""

    inputs: StepInputs
    z_H: torch.Tensor
    z_L: torch.Tensor


class RecursiveMoEReasonForCausalLM(MoEReasonForCausalLM):
    config_class = RecursiveMoEReasonConfig
    config: RecursiveMoEReasonConfig

    def __init__(self, config: RecursiveMoEReasonConfig):
        super().__init__(config)
        self.z_init = LatentInit(config.hidden_size)
        # without ACT there is nothing to halt: no Q-head, no halting loss, every supervision step runs
        self.q_head = HaltingHead(config.hidden_size, 1) if config.use_act else None
        self.input_norm = MoEReasonRMSNorm(config.hidden_size, config.rms_norm_eps) if config.input_norm else None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The base model's initialisation, plus: z_init = 0, so the first pass sees exactly the embedded
        input; Q-head weight 0 and bias -5 towards "accuracy", so halting starts almost never (as in TRM), or
        towards a relative target the log-odds of its target's share (0 for the median), where it starts learning."""
        super()._init_weights(module)
        if isinstance(module, LatentInit):
            init.zeros_(module.weight)
        elif isinstance(module, HaltingHead):
            share = self.config.halt_quantile
            init.zeros_(module.weight)
            init.constant_(module.bias,
                           -5.0 if self.config.halt_target == "accuracy" else math.log(share / (1 - share)))

    # ---- the recurrent network

    def shared_pass(self, hidden, position_embeddings, mask):
        """One pass of the shared network: decoder stack + final norm -> (hidden, router logits, experts).

        Under torch.compile this is the compiled unit (see `forward`): a pure function of tensors,
        so its guards do not depend on where in the recursion it is called.
        """
        hidden, router_logits, experts, _ = self.model.decode(hidden, position_embeddings, mask)
        return self.model.norm(hidden), router_logits, experts

    @torch.compiler.disable(recursive=False)  # eager control flow; each `shared_pass` compiles (see `forward`)
    def supervision_step(self, x, z_H, z_L, position_embeddings, mask, token_mask):
        """h_cycles x (l_cycles L-updates + 1 H-update); gradient only through the configured last passes.

        -> (z_H, z_L, passes): one (router logits, experts, token mask) record per pass.
        """
        cfg = self.config
        total = cfg.h_cycles * (cfg.l_cycles + 1)
        with_grad = cfg.grad_passes_per_supervision_step()
        passes, index = [], 0
        for _ in range(cfg.h_cycles):
            for _ in range(cfg.l_cycles):
                with torch.set_grad_enabled(torch.is_grad_enabled() and index >= total - with_grad):
                    z_L, router_logits, experts = self.shared_pass(z_L + z_H + x, position_embeddings, mask)
                passes.append((router_logits, experts, token_mask))
                index += 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= total - with_grad):
                z_H, router_logits, experts = self.shared_pass(z_H + z_L, position_embeddings, mask)
            passes.append((router_logits, experts, token_mask))
            index += 1
        return z_H, z_L, passes

    # ---- forward with deep supervision and halting

    # Under torch.compile the recursion's control flow (halting, dropping halted rows, collecting the
    # passes) runs eagerly, and what it calls is compiled function by function: above all `shared_pass`, the
    # decoder stack, whose guards see only tensor shapes, so halting costs one dynamic-shape recompile.
    # Traced whole, the loop unrolled into a frame per pass and hit the recompile limit within a step.
    @torch.compiler.disable(recursive=False)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep: int = 0, halt_max_steps: int | None = None, eval_halting: str | None = None,
                eval_halt_threshold: float | None = None, carry: SupervisionCarry | None = None,
                **kwargs) -> RecursiveCausalLMOutput:
        """`halt_max_steps`, `eval_halting` and `eval_halt_threshold` override the config's for this call only:
        evaluation at another depth than the trained one (test-time compute) or with the Q-head halting.
        In training under supervision_updates="per_step", one supervision step from `carry` (`carried_forward`)."""
        cfg = self.config
        if self.training and cfg.supervision_updates == "per_step":
            if labels is None or inputs_embeds is not None:
                raise ValueError("supervision_updates='per_step' trains on input_ids with labels: a slot's row is "
                                 "kept for its next supervision step")
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                     "position_ids": position_ids}
            return self.carried_forward(carry, {k: v for k, v in batch.items() if v is not None})
        max_steps = cfg.halt_max_steps if halt_max_steps is None else halt_max_steps
        eval_halting = cfg.eval_halting if eval_halting is None else eval_halting
        if max_steps < 1 or eval_halting not in EVAL_HALTING:
            raise ValueError(f"halt_max_steps={max_steps} and eval_halting={eval_halting!r}: need >= 1 and one of "
                             f"{EVAL_HALTING}")
        inputs = self.step_inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        B, device = inputs.x.shape[0], inputs.x.device
        # training halts by the Q-head only towards "accuracy": a relative target is set by the whole batch at every
        # step ("loss_gain"'s also needs the next step; a halted example's would stay unknown)
        halt_by_q = cfg.use_act and (cfg.halt_target == "accuracy" if self.training else eval_halting == "q_head")
        threshold = cfg.eval_halt_threshold if eval_halt_threshold is None else eval_halt_threshold
        halt_logit = 0.0 if self.training else math.log(threshold / (1 - threshold))  # training halts at q > 0
        min_steps = self.minimum_steps(B, max_steps, device)
        carry = RecursionCarry.initial(self.z_init.weight.to(inputs.x.dtype), B, inputs.x.shape[1])
        passes, finished, steps = [], [], torch.zeros(B, device=device)
        lm_sum, pairs = inputs.x.new_zeros((), dtype=torch.float32), 0
        halting = HaltingLoss(cfg, inputs.x.new_zeros((), dtype=torch.float32))
        ghost, ghost_term = None, inputs.x.new_zeros((), dtype=torch.float32)
        for step in range(1, max_steps + 1):
            if len(carry.rows) == 0:  # every local example halted, but another rank still runs
                ghost_term = ghost_term + self.ghost_step(ghost)
                if not self.any_rank_running(False, device):
                    break
                continue
            here = inputs.rows(carry.rows)
            z_H, z_L, step_passes = self.supervision_step(here.x, carry.z_H, carry.z_L, here.position_embeddings,
                                                          here.mask, here.token_mask)
            passes += step_passes
            q = self.halt_logits(z_H, here.token_mask)
            steps[carry.rows] = step
            halt = torch.full((len(carry.rows),), step == max_steps, dtype=torch.bool, device=device)
            logits, stats, lm_term = self.predict(z_H, None if labels is None else labels[carry.rows], logits_to_keep)
            if stats is not None:
                lm_sum, pairs = lm_sum + lm_term, pairs + len(carry.rows)
                if q is not None:
                    halting.observe(q, stats)
            if halt_by_q:
                halt = halt | ((q.detach() > halt_logit) & (step >= min_steps[carry.rows]))
            finished.append(Finished(carry.rows[halt], None if logits is None else logits[halt],
                                     None if stats is None else stats[halt]))
            halting.carry(~halt)
            ghost = GhostStep(here.first(), z_H[:1].detach(), z_L[:1].detach())
            carry = RecursionCarry(carry.rows[~halt], z_H[~halt].detach(), z_L[~halt].detach())  # detached between
            if not self.any_rank_running(len(carry.rows) > 0, device):
                break
        return self.output(finished, passes, halting, lm_sum, pairs, ghost_term, steps, max_steps, labels,
                           logits_to_keep)

    def halt_logits(self, z_H, token_mask) -> torch.Tensor | None:
        """[b] the Q-head's halt logits, from z_H [b, S, H] pooled over the real positions (None without ACT)."""
        if self.q_head is None:
            return None
        pooled = (z_H * token_mask[..., None]).sum(1) / token_mask.sum(1, keepdim=True).clamp(min=1)  # [b, H]
        return self.q_head(pooled).squeeze(-1)

    @torch.compiler.disable(recursive=False)  # eager, as `forward`; what it calls compiles
    def carried_forward(self, carry: SupervisionCarry | None, batch: dict) -> RecursiveCausalLMOutput:
        """One supervision step on every slot (training under supervision_updates="per_step").

        Slots that halted at the last forward (every slot at the first) take this batch's row, the learned
        initial states and a fresh exploration draw; the others go on with their row and states. Every slot
        runs the same step, so the ranks of a distributed run stay in step without ghost steps. The loss is
        the step's, as `forward`'s is the mean over its steps: LM loss + act_loss_coef x halting loss, per row.
        """
        cfg, (B, S), device = self.config, batch["input_ids"].shape, batch["input_ids"].device
        z_init = self.z_init.weight  # [2, H]
        if carry is None or not carry.fits(batch):  # as if every slot had halted: each takes its row of this batch
            start, zero = z_init.detach()[:, None, None].expand(2, B, S, -1), torch.zeros(B, dtype=torch.long,
                                                                                           device=device)
            carry = SupervisionCarry(batch, start[0], start[1], zero, zero, torch.ones_like(zero, dtype=torch.bool))
        fresh = carry.halted  # [B]
        data = {k: torch.where(fresh.view(-1, *[1] * (v.ndim - 1)), v, carry.data[k]) for k, v in batch.items()}
        inputs = self.step_inputs(data["input_ids"], None, data.get("attention_mask"), data.get("position_ids"))
        z_init = z_init.to(inputs.x.dtype)
        z_H = torch.where(fresh[:, None, None], z_init[0], carry.z_H)  # [B, S, H]: the initial state where fresh
        z_L = torch.where(fresh[:, None, None], z_init[1], carry.z_L)
        steps = torch.where(fresh, 0, carry.steps) + 1
        min_steps = torch.where(fresh, self.minimum_steps(B, cfg.halt_max_steps, device), carry.min_steps)
        z_H, z_L, passes = self.supervision_step(inputs.x, z_H, z_L, inputs.position_embeddings, inputs.mask,
                                                 inputs.token_mask)
        q = self.halt_logits(z_H, inputs.token_mask)
        _, stats, lm_term = self.predict(z_H, data["labels"])
        halting = HaltingLoss(cfg, inputs.x.new_zeros((), dtype=torch.float32))
        if q is not None:
            halting.observe(q, stats)
        halt = steps >= cfg.halt_max_steps
        if q is not None and cfg.halt_target == "accuracy":  # a relative target halts at evaluation only
            halt = halt | ((q.detach() > 0) & (steps >= min_steps))
        aux, z_loss, load = self.pass_router_losses(passes)
        loss = self.combine_losses((lm_term + cfg.act_loss_coef * halting.sum) / B, aux, z_loss)
        finished = halt.float()  # [B] the slots whose row ends with this step
        metrics = {"finished_rows": finished.mean(), "finished_steps": (finished * steps).mean(),
                   "finished_early": (finished * (steps < cfg.halt_max_steps)).mean()}
        act_loss = halting.sum / B if q is not None else None
        if act_loss is not None:
            metrics.update(act_loss=act_loss.detach(), q_accuracy=halting.right / halting.decisions)
        return RecursiveCausalLMOutput(
            loss=loss, aux_loss=aux, lm_loss=stats[:, 0].sum() / stats[:, 1].sum().clamp(min=1), z_loss=z_loss,
            expert_load=load, act_loss=act_loss, recursion_steps=steps.float(),
            q_accuracy=metrics.get("q_accuracy"), training_metrics=metrics,
            carry=SupervisionCarry(data, z_H.detach(), z_L.detach(), steps, min_steps, halt))

    @torch.compiler.disable(recursive=False)  # eager, as `forward`; what it calls compiles
    def step_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids) -> "StepInputs":
        """The embedded input (once per forward, RMS-normalised unless config.input_norm is off), its positions and
        masks, for the whole batch."""
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, H]
        x = x if self.input_norm is None else self.input_norm(x)
        B, S, _ = x.shape
        position_embeddings, mask = self.model.prepare_positions(x, attention_mask, position_ids, None)
        token_mask = attention_mask[:, -S:].to(x.dtype) if attention_mask is not None else x.new_ones(B, S)
        return StepInputs(x, token_mask, position_embeddings, mask)

    @torch.compiler.disable(recursive=False)  # eager, as `forward`; what it calls compiles
    def minimum_steps(self, batch: int, max_steps: int, device) -> torch.Tensor:
        """[B] the steps each example must run before the Q-head may halt it: 1, or in training with probability
        halt_exploration_prob a number drawn from [2, max_steps] (HRM/TRM's exploration)."""
        cfg, min_steps = self.config, torch.ones(batch, dtype=torch.long, device=device)
        if self.training and cfg.use_act and cfg.halt_exploration_prob > 0 and max_steps >= 2:
            explore = torch.rand(batch, device=device) < cfg.halt_exploration_prob
            min_steps = torch.where(explore, torch.randint(2, max_steps + 1, (batch,), device=device), min_steps)
        return min_steps

    @torch.compiler.disable(recursive=False)  # eager, as `forward`; what it calls compiles
    def output(self, finished, passes, halting, lm_sum, pairs, ghost_term, steps, max_steps, labels,
               logits_to_keep) -> RecursiveCausalLMOutput:
        """The forward's losses and figures from what the supervision steps left."""
        cfg = self.config
        final_logits, final_stats = self.gather_finished(finished)
        aux, z_loss, load = self.pass_router_losses(passes)
        lm_loss = loss = act_loss = None
        if labels is not None:
            lm_loss = final_stats[:, 0].sum() / final_stats[:, 1].sum().clamp(min=1)  # token mean, as the base's
            act_loss = halting.sum / pairs if cfg.use_act else None
            loss = self.combine_losses((lm_sum + cfg.act_loss_coef * halting.sum) / pairs, aux, z_loss) + ghost_term
        if logits_to_keep and final_logits is not None and labels is not None:
            final_logits = final_logits[:, -logits_to_keep:]
        halt_rate = (steps < max_steps).float().mean()
        q_accuracy = halting.right / halting.decisions if halting.decisions else None
        metrics = {"recursion_steps": steps.mean(), "halt_rate": halt_rate}
        if act_loss is not None:
            metrics.update(act_loss=act_loss.detach(), q_accuracy=q_accuracy)
        return RecursiveCausalLMOutput(
            loss=loss, aux_loss=aux, logits=final_logits, lm_loss=lm_loss, z_loss=z_loss, expert_load=load,
            act_loss=act_loss, recursion_steps=steps, halt_rate=halt_rate, q_accuracy=q_accuracy,
            training_metrics=metrics,
        )

    @staticmethod
    @torch.compiler.disable  # the number and sizes of the pieces follow halting: traced, each pattern compiles anew
    def gather_finished(finished):
        """Each step's `Finished` examples -> logits [B, S, V] in batch order and statistics [B, 3] (in any
        order), each None where the steps produced none."""
        batch_order = torch.argsort(torch.cat([f.rows for f in finished]))
        logits = torch.cat([f.logits for f in finished])[batch_order] if finished[0].logits is not None else None
        stats = torch.cat([f.stats for f in finished]) if finished[0].stats is not None else None
        return logits, stats

    @torch.compiler.disable  # the chunk loop's length follows the active rows: traced, each count compiles anew
    def predict(self, z_H, labels, logits_to_keep: int = 0):
        """The LM head on z_H -> (logits, statistics, lm_term), each None where it is not needed.

        logits [b, S, V]; statistics [b, 3] per sequence as `next_token_statistics` (no gradient);
        lm_term = the sum over sequences of each one's mean next-token NLL, with gradient. In
        training with labels the logits are not needed: the rest comes from `next_token_loss`
        chunk by chunk, and no [b, S, V] tensor is formed.
        """
        shift = not self.config.bidirectional
        if labels is not None and self.training:
            lm_term, stats = next_token_loss(self.lm_head, z_H, labels, per_sequence=True, shift=shift)
            return None, stats, lm_term
        logits = self.lm_head(z_H if labels is not None or logits_to_keep == 0 else z_H[:, -logits_to_keep:])
        if labels is None:
            return logits, None, None
        stats = next_token_statistics(logits, labels, shift, self.config.stablemax_loss)
        return logits, stats.detach(), (stats[:, 0] / stats[:, 1].clamp(min=1)).sum()

    # ---- keeping the ranks of a distributed run in step
    #
    # Halting makes the number of supervision steps differ between examples, and so between ranks.
    # But every rank must call the same modules the same number of times: ZeRO-3 gathers a module's
    # parameters with a collective at each call, and the gradient reduction expects every parameter
    # on every rank. Only the forward knows where its halting loop stands, so the agreement lives
    # here in the model: `any_rank_running` (one small all-reduce per step) decides together when to
    # stop, and a rank whose examples have all halted runs `ghost_step` until the others are done.
    # Outside a process group both cost nothing.

    # Evaluation halts by the Q-head too (eval_halting="q_head"), and a forward with collectives inside
    # (the all-to-alls of expert parallelism) needs the ranks in step there as well. Only the caller knows
    # whether every rank runs each evaluation forward together: the trainer says so by setting this; a
    # model evaluated or generating on one process alone must not wait for the others.
    evaluates_in_step: bool = False

    @torch.compiler.disable(recursive=False)  # eager, as `forward`; the passes it runs compile as usual
    def ghost_step(self, ghost: "GhostStep") -> torch.Tensor:
        """Repeat one supervision step on a detached copy of the last example's state -> a zero loss term
        that still reaches the LM head and Q-head, so their parameters take part as on the other ranks."""
        inputs = ghost.inputs
        z_H, _, _ = self.supervision_step(inputs.x, ghost.z_H, ghost.z_L, inputs.position_embeddings, inputs.mask,
                                          inputs.token_mask)
        q_term = 0.0 if self.q_head is None else self.q_head(z_H).float().sum()
        return 0.0 * (self.lm_head(z_H).float().sum() + q_term)

    def any_rank_running(self, local: bool, device) -> bool:
        """Whether any rank still has examples running (one small all-reduce per step in distributed training,
        and in distributed evaluation where `evaluates_in_step`)."""
        if not ((self.training or self.evaluates_in_step) and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return local
        flag = torch.tensor([float(local)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    @torch.compiler.disable  # the passes' number and shapes follow halting: traced, each pattern compiles anew
    def pass_router_losses(self, passes):
        """Aux loss and z-loss averaged over every pass; expert load summed over every pass."""
        aux_terms, z_terms, load = [], [], None
        for router_logits, experts, token_mask in passes:
            aux, z = self.router_losses(router_logits, experts, token_mask)
            aux_terms += [aux] if aux is not None else []
            z_terms += [z] if z is not None else []
            pass_load = expert_load(experts, self.config.num_experts)
            load = pass_load if load is None else load + pass_load
        aux = torch.stack(aux_terms).mean() if aux_terms else None
        z = torch.stack(z_terms).mean() if z_terms else None
        return aux, z, load

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No KV cache: every decoding step reruns the recursion over the whole prefix."""
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
