"""The recursive model's carry from one training forward to the next (supervision_updates="per_step"): one
per micro-batch position of an optimizer step, each rank its own, saved with every checkpoint so that a
resumed run goes on with the same slots, states and rows."""

from pathlib import Path

from safetensors.torch import load_file

from ..layout import carry_name
from ..models.modeling_recursive import SupervisionCarry


class Carries:
    """The carries of one rank, by micro-batch position; nothing (and no keyword) for a model that keeps none."""

    def __init__(self, config):
        self.enabled = getattr(config, "supervision_updates", "per_batch") == "per_step"
        self.by_position: dict[int, SupervisionCarry] = {}

    def kwargs(self, position: int) -> dict:
        """What the model's forward takes for the micro-batch at `position` of the step."""
        return {"carry": self.by_position.get(position)} if self.enabled else {}

    def keep(self, position: int, output) -> None:
        if self.enabled:
            self.by_position[position] = output.carry

    def files(self, rank: int, world_size: int) -> dict[str, dict]:
        """{file name: tensors} to save in a checkpoint (empty where there is nothing to carry)."""
        if not self.by_position:
            return {}
        tensors = {}
        for position, carry in self.by_position.items():
            tensors.update(carry.state_dict(f"{position}."))
        return {carry_name(rank, world_size): tensors}

    def load(self, checkpoint: Path, rank: int, world_size: int, device) -> str | None:
        """This rank's carries from `checkpoint` -> None, or why every slot starts afresh instead."""
        if not self.enabled:
            return None
        path = Path(checkpoint) / carry_name(rank, world_size)
        if not path.is_file():
            return (f"{checkpoint.name} holds no {path.name} (saved by another number of processes): every slot "
                    "starts a fresh row")
        tensors = {k: v.to(device) for k, v in load_file(path).items()}
        positions = sorted({int(k.split(".", 1)[0]) for k in tensors})
        self.by_position = {p: SupervisionCarry.from_state_dict(tensors, f"{p}.") for p in positions}
        return None
