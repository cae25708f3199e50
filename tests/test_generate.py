"""`moe-reason-generate`: streamed text from a prompt, stdin or an interactive loop, and a task
model's answer as a grid."""

import io

import pytest
import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.evaluation.generate import main as generate_main
from moe_reason.tasks.puzzles import GridFormulation, PromptFormulation, SudokuTask

from conftest import save_tiny

PUZZLE = "4..31.4224..3..."


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


def test_lm_eval_harness_scores_an_export_on_a_task_of_local_files(tmp_path):
    """lm-eval's HFLM on our model and tokenizer, on a multiple-choice task read from a local JSONL file."""
    pytest.importorskip("lm_eval")  # the dev extra installs it; a user may not have it
    import json
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from moe_reason.evaluation.evaluate import main as evaluate_main

    words = ["<eos>", "the", "sky", "is", "blue", "green", "grass", "red", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = MoEReasonConfig.from_preset("debug", vocab_size=len(words), eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    MoEReasonForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"question": "the sky is", "choices": ["blue", "green"], "answer": 0},
            {"question": "the grass is", "choices": ["red", "green"], "answer": 1},
            {"question": "is the sky", "choices": ["blue", "red"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "colours.yaml").write_text(
        "task: colours\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    result = evaluate_main(["--model_path", str(tmp_path / "model"), "--lm_eval_tasks", "colours",
                            "--lm_eval_include_path", str(tmp_path / "tasks"), "--lm_eval_limit", "2"])
    accuracy = result["results"]["colours"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and result["n-samples"]["colours"]["effective"] == 2
    saved = json.loads((tmp_path / "model" / "eval_lm_eval.json").read_text())
    assert saved["results"]["colours"]["acc,none"] == accuracy


def test_generate_caps_new_tokens_at_the_models_positions_and_says_so(tmp_path, capsys):
    folder = save_tiny(tmp_path / "lm", PromptFormulation())  # the debug preset holds 128 positions
    (reply,) = generate_main(["--model_path", str(folder), "--prompt", PUZZLE + "=", "--max_new_tokens", "100000"])
    assert len(reply) == 128 - 17  # every position the prompt left
    assert "note: --max_new_tokens 100000 capped at 111: the model holds 128 positions" in capsys.readouterr().err
