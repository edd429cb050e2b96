"""Tests of the generated jigsaw layouts (illusions.jigsaw): every piece moves, exactly (CPU, fast).

A piece that keeps both its cell and its orientation shows the same picture in both views, so the
illusion needs every piece to move, as all do in the reference's hand-drawn 4x4 puzzle.
"""

from __future__ import annotations

import functools

import pytest
import torch

from illusions import jigsaw
from illusions.views import MAX_JIGSAW_GRID, JigsawView, build_view, build_views

GRIDS = range(2, MAX_JIGSAW_GRID + 1)
SIZES = (64, 256, 1024)


def seeds_for(grid: int) -> range:
    """Many seeds for small grids, one for the largest: about the same number of pieces per grid."""
    return range(max(1, 1024 // grid**2))


@functools.cache
def layout(grid: int, seed: int) -> jigsaw.JigsawLayout:
    return jigsaw.make_layout(grid, torch.Generator().manual_seed(seed))


def centre_cell(grid: int) -> int | None:
    """The cell a quarter turn maps onto itself (odd grids only)."""
    return (grid * grid) // 2 if grid % 2 else None


@pytest.mark.parametrize("grid", GRIDS)
def test_no_piece_stays_put(grid: int):
    for seed in seeds_for(grid):
        lay = layout(grid, seed)
        cells = range(grid * grid)
        stay = [k for k in cells if lay.destination[k] == k and lay.quarter_turns[k] == 0]
        assert not stay, f"grid {grid}, seed {seed}: pieces {stay} keep their place and orientation"
        # Only the centre piece of an odd grid keeps its cell, and it turns there.
        same_cell = [k for k in cells if lay.destination[k] == k]
        assert same_cell == ([] if grid % 2 == 0 else [centre_cell(grid)]), (grid, seed, same_cell)
        assert all(1 <= t <= 3 for t in lay.quarter_turns), (grid, seed, lay.quarter_turns)
        # Still a quarter-turn rearrangement of the cells.
        assert sorted(lay.destination) == list(cells)
        for k in cells:
            assert lay.destination[k] == jigsaw.rotate_cell(k, grid, lay.quarter_turns[k])


def test_default_view_moves_all_sixteen_pieces():
    # The user's case: `--views ... jigsaw` with the default grid 4 and view seed 0.
    view = build_views(["identity", "jigsaw"])[1]
    assert isinstance(view, JigsawView) and view.grid == 4 and view.seed == 0
    assert all(view.destination[k] != k for k in range(16))
    labels = view.piece_labels(64)
    moved = view.view(labels[None].to(torch.float32))[0].to(torch.int64)
    for k in range(16):
        assert not torch.any(moved[labels == k] == k), f"piece {k} still covers part of its place"


def _bijection_cases() -> list[tuple[int, int, int]]:
    """Every grid that divides 64, 256 or 1024, at each of those sizes (two seeds at 64)."""
    seeds = {64: (0, 1), 256: (1,), 1024: (0,)}
    return [(size, grid, seed) for size in SIZES for grid in GRIDS if size % grid == 0
            for seed in seeds[size]]


@pytest.mark.parametrize(("size", "grid", "seed"), _bijection_cases())
def test_bijection_that_moves_every_pixel(size: int, grid: int, seed: int):
    dest = jigsaw.destination_index(layout(grid, seed), size)
    identity = torch.arange(size * size)
    assert torch.equal(torch.sort(dest).values, identity), "not a permutation of the pixels"
    # Even sizes have no pixel at the centre of a turn, so no pixel stays where it was.
    assert not torch.any(dest == identity)


@pytest.mark.parametrize("size", SIZES)
def test_view_permutation_moves_every_pixel(size: int):
    view = JigsawView(seed=3)
    perm, identity = view.permutation(size), torch.arange(size * size)
    assert torch.equal(torch.sort(perm).values, identity) and not torch.any(perm == identity)
    assert torch.equal(perm[jigsaw.destination_index(view.layout, size)], identity)


@pytest.mark.parametrize("grid", [3, 5, 7])
def test_odd_grid_centre_piece_turns(grid: int):
    size = 16 * grid
    centre = centre_cell(grid)
    turns = {layout(grid, seed).quarter_turns[centre] for seed in range(40)}
    assert turns == {1, 2, 3}
    dest = jigsaw.destination_index(layout(grid, 0), size)
    assert torch.equal(torch.sort(dest).values, torch.arange(size * size))
    assert not torch.any(dest == torch.arange(size * size))


def test_orbits_use_every_derangement():
    # Each orbit of four draws one of the 9 derangements of its positions, not a fixed few.
    assert len(jigsaw.ORBIT_DERANGEMENTS) == 9
    seen = set()
    for seed in range(60):
        lay = layout(4, seed)
        for start in (0, 1, 2, 5):  # the four orbits of a 4x4 grid: corners, edges (2), centre
            orbit = [jigsaw.rotate_cell(start, 4, t) for t in range(4)]
            seen.add(tuple(orbit.index(lay.destination[cell]) for cell in orbit))
    assert seen == set(jigsaw.ORBIT_DERANGEMENTS)


def test_seeded_and_deterministic():
    for grid in (2, 3, 4, 8):
        again = jigsaw.make_layout(grid, torch.Generator().manual_seed(11))
        assert again == layout(grid, 11)
    distinct = {layout(4, seed).destination for seed in range(30)}
    assert len(distinct) > 20
    # The view draws its layout from its own generator seeded with the view seed.
    assert build_view("jigsaw", seed=7).layout == layout(4, 7)
