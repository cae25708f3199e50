"""Reading a checkpoint without running what it holds, and naming the file when it cannot be read.

A checkpoint folder can come from anywhere (a shared disk, a download), and a pickle runs code when
it is loaded. What a resume reads:
    model.safetensors, expert shards     safetensors: tensors only
    trainer_state.json                   JSON (the loop's state and the learning-rate schedule)
    optimizer.bin, random_states_*.pkl   Accelerate loads them with torch.load(weights_only=True)
    DeepSpeed's *_model_states.pt and    DeepSpeed loads them with weights_only=False: `deepspeed_weights_only`
      *_optim_states.pt                    makes it weights_only=True with its three own types allow-listed
An earlier version's custom_checkpoint_0.pkl (Accelerate would unpickle it with weights_only=False) is
refused with a way out. Accelerate swallows a failure to read the random states (the resume would then not be exact), so
`check_random_states` reads them first; any other failure is traced to its file by `damaged_files`,
as it is for an exported model folder (`from_pretrained`).
"""

import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from .errors import MissingFileError, UserError


def deepspeed_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO checkpoint files hold (imported only for DeepSpeed runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def deepspeed_weights_only(model):
    """While it lasts, the DeepSpeed engine `model` reads its checkpoint files with weights_only=True."""
    checkpoint_engine = getattr(model, "checkpoint_engine", None)  # only a DeepSpeedEngine has one
    if checkpoint_engine is None:
        yield
        return
    allowed = deepspeed_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load  # the class's own method again


def load_deepspeed_file(path, map_location="cpu"):
    """One of DeepSpeed's *.pt checkpoint files, tensors and its three own types only."""
    with torch.serialization.safe_globals(deepspeed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def torch_load_weights_only():
    """While it lasts, torch.load reads tensors and DeepSpeed's own types only, whatever its caller asks
    (DeepSpeed's zero_to_fp32 asks for weights_only=False)."""
    original = torch.load

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(deepspeed_globals()):
            return original(f, map_location, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def check_no_custom_pickles(checkpoint: Path) -> None:
    """Refuse Accelerate's custom_checkpoint_N.pkl: it would load it with weights_only=False. Earlier versions
    of this trainer wrote the learning-rate schedule there; it is a function of the step and is recomputed."""
    found = sorted(p.name for p in Path(checkpoint).glob("custom_checkpoint_*.pkl"))
    if found:
        raise UserError(f"checkpoint {checkpoint} holds {', '.join(found)}: a pickle, which Accelerate would load "
                        "with weights_only=False, where it can run code. It is not loaded. If the checkpoint is "
                        "yours (an earlier version of this trainer saved its learning-rate schedule there), delete "
                        "the file and resume: the schedule is recomputed from the step")


def check_random_states(checkpoint: Path, process_index: int, required: bool = True) -> bool:
    """This process's random states must load: without them a resume is silently not exact. Not `required`
    (a resume on more processes than saved the checkpoint), a missing file -> False."""
    path = Path(checkpoint) / f"random_states_{process_index}.pkl"
    if not path.is_file() and not required:
        return False
    if not path.is_file():
        raise MissingFileError(f"checkpoint {checkpoint} has no {path.name}: the resumed run could not continue "
                               "the random streams (dropout, routing noise) where they stopped. Resume from a "
                               "complete checkpoint, or start afresh with --init_from on an exported model.")
    try:
        accelerate_load(path)
    except Exception as err:  # noqa: BLE001  (what matters is that it does not load)
        raise UserError(f"checkpoint {checkpoint}: {path.name} {_why_unreadable(err)}; resume from an earlier "
                        "checkpoint (--resume_from_checkpoint DIR)") from None
    return True


def damaged_files(checkpoint: Path, extra_globals=()) -> list[str]:
    """Each file of the checkpoint that does not read as tensors (safetensors, or torch.load with
    weights_only=True and `extra_globals` allowed), as "NAME why"."""
    found = []
    for path in sorted(Path(checkpoint).rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix in (".bin", ".pt", ".pkl", ".pth"):
                with torch.serialization.safe_globals(list(extra_globals)):
                    accelerate_load(path, map_location="cpu")
        except Exception as err:  # noqa: BLE001
            found.append(f"{path.relative_to(checkpoint)} {_why_unreadable(err)}")
    return found


def _why_unreadable(err: Exception) -> str:
    """A reason that names no unsafe remedy (torch's own message suggests weights_only=False)."""
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        return "holds objects other than tensors, which are not loaded (it may have been tampered with)"
    return f"is damaged or truncated ({type(err).__name__})"


def from_pretrained(model_class, folder, strict: bool = True, **kwargs):
    """`model_class.from_pretrained(folder)`, naming the damaged file when the folder does not load.

    `strict`: refuse a folder whose weights are not all of the model's, under its names and shapes, and nothing
    else. transformers only warns, and leaves each missing weight randomly initialised: a model evaluated so is
    a random one. Off where the folder starts a model that adds weights of its own (`--init_from`).
    """
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    except Exception:
        damaged = damaged_files(Path(folder)) if Path(folder).is_dir() else []
        if not damaged:
            raise
        raise UserError(f"model folder {folder} cannot be loaded: {'; '.join(damaged)}") from None
    if not strict:
        return model
    wrong = {what: sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or ())
             for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                               ("of another shape", "mismatched_keys"))}
    if any(wrong.values()):
        raise UserError(f"model folder {folder} does not hold this model's weights: " + "; ".join(
            f"{len(names)} {what} (e.g. {', '.join(names[:3])})" for what, names in wrong.items() if names))
    return model
