"""Reasoning tasks: generators, validators, splits, the grid formulation, puzzle files, training on
puzzles through the real trainer, and the weights' moving average."""

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM, RecursiveMoEReasonConfig, RecursiveMoEReasonForCausalLM
from moe_reason.tasks import maze, sudoku
from moe_reason.data.prepare import DataArguments, DrawSampler
from moe_reason.evaluation.loss import evaluate_model
from moe_reason.tasks.scoring import evaluate_puzzles, score, solved_rows
from moe_reason.tasks.files import read_sudoku_file
from moe_reason.tasks.puzzles import (GridFormulation, MazeTask, PuzzleDraws, SudokuTask, generate_splits,
                                      load_or_generate, make_task)

from conftest import assert_export_cli_matches_final, main_cases, read_metrics, task_argv


# ---- generators and validators


@pytest.mark.parametrize("n, blanks, count", [(4, 10, 20), (6, 22, 10), (9, 50, 4)])
def test_every_sudoku_has_exactly_one_solution_and_the_validator_judges_it(n, blanks, count):
    rng = np.random.default_rng(1)
    for _ in range(count):
        solution = sudoku.random_solution(n, rng)
        puzzle = sudoku.make_puzzle(solution, blanks, rng)
        found, first = sudoku.solve(puzzle, limit=5)
        assert found == 1 and (first == solution).all()
        assert (puzzle == 0).sum() <= blanks and ((puzzle == 0) | (puzzle == solution)).all()
        assert sudoku.is_valid(puzzle, solution)
        blank = tuple(np.argwhere(puzzle == 0)[0])
        changed = solution.copy()
        changed[blank] = changed[blank] % n + 1  # one cell off: a row, column and box now repeat a digit
        assert not sudoku.is_valid(puzzle, changed)
        given = tuple(np.argwhere(puzzle != 0)[0])
        relabelled = sudoku.augment(solution, (np.array([0, *np.roll(np.arange(1, n + 1), 1)]), np.arange(n),
                                               np.arange(n), False))
        assert sudoku.is_valid(np.zeros_like(puzzle), relabelled)  # still a Sudoku ...
        assert relabelled[given] != puzzle[given] and not sudoku.is_valid(puzzle, relabelled)  # ... not this one's


def test_blank_count_sets_difficulty_and_the_grader_measures_it():
    rng = np.random.default_rng(0)
    grids = [sudoku.random_solution(9, rng) for _ in range(6)]
    easy = [sudoku.propagation_rounds(sudoku.make_puzzle(g, 30, rng)) for g in grids]
    hard = [sudoku.propagation_rounds(sudoku.make_puzzle(g, 55, rng)) for g in grids]
    assert all(r is not None for r in easy)
    assert np.mean([r if r is not None else 99 for r in hard]) > np.mean(easy)
    assert sudoku.propagation_rounds(grids[0]) == 0
    # a puzzle that stalls single-candidate filling is measured as needing backtracking
    assert sudoku.propagation_rounds(np.zeros((9, 9), dtype=np.int8)) is None


def test_maze_labels_are_shortest_paths_and_the_validator_judges_them():
    rng = np.random.default_rng(2)
    for _ in range(30):
        puzzle, answer = maze.make_maze(8, 12, rng)
        start, goal = tuple(np.argwhere(puzzle == maze.START)[0]), tuple(np.argwhere(puzzle == maze.GOAL)[0])
        shortest = maze.distances(puzzle, start)[goal]
        assert shortest + 1 >= 12 and (answer == maze.PATH).sum() == shortest - 1
        assert maze.is_valid(puzzle, answer)
        path_cells = np.argwhere(answer == maze.PATH)
        broken = answer.copy()
        broken[tuple(path_cells[len(path_cells) // 2])] = maze.FREE  # a gap in the path
        assert not maze.is_valid(puzzle, broken)
        longer = answer.copy()
        free = np.argwhere(answer == maze.FREE)
        if len(free):
            longer[tuple(free[0])] = maze.PATH  # a cell too many: not a shortest path
            assert not maze.is_valid(puzzle, longer)
        for k in range(8):  # every symmetry keeps a valid answer valid
            assert maze.is_valid(maze.dihedral(puzzle, k), maze.dihedral(answer, k))


def test_the_evaluation_counts_a_maze_solved_by_any_shortest_path_where_exact_match_wants_the_stored_one():
    task = MazeTask(3, maze_min_path=5, maze_wall_share=0.0)
    puzzle = np.full((3, 3), maze.FREE, dtype=np.int8)
    puzzle[0, 0], puzzle[2, 2] = maze.START, maze.GOAL

    def marked(*cells):
        grid = puzzle.copy()
        for cell in cells:
            grid[cell] = maze.PATH
        return grid

    stored = marked((0, 1), (0, 2), (1, 2))
    answers = [stored, marked((1, 0), (2, 0), (2, 1)), marked((0, 1), (1, 1), (1, 2), (2, 1))]  # 2 shortest, 1 not
    ids = torch.tensor(np.stack([task.to_tokens(puzzle)] * 3))  # [3, 9]
    predicted = torch.tensor(np.stack([task.to_tokens(a) for a in answers]))  # [3, 9]

    class Answers(torch.nn.Module):  # a grid model whose argmax is `predicted`
        def forward(self, input_ids, use_cache):
            return SimpleNamespace(logits=torch.nn.functional.one_hot(predicted, 6).float())

    config = SimpleNamespace(bidirectional=True, stablemax_loss=False, vocab_size=6, num_experts=1)
    batch = {"input_ids": ids, "labels": torch.tensor(np.stack([task.to_tokens(stored)] * 3))}
    assert solved_rows(task, ids, predicted).tolist() == [True, True, False]
    result = evaluate_model(Answers(), [batch], config, validate=functools.partial(solved_rows, task))
    assert result["exact_match"] == pytest.approx(1 / 3) and result["solved"] == pytest.approx(2 / 3)
    assert "solved" not in evaluate_model(Answers(), [batch], config)  # no validator: text, or a prompt model
    assert not MazeTask.unique_answers and SudokuTask.unique_answers


@pytest.mark.parametrize("task", [SudokuTask(9, 40), SudokuTask(4, 8), MazeTask(6, 8), MazeTask(5, 8, maze_canvas=8)],
                         ids=["sudoku9", "sudoku4", "maze6", "maze5_on_8"])
def test_splits_are_disjoint_up_to_augmentation_and_seeds_reproduce(task):
    splits = generate_splits(task, train=30, test=20, seed=3)
    keys = {name: [task.key(p, a) for p, a in zip(*split)] for name, split in splits.items()}
    assert not set(keys["train"]) & set(keys["test"]) and len(set(keys["train"])) == 30
    rng = np.random.default_rng(0)
    puzzle, answer = splits["test"][0][0], splits["test"][1][0]
    for _ in range(5):  # the key sees through the augmentations, so the check above is the real one
        p, a = task.augment(puzzle, answer, rng)
        assert task.key(p, a) == keys["test"][0] and task.is_valid(p, a)
    again = generate_splits(task, train=30, test=20, seed=3)
    assert all((again[s][i] == splits[s][i]).all() for s in splits for i in (0, 1))
    other = generate_splits(task, train=30, test=20, seed=4)
    assert not (other["test"][0] == splits["test"][0]).all()


def test_an_epoch_is_a_fresh_draw_and_a_pure_function_of_the_index():
    task = SudokuTask(4, 8)
    splits = generate_splits(task, train=8, test=4, seed=0)
    draws = PuzzleDraws(task, GridFormulation(), *splits["train"], seed=0, augment=True)
    sampler = DrawSampler(len(draws), seed=0)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(8, 16))
    assert draws[epoch1[0]] == draws[epoch1[0]]  # the same draw every time it is read (exact resume)
    assert draws[3] != draws[3 + 8]  # base puzzle 3 in epoch 0 and epoch 1: two augmentations
    for i in (3, 11):
        row = draws[i]
        assert task.is_valid(task.from_tokens(row["input_ids"]), task.from_tokens(row["labels"]))


def test_a_maze_on_a_canvas_keeps_its_path_and_moves_around():
    """--maze_canvas: the small maze sits at a random spot of a wall grid, still solved by its label."""
    task = MazeTask(5, 8, maze_canvas=8)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(20):
        puzzle, answer = task.generate(rng)
        assert puzzle.shape == (8, 8) and maze.is_valid(puzzle, answer)
        inside = np.argwhere(puzzle != maze.WALL)
        assert np.ptp(inside, axis=0).max() < 5  # every open cell within one 5x5 window
        corners.add(tuple(inside.min(0)))
    assert len(corners) > 3
    assert DataArguments(task="maze", task_size=5, maze_canvas=8).sequence_length() == 64
    with pytest.raises(ValueError, match="maze_canvas=4 is invalid: must be None or >= task_size \\(5\\)"):
        DataArguments(task="maze", task_size=5, maze_canvas=4)


# ---- the grid formulation


@pytest.mark.parametrize("model_class, config_class", [(MoEReasonForCausalLM, MoEReasonConfig),
                                                       (RecursiveMoEReasonForCausalLM, RecursiveMoEReasonConfig)])
def test_grid_attention_is_bidirectional_and_generate_is_refused(model_class, config_class):
    torch.manual_seed(0)
    model = model_class(config_class.from_preset("debug", vocab_size=11, bidirectional=True, use_cache=False)).eval()
    ids = torch.randint(1, 11, (2, 81))
    later = ids.clone()
    later[:, 80] = later[:, 80] % 10 + 1  # change the last cell only
    with torch.no_grad():
        first, changed = model(input_ids=ids).logits, model(input_ids=later).logits
    assert (first[:, 0] - changed[:, 0]).abs().max() > 1e-4  # position 0 saw position 80
    causal = model_class(config_class.from_preset("debug", vocab_size=11)).eval()
    with torch.no_grad():
        assert torch.allclose(causal(input_ids=ids).logits[:, :80], causal(input_ids=later).logits[:, :80], atol=1e-6)
    with pytest.raises(ValueError, match="generate does not apply to a grid model"):
        model.generate(ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="use_cache"):
        MoEReasonConfig.from_preset("debug", bidirectional=True)  # use_cache=True would cache a left-to-right decode


# ---- puzzle files


SOLVED = "4213134224313124"


def test_task_file_reads_text_and_csv_and_names_a_malformed_line(tmp_path):
    text = tmp_path / "puzzles.txt"
    text.write_text(f"# two 4x4 puzzles\n\n4..31.4224..3...,{SOLVED}\n4.1.1.4224..3..0\n")
    puzzles, solutions = read_sudoku_file(text)
    assert puzzles.shape == solutions.shape == (2, 4, 4)
    assert puzzles[0, 0, 0] == 4 and puzzles[0, 0, 1] == 0 and puzzles[1, 3, 3] == 0
    assert (solutions[0].reshape(-1) == [int(c) for c in SOLVED]).all() and not solutions[1].any()  # none given
    # cells are scored where a solution was given, the validator judges all: the reference answers the first
    # puzzle, the second keeps one blank
    answers = np.stack([solutions[0], np.where(puzzles[1] == 0, solutions[0], puzzles[1])])
    answers[1, 3, 3] = 0
    scored = score(SudokuTask(task_size=4), puzzles, answers, solutions)
    assert scored == {"puzzles": 2, "exact_accuracy": 0.5, "cell_accuracy": 1.0, "cell_accuracy_puzzles": 1}
    bare = tmp_path / "bare.txt"
    bare.write_text("4..31.4224..3...\n")
    assert read_sudoku_file(bare)[1] is None
    csv = tmp_path / "extreme.csv"
    csv.write_text(f"source,question,answer,rating\nx,4..31.4224..3...,{SOLVED},3\n")
    puzzles, solutions = read_sudoku_file(csv)
    assert (solutions[0].reshape(-1) == [int(c) for c in SOLVED]).all()
    for name, line, error in [("short.txt", "4..31.4224..3..", "line 2: the puzzle has 15 characters"),
                              ("letters.txt", "4..31.4224..3..x", "line 2: the puzzle holds 'x'"),
                              ("blank_solution.txt", f"4..31.4224..3...,{SOLVED[:-1]}.",
                               "line 2: the solution holds '.'")]:
        (tmp_path / name).write_text("# header\n" + line + "\n")
        with pytest.raises(ValueError, match=error):
            read_sudoku_file(tmp_path / name)
    (tmp_path / "cols.csv").write_text("id,grid\n1,4..31.4224..3...\n")
    with pytest.raises(ValueError, match="line 1: no puzzle column"):
        read_sudoku_file(tmp_path / "cols.csv")
    # a given solution must be one: scored as the reference otherwise
    clue_broken = ("3" + SOLVED[1:], r"line 2: the solution is not one \(it changes 1 of the puzzle's clues\)")
    not_a_grid = (SOLVED[0] + "1" + SOLVED[2:], r"line 2: the solution is not one \(it breaks a row, column or box")
    for solution, error in (clue_broken, not_a_grid):
        (tmp_path / "wrong.txt").write_text(f"# header\n4..31.4224..3...,{solution}\n")
        with pytest.raises(ValueError, match=error):
            read_sudoku_file(tmp_path / "wrong.txt")
    (tmp_path / "huge.csv").write_text("question,answer\n4..31.4224..3...," + "1" * 5_000_000 + "\n")
    with pytest.raises(ValueError, match="huge.csv line 2: field larger than field limit"):
        read_sudoku_file(tmp_path / "huge.csv")


# ---- training on puzzles, and the moving average of the weights


@pytest.mark.slow
def test_recursive_model_overfits_32_puzzles_and_the_ema_is_exported_and_resumed(tmp_path):
    """One process: a tiny recursive grid model memorises 32 Sudoku puzzles (100% exact), and so does a
    causal LM in the prompt formulation, solving them with generate; then 8 EMA steps straight through,
    and the same 8 as 4 + a resumed 4."""
    fit, prompt, ema, halves = tmp_path / "fit", tmp_path / "prompt", tmp_path / "ema", tmp_path / "halves"
    quick = dict(max_steps=8, save_interval=4, lr_scheduler="constant", warmup_steps=0, ema_decay=0.5,
                 learning_rate=1e-2)
    errors = main_cases([
        task_argv(tmp_path, fit, model_type="recursive", task_augment="false", max_steps=300, learning_rate=1e-2,
                  h_cycles=1, l_cycles=1),
        task_argv(tmp_path, prompt, task_formulation="prompt", task_augment="false", max_steps=300,
                  learning_rate=1e-2, warmup_steps=50),
        task_argv(tmp_path, ema, **quick),
        task_argv(tmp_path, halves, **{**quick, "max_steps": 4}),
        task_argv(tmp_path, halves, **quick, resume_from_checkpoint="latest"),
    ], timeout=400)
    assert errors == [None] * 5

    results = {}
    for folder in (fit, prompt):  # the grid model answers in one forward, the prompt model through generate
        model = AutoModelForCausalLM.from_pretrained(folder / "final")
        settings = model.config.task
        splits, _ = load_or_generate(DataArguments(**settings, data_cache_dir=str(tmp_path / "cache")))
        results[folder] = evaluate_puzzles(model, make_task(settings), *splits["train"])
        assert results[folder]["puzzles"] == 32 and results[folder]["exact_accuracy"] == 1.0, results[folder]
        assert model.config.bidirectional == (folder == fit)
    # the trained 2 steps, then 2, 3 and 4 times as many
    assert set(results[fit]["exact_accuracy_by_steps"]) == {1, 2, 4, 6, 8} and "q_head" in results[fit]

    average = load_file(ema / "checkpoint-8" / "ema.safetensors")
    raw = load_file(ema / "checkpoint-8" / "model.safetensors")
    exported = load_file(ema / "final" / "model.safetensors")
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert (average[name] - raw[name]).abs().max() > 1e-4  # the average is not the weights ...
    assert all(torch.equal(exported[k], average[k]) for k in exported)  # ... and it is what was exported
    assert_export_cli_matches_final(ema)  # the export command takes the average too
    resumed = load_file(halves / "checkpoint-8" / "ema.safetensors")
    assert all(torch.allclose(resumed[k], average[k], atol=1e-6, rtol=0) for k in average)
    evals = [r for r in read_metrics(ema) if "eval/exact_match" in r]
    assert evals and 0.0 <= evals[-1]["eval/exact_match"] <= 1.0
    # the validator's verdict beside it: a Sudoku's one solution is its stored answer, so they agree
    assert all(e["eval/solved"] == e["eval/exact_match"] for e in evals)


@pytest.mark.slow
def test_the_mlp_token_mixer_trains_on_grids_for_both_models_and_its_exports_reload(tmp_path):
    """TRM's MLP across positions in place of attention: direct and recursive grid models train through the
    trainer (the grid sets max_position_embeddings), and each export reloads with from_pretrained as the same
    function; a causal model cannot have it."""
    direct, recursive = tmp_path / "direct", tmp_path / "recursive"
    quick = dict(token_mixer="mlp", max_steps=30, learning_rate=1e-2, log_interval=10)
    errors = main_cases([task_argv(tmp_path, direct, **quick),
                         task_argv(tmp_path, recursive, **quick, model_type="recursive", h_cycles=2, l_cycles=1)])
    assert errors == [None, None]
    for folder in (direct, recursive):
        losses = [r["train/lm_loss"] for r in read_metrics(folder) if "train/lm_loss" in r]
        first, last = losses[0], losses[-1]
        assert last < first - 0.1, (folder, first, last)
        model = AutoModelForCausalLM.from_pretrained(folder / "final").eval()
        assert model.config.token_mixer == "mlp" and model.config.max_position_embeddings == 16
        assert "model.layers.0.token_mlp.gate_up_proj.weight" in load_file(folder / "final" / "model.safetensors")
        assert not any("self_attn" in name for name, _ in model.named_parameters())
        ids = torch.randint(1, 6, (3, 16))
        again = AutoModelForCausalLM.from_pretrained(folder / "final").eval()
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
        with pytest.raises(ValueError, match="takes exactly max_position_embeddings=16 positions, got 12"):
            model(input_ids=ids[:, :12])
    with pytest.raises(ValueError, match="token_mixer='mlp' is invalid: must be 'attention' unless bidirectional"):
        MoEReasonConfig.from_preset("debug", token_mixer="mlp")


def test_task_options_are_checked_before_any_work():
    with pytest.raises(ValueError, match="task_size=5 is invalid: must be one of \\[4, 6, 9\\]"):
        DataArguments(task="sudoku", task_size=5)
    with pytest.raises(ValueError, match="sudoku_blanks=16 is invalid"):
        DataArguments(task="sudoku", task_size=4, sudoku_blanks=16)
    with pytest.raises(ValueError, match="task='chess' is invalid"):
        DataArguments(task="chess")
    assert DataArguments(task="maze").maze_min_path == 16 and DataArguments(task="sudoku").sequence_length() == 81


def test_a_task_model_without_a_task_config_is_refused_by_evaluate(tmp_path):
    """--task_file on a model that was never trained on a task: a clear error, not a crash in the forward."""
    from moe_reason.evaluation.evaluate import main as evaluate_main
    MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug")).save_pretrained(tmp_path / "text_model")
    with pytest.raises(ValueError, match="was not trained on a task"):
        evaluate_main(["--model_path", str(tmp_path / "text_model"), "--task_file", str(tmp_path / "none.txt")])


def test_evaluate_scores_a_model_on_harder_puzzles_than_its_own(tmp_path):
    """Easy-to-hard: --task and the task options replace the model's own held-out puzzles (its formulation
    stays), and the JSON names both settings."""
    from moe_reason.evaluation.evaluate import main as evaluate_main
    trained = DataArguments(task="maze", task_size=5, maze_min_path=6, maze_canvas=8, task_train_puzzles=10,
                            task_test_puzzles=10).task_settings()
    config = RecursiveMoEReasonConfig.from_preset("debug", vocab_size=6, bidirectional=True, use_cache=False,
                                                  halt_max_steps=2)
    config.task = trained  # what the trainer records
    RecursiveMoEReasonForCausalLM(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "harder.json"
    result = evaluate_main(["--model_path", str(tmp_path / "model"), "--task", "maze", "--task_size", "8",
                            "--maze_min_path", "12", "--task_train_puzzles", "10", "--task_test_puzzles", "7",
                            "--data_cache_dir", str(tmp_path / "cache"), "--output_file", str(out)])
    assert result["task"]["task_size"] == 8 and result["task"]["maze_min_path"] == 12
    assert result["trained_task"] == trained and result["puzzles"] == 7
    assert set(result["exact_accuracy_by_steps"]) == {1, 2, 4, 6, 8}  # the trained 2, then 2, 3, 4 times
    assert json.loads(out.read_text())["puzzles"] == 7
    own = evaluate_main(["--model_path", str(tmp_path / "model"), "--data_cache_dir", str(tmp_path / "cache"),
                         "--output_file", str(out)])
    assert own["task"] == trained and own["puzzles"] == 10


def test_training_puzzles_can_come_from_files(tmp_path):
    """--task_train_file/--task_test_file (Sudoku-Extreme's CSV layout): the first N of each, solutions required."""
    task = SudokuTask(4, 8)
    splits = generate_splits(task, train=6, test=3, seed=0)
    for name, (puzzles, answers) in splits.items():
        rows = ["source,question,answer,rating"] + [
            f"gen,{''.join(map(str, p.reshape(-1))).replace('0', '.')},{''.join(map(str, a.reshape(-1)))},0"
            for p, a in zip(puzzles, answers)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    args = DataArguments(task="sudoku", task_size=4, task_train_file=str(tmp_path / "train.csv"),
                         task_test_file=str(tmp_path / "test.csv"), task_train_puzzles=5)
    loaded, summary = load_or_generate(args)
    assert (loaded["train"][0] == splits["train"][0][:5]).all() and (loaded["test"][1] == splits["test"][1]).all()
    assert summary["train"]["puzzles"] == 5 and args.task_settings()["task_test_file"].endswith("test.csv")
    (tmp_path / "unsolved.txt").write_text("4..31.4224..3...\n")
    with pytest.raises(ValueError, match="1 of 1 puzzles have no solution"):
        load_or_generate(DataArguments(task="sudoku", task_size=4, task_train_file=str(tmp_path / "unsolved.txt"),
                                       task_test_file=str(tmp_path / "test.csv")))
    with pytest.raises(ValueError, match="given together with task_train_file"):
        DataArguments(task="sudoku", task_train_file=str(tmp_path / "train.csv"))
    with pytest.raises(ValueError, match="pass --task_size 4"):
        load_or_generate(DataArguments(task="sudoku", task_train_file=str(tmp_path / "train.csv"),
                                       task_test_file=str(tmp_path / "test.csv")))
