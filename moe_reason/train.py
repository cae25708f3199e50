"""The training loop: arguments -> data -> model -> Accelerator/DeepSpeed -> loop -> checkpoints/metrics.

    accelerate launch train.py                                   # small preset, offline corpus, ~7 min on 2 CPU cores
    accelerate launch train.py configs/x.yaml --max_steps 100    # file values, then flag overrides
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train.py
    deepspeed train.py --deepspeed ds_configs/zero2.json         # the plain DeepSpeed launcher
"""

import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .arguments import ARGUMENT_CLASSES, build_config, model_class_for, parse_args, resolve_global_batch
from .checkpointing import (check_expert_parallel_size, complete_checkpoints, export_model, read_trainer_state,
                            resolve_checkpoint, save_checkpoint)
from .data import EpochSampler, check_against_model, collate_blocks, prepare_data
from .evaluate import evaluate_model
from .metrics import ExpertLoadMeter, measure_peak_flops, training_flops_per_token
from .optim import make_optimizer_and_scheduler

RUN_FILE = "run_args.json"

# ----------------------------------------------------------------------------
# Set-up: output folder, Accelerator and DeepSpeed


def check_output_dir(args, run_args: dict) -> None:
    """Refuse to mix two runs in one folder, before any work starts."""
    out = Path(args.output_dir)
    if args.resume_from_checkpoint or args.overwrite_output_dir or not out.exists():
        return
    if (out / RUN_FILE).exists() or complete_checkpoints(out) or (out / "final").exists():
        same = (out / RUN_FILE).exists() and json.loads((out / RUN_FILE).read_text()) == run_args
        what = "this run's earlier output" if same else "a different run"
        raise ValueError(f"output_dir {out} already holds {what}; pass --resume_from_checkpoint latest to continue "
                         "it or --overwrite_output_dir to start afresh (its checkpoints are deleted)")


def clear_output_dir(out: Path) -> None:
    for path in [*out.glob("checkpoint-*"), out / "best", out / "final", out / "tensorboard"]:
        shutil.rmtree(path, ignore_errors=True)
    for name in ("metrics.jsonl", RUN_FILE, "train_results.json"):
        (out / name).unlink(missing_ok=True)


def make_accelerator(args) -> Accelerator:
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # without this each CPU process initialises its own world and believes it is alone (DESIGN.md §4)
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed) if args.deepspeed else None
    use_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    # Accelerate treats several CPU processes as one DDP world only when told it is on the CPU;
    # but cpu=True also switches DeepSpeed off, which runs on the CPU by itself
    cpu = not torch.cuda.is_available() and not use_deepspeed
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision, log_with="tensorboard", cpu=cpu,
                       project_dir=args.output_dir, deepspeed_plugin=plugin, kwargs_handlers=handlers,
                       dynamo_backend="inductor" if args.torch_compile else "no")


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
        raise ValueError(f"the DeepSpeed config contradicts the training arguments: {'; '.join(clashes)}. "
                         "Use \"auto\" in the DeepSpeed config, or change the arguments.")
    for key, value in ours.items():
        if config.get(key) == "auto":
            config[key] = value


# ----------------------------------------------------------------------------
# A sample


def print_sample(folder: Path, prompt: str, tokens: int) -> str:
    """Greedy continuation of `prompt` by the exported model (loaded back with from_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------
# Training


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


def rank_load_summary(accelerator, rank_rows: torch.Tensor | None) -> dict:
    """Rows each rank's experts processed per layer (EP), gathered: imbalance across ranks in TensorBoard."""
    if rank_rows is None:
        return {}
    table = accelerator.gather(rank_rows.reshape(1, -1).float()).cpu()  # [world, L]
    record = {f"expert_parallel/rows_layer{layer}_rank{rank}": float(table[rank, layer])
              for rank in range(table.shape[0]) for layer in range(table.shape[1])}
    per_rank = table.sum(1)
    record["expert_parallel/rank_imbalance"] = float(per_rank.max() / per_rank.mean().clamp_min(1))
    return record


def any_nonfinite(accelerator, value: torch.Tensor) -> bool:
    bad = (~torch.isfinite(value.detach().float())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bool(bad.item() > 0)


def build_model(model_args, args, data, accelerator, is_deepspeed: bool):
    """The model for this run's tokenizer -> (model, config, this rank's expert modules under EP or None)."""
    config = build_config(model_args, vocab_size=len(data.tokenizer))
    config.eos_token_id = config.pad_token_id = data.tokenizer.eos_token_id
    config.bos_token_id = data.tokenizer.bos_token_id
    check_against_model(data, config)
    model_class = model_class_for(config)
    model = model_class.from_pretrained(model_args.init_from, config=config) if model_args.init_from \
        else model_class(config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    ep_experts = None
    if args.expert_parallel_size > 1:  # every rank built (or loaded) the same full model; each keeps its slice
        from .expert_parallel import shard_experts
        ep_experts = shard_experts(model, args.expert_parallel_size)
        accelerator.print(f"expert parallelism: {args.expert_parallel_size} ranks per group, "
                          f"{config.num_experts // args.expert_parallel_size} experts per rank")
    if is_deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3:
        # ZeRO-3 gathers a module's parameters when its forward starts; an expert that gets no
        # tokens on one rank would skip that gather and hang the others, so the whole MoE block is one leaf
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    return model, config, ep_experts


def make_loaders(data, args, num_processes: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (seeded epoch order, resumable) and the fixed validation slice."""
    train_loader = DataLoader(data.train, batch_size=args.per_device_train_batch_size, drop_last=True,
                              sampler=EpochSampler(len(data.train), args.seed), collate_fn=collate_blocks,
                              generator=torch.Generator().manual_seed(args.seed))
    # the validation set is a fixed slice of blocks, the same whatever the number of processes
    eval_blocks = len(data.validation) if args.eval_batches == 0 else \
        min(len(data.validation), args.eval_batches * args.per_device_eval_batch_size)
    eval_loader = DataLoader(data.validation.select(range(eval_blocks)), batch_size=args.per_device_eval_batch_size,
                             collate_fn=collate_blocks)
    if len(train_loader) < num_processes:
        raise ValueError(f"{len(data.train)} training blocks make fewer batches than there are processes")
    return train_loader, eval_loader


# ----------------------------------------------------------------------------
# Logging


class LogWindow:
    """What the micro-batches since the last log line add up to.

    Losses, recursion metrics and expert load are summed as tensors on the device, so a
    micro-batch costs no host sync; `record` averages losses and recursion metrics over
    processes once per log line and opens the next window.
    """

    LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss")

    def __init__(self, ep_experts=None):
        self.ep_experts = ep_experts
        if ep_experts is not None:  # imported only under EP: it needs DeepSpeed
            from .expert_parallel import tokens_per_rank
            self.tokens_per_rank = tokens_per_rank
        self.load = ExpertLoadMeter()
        self.restart()

    def restart(self) -> None:
        self.sums = {name: 0.0 for name in self.LOSSES}
        self.extra: dict[str, torch.Tensor] = {}  # recursion steps, halt rate, ...
        self.micro = self.skipped = 0
        self.rank_rows = None  # [L] rows this rank's experts processed per MoE layer (EP only)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation and checkpointing time is not training time."""
        self.tick = time.perf_counter()

    def add(self, output, nonfinite: bool) -> None:
        self.micro += 1
        if nonfinite:
            self.skipped += 1
            return
        self.sums["loss"] += output.loss.detach().float()
        self.sums["lm_loss"] += (output.lm_loss if output.lm_loss is not None else output.loss).detach().float()
        for name in ("aux_loss", "z_loss"):
            if getattr(output, name, None) is not None:
                self.sums[name] += getattr(output, name).detach().float()
        for name, value in (getattr(output, "training_metrics", None) or {}).items():
            if value is not None:
                self.extra[name] = self.extra.get(name, 0.0) + torch.as_tensor(value).detach().float()
        self.load.update(getattr(output, "expert_load", None))
        if self.ep_experts is not None:
            received = self.tokens_per_rank(self.ep_experts)
            self.rank_rows = received if self.rank_rows is None else self.rank_rows + received

    def record(self, accelerator, tokens_per_micro_batch: int, flops_per_token: float, peak: float,
               **fields) -> dict:
        """The train/* record of this window (means over good micro-batches and processes); restarts."""
        elapsed = time.perf_counter() - self.tick
        good = max(self.micro - self.skipped, 1)
        tokens_per_s = tokens_per_micro_batch * self.micro / max(elapsed, 1e-9)
        # every rank reports the same names (the model's outputs), so the reductions pair up
        sums = {**self.sums, **dict(sorted(self.extra.items()))}
        record = {f"train/{name}": float(accelerator.reduce(torch.as_tensor(value, device=accelerator.device).float(),
                                                            "mean")) / good
                  for name, value in sums.items()}
        record.update({f"train/{name}": value for name, value in fields.items()})
        record.update({"train/tokens_per_s": tokens_per_s,
                       "train/mfu": tokens_per_s * flops_per_token / (peak * accelerator.num_processes),
                       "train/skipped_micro_batches": self.skipped,
                       **self.load.summary(), **rank_load_summary(accelerator, self.rank_rows)})
        self.restart()
        return record


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_args(argv)
    run_args = {cls.__name__: vars(obj) for cls, obj in zip(ARGUMENT_CLASSES, (model_args, data_args, args))}
    run_args["TrainingArguments"] = {k: v for k, v in run_args["TrainingArguments"].items()
                                     if k not in ("resume_from_checkpoint", "overwrite_output_dir", "max_steps",
                                                  "local_rank", "cpu_threads")}
    check_output_dir(args, run_args)
    checkpoint = resolve_checkpoint(Path(args.output_dir), args.resume_from_checkpoint) \
        if args.resume_from_checkpoint else None
    if checkpoint is not None:
        check_expert_parallel_size(checkpoint, args.expert_parallel_size)
    num_experts = build_config(model_args).num_experts  # invalid model fields fail here, before any other work
    resolve_global_batch(args, int(os.environ.get("WORLD_SIZE", "1")))

    accelerator = make_accelerator(args)
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate applies fp16 autocast on accelerators only: on the CPU the run would be fp32
        raise ValueError("--mixed_precision fp16 needs a GPU: on the CPU Accelerate does not apply it and the run "
                         "would train in fp32 unannounced; use --mixed_precision bf16 (CPU autocast) or no")
    if not torch.cuda.is_available():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // local_processes))
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        reconcile_deepspeed_config(accelerator, args)
    expert_parallel = args.expert_parallel_size > 1
    if expert_parallel:  # imported only here: it needs DeepSpeed
        from .expert_parallel import check_layout, load_shards, save_shards
        check_layout(num_experts, args.expert_parallel_size, accelerator.num_processes,
                     accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed else None)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            clear_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(run_args, indent=2, default=str))
    set_seed(args.seed)

    # ---- data
    with accelerator.main_process_first():
        data = prepare_data(data_args, log=accelerator.print)
    accelerator.print(f"data: {json.dumps({k: data.summary[k] for k in ('train', 'validation', 'cache_hit')})}")

    # ---- model
    model, config, ep_experts = build_model(model_args, args, data, accelerator, is_deepspeed)
    n_params = sum(p.numel() for p in model.parameters())  # this rank's share under expert parallelism
    accelerator.print(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, {accelerator.num_processes} "
                      f"process(es) ({accelerator.distributed_type.value}), mixed precision "
                      f"{accelerator.mixed_precision}, {config.num_experts} experts top-{config.num_experts_per_tok}, "
                      f"vocab {config.vocab_size}")

    # ---- optimizer, schedule, loaders, Accelerate
    optimizer, scheduler = make_optimizer_and_scheduler(model, args, accelerator.device)
    train_loader, eval_loader = make_loaders(data, args, accelerator.num_processes)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # the scheduler is stepped once per optimizer step by us; Accelerate's wrapper would step it
    # once per process, making the schedule depend on the world size
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_val_loss": None, "nonfinite_in_a_row": 0}
    if checkpoint is not None:
        state.update(read_trainer_state(checkpoint))
        # under expert parallelism DeepSpeed's module file holds the dense weights only (its
        # checkpoint code knows only its own MoE layout); the ZeRO optimizer files restore the
        # experts' fp32 master copies and our shard files the module's expert weights
        accelerator.load_state(str(checkpoint), **({"load_module_strict": False} if expert_parallel else {}))
        if expert_parallel:
            load_shards(accelerator.unwrap_model(model), checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")

    seq_len = data.summary["block_size"]
    flops_per_token = training_flops_per_token(config, seq_len)
    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measure_peak_flops(accelerator.device, matmul_dtype)
    hparams = {k: v for group in run_args.values() for k, v in group.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("tensorboard", config=hparams)
    metrics_file = out / "metrics.jsonl"

    def log(record: dict, step: int) -> None:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def run_eval(step: int) -> dict:
        result = evaluate_model(model, eval_loader, config.vocab_size, accelerator.gather_for_metrics)
        log({f"eval/{k}": v for k, v in result.items()}, step)
        accelerator.print(f"step {step}: val loss {result['loss']:.4f} (ln vocab {result['ln_vocab']:.2f}), "
                          f"ppl {result['perplexity']:.1f}, acc {result['accuracy']:.3f}")
        if state["best_val_loss"] is None or result["loss"] < state["best_val_loss"]:
            state["best_val_loss"] = result["loss"]
            export_model(accelerator, model, data.tokenizer, out / "best", gather_experts=expert_parallel)
        return result

    def save(step: int) -> Path:
        save_extra = (lambda folder: save_shards(accelerator.unwrap_model(model), folder)) if expert_parallel else None
        return save_checkpoint(accelerator, out, step, dict(state), args.save_total_limit, save_extra)

    # ---- the loop
    stop = StopRequest()
    tokens_per_micro_batch = args.per_device_train_batch_size * seq_len * accelerator.num_processes
    window = LogWindow(ep_experts)
    progress = tqdm(total=args.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    last_eval, saved_step, step_ok = None, state["step"] if args.resume_from_checkpoint else None, True
    started = time.perf_counter()
    tokens_total = 0
    model.train()
    while state["step"] < args.max_steps:
        train_loader.set_epoch(state["epoch"])
        batches = accelerator.skip_first_batches(train_loader, state["batches_in_epoch"]) \
            if state["batches_in_epoch"] else train_loader
        for batch in batches:
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                output = model(**batch, use_cache=False)
                nonfinite = any_nonfinite(accelerator, output.loss)
                if nonfinite and is_deepspeed:
                    raise RuntimeError(f"non-finite loss at step {state['step']} under DeepSpeed, whose engine "
                                       "steps inside backward: stopping (lower the learning rate, or use bf16)")
                if not nonfinite:
                    accelerator.backward(output.loss)
                window.add(output, nonfinite)
                step_ok = step_ok and not nonfinite
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
                    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                    step_ok = step_ok and (math.isfinite(grad_norm) or is_deepspeed)
                    if step_ok:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done
            state["step"] += 1
            step = state["step"]
            tokens_total += tokens_per_micro_batch * args.gradient_accumulation_steps
            state["nonfinite_in_a_row"] = 0 if step_ok else state["nonfinite_in_a_row"] + 1
            if not step_ok:
                accelerator.print(f"step {step}: non-finite loss or gradient, update skipped "
                                  f"({state['nonfinite_in_a_row']} in a row)")
                log({"train/skipped_step": 1}, step)
                if state["nonfinite_in_a_row"] >= args.max_nonfinite_steps:
                    raise RuntimeError(f"{state['nonfinite_in_a_row']} consecutive non-finite steps at step {step}: "
                                       "stopping. Lower --learning_rate or --max_grad_norm, or check the data.")
            step_ok = True
            progress.update(1)

            if step % args.log_interval == 0 or step == args.max_steps:
                record = window.record(accelerator, tokens_per_micro_batch, flops_per_token, peak,
                                       lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, epoch=state["epoch"])
                log(record, step)
                progress.set_postfix(loss=f"{record['train/lm_loss']:.3f}", tok_s=f"{record['train/tokens_per_s']:,.0f}")

            if step % args.eval_interval == 0 or step == args.max_steps:
                last_eval = (step, run_eval(step))
                window.restart_clock()
            stopping = stop.agreed(accelerator)
            if step % args.save_interval == 0 or step == args.max_steps or stopping:
                save(step)
                saved_step = step
                window.restart_clock()
            if stopping:
                progress.close()
                accelerator.print(f"stopped at step {step}; checkpoint saved in {out}/checkpoint-{step}. Resume with:\n"
                                  f"  accelerate launch train.py {' '.join(sys.argv[1:])} "
                                  "--resume_from_checkpoint latest")
                accelerator.end_training()
                return {"stopped_at": step, "output_dir": str(out)}
            if step >= args.max_steps:
                break
        else:  # the epoch ran out before max_steps
            state["epoch"] += 1
            state["batches_in_epoch"] = 0

    progress.close()
    # ---- end of training: final evaluation, export, sample
    if last_eval is None or last_eval[0] != state["step"]:
        last_eval = (state["step"], run_eval(state["step"]))
    if saved_step != state["step"]:
        save(state["step"])
    export_model(accelerator, model, data.tokenizer, out / "final", gather_experts=expert_parallel)
    wall = time.perf_counter() - started
    results = {"step": state["step"], "final_eval": last_eval[1], "best_val_loss": state["best_val_loss"],
               "tokens_per_s": tokens_total / wall if tokens_total else None, "wall_seconds": wall,
               "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_micro_batch * args.gradient_accumulation_steps,
               "parameters": n_params, "output_dir": str(out)}
    if accelerator.is_main_process:
        (out / "train_results.json").write_text(json.dumps(results, indent=2))
        accelerator.print(f"done: {state['step']} steps in {wall / 60:.1f} min; final val loss "
                          f"{last_eval[1]['loss']:.4f} vs ln(vocab) {last_eval[1]['ln_vocab']:.2f}; "
                          f"exported {out / 'final'}")
        if args.sample_tokens:
            accelerator.print("sample:\n" + print_sample(out / "final", args.sample_prompt, args.sample_tokens))
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
