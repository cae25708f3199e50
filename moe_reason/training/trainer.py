"""The training loop: arguments -> data -> model -> Accelerator/DeepSpeed -> steps -> checkpoints/metrics.

    accelerate launch train.py                                   # small preset, offline corpus
    accelerate launch train.py configs/x.yaml --max_steps 100    # file values, then flag overrides
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train.py
    deepspeed train.py --deepspeed ds_configs/zero2.json         # the plain DeepSpeed launcher

Read `Trainer` top to bottom: `setup` builds everything once; `train` is the loop, one `train_step`
(one optimizer step over its micro-batches) after another, with `evaluate` and `save` at their
intervals; `finish` evaluates, exports and writes the results. Everything the loop carries from one
step to the next is the `TrainState`, and that is what a checkpoint's trainer_state.json holds.
Expert parallelism is one object built at set-up (`make_expert_parallel`), a no-op at size 1.
"""

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from filelock import FileLock
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..atomic import write_text
from ..data.corpus import changed_files
from ..data.prepare import check_block_fits, prepare_data
from ..errors import UserError, run_cli
from ..evaluation.loss import evaluate_model
from ..locks import hold_folder
from ..parallel.expert_parallel import make_expert_parallel
from ..tasks.puzzles import make_task, render
from ..tasks.scoring import answer_one, solved_rows
from .accelerator import configure_device, make_accelerator, trackers, zero_stage
from .arguments import ARGUMENT_CLASSES, build_config, parse_args, resolve_global_batch
from .build import build_model, config_drift, describe_drift, make_loaders, same_tokenizer, saved_config
from .carries import Carries
from .checkpointing import (bare_model, export_model, load_checkpoint, read_trainer_state, resolve_checkpoint,
                            save_checkpoint, unfinished_checkpoints_after)
from .ema import WeightEMA
from ..layout import (BEST, DATA_SOURCE, EMA_WEIGHTS, FINAL, METRICS, RESULTS, RUN_ARGS, RUN_LOCK, STREAM_STATE,
                      TENSORBOARD, complete_checkpoints, run_outputs, stream_state_name)
from .lora import is_lora, merged
from .metrics import LogWindow, any_nonfinite, machine, measure_peak_flops, training_flops_per_token
from .optim import make_optimizer_and_scheduler
from .plateau import describe as describe_plateau
from .plateau import plateaued
from ..safe_loading import from_pretrained

# arguments that change how a run computes (its threads, whether activations are recomputed, whether it is
# compiled) or where its metrics also go, not what it computes: the same model, data and steps, rounded
# differently at most. A run resumes, and a study keeps a finished run, under other values
EXECUTION_ARGUMENTS = ("cpu_threads", "gradient_checkpointing", "torch_compile", "torch_compile_backend", "report_to",
                       "peak_tflops")
# arguments that may change between a run and its resumption (the rest must match run_args.json)
RESUMABLE_ARGUMENTS = ("resume_from_checkpoint", "overwrite_output_dir", "max_steps", "local_rank",
                       *EXECUTION_ARGUMENTS)


LR_SCHEDULER = "lr_scheduler"  # its state dict's key in trainer_state.json, beside the TrainState's fields


UNRECORDED_MACHINE = "not recorded"  # what ran the steps of a checkpoint saved before runs recorded it


@dataclass
class TrainState:
    """Everything the loop carries from one optimizer step to the next; each checkpoint saves it as JSON."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_in_epoch: int = 0  # training blocks of this epoch consumed, by all processes together
    num_processes: int = 1  # that trained up to here (a ZeRO optimizer state is partitioned that many ways)
    best_val_loss: float | None = None
    nonfinite_in_a_row: int = 0  # consecutive steps skipped for a non-finite loss or gradient
    last_eval: dict | None = None  # {"step": S, "loss": ..., ...}: the latest evaluation
    last_save: int | None = None  # the step of the latest checkpoint
    train_seconds: float = 0.0  # the training loop's wall time up to the latest checkpoint, over every start
    evals: list = dataclasses.field(default_factory=list)  # [step, exact_match, accuracy] per evaluation (plateau)
    plateau_step: int | None = None  # --stop_on_plateau: the step whose evaluation found the plateau
    machines: list = dataclasses.field(default_factory=list)  # metrics.machine of each start, once each

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """From trainer_state.json; a field an older checkpoint lacks keeps its default."""
        for name in (f.name for f in dataclasses.fields(self)):
            if name in saved:
                setattr(self, name, saved[name])


def check_deepspeed_world(checkpoint: Path, num_processes: int) -> None:
    """A ZeRO checkpoint resumes only on the number of processes that saved it: its optimizer state is
    partitioned that many ways, and DeepSpeed loads it no other way (a plain DDP checkpoint resumes on any)."""
    saved = read_trainer_state(checkpoint).get("num_processes")
    if saved is not None and saved != num_processes:
        raise UserError(
            f"checkpoint {checkpoint} was saved by {saved} DeepSpeed processes, and this launch has {num_processes}: "
            f"ZeRO's optimizer state is partitioned {saved} ways and DeepSpeed loads it only so. Resume with "
            f"`accelerate launch --num_processes {saved} ...`, or train on {num_processes} from its weights: "
            "--init_from OUTPUT_DIR/best (or final/), which restarts the optimizer")


def read_stream_state(checkpoint: Path, rank: int, num_processes: int) -> dict:
    """This rank's stream position saved in `checkpoint`, which must hold one per process of this launch."""
    saved = {int(m.group(2)) for p in checkpoint.iterdir() if (m := STREAM_STATE.match(p.name))}
    if not saved:
        raise UserError(f"checkpoint {checkpoint} holds no stream position (stream_state_*.json): it was not saved "
                        "by a --streaming run")
    if saved != {num_processes}:
        raise UserError(
            f"checkpoint {checkpoint} holds the stream positions of {max(saved)} process(es), and this launch has "
            f"{num_processes}: each rank's position is within its own share of the documents, which another number "
            f"of processes splits differently. Resume with `accelerate launch --num_processes {max(saved)} ...`, or "
            "start a new run from its weights with --init_from OUTPUT_DIR/final (its stream starts again)")
    return json.loads((checkpoint / stream_state_name(rank, num_processes)).read_text())


def micro_batches_to_skip(state: TrainState, per_device_batch: int, num_processes: int, checkpoint=None) -> int:
    """The micro-batches each process skips to resume at the state's sample position, on any number of
    processes: process p takes every num_processes-th batch of the epoch's order, so after k of its
    batches all processes together have consumed k * per_device_batch * num_processes blocks."""
    per_round = per_device_batch * num_processes
    if state.samples_in_epoch % per_round:
        raise UserError(
            f"{checkpoint or 'the checkpoint'} stopped {state.samples_in_epoch} blocks into epoch {state.epoch}, "
            f"which is not a whole number of rounds of {per_device_batch} blocks x {num_processes} process(es): "
            "resuming here would repeat or skip blocks. Resume with a per_device_train_batch_size and number of "
            f"processes whose product divides {state.samples_in_epoch}")
    return state.samples_in_epoch // per_round


# ----------------------------------------------------------------------------
# Set-up: the output folder, and the data a resume trains on (the Accelerator: accelerator.py; the model and
# loaders: build.py)


def run_arguments(model_args, data_args, args) -> dict:
    """The arguments that define a run, as saved in run_args.json."""
    run_args = {cls.__name__: vars(obj) for cls, obj in zip(ARGUMENT_CLASSES, (model_args, data_args, args))}
    run_args["TrainingArguments"] = {k: v for k, v in run_args["TrainingArguments"].items()
                                     if k not in RESUMABLE_ARGUMENTS}
    return run_args


def check_output_dir(args, run_args: dict) -> None:
    """Refuse to mix two runs in one folder, before any work starts."""
    out = Path(args.output_dir)
    if args.resume_from_checkpoint or args.overwrite_output_dir or not out.exists():
        return
    if (out / RUN_ARGS).exists() or complete_checkpoints(out) or (out / FINAL).exists():
        same = (out / RUN_ARGS).exists() and json.loads((out / RUN_ARGS).read_text()) == run_args
        what = "this run's earlier output" if same else "a different run"
        raise UserError(f"output_dir {out} already holds {what}; pass --resume_from_checkpoint latest to continue "
                        "it or --overwrite_output_dir to start afresh (its checkpoints are deleted)")


def lock_output_dir(out: Path) -> FileLock | None:
    """Hold the output folder for the run's lifetime (the main process of the launch takes it): a second
    run into the same folder is refused, naming the holder, before it can write or delete anything."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return hold_folder(out, RUN_LOCK, "output_dir {folder} is in use by another run ({who}): wait for it to end, "
                                      "stop it, or train into another --output_dir")


def clear_output_dir(accelerator, args) -> None:
    """--overwrite_output_dir: delete what an earlier run wrote (main process; the folder is locked)."""
    if accelerator.is_main_process and args.overwrite_output_dir and not args.resume_from_checkpoint:
        for path in run_outputs(args.output_dir):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def truncate_metrics(out: Path, step: int) -> None:
    """On resume: drop the records logged after the checkpoint's step (they are about to be logged again)."""
    path = out / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    write_text(path, "".join(kept))


def data_for_resume(data, data_args, checkpoint: Path, accelerator):
    """The data a resumed run trains on: tokenized by the tokenizer its checkpoint saved, whatever today's
    documents would train (a changed training document moves token ids; the run's embeddings follow the
    saved ones), with a warning naming every data file changed since the checkpoint."""
    then = json.loads((checkpoint / DATA_SOURCE).read_text()) if (checkpoint / DATA_SOURCE).is_file() else None
    changed = changed_files(then, data.summary.get("files", [])) if then is not None else []
    if changed:
        shrank = any(": shrank" in line or ": gone" in line for line in changed)
        accelerator.print(f"warning: data files changed since {checkpoint}:\n  " + "\n  ".join(changed)
                          + ("\n  the resumed stream's pass ends earlier than the run's" if data_args.streaming
                             and shrank else "")
                          + ("" if data_args.streaming or data_args.task else
                             "\n  the corpus was prepared again from them: the resumed epoch's blocks differ"))
    if data_args.task or not (checkpoint / "tokenizer_config.json").is_file():
        return data  # a task's tokenizer is its symbols; an old checkpoint saved none
    saved = AutoTokenizer.from_pretrained(checkpoint)
    if same_tokenizer(saved, data.tokenizer):
        return data
    accelerator.print(f"the documents today train another tokenizer than the run's (a training document changed): "
                      f"the resumed run keeps the tokenizer saved in {checkpoint}")
    return prepare_data(dataclasses.replace(data_args, tokenizer_name=str(checkpoint)), log=accelerator.print,
                        rank=accelerator.process_index, world_size=accelerator.num_processes)


# ----------------------------------------------------------------------------
# A sample


def print_sample(folder: Path, prompt: str, tokens: int) -> str:
    """Greedy continuation of `prompt` by the exported model (loaded back with from_pretrained)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(AutoModelForCausalLM, folder).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def solved_sample(folder: Path, puzzle_tokens: list[int]) -> str:
    """The first held-out puzzle and the exported task model's answer, judged by the task's validator."""
    model = from_pretrained(AutoModelForCausalLM, folder).eval()
    task = make_task(model.config.task)
    puzzle = task.from_tokens(puzzle_tokens[: task.n * task.n])  # both formulations start with the puzzle
    answer, valid = answer_one(model, task, puzzle)
    verdict = "solved" if valid else "not solved"
    return f"sample puzzle:\n{render(task, puzzle)}\nthe model's answer ({verdict}):\n{render(task, answer)}"


# ----------------------------------------------------------------------------
# The trainer


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if not self.requested:
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
                  file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop (so all save the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)


class Trainer:
    """One training run: `setup`, then `train`, which ends in `finish` (or returns early on a stop request)."""

    def __init__(self, model_args, data_args, args, command_line: list[str] | None = None):
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self.command_line = command_line  # for the resume hint; None: the run was started from Python
        self.out = Path(args.output_dir)
        self.state = TrainState()
        self.lock = None  # the output folder's lock, held from `setup` to `close`
        self.run_args = run_arguments(model_args, data_args, args)  # what run_args.json holds
        # `launch`: the Accelerator and what the launch decides
        self.accelerator = self.expert_parallel = self.stream_state = None
        self.is_deepspeed = False
        # `build`: what trains
        self.data = self.config = self.model = self.optimizer = self.scheduler = self.ema = None
        self.train_loader = self.eval_loader = self.carries = None
        self.parameters, self.streaming = 0, False
        # `start_logging`: what the log records need
        self.flops_per_token = self.tokens_per_micro_batch = self.peak = self.window = self.started = None

    # ---- set-up

    def setup(self) -> "Trainer":
        """Hold the output folder, check what can be checked cheaply, launch, then build data, model, optimizer."""
        self.lock = lock_output_dir(self.out)  # before anything reads or writes it
        checkpoint, config = self.check()
        self.launch(checkpoint, config)
        self.build(checkpoint)
        if checkpoint is not None:
            self.resume(checkpoint)
        self.start_logging()
        return self

    def check(self):
        """Validate the arguments against the output folder and the model config -> (the checkpoint to resume
        from or None, the config). Changes nothing; fails here, before any data, model or process-group work."""
        args = self.args
        trackers(args)  # a tracker asked for and not installed fails here
        check_output_dir(args, self.run_args)
        checkpoint = resolve_checkpoint(self.out, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        task = self.data_args.task_settings() if self.data_args.task else None
        config = build_config(self.model_args, task=task)  # invalid model fields fail here
        check_block_fits(self.data_args.sequence_length(), config,
                         f" (--model_preset {self.model_args.model_preset}): pass --max_position_embeddings "
                         f"{self.data_args.sequence_length()} or more"
                         + ("" if task else ", or a smaller --block_size"))
        return checkpoint, config

    def launch(self, checkpoint: Path | None, config) -> None:
        """The Accelerator (DeepSpeed, the process group, DDP as `config`'s model needs it), the device, expert
        parallelism; then what the launch must agree with the checkpoint; then the output folder cleared
        (--overwrite_output_dir) and the seed set."""
        args = self.args
        resolve_global_batch(args, int(os.environ.get("WORLD_SIZE", "1")))
        self.accelerator = accelerator = make_accelerator(args, config.every_parameter_learns())
        configure_device(accelerator, args)
        self.is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        for flag, used in (("--ema_decay", args.ema_decay), ("--lora_rank", self.model_args.lora_rank)):
            if used and (zero_stage(accelerator) == 3 or args.expert_parallel_size > 1):
                raise UserError(f"{flag} needs every rank to hold the whole model: not with ZeRO-3 or "
                                "--expert_parallel_size > 1 (use ZeRO-2 or DDP with expert_parallel_size 1)")
        self.expert_parallel = make_expert_parallel(args.expert_parallel_size, config.num_experts,
                                                    accelerator.num_processes, zero_stage(accelerator))
        if checkpoint is not None:
            self.expert_parallel.check_checkpoint(checkpoint)
            if self.data_args.streaming:  # this rank's saved position: another process count fails here
                self.stream_state = read_stream_state(checkpoint, accelerator.process_index, accelerator.num_processes)
            if self.is_deepspeed:
                check_deepspeed_world(checkpoint, accelerator.num_processes)
        clear_output_dir(accelerator, args)
        set_seed(args.seed)

    def build(self, checkpoint: Path | None = None) -> None:
        """Data, model, optimizer, schedule and loaders, prepared by Accelerate. A resumed run's data is tokenized
        by the tokenizer its checkpoint saved (`data_for_resume`)."""
        args, accelerator = self.args, self.accelerator
        with accelerator.main_process_first():
            self.data = prepare_data(self.data_args, log=accelerator.print, rank=accelerator.process_index,
                                     world_size=accelerator.num_processes)
            if checkpoint is not None:
                self.data = data_for_resume(self.data, self.data_args, checkpoint, accelerator)
        shown = {k: self.data.summary[k] for k in ("train", "validation", "cache_hit")}
        accelerator.print(f"data: {json.dumps(shown)}")
        model, self.config = build_model(self.model_args, args, self.data, accelerator, self.expert_parallel)
        self.parameters = sum(p.numel() for p in model.parameters())  # this rank's share under expert parallelism
        if is_lora(model):
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            accelerator.print(f"LoRA rank {self.model_args.lora_rank}: {trainable / 1e6:.3f}M of "
                              f"{self.parameters / 1e6:.2f}M parameters train")
        accelerator.print(f"model: {type(model).__name__}, {self.parameters / 1e6:.2f}M parameters, "
                          f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value}) on "
                          f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}, "
                          f"{self.config.num_experts} experts "
                          f"top-{self.config.num_experts_per_tok}, vocab {self.config.vocab_size}")
        optimizer, self.scheduler = make_optimizer_and_scheduler(model, args, accelerator.device)
        train_loader, eval_loader = make_loaders(self.data, args, accelerator.num_processes)
        # the scheduler is not prepared: Accelerate's wrapper would step it once per process, making the
        # schedule depend on the world size. Nor registered for checkpointing, which would pickle it:
        # its few numbers are saved in trainer_state.json (`save`)
        self.streaming = self.data.sampler is None
        if self.streaming:  # Accelerate would shard the stream again: each rank's loader already reads its share
            self.model, self.optimizer, self.eval_loader = accelerator.prepare(model, optimizer, eval_loader)
            self.train_loader = train_loader
        else:
            self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
                model, optimizer, train_loader, eval_loader)
        self.ema = WeightEMA(bare_model(accelerator, self.model), args.ema_decay) if args.ema_decay else None
        self.carries = Carries(self.config)

    def resume(self, checkpoint: Path) -> None:
        """Model, optimizer, schedule, RNG and the loop's state from a checkpoint, on the same or another
        number of processes (not under DeepSpeed: `check_deepspeed_world`); later metrics are dropped."""
        accelerator, args = self.accelerator, self.args
        unfinished = unfinished_checkpoints_after(self.out, checkpoint)
        if unfinished:
            accelerator.print(f"{', '.join(p.name for p in unfinished)}: no trainer_state.json (the save did not "
                              f"finish); resuming from the newest complete checkpoint, {checkpoint.name}")
        then = saved_config(checkpoint)
        drift = config_drift(then, self.config) if then is not None else {}
        if drift:
            raise UserError(f"{checkpoint} holds a different model than these arguments build "
                            f"({describe_drift(drift)}): resume with the arguments it was trained with "
                            f"({self.out / RUN_ARGS}), or train into another --output_dir")
        saved = load_checkpoint(accelerator, self.model, checkpoint, self.expert_parallel)
        if self.ema is not None:
            if not (checkpoint / EMA_WEIGHTS).is_file():
                raise UserError(f"{checkpoint} holds no {EMA_WEIGHTS}: it was saved without --ema_decay")
            self.ema.load_state_dict(load_file(checkpoint / EMA_WEIGHTS), str(checkpoint / EMA_WEIGHTS))
        self.state.load_state_dict(saved)
        self.state.last_save = self.state.step
        if "batches_in_epoch" in saved:  # an older checkpoint counted micro-batches per process
            self.state.samples_in_epoch = saved["batches_in_epoch"] * args.per_device_train_batch_size \
                * accelerator.num_processes
        micro_batches_to_skip(self.state, args.per_device_train_batch_size, accelerator.num_processes, checkpoint)
        fresh = self.carries.load(checkpoint, accelerator.process_index, accelerator.num_processes,
                                  accelerator.device)
        if fresh:
            accelerator.print(fresh)
        if LR_SCHEDULER in saved:
            self.scheduler.load_state_dict(saved[LR_SCHEDULER])
        else:  # a checkpoint from before the schedule was saved as JSON: it is a function of the step
            accelerator.print(f"{checkpoint.name} holds no {LR_SCHEDULER} state: the schedule is recomputed "
                              f"to step {self.state.step}")
            for _ in range(self.state.step):
                self.scheduler.step()
        if accelerator.is_main_process:
            truncate_metrics(self.out, self.state.step)
        accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")

    def start_logging(self) -> None:
        """FLOPs per token and the MFU peak, the run's arguments on disk, TensorBoard, the first log window."""
        args, accelerator = self.args, self.accelerator
        seq_len = self.data.summary["block_size"]
        self.flops_per_token = training_flops_per_token(self.config, seq_len)
        self.tokens_per_micro_batch = args.per_device_train_batch_size * seq_len * accelerator.num_processes
        matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
        self.peak = (args.peak_tflops * 1e12 if args.peak_tflops
                     else measure_peak_flops(accelerator.device, matmul_dtype))
        if accelerator.is_main_process:  # written only now: a run that failed in set-up leaves no claim on the folder
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_ARGS).write_text(json.dumps(self.run_args, indent=2, default=str))
        hparams = {k: v for group in self.run_args.values() for k, v in group.items()
                   if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(TENSORBOARD, config=hparams)  # TensorBoard's folder in OUTPUT_DIR; others' run
        self.window = LogWindow(self.expert_parallel.rows_per_layer)

    def end(self) -> None:
        """Tear down in order, every rank together: the model, optimizer (DeepSpeed's engine, its CPU optimizer and
        partitioned parameters) and loaders are released while the process group still lives, then the trackers
        end and the process group goes. Left to the interpreter's exit, DeepSpeed's objects were destroyed after
        the group, and a finished ZeRO-3 offload rank could abort (`terminate called without an active
        exception`), failing a job that had succeeded."""
        self.accelerator.wait_for_everyone()
        self.model = self.optimizer = self.train_loader = self.eval_loader = self.ema = None
        self.accelerator.free_memory()
        gc.collect()
        self.accelerator.end_training()

    def close(self) -> None:
        """Release the output folder (a run in this process may train into it next)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    # ---- the loop

    def train(self) -> dict:
        """Optimizer steps until max_steps, evaluating and saving at their intervals, then `finish`.

        SIGTERM/SIGINT finish the step, save a checkpoint and return early with the command that resumes.
        """
        args, state = self.args, self.state
        stop = StopRequest()
        micro_batches = self.micro_batches()
        progress = tqdm(total=args.max_steps, initial=state.step, disable=not self.accelerator.is_local_main_process,
                        desc="training", dynamic_ncols=True)
        self.started = time.perf_counter() - state.train_seconds  # a resumed run's clock goes on from its checkpoint
        earlier = state.machines or ([UNRECORDED_MACHINE] if state.step else [])  # a checkpoint from older code
        here = machine(self.accelerator.device, self.accelerator.num_processes)
        state.machines = earlier + ([here] if here not in earlier else [])
        self.model.train()
        while state.step < args.max_steps and state.plateau_step is None:
            record = self.train_step(micro_batches)
            progress.update(1)
            last = state.step == args.max_steps
            if state.step % args.log_interval == 0 or last:
                record = self.window.record(self.accelerator, self.tokens_per_micro_batch, self.flops_per_token,
                                            self.peak, lr=self.scheduler.get_last_lr()[0], epoch=state.epoch, **record)
                self.log(record)
                progress.set_postfix(loss=f"{record['train/lm_loss']:.3f}",
                                     tok_s=f"{record['train/tokens_per_s']:,.0f}")
            if state.step % args.eval_interval == 0 or last:
                self.evaluate()
                last = last or state.plateau_step is not None
            stopping = stop.agreed(self.accelerator)
            if state.step % args.save_interval == 0 or last or stopping:
                self.save()
            if stopping:
                progress.close()
                return self.stopped()
        progress.close()
        micro_batches.close()  # done with the training loader before the final evaluation
        return self.finish()

    def micro_batches(self):
        """Training micro-batches, epoch after epoch, from the sample position in the state (which they advance)."""
        if self.streaming:
            yield from self.stream_batches()
            return
        per_round = self.args.per_device_train_batch_size * self.accelerator.num_processes
        while True:
            self.train_loader.set_epoch(self.state.epoch)
            done = micro_batches_to_skip(self.state, self.args.per_device_train_batch_size,
                                         self.accelerator.num_processes)
            for batch in self.accelerator.skip_first_batches(self.train_loader, done) if done else self.train_loader:
                self.state.samples_in_epoch += per_round
                yield batch
            self.state.epoch += 1
            self.state.samples_in_epoch = 0

    def stream_batches(self):
        """This rank's stream, pass after pass (a pass is an epoch), from a resumed run's saved position."""
        stream, device = self.data.train, self.accelerator.device
        while True:
            stream.set_epoch(self.state.epoch)
            if self.stream_state is not None:  # where the checkpoint stopped, in this pass
                stream.load_state_dict(self.stream_state)
                self.stream_state = None
            for batch in self.train_loader:
                yield {name: tensor.to(device) for name, tensor in batch.items()}
            self.state.epoch += 1

    def train_step(self, micro_batches) -> dict:
        """One optimizer step: forward and backward over micro-batches until Accelerate syncs the gradients
        (gradient_accumulation_steps of them; fewer where an epoch ends), then clip, update and schedule.

        A micro-batch with a non-finite loss is left out of the gradient; a step with one, or with a
        non-finite gradient norm, makes no update. -> the step's record: {"grad_norm": float}.
        """
        accelerator, args = self.accelerator, self.args
        ok, grad_norm, step_load = True, math.nan, None
        for position, batch in enumerate(micro_batches):
            with accelerator.accumulate(self.model):
                output = self.model(**batch, use_cache=False, **self.carries.kwargs(position))
                self.carries.keep(position, output)
                if self.config.uses_router_bias():  # [L, E] tokens per expert: the balancing bias's evidence
                    load = output.expert_load.detach().float()
                    step_load = load if step_load is None else step_load + load
                nonfinite = any_nonfinite(accelerator, output.loss)
                if nonfinite and self.is_deepspeed:
                    raise RuntimeError(f"non-finite loss at step {self.state.step} under DeepSpeed, whose engine "
                                       "steps inside backward: stopping (lower the learning rate, or use bf16)")
                if not nonfinite:
                    accelerator.backward(output.loss)
                self.window.add(output, nonfinite)
                ok = ok and not nonfinite
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(self.model.parameters(),
                                                       args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
                    grad_norm = float(norm) if norm is not None else math.nan
                    ok = ok and (math.isfinite(grad_norm) or self.is_deepspeed)
                    if ok:
                        self.optimizer.step()
                        if self.ema is not None:
                            self.ema.update()
                        if self.config.uses_router_bias():  # the whole step's load, every rank's: equal biases
                            load = accelerator.reduce(step_load.to(accelerator.device), "sum")
                            bare_model(accelerator, self.model).update_router_biases(load)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
            if accelerator.sync_gradients:
                break
        self.state.step += 1
        self.count_nonfinite(ok)
        return {"grad_norm": grad_norm, **self.router_bias_summary()}

    def router_bias_summary(self) -> dict:
        """Each layer's balancing-bias spread (largest minus smallest expert's), logged as
        train/router_bias_spread/layer_L: how hard the aux-free rule is steering the choice."""
        if not self.config.uses_router_bias():
            return {}
        routers = bare_model(self.accelerator, self.model).routers()
        spreads = torch.stack([r.expert_bias.max() - r.expert_bias.min() for r in routers]).tolist()  # one sync
        return {f"router_bias_spread/layer_{i}": spread for i, spread in enumerate(spreads)}

    def count_nonfinite(self, ok: bool) -> None:
        """Track the streak of skipped steps; too long a streak stops the run."""
        state = self.state
        state.nonfinite_in_a_row = 0 if ok else state.nonfinite_in_a_row + 1
        if ok:
            return
        self.accelerator.print(f"step {state.step}: non-finite loss or gradient, update skipped "
                               f"({state.nonfinite_in_a_row} in a row)")
        self.log({"train/skipped_step": 1})
        if state.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            raise RuntimeError(f"{state.nonfinite_in_a_row} consecutive non-finite steps at step {state.step}: "
                               "stopping. Lower --learning_rate or --max_grad_norm, or check the data.")

    def log(self, record: dict) -> None:
        """To the trackers (numbers only) and, on the main process, to metrics.jsonl, at the current step."""
        step = self.state.step
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    # ---- evaluation, checkpoints, exports

    def evaluate(self) -> dict:
        """Loss, perplexity and accuracy on the fixed validation slice; a new best is exported to best/."""
        state = self.state
        with self.ema_applied():
            result = evaluate_model(self.model, self.eval_loader, self.config, self.accelerator.gather_for_metrics,
                                    validate=self.validator())
        solved = result.get("solved", result["exact_match"])
        self.log({f"eval/{k}": v for k, v in result.items()})
        self.accelerator.print(f"step {state.step}: val loss {result['loss']:.4f} (ln vocab {result['ln_vocab']:.2f}), "
                               f"ppl {result['perplexity']:.1f}, acc {result['accuracy']:.3f}"
                               + (f", puzzles solved {solved:.3f}" if self.data_args.task else ""))
        state.last_eval = {"step": state.step, **result}
        state.evals.append([state.step, solved, result["accuracy"]])
        rule = (self.args.plateau_min_evals, self.args.plateau_delta, self.args.plateau_min_window)
        if self.args.stop_on_plateau and plateaued(state.evals, *rule):
            state.plateau_step = state.step
            cap = self.args.max_steps
            early = f": stopping before the cap of {cap} steps" if state.step < cap else ""
            self.accelerator.print(f"step {state.step}: plateau ({describe_plateau(*rule)}){early}")
        if state.best_val_loss is None or result["loss"] < state.best_val_loss:
            state.best_val_loss = result["loss"]
            self.export(BEST)
        self.window.restart_clock()  # evaluation time is not training time
        return result

    def validator(self):
        """A grid task's validator for the evaluation's argmax answers (`solved`); None for text, and for the
        prompt formulation, whose teacher-forced argmax is not the answer `generate` would write."""
        task = self.data_args.task_settings() if self.data_args.task else None
        if task is None or not self.config.bidirectional:
            return None
        return functools.partial(solved_rows, make_task(task))

    def save(self) -> Path:
        """A resumable checkpoint of this step (the state saved says so)."""
        self.state.last_save = self.state.step
        self.state.num_processes = self.accelerator.num_processes
        self.state.train_seconds = time.perf_counter() - self.started
        trainer_state = {**self.state.state_dict(), LR_SCHEDULER: self.scheduler.state_dict()}
        folder = save_checkpoint(self.accelerator, self.out, self.state.step, trainer_state,
                                 self.args.save_total_limit, bare_model(self.accelerator, self.model),
                                 self.expert_parallel, {EMA_WEIGHTS: self.ema.state_dict()} if self.ema else None,
                                 self.data.tokenizer, self.rank_files(),
                                 {DATA_SOURCE: json.dumps(self.data.summary.get("files", []))})
        self.window.restart_clock()
        return folder

    def rank_files(self) -> dict[str, str | dict]:
        """This rank's own files for a checkpoint: its stream position (--streaming) and its training carries
        (a recursive model updating per supervision step)."""
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        stream = {stream_state_name(rank, world_size): json.dumps(self.data.train.state_dict())} if self.streaming \
            else {}
        return {**stream, **self.carries.files(rank, world_size)}

    def export(self, name: str) -> Path:
        """The full model (gathered under ZeRO-3 and expert parallelism; the moving average with --ema_decay;
        LoRA merged) as OUTPUT_DIR/name, for from_pretrained."""
        with self.ema_applied():
            model = self.model if self.model_args.lora_rank == 0 else merged(bare_model(self.accelerator, self.model))
            return export_model(self.accelerator, model, self.data.tokenizer, self.out / name, self.expert_parallel)

    def ema_applied(self):
        """The weights evaluation and exports see: the moving average with --ema_decay, else the raw ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def stopped(self) -> dict:
        step, words = self.state.step, self.command_line
        hint = "the same arguments and --resume_from_checkpoint latest"
        if words is not None:
            kept = [w for i, w in enumerate(words) if w != "--resume_from_checkpoint" and
                    (i == 0 or words[i - 1] != "--resume_from_checkpoint")]
            hint = f":\n  accelerate launch train.py {' '.join(kept)} --resume_from_checkpoint latest"
        self.accelerator.print(f"stopped at step {step}; checkpoint saved in {self.out}/checkpoint-{step}. Resume "
                               f"with {hint}")
        self.end()
        return {"stopped_at": step, "output_dir": str(self.out)}

    def finish(self) -> dict:
        """Evaluate and save the last step if its interval did not, export final/, write the results."""
        state, args = self.state, self.args
        if state.last_eval is None or state.last_eval["step"] != state.step:
            self.evaluate()
        if state.last_save != state.step:
            self.save()
        self.export(FINAL)
        wall = time.perf_counter() - self.started  # every start's, up to the checkpoint each resumed from
        tokens_per_step = self.tokens_per_micro_batch * args.gradient_accumulation_steps
        final_eval = {k: v for k, v in state.last_eval.items() if k != "step"}
        results = {"step": state.step, "final_eval": final_eval, "best_val_loss": state.best_val_loss,
                   "tokens_per_s": state.step * tokens_per_step / wall if state.step else None, "wall_seconds": wall,
                   "flops_per_token": self.flops_per_token, "tokens_per_step": tokens_per_step,
                   "sequences_per_step": tokens_per_step // self.data.summary["block_size"],
                   "parameters": self.parameters, "output_dir": str(self.out),
                   "stopped_by": "plateau" if state.plateau_step is not None else "max_steps",
                   "machines": state.machines}
        if self.accelerator.is_main_process:
            (self.out / RESULTS).write_text(json.dumps(results, indent=2))
            self.accelerator.print(f"done: {state.step} steps in {wall / 60:.1f} min; final val loss "
                                   f"{final_eval['loss']:.4f} vs ln(vocab) {final_eval['ln_vocab']:.2f}; "
                                   f"exported {self.out / FINAL}")
            if self.data_args.task:
                self.accelerator.print(solved_sample(self.out / FINAL, self.data.validation[0]["input_ids"]))
            elif args.sample_tokens:
                self.accelerator.print("sample:\n" + print_sample(self.out / FINAL, args.sample_prompt,
                                                                  args.sample_tokens))
        self.end()
        return results


def train(model_args, data_args, args, command_line: list[str] | None = None) -> dict:
    """Train as the arguments say -> the results (train_results.json), or {"stopped_at": step, ...}.
    `command_line`: the flags the run was started with, for the resume hint a stopped run prints."""
    trainer = Trainer(model_args, data_args, args, command_line=command_line)
    try:
        return trainer.setup().train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> dict:
    """The command line -> `train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return train(*parse_args(argv), command_line=argv)


if __name__ == "__main__":
    run_cli(main)
