"""torch.compile on CPU: compiled training equals eager, and compiles a bounded number of times.

Whether dynamo recompiles is decided by its guards, which do not depend on the backend, so the
recompile checks use "aot_eager" (dynamo + AOT autograd, no code generation: seconds, not minutes).
Under bf16 autocast they trace what a GPU compiles: `torch._grouped_mm` inside the graph (in fp32
its compile-time rule refuses it, and the per-expert custom op stands in). The trainer test runs
`--torch_compile` through Accelerate: aot_eager and inductor, all as `full` tests; the suite keeps a run
resumed across compiling (aot_eager), with the names its export and moving average are saved under.
"""

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM

from conftest import main_cases, train_args, train_losses, write_corpus

DETERMINISTIC = dict(expert_activation="swiglu", hidden_dropout=0.0, attention_dropout=0.0, router_jitter_noise=0.0)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


class GraphRecorder(CompileCounterWithBackend):
    """Counts compiled frames (as its parent) and the `torch._grouped_mm` calls in their graphs."""

    def __init__(self):
        super().__init__("aot_eager")
        self.grouped_mm_calls = 0

    def __call__(self, gm, example_inputs):
        self.grouped_mm_calls += sum(node.target is torch._grouped_mm for node in gm.graph.nodes)
        return super().__call__(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_and_eager_steps(model, compiled, batches, dtype=torch.float32):
    """Per batch: [(loss, grads, recursion steps) compiled, the same eager], with the same random draws;
    bf16 runs under autocast, as mixed-precision training does."""
    results = []
    for i, ids in enumerate(batches):
        pair = []
        for run in (compiled, model):
            torch.manual_seed(i)  # the recursive model draws its halting exploration
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = run(ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            pair.append((out.loss.detach(), grads, getattr(out, "recursion_steps", None)))
            model.zero_grad()
        results.append(pair)
    return results


def assert_same_step(compiled, eager, atol=1e-5):
    (loss, grads, steps), (ref_loss, ref_grads, ref_steps) = compiled, eager
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=1e-4, msg=name)
    if steps is not None:
        assert torch.equal(steps, ref_steps)


@DTYPES
def test_compiled_base_model_trains_like_eager_and_compiles_once(dtype):
    model = MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug", **DETERMINISTIC)).train()
    counter = GraphRecorder()
    compiled = torch.compile(model, backend=counter)
    batches = [torch.randint(0, model.config.vocab_size, (4, 32)) for _ in range(4)]
    first = compiled_and_eager_steps(model, compiled, batches[:1], dtype)
    frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):  # new data, same shapes: no new compilation
        rest = compiled_and_eager_steps(model, compiled, batches[1:], dtype)
    assert counter.frame_count == frames
    # up and down projection of each of the 2 layers, in the one graph
    assert counter.grouped_mm_calls == (4 if dtype == torch.bfloat16 else 0)
    for compiled_step, eager_step in first + rest:
        assert_same_step(compiled_step, eager_step)


# bf16 (emulated, slow on CPUs without AMX) in the full run: fp32 shows the same recompilation behaviour
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.full)],
                         ids=["fp32", "bf16"])
def test_compiled_recursive_model_trains_like_eager_while_halting_changes_the_batch(dtype):
    """Examples halt at random steps, so the passes see ever different numbers of rows. Traced whole,
    the recursion unrolled into a frame per pass and hit dynamo's recompile limit in the first step
    (after which dynamo runs the rest eagerly). Now the first step's compilations (per grad mode,
    static then dynamic row count) serve every later batch, whatever its halting."""
    config = RecursiveMoEReasonConfig.from_preset("debug", halt_max_steps=4, halt_exploration_prob=1.0,
                                                  halt_target="accuracy", **DETERMINISTIC)  # it halts in training
    model = RecursiveMoEReasonForCausalLM(config).train()
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)  # halt as soon as the drawn minimum allows: 2 to 4 steps per example
    counter = GraphRecorder()
    compiled = torch.compile(model, backend=counter)
    batches = [torch.randint(0, config.vocab_size, (16, 16)) for _ in range(4)]
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        first = compiled_and_eager_steps(model, compiled, batches[:1], dtype)
        frames = counter.frame_count
        rest = compiled_and_eager_steps(model, compiled, batches[1:], dtype)
    assert counter.frame_count == frames  # nothing compiled after the first step
    assert (counter.grouped_mm_calls > 0) == (dtype == torch.bfloat16)
    halted = [compiled_step[2].tolist() for compiled_step, _ in first + rest]
    assert all(len(set(steps)) > 1 for steps in halted)  # in each batch, examples halted at different steps
    for compiled_step, eager_step in first + rest:
        assert_same_step(compiled_step, eager_step)


# The trainer's --torch_compile through Accelerate, all as `full` tests (the suite keeps the compiled models'
# own tests above): aot_eager (dynamo and AOT autograd, no code generation) for both models, and inductor,
# which generates and compiles C++ for minutes on a 2-core CPU
@pytest.mark.parametrize("model_type, backend", [
    pytest.param("base", "aot_eager", marks=pytest.mark.full),
    pytest.param("recursive", "aot_eager", marks=pytest.mark.full),
    pytest.param("base", "inductor", marks=pytest.mark.full),
    pytest.param("recursive", "inductor", marks=pytest.mark.full)])
def test_trainer_with_torch_compile_reproduces_the_eager_losses(tmp_path, model_type, backend):
    corpus = write_corpus(tmp_path, n=80)
    argvs = [train_args(tmp_path, corpus, model_type=model_type, output_dir=tmp_path / f"compile_{compile_}",
                        max_steps=4, eval_interval=100, save_interval=100, torch_compile=compile_,
                        torch_compile_backend=backend) for compile_ in (False, True)]
    assert main_cases(argvs) == [None, None]  # both runs forked from the warm-start process
    losses = {compile_: train_losses(tmp_path / f"compile_{compile_}") for compile_ in (False, True)}
    assert losses[True].keys() == losses[False].keys() == {1, 2, 3, 4}
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-4), step


def test_a_run_begun_eager_resumes_compiled_and_back_as_the_same_run(tmp_path):
    # compiling changes how a run computes, not what (trainer.EXECUTION_ARGUMENTS): a study's lane may resume
    # its interrupted run compiled, or a compiled run's checkpoint eagerly, and train on as the uninterrupted run.
    # Accelerate's compiled wrapper names every weight `_orig_mod.NAME`: the moving average saved with a checkpoint
    # and the export must still carry the model's own names, or they load as nothing
    corpus = write_corpus(tmp_path, n=80)
    common = dict(model_type="recursive", max_steps=4, eval_interval=100, save_interval=2, ema_decay=0.9,
                  torch_compile_backend="aot_eager")
    straight, there, back = (tmp_path / name for name in ("straight", "there", "back"))
    first_halves = [train_args(tmp_path, corpus, output_dir=out, torch_compile=compile_, **{**common, "max_steps": 2})
                    for out, compile_ in ((there, False), (back, True))]
    second_halves = [train_args(tmp_path, corpus, output_dir=out, torch_compile=compile_,
                                resume_from_checkpoint="latest", **common) for out, compile_ in ((there, True),
                                                                                                (back, False))]
    assert main_cases([train_args(tmp_path, corpus, output_dir=straight, **common), *first_halves,
                       *second_halves]) == [None] * 5
    expected = train_losses(straight)
    exported = load_file(straight / "final" / "model.safetensors")
    for out in (there, back):
        losses = train_losses(out)
        assert losses.keys() == expected.keys() == {1, 2, 3, 4}
        for step, loss in expected.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (out.name, step)
        weights = load_file(out / "final" / "model.safetensors")
        assert weights.keys() == exported.keys()
        assert all(torch.allclose(weights[k], exported[k], atol=1e-5) for k in weights), out.name
    assert load_file(back / "checkpoint-2" / "ema.safetensors").keys() == exported.keys()  # saved compiled
