"""Mazes: a seeded generator of n x n grids with a start, a goal and a shortest path between them,
a validator that needs no reference, and the dihedral augmentations.

Grids are numpy int8 arrays [n, n] of the cell codes below. The puzzle has walls, free cells, the
start and the goal; the answer also marks the cells of a shortest path from start to goal (start
and goal keep their own codes). Walls are drawn at random and the start and goal are drawn among
the free cells until their shortest path is at least `min_path` cells long.
"""

from collections import deque

import numpy as np

from ..errors import UserError

WALL, FREE, START, GOAL, PATH = 1, 2, 3, 4, 5  # 0 is padding in the token vocabulary
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def distances(grid: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """Breadth-first steps from `source` to every reachable non-wall cell [n, n] (-1: unreachable)."""
    n = grid.shape[0]
    dist = np.full(grid.shape, -1, dtype=np.int32)
    dist[source] = 0
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            rr, cc = r + dr, c + dc
            if 0 <= rr < n and 0 <= cc < n and dist[rr, cc] < 0 and grid[rr, cc] != WALL:
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
    return dist


def shortest_path(grid: np.ndarray, start, goal) -> list[tuple[int, int]] | None:
    """Cells of one shortest path from start to goal, both included (None if unreachable)."""
    dist = distances(grid, goal)
    if dist[start] < 0:
        return None
    path, (r, c) = [start], start
    while (r, c) != goal:  # step to any neighbour one closer to the goal (the first in MOVES order)
        r, c = next((r + dr, c + dc) for dr, dc in MOVES if 0 <= r + dr < grid.shape[0] and
                    0 <= c + dc < grid.shape[1] and dist[r + dr, c + dc] == dist[r, c] - 1)
        path.append((r, c))
    return path


def make_maze(n: int, min_path: int, rng: np.random.Generator, wall_share: float = 0.3,
              tries: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """-> (puzzle [n, n], answer [n, n]) whose shortest path has at least `min_path` cells."""
    for _ in range(tries):
        grid = np.where(rng.random((n, n)) < wall_share, WALL, FREE).astype(np.int8)
        free = np.argwhere(grid == FREE)
        if len(free) < 2:
            continue
        start = tuple(free[rng.integers(len(free))])
        dist = distances(grid, start)
        far = np.argwhere(dist + 1 >= min_path)  # cells whose path from start has >= min_path cells
        if len(far) == 0:
            continue
        goal = tuple(far[rng.integers(len(far))])
        grid[start], grid[goal] = START, GOAL
        answer = grid.copy()
        for cell in shortest_path(grid, start, goal)[1:-1]:
            answer[cell] = PATH
        return grid, answer
    raise UserError(f"no {n}x{n} maze with a shortest path of >= {min_path} cells in {tries} tries: "
                    f"lower --maze_min_path (at most about {n * n // 2} is reachable)")


def is_valid(puzzle: np.ndarray, answer: np.ndarray) -> bool:
    """`answer` keeps the puzzle's walls, start and goal, and its PATH cells (on free cells) form, with
    start and goal, a connected path of the shortest possible length."""
    if answer.shape != puzzle.shape:
        return False
    kept = puzzle != FREE
    if (answer[kept] != puzzle[kept]).any() or not np.isin(answer[~kept], (FREE, PATH)).all():
        return False
    start, goal = tuple(np.argwhere(puzzle == START)[0]), tuple(np.argwhere(puzzle == GOAL)[0])
    on_path = np.where((answer == PATH) | (answer == START) | (answer == GOAL), FREE, WALL).astype(np.int8)
    shortest = distances(puzzle, start)[goal]
    # a path of shortest length uses exactly shortest - 1 PATH cells and connects start to goal through them
    return int((answer == PATH).sum()) == shortest - 1 and distances(on_path, start)[goal] == shortest


def on_canvas(grid: np.ndarray, canvas: int, corner) -> np.ndarray:
    """`grid` [n, n] placed with its top-left cell at `corner` (row, column) on a canvas x canvas grid of walls."""
    out = np.full((canvas, canvas), WALL, dtype=grid.dtype)
    (r, c), n = corner, grid.shape[0]
    out[r:r + n, c:c + n] = grid
    return out


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 symmetries of the square (k in 0..7): rotate k % 4 quarter turns, then mirror."""
    out = np.rot90(grid, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def canonical_key(answer: np.ndarray) -> bytes:
    """Equal for mazes the dihedral augmentations map onto each other."""
    return min(dihedral(answer, k).tobytes() for k in range(8))
