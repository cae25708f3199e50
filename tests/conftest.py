"""Shared fixtures: offline Hub, deterministic seeds, tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import moe_reason  # noqa: F401  (registers the Auto classes)
from moe_reason import MoEReasonConfig, MoEReasonForCausalLM


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(**overrides) -> MoEReasonForCausalLM:
    """The `debug` preset (hidden 32, 2 layers, 4 experts, top-2) in eval mode."""
    return MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug", **overrides)).eval()


def random_ids(batch=2, seq=16, vocab=256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))
