"""`python -m moe_reason.generate`: streamed text from a prompt, stdin or an interactive loop, and a task
model's answer as a grid."""

import io

import pytest
import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.generate import main as generate_main
from moe_reason.tasks import GridFormulation, PromptFormulation, SudokuTask, task_tokenizer

PUZZLE = "4..31.4224..3..."


def save_tiny(folder, formulation, task_settings=None):
    tokenizer = task_tokenizer(SudokuTask(4), formulation)
    grid = isinstance(formulation, GridFormulation)
    config = MoEReasonConfig.from_preset("debug", vocab_size=len(tokenizer), pad_token_id=0, bidirectional=grid,
                                         use_cache=not grid)
    torch.manual_seed(0)
    model = MoEReasonForCausalLM(config)
    if task_settings:
        model.config.task = task_settings
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_text_is_streamed_from_a_prompt_stdin_or_an_interactive_loop(tmp_path, capsys, monkeypatch):
    folder = save_tiny(tmp_path / "lm", PromptFormulation())
    (reply,) = generate_main(["--model_path", str(folder), "--prompt", PUZZLE + "=", "--max_new_tokens", "16"])
    printed = capsys.readouterr().out
    assert len(reply) == 16 and PUZZLE + "=" + reply in printed  # the prompt, then the tokens as produced
    monkeypatch.setattr("sys.stdin", io.StringIO(PUZZLE + "="))
    assert generate_main(["--model_path", str(folder), "--max_new_tokens", "16"]) == [reply]  # greedy: the same
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PUZZLE}=\n1234\n\n"))
    replies = generate_main(["--model_path", str(folder), "--interactive", "--max_new_tokens", "8", "--do_sample",
                             "--temperature", "1.5", "--seed", "3"])
    assert len(replies) == 2 and all(len(r) <= 8 for r in replies)  # padding sampled is not shown
    with pytest.raises(ValueError, match="temperature=0.0 is invalid"):
        generate_main(["--model_path", str(folder), "--prompt", "1", "--do_sample", "--temperature", "0"])


def test_a_task_model_prints_its_answer_as_a_grid_with_the_validators_verdict(tmp_path, capsys):
    settings = {"task": "sudoku", "task_formulation": "grid", "task_size": 4, "sudoku_blanks": 8}
    folder = save_tiny(tmp_path / "grid", GridFormulation(), settings)
    (reply,) = generate_main(["--model_path", str(folder), "--prompt", "4..3\n1.42\n2400\n3..."])
    grid, verdict = reply.rsplit("\n", 1)
    assert len(grid.splitlines()) == 4 and all(len(row) == 4 for row in grid.splitlines())
    assert verdict in ("(valid by the sudoku validator)", "(not valid by the sudoku validator)")
    assert set(grid.replace("\n", "")) <= set(SudokuTask(4).symbols)
    with pytest.raises(ValueError, match="a 4x4 puzzle is 16 cells"):
        generate_main(["--model_path", str(folder), "--prompt", "4..3x"])
