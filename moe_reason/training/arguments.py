"""The trainer's arguments, as dataclasses for `HfArgumentParser`: the model (`model_arguments.py`), the data
(`data/prepare.py`) and the training (here).

    accelerate launch train.py [config.yaml|config.json] [--field value ...]

A YAML/JSON file gives defaults; command-line flags override it. The runners build the same dataclasses from
a mapping (`arguments_from`), with no command line in between.
"""

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from accelerate.utils import DynamoBackend
from transformers import HfArgumentParser

from ..data.prepare import DataArguments
from ..errors import MissingFileError, UserError
from ..models.configuration_moe_reason import MoEReasonConfig, require
from ..models.configuration_recursive import RecursiveMoEReasonConfig
from ..tasks.puzzles import formulation_of, make_task
from .model_arguments import ModelArguments
from .optim import LR_SCHEDULERS

DYNAMO_BACKENDS = {b.value for b in DynamoBackend}
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio", "all", "none")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


@dataclass
class TrainingArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": (
        "Where checkpoints, exported models (best/, final/), TensorBoard events and metrics.jsonl go.")})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "Start afresh even if output_dir holds another run (its checkpoints are deleted).")})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": (
        "'latest' (newest complete checkpoint in output_dir) or a checkpoint folder.")})
    max_steps: int = field(default=800, metadata={"help": (
        "Optimizer steps to train for (with --stop_on_plateau: the cap).")})
    stop_on_plateau: bool = field(default=False, metadata={"help": (
        "Stop before max_steps once held-out accuracy plateaus (moe_reason/training/plateau.py): after at least "
        "--plateau_min_evals evaluations, when neither exact accuracy (puzzles solved) nor token accuracy rose "
        "--plateau_delta or more over the last quarter of the evaluations above its best before them. Use a "
        "schedule that does not depend on max_steps (--lr_scheduler constant), so the cap does not shape training.")})
    plateau_min_evals: int = field(default=8, metadata={"help": (
        "Evaluations before --stop_on_plateau may stop a run (the flat start of learning is not a plateau).")})
    plateau_delta: float = field(default=0.01, metadata={"help": (
        "Smallest rise of a share (0.01 = one point) that --stop_on_plateau counts as an improvement.")})
    plateau_min_window: int = field(default=1, metadata={"help": (
        "Fewest evaluations --stop_on_plateau looks back over (the last quarter otherwise), so a run evaluated "
        "a dozen times is not judged on its last three. 1: the quarter alone.")})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per device per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    global_batch_size: int | None = field(default=None, metadata={"help": (
        "Sequences per optimizer step over all processes; sets gradient_accumulation_steps to "
        "global_batch_size / (per_device_train_batch_size x processes), which must divide exactly.")})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.1,
                                metadata={"help": "AdamW weight decay (never on norms, biases, embeddings)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warmup steps (0 = none; may exceed max_steps)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": (
        "Warm up for this share of max_steps (rounded up) instead of --warmup_steps, so that runs of different "
        "lengths (compare's equal-FLOPs runs) spend the same share of their schedule warming up.")})
    lr_scheduler: str = field(default="cosine", metadata={"help": (
        f"Decay after warmup: one of {LR_SCHEDULERS}. seeds_linear is the Exp8 seeds' max(min_lr_ratio, "
        "(max_steps - step) / (max_steps - warmup_steps)), which reaches its floor before the last step.")})
    min_lr_ratio: float = field(default=0.1, metadata={"help": (
        "Floor of the decay as a share of the peak learning rate (exp8: linear to 0.1).")})
    ema_decay: float = field(default=0.0, metadata={"help": (
        "Keep an exponential moving average of the weights with this decay (TRM: 0.999; 0 = off). Evaluation, "
        "best/ and final/ use the average; training continues from the raw weights; checkpoints keep both. "
        "Not with ZeRO-3 or expert parallelism, whose ranks hold only part of the weights.")})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip gradients to this global norm (0 = off)."})
    mixed_precision: str = field(default="no", metadata={"help": (
        "no, bf16 or fp16 (passed to Accelerate). bf16 also runs on the CPU (autocast); fp16 needs a GPU.")})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, dropout, routing noise and data order."})
    eval_interval: int = field(default=200, metadata={"help": "Evaluate every this many steps (and at the end)."})
    eval_batches: int = field(default=20, metadata={"help": (
        "Size of the fixed validation set in batches of per_device_eval_batch_size blocks, the same "
        "blocks at every evaluation whatever the number of processes (0 = the whole split).")})
    log_interval: int = field(default=10, metadata={"help": "Log training metrics every this many steps."})
    report_to: str = field(default="tensorboard", metadata={"help": (
        f"Where metrics go beside metrics.jsonl, named as transformers' report_to: one or more of {REPORT_TO} "
        "(comma-separated; all: every one installed; none: metrics.jsonl only), through Accelerate's trackers. "
        "TensorBoard writes OUTPUT_DIR/tensorboard; the others log where their own settings point (e.g. "
        "MLFLOW_TRACKING_URI, WANDB_MODE=offline).")})
    save_interval: int = field(default=200, metadata={"help": "Save a resumable checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the newest this many checkpoints."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": (
        "Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Keep only each decoder layer's input and recompute its activations in the backward: one more forward "
        "of the layers with gradient for far less memory. A recursive step otherwise keeps the gradient passes "
        "of every supervision step until its one backward (docs/performance.md).")})
    torch_compile: bool = field(default=False, metadata={"help": (
        "Compile the model with torch.compile (inductor) through Accelerate. Shapes are fixed (packed blocks), so it "
        "compiles in the first steps only; the recursive model compiles each decoder-stack pass and runs its halting "
        "loop eagerly. The expert-parallel all-to-all breaks the graph. It changes how a run computes, not what: "
        "a run begun eager may resume compiled, and a study's finished runs count either way.")})
    torch_compile_backend: str = field(default="inductor", metadata={"help": (
        "torch.compile backend for --torch_compile, by Accelerate's names: inductor (generated kernels), "
        "aot_eager (traced and differentiated ahead of time, no code generation: shows in seconds that a model "
        "compiles without recompiling), eager, cudagraphs, ...")})
    deepspeed: str | None = field(default=None, metadata={"help": (
        "DeepSpeed JSON config (see ds_configs/); also lets the plain `deepspeed` launcher run train.py.")})
    expert_parallel_size: int = field(default=1, metadata={"help": (
        "Ranks that split each MoE layer's experts (all-to-all between them); needs DeepSpeed ZeRO 0-2 and must "
        "divide num_experts and the number of processes. 1: every rank holds every expert.")})
    peak_tflops: float | None = field(default=None, metadata={"help": (
        "Peak TFLOP/s per device for MFU; default: measured by a matmul at start-up on this device.")})
    sample_prompt: str = field(default="def read_config(path):\n",
                               metadata={"help": "Prompt of the sample printed after training."})
    sample_tokens: int = field(default=48, metadata={"help": "Tokens generated for the final sample (0 = none)."})
    cpu_threads: int | None = field(default=None, metadata={"help": (
        "Torch threads per process on a machine without a GPU; default: its cores shared among the local "
        "processes (`accelerate launch` would otherwise pin one thread per process).")})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; ignore."})

    def __post_init__(self):
        positive = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "eval_interval", "log_interval", "save_interval",
                    "save_total_limit", "max_nonfinite_steps", "expert_parallel_size")
        for name in positive:
            require(self, name, getattr(self, name) >= 1, ">= 1")
        checks = [
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("warmup_ratio", self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0, "None or in [0, 1)"),
            ("eval_batches", self.eval_batches >= 0, ">= 0"),
            ("plateau_min_evals", self.plateau_min_evals >= 2, ">= 2"),
            ("plateau_min_window", self.plateau_min_window >= 1, ">= 1"),
            ("report_to", set(self.trackers()) <= set(REPORT_TO) and bool(self.trackers()),
             f"one or more of {REPORT_TO}, comma-separated"),
            ("plateau_delta", 0.0 < self.plateau_delta < 1.0, "a share in (0, 1)"),
            ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, f"one of {LR_SCHEDULERS}"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1) (0 = no moving average)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16", "fp16"), "no, bf16 or fp16"),
            ("torch_compile_backend", self.torch_compile_backend.upper() in DYNAMO_BACKENDS,
             f"one of {sorted(b.lower() for b in DYNAMO_BACKENDS if b != 'NO')}"),
        ]
        for name, ok, allowed in checks:
            require(self, name, ok, allowed)
        if self.deepspeed:
            load_mapping(self.deepspeed, "DeepSpeed config")  # a syntax error is named here, with the file

    def trackers(self) -> list[str]:
        """--report_to as a list of names."""
        return [name.strip() for name in self.report_to.split(",") if name.strip()]

    def cap_shapes_training(self) -> bool:
        """Whether max_steps changes what any step does (a decaying schedule, or a warm-up given as its share).
        Where it does not, a run with a higher cap repeats a lower one's steps, then goes on."""
        return self.lr_scheduler != "constant" or self.warmup_ratio is not None

    def warmup(self) -> int:
        """The warm-up in steps: --warmup_ratio of max_steps when given, else --warmup_steps."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(round(self.warmup_ratio * self.max_steps, 9))  # 0.07 x 100 is 7.000000000000001


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    """[config.yaml|.json] [--flag value ...] -> (ModelArguments, DataArguments, TrainingArguments).

    File values are defaults; flags override them. Unknown keys or flags are errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)  # a typo must not pass as another flag
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = argv.pop(0)
        parser.set_defaults(**checked_names(load_mapping(path, "config file"), f"config file {path}"))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def arguments_from(values: dict):
    """{argument: value} (an experiment file's, in Python or YAML types) -> (ModelArguments, DataArguments,
    TrainingArguments), validated as the command line's are: how the runners build a run's arguments."""
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    parser.set_defaults(**checked_names(values, "the run's arguments"))  # argparse types string values
    return parser.parse_args_into_dataclasses(args=[], look_for_args_file=False)


def argument_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def refuse_unknown(values: dict, where: str, allowed: set[str] | None = None) -> None:
    """A UserError naming the names in `values` that are not in `allowed` (default: every trainer argument): a typo
    must not pass as a silent no-op."""
    unknown = sorted(set(values) - (argument_names() if allowed is None else allowed))
    if unknown:
        raise UserError(f"{where} has unknown argument(s) {unknown}")


def checked_names(values: dict, where: str) -> dict:
    """`values` with every name an argument's (else a UserError), and a lone value of a list argument (one
    data file) made a list, as the command line would."""
    refuse_unknown(values, where)
    lists = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if "list" in str(f.type)}
    return {k: [v] if k in lists and not isinstance(v, list) and v is not None else v for k, v in values.items()}


def load_mapping(path, what: str) -> dict:
    """A YAML or JSON file holding a mapping, or an error naming the file: the one reader of the trainer's
    config files and the runners' experiment files."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        values = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} does not parse: {err}") from err
    if not isinstance(values, dict):
        raise UserError(f"{what} {path} must hold a mapping of names to values")
    return values


def build_config(model_args, vocab_size: int | None = None, task: dict | None = None):
    """The model config: preset, then the tokenizer's vocabulary size, then explicit overrides. A `task`
    (`TaskArguments.task_settings()`) is kept in the config as `task`; its grid formulation makes a
    bidirectional model, and a recursive model halts on "the answer is right" unless told otherwise."""
    overrides = model_args.overrides()
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    if task and model_args.model_type == "recursive":  # a puzzle's prediction is right or wrong: HRM/TRM's target
        overrides.setdefault("halt_target", "accuracy")
    if task and task.get("task_formulation", "grid") == "grid":
        overrides.update(bidirectional=True, use_cache=False)
        if overrides.get("token_mixer") == "mlp":  # an MLP across positions is as wide as the grid
            overrides.setdefault("max_position_embeddings", task_length(task))
    elif overrides.get("bidirectional"):
        raise UserError("bidirectional=True is the grid formulation of a reasoning task: pass --task sudoku or "
                        "--task maze with --task_formulation grid (on text, or in the prompt formulation, every "
                        "position would see the label it must predict)")
    if model_args.model_type == "recursive":
        config = RecursiveMoEReasonConfig.from_preset(model_args.model_preset, **overrides)
    else:
        recursive_only = sorted(set(overrides) - MoEReasonConfig.field_names())
        if recursive_only:
            raise UserError(f"{recursive_only} apply to the recursive model only; add --model_type recursive")
        config = MoEReasonConfig.from_preset(model_args.model_preset, **overrides)
    if task:
        config.task = task  # saved in config.json: evaluate reads which puzzles the model was trained on
    return config


def task_length(task: dict) -> int:
    """Positions of one example of a task (`TaskArguments.task_settings()`)."""
    return formulation_of(task).length(make_task(task))


def resolve_global_batch(args, world_size: int) -> None:
    """Derive gradient_accumulation_steps from --global_batch_size, or refuse a split that does not divide."""
    if args.global_batch_size is None:
        return
    per_step = args.per_device_train_batch_size * world_size
    steps, rest = divmod(args.global_batch_size, per_step)
    if rest or steps == 0:
        raise UserError(f"global_batch_size={args.global_batch_size} is not a multiple of per_device_train_batch_size"
                        f"={args.per_device_train_batch_size} x {world_size} process(es) = {per_step}")
    if args.gradient_accumulation_steps not in (1, steps):
        raise UserError(f"global_batch_size={args.global_batch_size} implies gradient_accumulation_steps={steps}, "
                        f"but {args.gradient_accumulation_steps} was given; set only one of them")
    args.gradient_accumulation_steps = steps
