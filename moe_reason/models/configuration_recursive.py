"""Configuration of the recursive-reasoning variant (HRM/TRM-style latent recursion)."""

from .configuration_moe_reason import MoEReasonConfig, _is_int, require

RECURSION_GRADIENTS = ("last_cycle", "one_step")
HALT_TARGETS = ("loss_rank", "loss_gain", "accuracy")
EVAL_HALTING = ("max_steps", "q_head")
SUPERVISION_UPDATES = ("per_batch", "per_step")


class RecursiveMoEReasonConfig(MoEReasonConfig):
    r"""Configuration of [`RecursiveMoEReasonForCausalLM`]: every `MoEReasonConfig` field plus the recursion.

    Args:
        h_cycles (`int`): answer-state updates per supervision step (HRM's H cycles).
        l_cycles (`int`): scratchpad updates before each answer update (HRM's L cycles).
        halt_max_steps (`int`): most supervision steps (deep supervision) per example.
        halt_exploration_prob (`float`): in training, chance that an example must run a random minimum
            number of steps in [2, halt_max_steps] before the Q-head may halt it (HRM/TRM exploration).
        use_act (`bool`): adaptive computation time: a Q-head learns when to halt and halts examples
            early. Without it the model has no Q-head and no halting loss, and every example runs exactly
            `halt_max_steps` supervision steps, in training and at evaluation.
        recursion_gradient (`str`): `"last_cycle"`: backprop through the whole last H cycle
            (its l_cycles + 1 passes, TRM's choice); `"one_step"`: only the last L pass and the H
            pass (HRM's one-step approximation). Earlier passes always run without gradient.
        act_loss_coef (`float`): weight of the halting (Q-head) loss.
        halt_target (`str`): what the Q-head learns to predict. For text, where HRM's exact match of a
            whole sequence is never reached (a Q-head trained towards it learns never to halt), a
            target relative to the batch:
            `"loss_rank"` (the default): halt at step k when this sequence's loss after step k is
            among the batch's lowest (at most its `halt_quantile` quantile), so the further steps go
            to the sequences the model still predicts worst. Content sets it (boilerplate against
            dense code), so the Q-head can learn it from z_H once z_H tells sequences apart.
            `"loss_gain"`: halt where one more step lowers this sequence's loss less than it lowers
            the others' (relative gain at most the `halt_quantile` quantile).
            Either way training runs every example to halt_max_steps (the quantile is over the whole
            batch, and `"loss_gain"`'s target of step k is known only at step k + 1); the Q-head halts
            at evaluation (`eval_halting`) and in generation.
            `"accuracy"`, for puzzles: halt when the prediction is correct (`halt_target_accuracy`),
            HRM/TRM's target; training halts by it too. A reasoning task sets it.
        halt_quantile (`float`): with `"loss_rank"` or `"loss_gain"`, the share of each batch's
            sequences whose target is "halt", in (0, 1).
        halt_target_accuracy (`float`): with `"accuracy"`, a sequence's prediction counts as correct
            when at least this share of its predicted tokens is right (1.0 = every token, HRM's
            exact match), in (0, 1].
        input_norm (`bool`): RMS-normalise the embedded input x (learned gain) before it is injected into
            every L-update, so it enters at the states' scale (they leave each pass through the final
            norm at RMS 1), as HRM/TRM's inputs do. `False` injects the raw embedding (RMS about
            `initializer_range`, 1/50 of z_H + z_L): once the trained stack adds a large component
            shared by all tokens, each pass shrinks what tells tokens apart, and on text z_H
            collapses towards one vector (the unigram plateau).
        eval_halting (`str`): at evaluation, `"max_steps"` runs every example to `halt_max_steps`;
            `"q_head"` lets the Q-head halt them.
        eval_halt_threshold (`float`): with `"q_head"` at evaluation, halt an example when the Q-head gives
            "halt" at least this probability, in (0, 1). 0.5 is training's rule (logit > 0, TRM's); a higher
            one spends more steps to halt fewer examples that are not yet right.
        supervision_updates (`str`): how deep supervision meets the optimizer in training. `"per_batch"`: one
            forward runs every supervision step of the batch and the one update follows the sum of their
            losses. `"per_step"` (HRM/TRM's training loop): one forward runs one supervision step on every
            slot of the batch and the update follows it, so a batch's halt_max_steps steps make that many
            updates for the same compute; each slot's state is carried to the next forward (`carry=`), and a
            slot whose row halted takes the next batch's row in its place (the batch's other rows go
            unused, as in TRM). Evaluation runs every step in one forward either way. Needs labels in
            training, and a halt target known at once (not `"loss_gain"`).
    """

    model_type = "moe_reason_recursive"

    h_cycles: int = 2
    l_cycles: int = 2
    halt_max_steps: int = 2
    halt_exploration_prob: float = 0.1
    use_act: bool = True
    recursion_gradient: str = "last_cycle"
    act_loss_coef: float = 0.5
    halt_target: str = "loss_rank"
    halt_quantile: float = 0.5
    halt_target_accuracy: float = 1.0
    input_norm: bool = True
    eval_halting: str = "max_steps"
    eval_halt_threshold: float = 0.5
    supervision_updates: str = "per_batch"
    use_cache: bool = False  # generation recomputes the recursion over the whole prefix (no KV cache)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # a config.json written before input_norm existed belongs to weights trained on the raw embedding
        return super().from_dict({"input_norm": False, **config_dict}, **kwargs)

    def check(self) -> None:
        super().check()
        for name in ("h_cycles", "l_cycles", "halt_max_steps"):
            require(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        require(self, "halt_exploration_prob", 0.0 <= self.halt_exploration_prob <= 1.0, "a probability in [0, 1]")
        require(self, "recursion_gradient", self.recursion_gradient in RECURSION_GRADIENTS,
                 f"one of {RECURSION_GRADIENTS}")
        require(self, "act_loss_coef", self.act_loss_coef >= 0.0, "a number >= 0")
        require(self, "halt_target", self.halt_target in HALT_TARGETS, f"one of {HALT_TARGETS}")
        require(self, "halt_quantile", 0.0 < self.halt_quantile < 1.0, "a share in (0, 1)")
        require(self, "halt_target_accuracy", 0.0 < self.halt_target_accuracy <= 1.0, "a share in (0, 1]")
        require(self, "eval_halting", self.eval_halting in EVAL_HALTING, f"one of {EVAL_HALTING}")
        require(self, "eval_halt_threshold", 0.0 < self.eval_halt_threshold < 1.0, "a probability in (0, 1)")
        require(self, "supervision_updates", self.supervision_updates in SUPERVISION_UPDATES,
                f"one of {SUPERVISION_UPDATES}")
        require(self, "supervision_updates", self.supervision_updates == "per_batch" or self.halt_target != "loss_gain",
                "'per_batch' with halt_target 'loss_gain': its target of step k is known only at step k + 1, which "
                "'per_step' runs in the next update")
        require(self, "use_cache", not self.use_cache, "False: the recursive model has no KV cache")

    def training_supervision_steps(self) -> int:
        """Supervision steps one training forward runs at most: all of them, or one (`supervision_updates`)."""
        return self.halt_max_steps if self.supervision_updates == "per_batch" else 1

    def passes_per_step(self) -> int:
        """Decoder-stack passes of one training forward at most: per supervision step h*(l+1)."""
        return self.h_cycles * (self.l_cycles + 1) * self.training_supervision_steps()

    def every_parameter_learns(self) -> bool:
        """The learned initial states get a gradient only where a pass with gradient reads them: with one H cycle,
        on the first supervision step (`LatentInit`). With more, every pass that reads them runs without
        gradient, and they keep their initial value. Under per-step updates every update's passes read them
        (`torch.where` picks them for the slots starting a row), so they get a gradient, zero where none starts."""
        return self.h_cycles == 1

    def grad_passes_per_supervision_step(self) -> int:
        """The last passes of a supervision step that run with gradient (the rest run under no_grad)."""
        return min(self.l_cycles + 1 if self.recursion_gradient == "last_cycle" else 2,
                   self.h_cycles * (self.l_cycles + 1))
