"""Tests of illusions.views and illusions.jigsaw (CPU, fast)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from illusions import jigsaw
from illusions.views import (
    BASE_SIZE,
    VIEWS,
    JigsawView,
    PermutationView,
    View,
    ViewError,
    build_view,
    build_views,
    gaussian_blur,
    gaussian_kernel1d,
    invert_permutation,
    parse_view_args,
    scaled_blur_params,
)

SIZES = (64, 256, 1024)
EXPECTED_ORDER = [
    "identity", "flip", "rotate_cw", "rotate_ccw", "rotate_180", "negate", "skew",
    "patch_permute", "pixel_permute", "jigsaw", "inner_circle", "square_hinge",
    "low_pass", "high_pass", "triple_low_pass", "triple_medium_pass", "triple_high_pass",
    "grayscale", "color", "motion", "motion_res", "scale",
]  # fmt: skip
GEOMETRIC = [
    "identity", "flip", "rotate_cw", "rotate_ccw", "rotate_180", "skew", "patch_permute",
    "pixel_permute", "jigsaw", "inner_circle", "square_hinge",
]  # fmt: skip
FACTORIZED = [
    "low_pass", "high_pass", "triple_low_pass", "triple_medium_pass", "triple_high_pass",
    "grayscale", "color", "motion", "motion_res", "scale",
]  # fmt: skip

# Views are built once per test module so that per-size permutation caches are shared.
_VIEW_CACHE: dict[tuple[str, tuple[str, ...]], View] = {}


def get_view(name: str, *args: str) -> View:
    key = (name, args)
    if key not in _VIEW_CACHE:
        _VIEW_CACHE[key] = build_view(name, list(args), seed=3)
    return _VIEW_CACHE[key]


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


_IMAGES: dict[int, torch.Tensor] = {}


def image6(size: int) -> torch.Tensor:
    """A shared (6, size, size) random image; tests must not modify it (checked below)."""
    if size not in _IMAGES:
        _IMAGES[size] = rand(6, size, size, seed=size)
    return _IMAGES[size]


# ------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_view_in_order():
    assert list(VIEWS) == EXPECTED_ORDER
    for name, info in VIEWS.items():
        assert info.name == name == info.cls.name
        assert info.description and "\n" not in info.description
        assert issubclass(info.cls, View)
        assert isinstance(build_view(name), info.cls)


def test_defaults_match_reference():
    defaults = {
        name: {a.name: a.default for a in info.args} for name, info in VIEWS.items() if info.args
    }
    assert defaults == {
        "skew": {"skew_factor": 1.5},
        "patch_permute": {"num_patches": 8},
        "pixel_permute": {"num_patches": 64},
        "jigsaw": {"grid": 4},
        "low_pass": {"sigma": 2.0, "kernel_size": 33},
        "high_pass": {"sigma": 2.0, "kernel_size": 33},
        "triple_low_pass": {"sigma_1": 1.0, "sigma_2": 2.0, "kernel_size": 25},
        "triple_medium_pass": {"sigma_1": 1.0, "sigma_2": 2.0, "kernel_size": 25},
        "triple_high_pass": {"sigma_1": 1.0, "sigma_2": 2.0, "kernel_size": 25},
        "motion": {"size": 7},
        "motion_res": {"size": 7},
        "scale": {"scale": 0.5},
    }
    for name in FACTORIZED:
        assert VIEWS[name].cls.factorized
    for name in GEOMETRIC + ["negate"]:
        assert not VIEWS[name].cls.factorized


def test_argument_parsing_positional_and_keyword():
    assert build_view("patch_permute", ["4"]).num_patches == 4
    assert build_view("patch_permute", ["num_patches=16"]).num_patches == 16
    assert build_view("skew", ["-2"]).skew_factor == -2.0
    v = build_view("low_pass", ["3", "kernel_size=21"])
    assert (v.sigma, v.kernel_size) == (3.0, 21)
    assert parse_view_args("triple_high_pass", ["sigma_2=4"]) == {"sigma_2": 4.0}
    assert parse_view_args("flip", []) == {}
    # A bare string is one argument, not a list of characters.
    assert build_view("patch_permute", "16").num_patches == 16
    assert build_views(["patch_permute"], ["16"])[0].num_patches == 16
    assert "num_patches=16" in repr(build_view("patch_permute", ["16"]))


# ------------------------------------------------------------------------------------------
# Geometric views: exact inverses, bijections


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_inverse_is_exact(name: str, size: int):
    view = get_view(name)
    x = image6(size)
    before = x.clone()
    y = view.view(x)
    assert y.shape == x.shape
    assert torch.equal(view.inverse_view(y), x)
    assert torch.equal(x, before)  # not modified in place
    if name != "identity":
        assert not torch.equal(y, x)


@pytest.mark.parametrize("size", SIZES)
def test_negate_channel_rule(size: int):
    view = get_view("negate")
    x = image6(size)
    assert torch.equal(view.view(x), -x)  # the model input is negated on every channel
    inv = view.inverse_view(x)
    assert torch.equal(inv[:3], -x[:3])  # the noise estimate is negated...
    assert torch.equal(inv[3:], x[3:])  # ...the variance estimate is not
    back = view.inverse_view(view.view(x))
    assert torch.equal(back[:3], x[:3]) and torch.equal(back[3:], -x[3:])
    assert torch.equal(view.inverse_view(x[:3]), -x[:3])  # 3-channel noise (inverse problems)


PERMUTATION_CASES = [
    ("patch_permute", ()),
    ("patch_permute", ("2",)),
    ("pixel_permute", ()),
    ("jigsaw", ("2",)),
    ("jigsaw", ()),  # grid 4, the default (shares the cache with other tests)
    ("jigsaw", ("8",)),
    ("inner_circle", ()),
    ("square_hinge", ()),
    ("skew", ()),
    ("skew", ("-0.7",)),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("name", "args"), PERMUTATION_CASES)
def test_permutation_views_are_bijections(name: str, args: tuple[str, ...], size: int):
    view = get_view(name, *args)
    assert isinstance(view, PermutationView)
    perm = view.permutation(size)
    assert perm.dtype == torch.int64 and perm.shape == (size * size,)
    assert torch.equal(torch.sort(perm).values, torch.arange(size * size))
    assert not torch.equal(perm, torch.arange(size * size))
    assert torch.equal(view.inverse_permutation(size)[perm], torch.arange(size * size))
    if size == 64:  # view() is exactly the gather with that permutation
        x = torch.arange(size * size, dtype=torch.float64).reshape(1, size, size)
        assert torch.equal(view.view(x).reshape(-1), perm.to(torch.float64))


def test_invert_permutation():
    perm = torch.tensor([2, 0, 3, 1])
    inv = invert_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(4)) and torch.equal(inv[perm], torch.arange(4))


# ------------------------------------------------------------------------------------------
# Exact reference numerics, checked against naive re-derivations


def marked(size: int) -> torch.Tensor:
    x = torch.zeros(1, size, size)
    x[0, 0, 0] = 1.0
    return x


def where_is_mark(x: torch.Tensor) -> tuple[int, int]:
    y, xx = torch.nonzero(x[0]).tolist()[0]
    return y, xx


def test_rotation_and_flip_directions():
    s = 64
    assert where_is_mark(get_view("rotate_cw").view(marked(s))) == (0, s - 1)  # top-right
    assert where_is_mark(get_view("rotate_ccw").view(marked(s))) == (s - 1, 0)  # bottom-left
    assert where_is_mark(get_view("rotate_180").view(marked(s))) == (s - 1, s - 1)
    assert where_is_mark(get_view("flip").view(marked(s))) == (s - 1, 0)  # upside down
    x = image6(s)
    assert torch.equal(get_view("rotate_cw").view(x), torch.rot90(x, -1, (-2, -1)))
    assert torch.equal(get_view("rotate_ccw").view(x), torch.rot90(x, 1, (-2, -1)))


def test_skew_matches_column_rolls():
    size, factor = 64, 1.5
    x = image6(size)
    cols = [x[:, :, i].roll(int(factor * (i - size // 2)), dims=1) for i in range(size)]
    assert torch.equal(get_view("skew").view(x), torch.stack(cols, dim=2))
    # int() truncates toward zero, so the inverse uses exactly the negated shifts.
    cols = [x[:, :, i].roll(int(-factor * (i - size // 2)), dims=1) for i in range(size)]
    assert torch.equal(get_view("skew").inverse_view(x), torch.stack(cols, dim=2))


def test_patch_permute_matches_patch_indexing():
    view = build_view("patch_permute", ["4"], seed=11)
    x = image6(64)
    n, p = 4, 16
    patches = x.reshape(6, n, p, n, p).permute(1, 3, 0, 2, 4).reshape(n * n, 6, p, p)
    moved = patches[view.perm].reshape(n, n, 6, p, p).permute(2, 0, 3, 1, 4).reshape(6, 64, 64)
    assert torch.equal(view.view(x), moved)


def test_inner_circle_matches_pixel_loop():
    size, radius = 64, 24
    expected = []
    for iy in range(size):
        for ix in range(size):
            cx, cy = ix - size // 2 + 0.5, iy - size // 2 + 0.5
            if cx**2 + cy**2 < radius**2:
                cx, cy = -cx, -cy
            expected.append(int(cx + size // 2 - 0.5) + int(cy + size // 2 - 0.5) * size)
    assert torch.equal(get_view("inner_circle").permutation(size), torch.tensor(expected))


def test_square_hinge_matches_block_rotations():
    for size in (64, 256):
        side = size // 3
        grid = torch.arange(size * size).reshape(size, size)
        expected = grid.clone()
        for bi in range(3):
            for bj in range(3):
                block = grid[bi * side : (bi + 1) * side, bj * side : (bj + 1) * side]
                turn = 1 if (bi + bj) % 2 else -1
                expected[bi * side : (bi + 1) * side, bj * side : (bj + 1) * side] = torch.rot90(
                    block, turn
                )
        assert torch.equal(get_view("square_hinge").permutation(size), expected.reshape(-1))


# ------------------------------------------------------------------------------------------
# Seeds


def test_patch_permute_seed_contract():
    views = build_views(["identity", "patch_permute"], view_seed=7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected = torch.randperm(64)
    assert torch.equal(views[1].perm, expected)
    # One generator, consumed in view order; the jigsaw has its own and does not shift it.
    views = build_views(["patch_permute", "jigsaw", "pixel_permute"], view_seed=5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(views[0].perm, torch.randperm(64, generator=g))
    assert torch.equal(views[2].perm, torch.randperm(4096, generator=g))


def test_same_seed_same_view_different_seed_different():
    a, b, c = (build_view("patch_permute", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(
        build_view("pixel_permute", generator=g1).perm,
        build_view("pixel_permute", generator=g2).perm,
    )
    j1, j2, j3 = (build_view("jigsaw", seed=s) for s in (1, 1, 2))
    assert j1.layout == j2.layout and j1.layout != j3.layout
    assert torch.equal(j1.permutation(64), j2.permutation(64))
    assert not torch.equal(j1.permutation(64), j3.permutation(64))
    v1, v2 = build_views(["identity", "patch_permute"], view_seed=1)[1], a
    assert torch.equal(v1.perm, v2.perm)


# ------------------------------------------------------------------------------------------
# Jigsaw geometry


@pytest.mark.parametrize("grid", [2, 3, 4, 5, 8])
def test_jigsaw_layout_is_quarter_turn_symmetric(grid: int):
    layout = jigsaw.make_layout(grid, torch.Generator().manual_seed(grid))
    size = 8 * grid * (2 if grid % 2 else 1)
    labels = jigsaw.piece_labels(layout, size)
    turn = torch.tensor([jigsaw.rotate_cell(k, grid) for k in range(grid * grid)])
    # The label of the quarter-turned image is the quarter-turned label, pixel for pixel.
    assert torch.equal(turn[torch.rot90(labels, -1)], labels)
    for k in range(grid * grid):
        assert layout.destination[k] == jigsaw.rotate_cell(k, grid, layout.quarter_turns[k])
    assert sorted(layout.destination) == list(range(grid * grid))
    dest = jigsaw.destination_index(layout, size)
    assert torch.equal(torch.sort(dest).values, torch.arange(size * size))


def test_jigsaw_pieces_have_tabs_and_move_whole():
    view = build_view("jigsaw", seed=0)
    size = 256
    labels = view.piece_labels(size)
    cells = (torch.arange(size)[:, None] // 64) * 4 + torch.arange(size)[None, :] // 64
    n_tab = int((labels != cells).sum())
    # 24 interior edges, each tab taking ~0.4 of a cell's area from the neighbour: ~1/6 of all.
    assert 0.1 * size * size < n_tab < 0.25 * size * size
    assert any(view.quarter_turns) and list(view.destination) != list(range(16))
    # After view(), the region of piece destination[k] is covered by piece k only.
    moved = view.view(labels[None].to(torch.float32))[0].to(torch.int64)
    for k in range(16):
        region = labels == view.destination[k]
        assert torch.all(moved[region] == k)


def test_jigsaw_same_layout_at_every_size():
    view = build_view("jigsaw", seed=4)
    small = view.piece_labels(64)
    for size in (256, 1024):
        f = size // 64
        # Sample the big map at the pixel nearest each small pixel centre.
        big = view.piece_labels(size)[f // 2 :: f, f // 2 :: f]
        mismatch = int((big != small).sum())
        assert mismatch <= 0.02 * small.numel(), mismatch  # only tab-boundary pixels differ


def test_jigsaw_cell_centre():
    assert jigsaw.cell_centre(0, 4, 64) == (7.5, 7.5)
    assert jigsaw.cell_centre(7, 4, 64) == (23.5, 55.5)


# ------------------------------------------------------------------------------------------
# Factorized views


def _component(name: str, x: torch.Tensor, *args: str) -> torch.Tensor:
    return get_view(name, *args).inverse_view(x)


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize(
    "group",
    [
        ("low_pass", "high_pass"),
        ("triple_low_pass", "triple_medium_pass", "triple_high_pass"),
        ("grayscale", "color"),
        ("motion", "motion_res"),
    ],
)
def test_factorized_components_add_up(group: tuple[str, ...], size: int):
    x = image6(size)
    before = x.clone()
    parts = [_component(name, x) for name in group]
    for name, part in zip(group, parts, strict=True):
        assert part.shape == x.shape
        assert torch.equal(part[3:], x[3:])  # variance passes through
        assert not torch.allclose(part[:3], x[:3], atol=1e-3)  # a real component
        assert get_view(name).view(x) is x  # the model input is unchanged
    total = sum(part[:3] for part in parts)
    torch.testing.assert_close(total, x[:3], atol=1e-5, rtol=0)
    assert torch.equal(x, before)
    # 3-channel noise (inverse problems) gives the same estimate components.
    for name, part in zip(group, parts, strict=True):
        torch.testing.assert_close(_component(name, x[:3]), part[:3], atol=1e-6, rtol=0)


def test_scale_view():
    x = image6(64)
    out = _component("scale", x)
    assert torch.equal(out[:3], 0.5 * x[:3]) and torch.equal(out[3:], x[3:])
    assert torch.equal(build_view("scale", ["0.25"]).inverse_view(x)[:3], 0.25 * x[:3])


def test_grayscale_and_color_values():
    x = image6(64)
    mean = x[:3].mean(0)
    gray = _component("grayscale", x)
    assert all(torch.allclose(gray[c], mean) for c in range(3))
    torch.testing.assert_close(_component("color", x)[:3], x[:3] - mean)


def test_blur_kernel_scaling():
    assert scaled_blur_params(33, 2.0, 64) == (33, 2.0)
    assert scaled_blur_params(33, 2.0, 256) == (133, 8.0)
    assert scaled_blur_params(33, 2.0, 1024) == (529, 32.0)
    assert scaled_blur_params(25, 1.0, 256) == (101, 4.0)
    assert scaled_blur_params(33, 2.0, 128) == (66 + 1, 4.0)  # even factor: kept odd
    assert scaled_blur_params(33, 2.0, 32) == (33, 2.0)  # below the base size: no shrinking
    assert BASE_SIZE == 64
    for size in (64, 256):
        x = image6(size)
        k, sigma = scaled_blur_params(33, 2.0, size)
        assert torch.equal(_component("low_pass", x)[:3], gaussian_blur(x[:3], k, sigma))


def test_gaussian_kernel_by_hand():
    w = math.exp(-0.5)
    expected = torch.tensor([w, 1.0, w]) / (1 + 2 * w)
    torch.testing.assert_close(gaussian_kernel1d(3, 1.0), expected)
    k5 = gaussian_kernel1d(5, 2.0)
    raw = torch.tensor([math.exp(-0.5 * (i / 2.0) ** 2) for i in (-2, -1, 0, 1, 2)])
    torch.testing.assert_close(k5, raw / raw.sum())


def test_gaussian_blur_matches_direct_2d_sum_with_reflect_padding():
    h, w, k, sigma = 7, 9, 5, 1.3
    x = rand(2, 3, h, w, seed=1, dtype=torch.float64)
    k1 = gaussian_kernel1d(k, sigma).to(torch.float64)
    kernel2d = k1[:, None] * k1[None, :]

    def reflect(i: int, n: int) -> int:  # mirror without repeating the edge pixel
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    expected = torch.zeros_like(x)
    r = k // 2
    for yy in range(h):
        for xx in range(w):
            acc = torch.zeros(2, 3, dtype=torch.float64)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    acc += kernel2d[dy + r, dx + r] * x[..., reflect(yy + dy, h), reflect(xx + dx, w)]
            expected[..., yy, xx] = acc
    torch.testing.assert_close(gaussian_blur(x, k, sigma), expected, atol=1e-6, rtol=0)


def test_motion_blur_matches_diagonal_convolution():
    for size in (64, 256):
        x = image6(size)
        factor = size // 64
        s = 7 * factor + (factor + 1) % 2
        kernel = (torch.eye(s) / s)[None, None]
        expected = torch.cat([F.conv2d(x[c][None], kernel, padding=s // 2) for c in range(3)])
        torch.testing.assert_close(_component("motion", x)[:3], expected, atol=1e-5, rtol=0)


def test_display():
    x = image6(64)
    assert torch.equal(get_view("rotate_cw").display(x), torch.rot90(x[:3], -1, (-2, -1)))
    assert torch.equal(get_view("negate").display(x[:3]), -x[:3])
    gray = get_view("grayscale").display(x[:3])
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[2])
    torch.testing.assert_close(gray[1], x[:3].mean(0))
    assert torch.equal(get_view("motion").display(x[:3]), _component("motion", x[:3]))
    assert torch.equal(get_view("low_pass").display(x[:3]), x[:3])
    batch = torch.stack([x[:3], -x[:3]])
    assert get_view("grayscale").display(batch).shape == (2, 3, 64, 64)


# ------------------------------------------------------------------------------------------
# Shapes, batches, dtypes, purity


@pytest.mark.parametrize("name", EXPECTED_ORDER)
def test_batch_dims_and_no_in_place_changes(name: str):
    view = get_view(name)
    x = rand(2, 6, 64, 64, seed=2)
    before = x.clone()
    out = view.view(x)
    inv = view.inverse_view(x)
    disp = view.display(x)
    assert torch.equal(x, before)
    assert torch.equal(out, torch.stack([view.view(x[i]) for i in range(2)]))
    assert torch.equal(inv, torch.stack([view.inverse_view(x[i]) for i in range(2)]))
    assert disp.shape == (2, 3, 64, 64)
    # More leading dims, and 3-channel stage-1 inputs.
    x3 = x[:, :3].reshape(1, 2, 3, 64, 64)
    assert torch.equal(view.view(x3)[0, 1], view.view(x[1, :3]))
    assert torch.equal(view.inverse_view(x3)[0, 0], view.inverse_view(x[0, :3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype: torch.dtype):
    x = rand(6, 64, 64, seed=3).to(dtype)
    for name in ("jigsaw", "rotate_cw", "skew", "negate"):
        view = get_view(name)
        assert view.view(x).dtype == dtype
    for name in ("low_pass", "motion", "triple_medium_pass", "color"):
        out = get_view(name).inverse_view(x)
        assert out.dtype == dtype
        ref = get_view(name).inverse_view(x.float())
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_non_square_where_it_makes_sense():
    x = rand(6, 64, 128, seed=4)
    for name in ("flip", "rotate_180", "skew", "patch_permute", "low_pass", "motion", "color"):
        view = get_view(name)
        assert view.view(x).shape == x.shape
        if not view.factorized:
            assert torch.equal(view.inverse_view(view.view(x)), x)
        else:
            assert view.inverse_view(x).shape == x.shape


def test_pickle_round_trip():
    view = get_view("jigsaw")
    view.view(image6(64))
    clone = pickle.loads(pickle.dumps(view))
    assert torch.equal(clone.view(image6(64)), view.view(image6(64)))
    assert isinstance(clone, JigsawView)


# ------------------------------------------------------------------------------------------
# Errors


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ViewError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_unknown_view_lists_valid_ones():
    msg = _error(build_view, "flp")
    assert "'flp'" in msg and "Did you mean 'flip'" in msg
    assert all(name in msg for name in EXPECTED_ORDER)
    assert "Valid views" in _error(build_views, ["identity", "inner_cricle"])
    assert "Valid views" in _error(build_view, "blur_failure")  # reference-only failure views


@pytest.mark.parametrize(
    ("name", "args", "needle"),
    [
        ("patch_permute", ["7"], "must divide 64"),
        ("patch_permute", ["1"], "must divide 64"),
        ("patch_permute", ["abc"], "expects an integer"),
        ("patch_permute", ["4.5"], "expects an integer"),
        ("patch_permute", ["4", "5"], "too many arguments"),
        ("patch_permute", ["size=4"], "unknown argument 'size'"),
        ("patch_permute", ["num_patches=4", "8"], "put positional arguments first"),
        ("patch_permute", ["4", "num_patches=8"], "given twice"),
        ("flip", ["1"], "takes no arguments"),
        ("skew", ["0"], "moves no pixel"),
        ("skew", ["0.01"], "moves no pixel"),
        ("skew", ["64"], "every column rolls by whole turns of 64"),
        ("low_pass", ["sigma=1e-50"], "sigma must be a finite number >= 0.01"),  # a NaN kernel
        ("skew", ["nan"], "finite"),
        ("skew", ["x"], "expects a number"),
        ("low_pass", ["0"], "sigma must be"),
        ("high_pass", ["-1"], "sigma must be"),
        ("low_pass", ["kernel_size=32"], "odd"),
        ("triple_low_pass", ["sigma_2=0"], "sigma_2 must be"),
        ("motion", ["6"], "odd"),
        ("motion", ["2000001"], "at most 63"),  # a blur this long would take minutes and GiBs
        ("low_pass", ["kernel_size=65"], "at most 63"),
        ("scale", ["0"], "> 0"),
        ("scale", ["inf"], "finite"),
        ("scale", ["1e38"], "at most 1000"),  # overflowed the estimate: a NaN image
        ("jigsaw", ["1"], "must divide 64"),
        ("jigsaw", ["3"], "use one of [2, 4, 8, 16, 32, 64], got 3"),  # found before any sampling
        ("jigsaw", ["100000000"], "must divide 64"),  # would draw a layout of 10^16 pieces
        ("skew", ["1e30"], "1000"),  # shifts beyond 64-bit integers
    ],
)
def test_bad_arguments(name: str, args: list[str], needle: str):
    msg = _error(build_view, name, args)
    assert needle in msg, msg


def test_bad_inputs():
    assert "multiple of 8" in _error(build_view("jigsaw", ["8"]).view, image6(60))
    assert "divisible by 8" in _error(get_view("patch_permute").view, rand(3, 60, 60))
    assert "square" in _error(get_view("rotate_cw").view, rand(3, 64, 32))
    assert "square" in _error(get_view("inner_circle").view, rand(3, 64, 32))
    assert "at least 3 dimensions" in _error(get_view("flip").view, rand(64, 64))
    assert "channels" in _error(get_view("low_pass").inverse_view, rand(2, 64, 64))
    assert "too large" in _error(get_view("low_pass").inverse_view, rand(3, 16, 16))
    assert "argument lists" in _error(build_views, ["identity", "flip"], [[]])
