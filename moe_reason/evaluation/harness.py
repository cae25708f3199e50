"""lm-evaluation-harness on an exported model: lm-eval's own `HFLM` wrapper around the loaded model and
its tokenizer, so every task lm-eval knows (or a folder of task YAMLs) scores it as any HF model.

lm-eval is an optional extra: `pip install -e ".[eval]"`.
"""

from ..errors import UserError


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8) -> dict:
    """-> lm-eval's results, per task (and its versions and sample counts), JSON-ready."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"--lm_eval_tasks needs lm-evaluation-harness: pip install -e \".[eval]\" ({err})") from None
    # lm-eval's thousands of built-in task files take seconds to index: only when a task is not in include_path
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or set(tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise UserError(f"lm-eval knows no task {unknown}"
                        + (f" (nor does --lm_eval_include_path {include_path})" if include_path else
                            "; a folder of task YAMLs can be added with --lm_eval_include_path"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=model.config.max_position_embeddings)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    return {"tasks": tasks, "limit": limit, "results": out["results"], "versions": out.get("versions"),
            "n-samples": out.get("n-samples")}
