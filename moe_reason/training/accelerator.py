"""The Accelerator a run trains under: gloo across CPU processes, DDP told of parameters that get no
gradient, the trackers asked for (refused where not installed), DeepSpeed's "auto" values filled from the
training arguments (and its contradictions refused), and the CPU's cores shared among the processes."""

import os
from datetime import timedelta

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from ..errors import UserError
from .arguments import TRACKER_PACKAGES


def make_accelerator(args, every_parameter_learns: bool) -> Accelerator:
    """The run's Accelerator; `every_parameter_learns`: the model's config says whether every trainable parameter
    gets a gradient at each step (DDP must be told when not)."""
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # without this each CPU process initialises its own world and believes it is alone
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    if not every_parameter_learns:
        # DDP waits for a gradient of every trainable parameter and fails at the next step. Freezing the ones
        # without would change the optimizer's parameters, and so every optimizer state saved before
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed) if args.deepspeed else None
    use_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    # Accelerate treats several CPU processes as one DDP world only when told it is on the CPU;
    # but cpu=True also switches DeepSpeed off, which runs on the CPU by itself
    cpu = not torch.cuda.is_available() and not use_deepspeed
    try:
        return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                           mixed_precision=args.mixed_precision, log_with=trackers(args), cpu=cpu,
                           project_dir=args.output_dir, deepspeed_plugin=plugin, kwargs_handlers=handlers,
                           dynamo_backend=args.torch_compile_backend if args.torch_compile else "no")
    except ValueError as error:  # Accelerate tries the launcher's path as a file, as JSON, then as base64
        if use_deepspeed and "existing deepspeed config" in str(error):
            raise UserError(f"DeepSpeed config not found from {os.getcwd()}: {error}. The shipped "
                            "accelerate_configs/ name ds_configs/*.json relative to the repository root: launch "
                            "from there, or give the config's absolute path") from error
        raise


def trackers(args) -> list[str] | None:
    """--report_to as Accelerate's log_with: a tracker asked for by name must be installed (Accelerate would
    silently leave it out), so a missing one is refused before any work, with the command that installs it."""
    names = args.trackers()
    if names == ["none"]:
        return None
    if "all" in names:
        return ["all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise UserError(f"--report_to {name}: the {name} package is not installed; pip install "
                            f"{TRACKER_PACKAGES[name]} (or leave {name} out of --report_to)")
    return names


def reconcile_deepspeed_config(accelerator, args) -> None:
    """Fill the DeepSpeed "auto" values we own and refuse numbers that contradict the arguments.

    Accelerate would otherwise fill gradient_clipping "auto" with 1.0 whatever --max_grad_norm
    says, and silently prefer DeepSpeed's accumulation steps over ours.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    ours = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
    }
    optimizer = config.get("optimizer", {}).get("params", {})
    ours_nested = {("optimizer", "lr"): (optimizer.get("lr"), args.learning_rate),
                   ("optimizer", "weight_decay"): (optimizer.get("weight_decay"), args.weight_decay)}
    clashes = [f"{key}={config[key]} vs {value}" for key, value in ours.items()
               if key in config and config[key] != "auto" and float(config[key]) != float(value)]
    clashes += [f"{'.'.join(key)}={theirs} vs {value}" for key, (theirs, value) in ours_nested.items()
                if theirs not in (None, "auto") and float(theirs) != float(value)]
    precision = {"bf16": config.get("bf16", {}).get("enabled"), "fp16": config.get("fp16", {}).get("enabled")}
    for name, enabled in precision.items():
        if enabled is True and args.mixed_precision != name:
            clashes.append(f"{name}.enabled=true vs --mixed_precision {args.mixed_precision}")
    if clashes:
        raise UserError(f"the DeepSpeed config contradicts the training arguments: {'; '.join(clashes)}. "
                        "Use \"auto\" in the DeepSpeed config, or change the arguments.")
    for key, value in ours.items():
        if config.get(key) == "auto":
            config[key] = value


def configure_device(accelerator, args) -> None:
    """Refuse a precision this device would ignore, share the CPU's cores, and settle DeepSpeed's config."""
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate applies fp16 autocast on accelerators only: on the CPU the run would be fp32
        raise UserError("--mixed_precision fp16 needs a GPU: on the CPU Accelerate does not apply it and the run "
                        "would train in fp32 unannounced; use --mixed_precision bf16 (CPU autocast) or no")
    if not torch.cuda.is_available():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // local_processes))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        reconcile_deepspeed_config(accelerator, args)


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.zero_stage
