"""LoRA fine-tuning through peft, reaching every expert.

Attention and the shared experts are `nn.Linear`s, which peft adapts by module name
(`target_modules`). The routed experts are stacked `nn.Parameter`s [E, in, out] with no Linear to
wrap, so peft adapts them by parameter name (`target_parameters`, peft >= 0.17): each expert gets
its own rank-r update. The router, norms, embeddings and the recursive model's halting head stay
frozen. peft is imported on use: only LoRA runs need it (`pip install -e ".[lora]"`).

    accelerate launch train.py --init_from outputs/run/final --lora_rank 8 --output_dir outputs/lora

The trainer's exports (best/, final/) and `moe-reason-export` of a LoRA checkpoint are the merged
model: a plain from_pretrained folder, whose logits equal the adapter model's.
"""

import copy
from pathlib import Path

import torch

ATTENTION_MODULES = ["qkv_proj", "o_proj"]
SHARED_EXPERT_MODULES = ["shared_experts.up_proj", "shared_experts.down_proj"]
EXPERT_PARAMETERS = ["experts.up_proj", "experts.down_proj"]
ADAPTER_CONFIG = "adapter_config.json"  # peft's name for it; a LoRA run's checkpoints hold one


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("--lora_rank needs peft >= 0.17: pip install -e \".[lora]\"") from err
    return peft


def lora_config(rank: int, alpha: float | None = None):
    """peft's LoraConfig for this model family: attention, shared experts and every routed expert at `rank`,
    scaled by alpha / rank (alpha defaults to 2 x rank)."""
    # no dropout: peft cannot apply it to a parameter-targeted update, whose input is never seen on its own
    return _peft().LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0,
                              target_modules=ATTENTION_MODULES + SHARED_EXPERT_MODULES,
                              target_parameters=EXPERT_PARAMETERS)


def add_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` wrapped by peft with `config`: only the LoRA factors train."""
    return _peft().get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is peft's wrapper (the model it wraps also gains a `peft_config`, so that is no test)."""
    return callable(getattr(model, "merge_and_unload", None))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA model's updates folded into a copy of its base model (the model itself is left as it is)."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model


def load_lora_config(folder):
    """The LoraConfig a LoRA run saved in a checkpoint folder, or None for a run without LoRA."""
    if not (Path(folder) / ADAPTER_CONFIG).is_file():
        return None
    config = _peft().LoraConfig.from_pretrained(str(folder))
    # the base model is the one rebuilt from the checkpoint, which holds its weights too: the name saved (the
    # run's --init_from) would only make peft warn that it was renamed, and ask to check the base model
    config.base_model_name_or_path = None
    return config
