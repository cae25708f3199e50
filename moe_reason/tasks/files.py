"""Sudoku collections as people keep them -> (puzzles [N, n, n], solutions [N, n, n] or None).

Two formats:
  text  one puzzle per line: n*n characters, digits 1..n and '.' or '0' for a blank, optionally
        followed by ',' and the n*n-digit solution; blank lines and lines starting with '#' are skipped.
  CSV   a header naming a puzzle and a solution column: question/answer, puzzle/solution,
        quizzes/solutions or unsolved/solved (Sudoku-Extreme's `source,question,answer,rating` is one).
A puzzle given without its solution gets an all-zero solution grid (0 is the blank, never a solution
digit); solutions is None when no puzzle has one. A given solution must be one: a valid grid that keeps
every clue of its puzzle (`sudoku.is_valid`), or the file is refused, since it would be scored as the
reference. The validator judges every answer either way. A malformed line raises a UserError naming the
file, the line and the problem.
"""

import csv
from pathlib import Path

import numpy as np

from ..errors import MissingFileError, UserError
from .sudoku import BOXES, is_valid

COLUMN_PAIRS = (("question", "answer"), ("puzzle", "solution"), ("quizzes", "solutions"), ("unsolved", "solved"))


def parse_grid(text: str, where: str, what: str, blanks_allowed: bool) -> np.ndarray:
    """'..3.1..' -> [n, n] int8 with 0 for a blank; a clear error otherwise."""
    text = text.strip()
    n = round(len(text) ** 0.5)
    if n * n != len(text) or n not in BOXES:
        raise UserError(f"{where}: the {what} has {len(text)} characters; expected "
                        f"{' or '.join(str(k * k) for k in sorted(BOXES))} (a {'/'.join(map(str, sorted(BOXES)))}-"
                        "square grid read row by row)")
    allowed = "123456789"[:n] + (".0" if blanks_allowed else "")
    bad = sorted({c for c in text if c not in allowed})
    if bad:
        raise UserError(f"{where}: the {what} holds {''.join(bad)!r}; allowed: digits 1-{n}"
                        + (" and '.' or '0' for a blank" if blanks_allowed else " (a solution has no blanks)"))
    return np.array([0 if c in ".0" else int(c) for c in text], dtype=np.int8).reshape(n, n)


def read_text(path: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {number}"
        puzzle_text, _, solution_text = line.partition(",")
        puzzle = parse_grid(puzzle_text, where, "puzzle", True)
        solution = parse_grid(solution_text, where, "solution", False) if solution_text.strip() else None
        rows.append(check_pair(puzzle, solution, where))
    return rows


def read_csv(path: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        pair = next(((q, a) for q, a in COLUMN_PAIRS if q in header), None)
        if pair is None:
            raise UserError(f"{path} line 1: no puzzle column in the header {header}; expected one of the "
                            f"column pairs {', '.join('/'.join(p) for p in COLUMN_PAIRS)}")
        q_col, a_col = header.index(pair[0]), header.index(pair[1]) if pair[1] in header else None
        rows = []
        for record in csv_records(reader, path):
            if not any(cell.strip() for cell in record):
                continue
            where = f"{path} line {reader.line_num}"
            if len(record) != len(header):
                raise UserError(f"{where}: {len(record)} fields where the header has {len(header)}")
            puzzle = parse_grid(record[q_col], where, "puzzle", True)
            solution = parse_grid(record[a_col], where, "solution", False) \
                if a_col is not None and record[a_col].strip() else None
            rows.append(check_pair(puzzle, solution, where))
    return rows


def csv_records(reader, path: Path):
    """The reader's records; a line the csv module cannot read (a field over its size limit, a stray quote)
    is an error naming the file and the line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise UserError(f"{path} line {reader.line_num}: {err}") from None


def check_pair(puzzle, solution, where):
    if solution is not None and solution.shape != puzzle.shape:
        raise UserError(f"{where}: the solution is {solution.shape[0]}x{solution.shape[0]} but the puzzle "
                        f"{puzzle.shape[0]}x{puzzle.shape[0]}")
    if solution is not None and not is_valid(puzzle, solution):
        clash = int(((puzzle != 0) & (puzzle != solution)).sum())
        why = f"it changes {clash} of the puzzle's clues" if clash else "it breaks a row, column or box rule"
        raise UserError(f"{where}: the solution is not one ({why}); it would be scored as the reference")
    return puzzle, solution


def read_sudoku_file(path) -> tuple[np.ndarray, np.ndarray | None]:
    """The puzzles of a text or CSV file (chosen by a `.csv` suffix) -> (puzzles, solutions or None)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--task_file {path}: no such file")
    rows = read_csv(path) if path.suffix.lower() == ".csv" else read_text(path)
    if not rows:
        raise UserError(f"{path}: no puzzles found")
    sizes = {p.shape[0] for p, _ in rows}
    if len(sizes) > 1:
        raise UserError(f"{path}: puzzles of several sizes {sorted(sizes)}; keep one size per file")
    puzzles = np.stack([p for p, _ in rows])
    if all(s is None for _, s in rows):
        return puzzles, None
    return puzzles, np.stack([np.zeros_like(p) if s is None else s for p, s in rows])


def given(solutions: np.ndarray) -> np.ndarray:
    """[N] True where a solution grid [N, n, n] was given (an all-zero grid stands for none)."""
    return solutions.reshape(len(solutions), -1).any(axis=1)
