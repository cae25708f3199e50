"""An exponential moving average of the model's weights (TRM's stabiliser; useful for language models too).

    ema <- decay * ema + (1 - decay) * weights      after every optimizer step

The average is kept in fp32 beside the model. Evaluation and exports swap it into the model for
their duration (`applied`); training always continues from the raw weights. It is saved in each
checkpoint as safetensors, so a resumed run continues the same average.
"""

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for _, p in model.named_parameters()]
        self.names = [n for n, _ in model.named_parameters()]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """The averaged weights in the model inside the block, the raw ones restored after it."""
        raw = [p.detach().clone() for p in self.params]
        for p, a in zip(self.params, self.average):
            p.copy_(a)
        try:
            yield
        finally:
            for p, r in zip(self.params, raw):
                p.copy_(r)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: a.contiguous() for name, a in zip(self.names, self.average)}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise UserError(f"{source} lacks the EMA of {len(missing)} parameter(s), e.g. {missing[:3]}; resume "
                            "with the --ema_decay the checkpoint was saved with")
        for name, a in zip(self.names, self.average):
            a.copy_(state[name])
