"""Geometry of generated jigsaw puzzles whose pieces can be rearranged by quarter turns.

The reference implementation cuts its 4x4 jigsaw out of hand-drawn piece masks.  We generate the
pieces instead, with a construction that makes the rearrangement an exact pixel bijection at every
image size:

* Pieces are the cells of a ``grid x grid`` partition of the (square) image, plus round *tabs*:
  every interior edge between two cells carries one disc (radius ``TAB_RADIUS`` of a cell side,
  centred ``TAB_OFFSET`` of a cell side past the edge midpoint, inside the neighbouring cell).  The
  pixels of the disc that lie in the neighbour are taken over by the cell the tab comes from.
* Tab directions are random but invariant under a quarter turn of the whole image about its
  centre: one random bit per orbit of edges under rotation, propagated around the orbit.  Hence a
  quarter turn maps every piece exactly onto another piece.
* Cells (and so pieces) fall into orbits of four under the quarter turn (the centre cell of an odd
  grid is an orbit of its own).  Within each orbit a random *derangement* ``p`` (a permutation
  with no fixed position, one of the 9 of four positions) sends the piece at orbit position ``a``
  to position ``p(a) != a``, which is done by rotating its pixels ``p(a) - a`` quarter turns about
  the image centre.  The centre piece turns 1, 2 or 3 quarter turns in place.  So every piece
  moves, as in the reference's hand-drawn puzzle: none keeps both its place and its orientation.

All geometry uses exact integer arithmetic on *doubled, centred* pixel coordinates
``X = 2 * x - (S - 1)`` (so pixel centres are integers and the image centre is 0): a quarter turn is
then ``(X, Y) -> (-Y, X)`` exactly, with no rounding, and the label map is exactly symmetric.

Conventions: cells are numbered in raster order, ``cell = row * grid + col``.  A "quarter turn" is
clockwise as seen on screen (y pointing down), the same direction as ``rotate_cw`` /
``torch.rot90(k=-1, dims=(-2, -1))``: pixel ``(y, x)`` goes to ``(x, S - 1 - y)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from itertools import permutations
from math import lcm

import torch

# Tab shape, as fractions of a cell side.  A disc of radius 0.2 centred 0.12 past the edge reaches
# 0.32 into the neighbouring cell and stays 0.3 away from the cell corners along the edge, so tabs
# never touch each other nor any cell other than the two sharing the edge.
TAB_RADIUS = Fraction(1, 5)
TAB_OFFSET = Fraction(3, 25)

# The permutations of an orbit's four positions that move every position (9 of the 24), in
# lexicographic order; a layout draws one uniformly per orbit.
ORBIT_DERANGEMENTS: tuple[tuple[int, ...], ...] = tuple(
    p for p in permutations(range(4)) if all(p[a] != a for a in range(4))
)


@dataclass(frozen=True)
class JigsawLayout:
    """A size-independent jigsaw layout: which way every tab points and where every piece goes.

    Attributes:
        grid: number of cells per side (>= 2).
        tabs: one ``(from_cell, to_cell)`` pair per interior edge; the tab belongs to
            ``from_cell`` and bulges into ``to_cell``.
        destination: ``destination[k]`` is the cell where piece ``k`` (the piece built on cell
            ``k``) ends up in the rearranged view; length ``grid**2``.
        quarter_turns: ``quarter_turns[k]`` in ``0..3`` is how many clockwise quarter turns about
            the image centre carry piece ``k`` to its destination; length ``grid**2``.
    """

    grid: int
    tabs: tuple[tuple[int, int], ...]
    destination: tuple[int, ...]
    quarter_turns: tuple[int, ...]


def rotate_cell(cell: int, grid: int, turns: int = 1) -> int:
    """Cell index reached from ``cell`` by ``turns`` clockwise quarter turns of the grid."""
    row, col = divmod(cell, grid)
    for _ in range(turns % 4):
        row, col = col, grid - 1 - row
    return row * grid + col


def _interior_edges(grid: int) -> list[tuple[int, int]]:
    """Every pair of side-adjacent cells ``(a, b)`` with ``a < b``, in a fixed order."""
    edges = []
    for row in range(grid):
        for col in range(grid):
            cell = row * grid + col
            if col + 1 < grid:
                edges.append((cell, cell + 1))
            if row + 1 < grid:
                edges.append((cell, cell + grid))
    return edges


def make_layout(grid: int, generator: torch.Generator) -> JigsawLayout:
    """Draw a random, quarter-turn-symmetric jigsaw layout.

    Args:
        grid: cells per side, >= 2.
        generator: CPU generator supplying all randomness (tab bits, then one draw per piece
            orbit in raster order of the orbit's first cell).

    Every piece moves: each orbit of four is deranged, and the centre piece of an odd grid turns
    at least once.  A piece that stayed put would show the same picture in both views.
    """
    if grid < 2:
        raise ValueError(f"jigsaw grid must be >= 2, got {grid}")

    # Tabs: one random bit per orbit of edges, carried around the orbit by rotation so that the
    # piece shapes are exactly invariant under a quarter turn.
    tab_of_edge: dict[tuple[int, int], tuple[int, int]] = {}
    for lo, hi in _interior_edges(grid):
        if (lo, hi) in tab_of_edge:
            continue
        bit = int(torch.randint(0, 2, (1,), generator=generator).item())
        src, dst = (lo, hi) if bit == 0 else (hi, lo)
        for turns in range(4):
            a, b = rotate_cell(src, grid, turns), rotate_cell(dst, grid, turns)
            key = (min(a, b), max(a, b))
            previous = tab_of_edge.setdefault(key, (a, b))
            # No edge is fixed by a half turn, so an orbit never revisits an edge reversed.
            assert previous == (a, b), "edge orbit is inconsistent"
    tabs = tuple(tab_of_edge[edge] for edge in _interior_edges(grid))

    n_cells = grid * grid
    destination = [-1] * n_cells
    quarter_turns = [0] * n_cells
    for start in range(n_cells):
        if destination[start] >= 0:
            continue
        orbit = [rotate_cell(start, grid, t) for t in range(4)]
        if orbit[1] == start:
            # Centre cell of an odd grid: it can only spin in place, so it turns 1 to 3 quarters.
            destination[start] = start
            quarter_turns[start] = int(torch.randint(1, 4, (1,), generator=generator).item())
            continue
        choice = torch.randint(0, len(ORBIT_DERANGEMENTS), (1,), generator=generator).item()
        perm = ORBIT_DERANGEMENTS[int(choice)]
        for pos, cell in enumerate(orbit):
            destination[cell] = orbit[perm[pos]]
            quarter_turns[cell] = (perm[pos] - pos) % 4
    return JigsawLayout(grid, tabs, tuple(destination), tuple(quarter_turns))


def cell_size(layout: JigsawLayout, size: int) -> int:
    """Side of one cell in pixels; raises ValueError unless ``grid`` divides ``size``."""
    if size % layout.grid != 0 or size < layout.grid:
        raise ValueError(
            f"jigsaw grid {layout.grid} does not divide image size {size}; use an image whose side "
            f"is a multiple of {layout.grid}"
        )
    return size // layout.grid


def piece_labels(layout: JigsawLayout, size: int) -> torch.Tensor:
    """Which piece every pixel belongs to.

    Returns:
        ``(size, size)`` int64 CPU tensor; entry ``[y, x]`` is the cell index of the piece that
        owns pixel ``(y, x)`` in the un-rearranged image.
    """
    grid = layout.grid
    c = cell_size(layout, size)
    # Integer scale that makes the tab radius and offset (in doubled units) whole numbers.
    scale = lcm(TAB_RADIUS.denominator, TAB_OFFSET.denominator)
    radius = int(2 * c * TAB_RADIUS * scale)
    offset = int(2 * c * TAB_OFFSET * scale)

    idx = torch.arange(size, dtype=torch.int64)
    coord = (2 * idx - (size - 1)) * scale  # doubled, centred, scaled pixel-centre coordinate
    cell_of = idx // c  # row (or column) of the cell containing each pixel row (or column)
    # Doubled coordinates of the cell's low/high boundaries and of its centre, scaled.
    low_edge = (2 * cell_of * c - size) * scale
    high_edge = (2 * (cell_of + 1) * c - size) * scale
    centre = ((2 * cell_of + 1) * c - size) * scale

    # incoming[side][row, col]: cell whose tab bulges into (row, col) through that side, or -1.
    incoming = {side: torch.full((grid, grid), -1, dtype=torch.int64) for side in "lrtb"}
    for src, dst in layout.tabs:
        row, col = divmod(dst, grid)
        side = {dst - 1: "l", dst + 1: "r", dst - grid: "t", dst + grid: "b"}[src]
        incoming[side][row, col] = src

    rows, cols = cell_of[:, None], cell_of[None, :]
    labels = rows * grid + cols
    py, px = coord[:, None], coord[None, :]
    # Disc centre (per pixel row, per pixel column) for a tab entering through each side.
    centres = {
        "l": (centre[:, None], (low_edge + offset)[None, :]),
        "r": (centre[:, None], (high_edge - offset)[None, :]),
        "t": ((low_edge + offset)[:, None], centre[None, :]),
        "b": ((high_edge - offset)[:, None], centre[None, :]),
    }
    for side, (cy, cx) in centres.items():
        src = incoming[side][rows, cols]
        inside = (py - cy) ** 2 + (px - cx) ** 2 < radius**2
        labels = torch.where((src >= 0) & inside, src, labels)
    return labels


def destination_index(layout: JigsawLayout, size: int) -> torch.Tensor:
    """Where every pixel goes when the pieces are rearranged.

    Returns:
        ``(size * size,)`` int64 CPU tensor: the flat (raster) index that pixel ``y * size + x``
        moves to.  It is a permutation of ``arange(size * size)``.
    """
    labels = piece_labels(layout, size)
    last = size - 1
    # Clockwise quarter turns about the image centre map pixel (y, x) to
    #   0: (y, x)   1: (x, last - y)   2: (last - y, last - x)   3: (last - x, y),
    # so the flat destination is coef_y * y + coef_x * x + const, with per-piece coefficients.
    coef_y, coef_x, const = [], [], []
    for turns in layout.quarter_turns:
        dy_y, dy_x, dy_c = ((1, 0, 0), (0, 1, 0), (-1, 0, 1), (0, -1, 1))[turns]
        dx_y, dx_x, dx_c = ((0, 1, 0), (-1, 0, 1), (0, -1, 1), (1, 0, 0))[turns]
        coef_y.append(dy_y * size + dx_y)
        coef_x.append(dy_x * size + dx_x)
        const.append((dy_c * size + dx_c) * last)
    y = torch.arange(size, dtype=torch.int64)[:, None]
    x = torch.arange(size, dtype=torch.int64)[None, :]
    table = torch.tensor([coef_y, coef_x, const], dtype=torch.int64)[:, labels]
    return (table[0] * y + table[1] * x + table[2]).reshape(-1)


def cell_centre(cell: int, grid: int, size: int) -> tuple[float, float]:
    """Pixel coordinates ``(y, x)`` of the centre of ``cell`` in an image of side ``size``."""
    row, col = divmod(cell, grid)
    c = size / grid
    return ((row + 0.5) * c - 0.5, (col + 0.5) * c - 0.5)
