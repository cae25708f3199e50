"""Sudoku: a seeded generator of puzzles with exactly one solution, a solver that proves it, a grader
of difficulty, a validator that needs no reference, and TRM's augmentations.

Grids are numpy int8 arrays [n, n] with 0 for a blank and 1..n for a digit; n is 4 (2x2 boxes),
6 (boxes of 2 rows x 3 columns) or 9 (3x3 boxes). The solver keeps each cell's candidates as a
bitmask and fills forced cells (a cell with one candidate, or a digit with one place in a unit)
before it branches on the cell with fewest candidates.
"""

from functools import cache
from itertools import permutations

import numpy as np

from ..errors import UserError

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # grid size -> (box rows, box columns)


@cache
def geometry(n: int):
    """-> (units: the cell lists of every row, column and box; peers[c]: the cells sharing a unit with c)."""
    if n not in BOXES:
        raise UserError(f"sudoku size {n} is not supported: use one of {sorted(BOXES)}")
    br, bc = BOXES[n]
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(r0 + r) * n + c0 + c for r in range(br) for c in range(bc)]
             for r0 in range(0, n, br) for c0 in range(0, n, bc)]
    units = rows + cols + boxes
    peers = [sorted({p for u in units if c in u for p in u} - {c}) for c in range(n * n)]
    return units, peers


def candidates(grid: np.ndarray) -> list[int] | None:
    """Flat grid -> each cell's candidate bitmask (bit d-1 for digit d), None if two givens clash."""
    n = int(round(len(grid) ** 0.5))
    _, peers = geometry(n)
    full = (1 << n) - 1
    cand = [full] * (n * n)
    for c, v in enumerate(grid.tolist()):
        if v:
            if not cand[c] >> (v - 1) & 1:
                return None
            if not assign(cand, c, 1 << (v - 1), peers):
                return None
    return cand


def assign(cand: list[int], cell: int, bit: int, peers) -> bool:
    """Fix `cell` to the digit `bit`, removing it from the peers (recursively for new singles)."""
    cand[cell] = bit
    stack = [cell]
    while stack:
        c = stack.pop()
        b = cand[c]
        for p in peers[c]:
            if cand[p] & b:
                cand[p] &= ~b
                if cand[p] == 0:
                    return False
                if cand[p] & (cand[p] - 1) == 0:
                    stack.append(p)
    return True


def hidden_singles(cand: list[int], units, peers) -> bool | None:
    """Place every digit that has one possible cell in a unit -> True if any was placed, None on a contradiction."""
    placed = False
    for unit in units:
        seen_once = seen_twice = 0
        for c in unit:
            seen_twice |= seen_once & cand[c]
            seen_once |= cand[c]
        if seen_once != (1 << len(unit)) - 1:
            return None  # some digit has no place in this unit
        only = seen_once & ~seen_twice
        for c in unit:
            bit = cand[c] & only
            if bit and cand[c] != bit:
                if bit & (bit - 1) or not assign(cand, c, bit, peers):
                    return None
                placed = True
    return placed


def count_solutions(cand: list[int], n: int, limit: int = 2) -> tuple[int, list[int] | None]:
    """Depth-first search with propagation -> (solutions found, up to `limit`; the first one's candidates)."""
    units, peers = geometry(n)
    cand = list(cand)
    while True:
        progress = hidden_singles(cand, units, peers)
        if progress is None:
            return 0, None
        if not progress:
            break
    open_cells = [c for c in range(n * n) if cand[c] & (cand[c] - 1)]
    if not open_cells:
        return 1, cand
    cell = min(open_cells, key=lambda c: bin(cand[c]).count("1"))
    found, first, bits = 0, None, cand[cell]
    while bits and found < limit:
        bit = bits & -bits
        bits &= bits - 1
        trial = list(cand)
        if assign(trial, cell, bit, peers):
            count, solution = count_solutions(trial, n, limit - found)
            found, first = found + count, first or solution
    return found, first


def to_grid(cand: list[int], n: int) -> np.ndarray:
    return np.array([c.bit_length() if c & (c - 1) == 0 else 0 for c in cand], dtype=np.int8).reshape(n, n)


def solve(puzzle: np.ndarray, limit: int = 2) -> tuple[int, np.ndarray | None]:
    """Puzzle [n, n] -> (number of solutions, counted up to `limit`; the first solution [n, n] or None)."""
    n = puzzle.shape[0]
    cand = candidates(puzzle.reshape(-1))
    if cand is None:
        return 0, None
    count, solution = count_solutions(cand, n, limit)
    return count, None if solution is None else to_grid(solution, n)


def propagation_rounds(puzzle: np.ndarray) -> int | None:
    """Difficulty: rounds of single-candidate filling (every cell with one candidate, and every digit with
    one place in a unit, filled at once per round) that solve the puzzle; None if they stall, so the
    solver must guess (backtrack)."""
    n = puzzle.shape[0]
    units, peers = geometry(n)
    grid = puzzle.reshape(-1).copy()
    for rounds in range(n * n + 1):
        if grid.all():
            return rounds
        cand = direct_candidates(grid, n, peers)  # no chains of consequences inside a round
        if 0 in cand:
            return None  # not solvable
        forced = {c: cand[c] for c in range(n * n) if not grid[c] and cand[c] & (cand[c] - 1) == 0}
        for unit in units:
            for d in range(n):
                places = [c for c in unit if cand[c] >> d & 1]
                if len(places) == 1 and not grid[places[0]]:
                    forced[places[0]] = 1 << d
        if not forced:
            return None
        for c, bit in forced.items():
            grid[c] = bit.bit_length()
    return None


def direct_candidates(grid: np.ndarray, n: int, peers) -> list[int]:
    """Each blank cell's digits not used by a filled peer (filled cells: their own digit)."""
    full, flat = (1 << n) - 1, grid.tolist()
    out = []
    for c, v in enumerate(flat):
        used = 0
        for p in peers[c]:
            used |= (1 << (flat[p] - 1)) if flat[p] else 0
        out.append(1 << (v - 1) if v else full & ~used)
    return out


def random_solution(n: int, rng: np.random.Generator) -> np.ndarray:
    """A complete grid: the solver run on an empty grid, trying digits in random order."""
    cand = fill([(1 << n) - 1] * (n * n), n, rng)
    return to_grid(cand, n)


def fill(cand: list[int], n: int, rng: np.random.Generator) -> list[int] | None:
    """The first completion found trying each branch's digits in random order (None if there is none)."""
    units, peers = geometry(n)
    cand = list(cand)
    while (progress := hidden_singles(cand, units, peers)):
        pass
    if progress is None:
        return None
    open_cells = [c for c in range(n * n) if cand[c] & (cand[c] - 1)]
    if not open_cells:
        return cand
    cell = min(open_cells, key=lambda c: bin(cand[c]).count("1"))
    for d in rng.permutation(n).tolist():
        bit = 1 << d
        if cand[cell] & bit:
            trial = list(cand)
            if assign(trial, cell, bit, peers) and (done := fill(trial, n, rng)) is not None:
                return done
    return None


def make_puzzle(solution: np.ndarray, blanks: int, rng: np.random.Generator) -> np.ndarray:
    """Blank cells of `solution` in random order while the puzzle keeps exactly one solution, up to `blanks`.

    A cell may be blanked when no solution of the puzzle without it puts another digit there:
    one search per cell, on a puzzle that is already almost solved.
    """
    n = solution.shape[0]
    puzzle = solution.reshape(-1).copy()
    removed = 0
    for c in rng.permutation(n * n):
        if removed == blanks:
            break
        digit = int(puzzle[c])
        puzzle[c] = 0
        cand = candidates(puzzle)
        cand[c] &= ~(1 << (digit - 1))  # another digit here: is there a solution?
        if cand[c] and count_solutions(cand, n, limit=1)[0]:
            puzzle[c] = digit  # removing it would allow a second solution
        else:
            removed += 1
    return puzzle.reshape(n, n)


def is_valid(puzzle: np.ndarray, answer: np.ndarray) -> bool:
    """Every row, column and box of `answer` holds each digit once, and the puzzle's givens are kept."""
    n = puzzle.shape[0]
    flat = answer.reshape(-1)
    if flat.shape[0] != n * n or ((puzzle.reshape(-1) != 0) & (puzzle.reshape(-1) != flat)).any():
        return False
    units, _ = geometry(n)
    digits = set(range(1, n + 1))
    return all({int(flat[c]) for c in unit} == digits for unit in units)


# ----------------------------------------------------------------------------
# Augmentations (TRM's): relabel digits, shuffle bands and the rows inside them, shuffle stacks and
# the columns inside them, transpose (square boxes only). Each maps a valid grid to a valid grid.


def random_augmentation(n: int, rng: np.random.Generator):
    """-> (digit map [n + 1] with 0 kept, row order [n], column order [n], transpose)."""
    br, bc = BOXES[n]
    digits = np.concatenate([[0], rng.permutation(n) + 1])
    rows = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(n // br)])
    cols = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(n // bc)])
    return digits, rows, cols, bool(br == bc and rng.random() < 0.5)


def augment(grid: np.ndarray, augmentation) -> np.ndarray:
    digits, rows, cols, transpose = augmentation
    out = digits[grid][rows][:, cols]
    return out.T.copy() if transpose else out


def canonical_key(solution: np.ndarray) -> tuple:
    """A key equal for grids that the augmentations map onto each other (so splits can be kept apart).

    For two rows, "digit in row a -> digit in row b, column by column" is a permutation of the
    digits; its cycle type does not change under relabelling digits or reordering columns. The
    sorted cycle types of all row pairs, and of all column pairs, joined in sorted order (for the
    transpose), are therefore the same for every augmentation of a grid.
    """
    def pair_types(g):
        n = g.shape[0]
        types = []
        for a in range(n):
            for b in range(a + 1, n):
                mapping = dict(zip(g[a].tolist(), g[b].tolist()))
                seen, cycles = set(), []
                for d in mapping:
                    length = 0
                    while d not in seen:
                        seen.add(d)
                        d, length = mapping[d], length + 1
                    if length:
                        cycles.append(length)
                types.append(tuple(sorted(cycles)))
        return tuple(sorted(types))

    return tuple(sorted([pair_types(solution), pair_types(solution.T)]))


@cache
def line_orders(n: int, box: int) -> np.ndarray:
    """Every order of n lines that keeps groups of `box` together: [(n/box)! x box!^(n/box), n]."""
    groups = [list(g) for g in permutations(range(n // box))]
    inner = list(permutations(range(box)))
    orders = [[]]
    for _ in range(n // box):
        orders = [o + [i] for o in orders for i in inner]
    return np.array([[g[k] * box + o[k][j] for k in range(n // box) for j in range(box)]
                     for g in groups for o in orders])


def canonical_puzzle_key(puzzle: np.ndarray) -> bytes:
    """The smallest of all augmentations of a puzzle, digits relabelled in order of first appearance:
    equal exactly for puzzles the augmentations map onto each other. Brute force over the row and
    column orders, so for the small grids (4x4: 128 orders, 6x6: 3,456)."""
    n = puzzle.shape[0]
    br, bc = BOXES[n]
    rows, cols = line_orders(n, br), line_orders(n, bc)
    grids = puzzle[rows][:, :, cols].transpose(0, 2, 1, 3).reshape(-1, n * n)  # [R * C, n * n]
    if br == bc:
        grids = np.concatenate([grids, puzzle.T[rows][:, :, cols].transpose(0, 2, 1, 3).reshape(-1, n * n)])
    present = grids[:, :, None] == np.arange(1, n + 1)  # [K, n*n, n]
    first = np.where(present.any(1), present.argmax(1), n * n)  # [K, n] first position of each digit
    rank = np.argsort(np.argsort(first, axis=1), axis=1) + 1  # digit d -> its order of appearance
    relabel = np.concatenate([np.zeros((len(grids), 1), dtype=rank.dtype), rank], axis=1)
    canonical = np.take_along_axis(relabel, grids.astype(np.int64), axis=1).astype(np.int8)
    order = np.lexsort(canonical.T[::-1])
    return canonical[order[0]].tobytes()
