"""Animations of views: the picture moving from how it is to how a view shows it.

``frame(view, image, t)`` draws one moment of a view's animation on a *canvas* larger than the
image (a margin of a quarter of the side all round, so that turning and travelling pieces stay in
sight), in the same value range as the image (``[-1, 1]``; the background is white):

* ``t = 0`` is the image itself, centred on the canvas;
* ``t = 1`` is what a person sees through the view: ``view.display(image)`` centred on the canvas
  for every view that moves, turns or recolours pixels; for the hybrid-image views the image
  shrunk by ``zoom_scale(view)`` (a low-pass component is what one sees from afar).

How each view moves:

* ``flip`` turns over like a card about the horizontal axis; rotations turn the image;
* ``jigsaw``, ``patch_permute`` and ``pixel_permute`` pieces travel on curved paths to their places
  (jigsaw pieces turning as they go), ``square_hinge`` squares turn and spread like a hinged
  puzzle, the ``inner_circle`` disc turns, ``skew`` columns slide;
* ``negate``, ``grayscale`` and ``motion`` fade into their view;
* ``low_pass``, ``triple_low_pass`` and ``triple_medium_pass`` zoom out;
* ``identity`` and the views that show the image unchanged (``high_pass``, ``triple_high_pass``,
  ``color``, ``motion_res``, ``scale``) stand still (``is_static``).

``timeline(views, spec)`` orders the frames of a whole animation that cycles through several
views: each view's pose is held, then the animation goes back to the identity and on to the next
view's pose (skipping legs that stand still), and from the last view back to the first.

Images are ``(3, S, S)`` floating tensors on the CPU; nothing here modifies its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from illusions import jigsaw as _jigsaw
from illusions.views import (
    ColorView,
    FlipView,
    GrayscaleView,
    HighPassView,
    IdentityView,
    InnerCircleView,
    JigsawView,
    LowPassView,
    MotionBlurResView,
    MotionBlurView,
    NegateView,
    PatchPermuteView,
    Rotate180View,
    RotateCCWView,
    RotateCWView,
    ScaleView,
    SkewView,
    SquareHingeView,
    TripleHighPassView,
    TripleLowPassView,
    TripleMediumPassView,
    View,
    ViewError,
    _skew_shifts,
)

__all__ = [
    "BACKGROUND",
    "AnimationSpec",
    "Step",
    "canvas_size",
    "ease",
    "frame",
    "is_animated",
    "is_static",
    "margin",
    "place",
    "render",
    "timeline",
    "zoom_scale",
]

BACKGROUND = 1.0  # white, in the images' [-1, 1] range

# Seed of the curved paths of travelling pieces: fixed, so that an animation never depends on
# anything but the view (whose own seed already fixes where the pieces go).
PATH_SEED = 0
# Largest sideways bend of a travelling piece's path, as a fraction of the distance it travels.
PATH_BEND = 0.35


def margin(size: int) -> int:
    """Canvas margin around an image of side ``size``: a quarter of the side."""
    return size // 4


def canvas_size(size: int) -> int:
    """Side of the square canvas of an image of side ``size`` (1.5 times it for even quarters)."""
    return size + 2 * margin(size)


def ease(u: float) -> float:
    """Smooth start and stop: ``6u^5 - 15u^4 + 10u^3`` (0 at 0, 1 at 1, flat at both ends)."""
    u = min(max(float(u), 0.0), 1.0)
    return u * u * u * (u * (6 * u - 15) + 10)


def place(image: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Centre ``image`` on a background canvas.

    Args:
        image: ``(3, h, w)``.
        size: side of the image the canvas is for (default ``h``): the canvas is
            ``canvas_size(size)`` square, so a shrunk image can sit on its full-size canvas.
    Returns:
        ``(3, F, F)`` with ``F = canvas_size(size)``, same dtype.
    """
    h, w = image.shape[-2:]
    side = canvas_size(h if size is None else size)
    out = torch.full((image.shape[0], side, side), BACKGROUND, dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = image
    return out


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


def _clockwise(degrees: float) -> torch.Tensor:
    """2x2 matrix turning ``(y, x)`` offsets clockwise on screen (y down), float64.

    At 90 degrees it sends ``(y, x)`` to ``(x, -y)``, the turn of ``rotate_cw`` /
    ``torch.rot90(k=-1, dims=(-2, -1))``.
    """
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, s], [-s, c]], dtype=torch.float64)


@dataclass(frozen=True)
class _Piece:
    """One rigid piece at one moment: the pixels labelled ``label``, moved by an affine map.

    A source pixel ``q`` (image coordinates, ``(y, x)``) is drawn at canvas position
    ``centre + matrix @ (q - source_centre)``.
    """

    label: int
    source_centre: tuple[float, float]
    centre: tuple[float, float]
    matrix: torch.Tensor  # (2, 2) float64


def _piece_radius(labels: torch.Tensor, label: int, centre: tuple[float, float]) -> float:
    """Largest distance from ``centre`` to a pixel of the piece (0 for an empty piece)."""
    ys, xs = torch.nonzero(labels == label, as_tuple=True)
    if ys.numel() == 0:
        return 0.0
    d2 = (ys.double() - centre[0]) ** 2 + (xs.double() - centre[1]) ** 2
    return float(d2.max().sqrt())


def _draw_pieces(image: torch.Tensor, labels: torch.Tensor, pieces: Sequence[_Piece]) -> torch.Tensor:
    """Draw rigid pieces of ``image`` onto a fresh canvas, later pieces on top.

    Every canvas pixel near a piece is mapped back into the image (inverse warp); it shows the
    bilinearly sampled image there if the nearest image pixel belongs to the piece.  When the maps
    are quarter turns and whole-pixel moves, the samples land exactly on pixels and the result is
    an exact rearrangement.

    Args:
        image: ``(3, S, S)`` floating.
        labels: ``(S, S)`` int64, the piece of every pixel.
        pieces: the pieces to draw, each with its map at this moment.
    Returns:
        ``(3, F, F)`` canvas, ``F = canvas_size(S)``, same dtype as ``image``.
    """
    size = image.shape[-1]
    side = canvas_size(size)
    out = torch.full((image.shape[0], side, side), BACKGROUND, dtype=image.dtype)
    source = image.double()[None]  # (1, 3, S, S)
    for piece in pieces:
        if abs(float(torch.linalg.det(piece.matrix))) < 1e-9:
            continue  # seen edge-on (a flip half-way): nothing to draw
        inverse = torch.linalg.inv(piece.matrix)
        reach = _piece_radius(labels, piece.label, piece.source_centre)
        reach = reach * float(torch.linalg.matrix_norm(piece.matrix, ord=2)) + 2
        cy, cx = piece.centre
        y0, y1 = max(0, math.floor(cy - reach)), min(side, math.ceil(cy + reach) + 1)
        x0, x1 = max(0, math.floor(cx - reach)), min(side, math.ceil(cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        py = torch.arange(y0, y1, dtype=torch.float64)[:, None] - cy
        px = torch.arange(x0, x1, dtype=torch.float64)[None, :] - cx
        py, px = torch.broadcast_tensors(py, px)
        qy = inverse[0, 0] * py + inverse[0, 1] * px + piece.source_centre[0]  # (h, w)
        qx = inverse[1, 0] * py + inverse[1, 1] * px + piece.source_centre[1]
        iy, ix = qy.round().long(), qx.round().long()
        inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
        mask = inside & (labels[iy.clamp(0, size - 1), ix.clamp(0, size - 1)] == piece.label)
        if not bool(mask.any()):
            continue
        grid = torch.stack([qx, qy], dim=-1)[None] * (2 / (size - 1)) - 1  # (1, h, w, 2): x, y
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="border",
                                align_corners=True)[0].to(image.dtype)  # (3, h, w)
        region = out[:, y0:y1, x0:x1]
        region[:, mask] = sampled[:, mask]
    return out


def _bezier(start: torch.Tensor, end: torch.Tensor, t: float, seed: int = PATH_SEED) -> torch.Tensor:
    """Points on curved paths from ``start`` to ``end`` (quadratic Bezier curves).

    Args:
        start, end: ``(N, 2)`` float64 positions; path ``k`` bends sideways by a random fraction
            (at most ``PATH_BEND``, from a generator seeded with ``seed``) of its length.
        t: 0 gives ``start`` and 1 gives ``end`` exactly.
    Returns:
        ``(N, 2)`` float64.
    """
    if t <= 0:
        return start.clone()
    if t >= 1:
        return end.clone()
    bend = (torch.rand(start.shape[0], generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 2 - 1) * PATH_BEND
    delta = end - start
    normal = torch.stack([delta[:, 1], -delta[:, 0]], dim=1)  # delta turned a quarter: same length
    control = (start + end) / 2 + normal * bend[:, None]
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end


# --------------------------------------------------------------------------------------------
# One animator per kind of view
# --------------------------------------------------------------------------------------------

Animator = Callable[[View, torch.Tensor, float], torch.Tensor]
_ANIMATORS: dict[type[View], Animator] = {}
_STATIC = (IdentityView, HighPassView, TripleHighPassView, ColorView, MotionBlurResView, ScaleView)
# Hybrid-image views: their poses differ only in how far away the image is.
_HYBRID = (LowPassView, HighPassView, TripleLowPassView, TripleMediumPassView, TripleHighPassView)


def _animates(*classes: type[View]) -> Callable[[Animator], Animator]:
    def register(fn: Animator) -> Animator:
        for cls in classes:
            _ANIMATORS[cls] = fn
        return fn

    return register


def _centre(size: int) -> tuple[float, float]:
    return ((size - 1) / 2, (size - 1) / 2)


def _canvas_centre(size: int) -> tuple[float, float]:
    m = margin(size)
    return ((size - 1) / 2 + m, (size - 1) / 2 + m)


@_animates(*_STATIC)
def _still(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    return place(image)


_TURNS = {RotateCWView: 90.0, RotateCCWView: -90.0, Rotate180View: 180.0}


@_animates(RotateCWView, RotateCCWView, Rotate180View)
def _turn(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    size = image.shape[-1]
    labels = torch.zeros(size, size, dtype=torch.int64)
    degrees = _TURNS[type(view)] * t
    return _draw_pieces(image, labels, [_Piece(0, _centre(size), _canvas_centre(size),
                                               _clockwise(degrees))])


@_animates(FlipView)
def _flip(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    # A card turning over about the horizontal axis: rows squeeze by cos(pi t), then mirror.
    size = image.shape[-1]
    labels = torch.zeros(size, size, dtype=torch.int64)
    squeeze = torch.tensor([[math.cos(math.pi * t), 0.0], [0.0, 1.0]], dtype=torch.float64)
    if t >= 1:
        squeeze[0, 0] = -1.0  # cos(pi) is -1 exactly, but say so
    return _draw_pieces(image, labels, [_Piece(0, _centre(size), _canvas_centre(size), squeeze)])


@_animates(NegateView, GrayscaleView, MotionBlurView)
def _fade(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    if t <= 0:
        return place(image)
    seen = view.display(image)
    if t >= 1:
        return place(seen)
    return place(torch.lerp(image, seen, t))


@_animates(SkewView)
def _skew(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    # Column x slides down by t * shift[x] rows, wrapping around (torch.roll semantics).
    assert isinstance(view, SkewView)
    size = image.shape[-1]
    shifts = torch.tensor(_skew_shifts(size, size, view.skew_factor), dtype=torch.float64)
    y = torch.arange(size, dtype=torch.float64)[:, None]
    src = torch.remainder(y - t * shifts[None, :], size)  # (S, S): source row of every pixel
    low = src.floor()
    frac = (src - low).to(image.dtype)
    low = low.long() % size
    high = (low + 1) % size
    x = torch.arange(size)[None, :].expand(size, size)
    moved = image[:, low, x] * (1 - frac) + image[:, high, x] * frac
    return place(moved)


@_animates(PatchPermuteView)
def _patches(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    # Patches travel on curved paths by whole canvas pixels, so each stays an exact copy.
    assert isinstance(view, PatchPermuteView)
    size = image.shape[-1]
    n = view.num_patches
    if size % n:
        raise ViewError(f"view '{view.name}' with num_patches={n} needs a side divisible by {n}, "
                        f"got {size}")
    patch = size // n
    index = torch.arange(n * n)
    slot = view.perm_inv.to(torch.int64)  # slot[s]: where source patch s goes
    start = torch.stack([index // n, index % n], dim=1).double() * patch
    end = torch.stack([slot // n, slot % n], dim=1).double() * patch
    shift = (_bezier(start, end, t) - start).round().long()  # (n*n, 2)
    side = canvas_size(size)
    m = margin(size)
    y = torch.arange(size)[:, None]
    x = torch.arange(size)[None, :]
    which = (y // patch) * n + x // patch  # (S, S): patch of every pixel
    cy = y + shift[which, 0] + m
    cx = x + shift[which, 1] + m
    keep = ((cy >= 0) & (cy < side) & (cx >= 0) & (cx < side)).reshape(-1)
    # Which image pixel lands on each canvas pixel (-1: none).  One index map, so where patches
    # overlap in flight a canvas pixel shows one whole image pixel, never channels of two.
    owner = torch.full((side * side,), -1, dtype=torch.int64)
    owner[(cy * side + cx).reshape(-1)[keep]] = torch.arange(size * size)[keep]
    out = torch.full((image.shape[0], side * side), BACKGROUND, dtype=image.dtype)
    painted = owner >= 0
    out[:, painted] = image.reshape(image.shape[0], -1)[:, owner[painted]]
    return out.reshape(image.shape[0], side, side)


@_animates(JigsawView)
def _jigsaw_pieces(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    # Each piece travels to its cell, turning about its own centre by its quarter turns (3 turns
    # go the short way, -90 degrees): the same rigid motion as the view's turn about the centre.
    assert isinstance(view, JigsawView)
    size = image.shape[-1]
    grid = view.grid
    m = margin(size)
    cells = range(grid * grid)
    start = torch.tensor([_jigsaw.cell_centre(k, grid, size) for k in cells], dtype=torch.float64)
    end = torch.tensor([_jigsaw.cell_centre(view.destination[k], grid, size) for k in cells],
                       dtype=torch.float64)
    path = _bezier(start, end, t) + m
    pieces = []
    for k in cells:
        degrees = ((view.quarter_turns[k] + 1) % 4 - 1) * 90.0 * t
        pieces.append(_Piece(k, (float(start[k, 0]), float(start[k, 1])),
                             (float(path[k, 0]), float(path[k, 1])), _clockwise(degrees)))
    return _draw_pieces(image, view.piece_labels(size), pieces)


@_animates(InnerCircleView)
def _inner_circle(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    assert isinstance(view, InnerCircleView)
    size = image.shape[-1]
    # The disc is where the view moves pixels; read it from the view rather than redraw it.
    moved = view.permutation(size) != torch.arange(size * size)
    labels = moved.reshape(size, size).long()
    centre, canvas = _centre(size), _canvas_centre(size)
    return _draw_pieces(image, labels, [_Piece(0, centre, canvas, _clockwise(0.0)),
                                        _Piece(1, centre, canvas, _clockwise(180.0 * t))])


@_animates(SquareHingeView)
def _square_hinge(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    # Nine squares of side S // 3 turn a quarter, alternately clockwise and counter-clockwise; as
    # they turn their centres spread so that neighbouring corners stay touching (the hinge):
    # spacing = side * (|cos| + |sin|), back to one side at the end.
    size = image.shape[-1]
    side = size // 3
    m = margin(size)
    labels = torch.full((size, size), 9, dtype=torch.int64)  # 9: leftover rows/columns, still
    idx = torch.arange(3 * side) // side
    labels[: 3 * side, : 3 * side] = idx[:, None] * 3 + idx[None, :]
    theta = math.radians(90.0 * t)
    spacing = side * (abs(math.cos(theta)) + abs(math.sin(theta)))
    if t >= 1:
        spacing = float(side)
    middle = (3 * side - 1) / 2
    pieces = [_Piece(9, _centre(size), _canvas_centre(size), _clockwise(0.0))]
    for bi in range(3):
        for bj in range(3):
            turn = 90.0 if (bi + bj) % 2 == 0 else -90.0  # as the view: even squares clockwise
            source = (bi * side + (side - 1) / 2, bj * side + (side - 1) / 2)
            centre = (middle + (bi - 1) * spacing + m, middle + (bj - 1) * spacing + m)
            pieces.append(_Piece(bi * 3 + bj, source, centre, _clockwise(turn * t)))
    return _draw_pieces(image, labels, pieces)


def zoom_scale(view: View) -> float:
    """How much a zooming view shrinks the image at ``t = 1`` (1.0 for other views).

    A hybrid component blurred with ``sigma`` pixels (at 64x64; the blur scales with the image)
    is what one sees once that blur is about half a pixel: the image shrinks to ``1 / (2 sigma)``
    of its side (1/4 for ``low_pass``'s default sigma 2), at most to 1/16.
    """
    if isinstance(view, LowPassView):
        sigma = view.sigma
    elif isinstance(view, TripleLowPassView):
        sigma = view.sigma_2
    elif isinstance(view, TripleMediumPassView):
        sigma = view.sigma_1
    else:
        return 1.0
    return min(1.0, max(1 / 16, 1 / (2 * sigma)))


@_animates(LowPassView, TripleLowPassView, TripleMediumPassView)
def _zoom(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    size = image.shape[-1]
    # Shrinking by 1 / (1 + (1/s - 1) t) makes the apparent distance grow linearly with t.
    scale = 1 / (1 + (1 / zoom_scale(view) - 1) * t)
    new = max(1, round(size * scale))
    if new == size:
        return place(image)
    small = F.interpolate(image[None].float(), size=(new, new), mode="bilinear",
                          antialias=True, align_corners=False)[0].to(image.dtype)
    return place(small, size)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _animator(view: View) -> Animator | None:
    for cls in type(view).__mro__:
        if cls in _ANIMATORS:
            return _ANIMATORS[cls]
    return None


def is_animated(view: View) -> bool:
    """Whether ``frame`` knows how to draw this view."""
    return _animator(view) is not None


def is_static(view: View) -> bool:
    """Whether the view's animation stands still (it shows the image as it is)."""
    return isinstance(view, _STATIC)


def frame(view: View, image: torch.Tensor, t: float) -> torch.Tensor:
    """One moment of ``view``'s animation.

    Args:
        view: any view of ``illusions.views``.
        image: ``(3, S, S)`` floating image in ``[-1, 1]`` (channels beyond 3 are ignored).
        t: 0 (the image) to 1 (the view's pose); values outside are clamped.
    Returns:
        ``(3, F, F)`` canvas, ``F = canvas_size(S)``, same dtype as ``image``: the image centred
        with a white margin at ``t = 0``; ``view.display(image)`` centred at ``t = 1`` (the image
        shrunk by ``zoom_scale(view)`` for zooming views).
    Raises:
        ViewError: not a square 3-channel image, or a view without an animation.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] < 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ViewError(f"frame() needs one (3, S, S) image, got {shape}")
    if image.shape[-1] != image.shape[-2] or image.shape[-1] < 2:
        raise ViewError(f"frame() needs a square image, got {tuple(image.shape)}")
    if not torch.is_floating_point(image):
        raise ViewError(f"frame() needs a floating-point image in [-1, 1], got {image.dtype}")
    animator = _animator(view)
    if animator is None:
        raise ViewError(f"view '{view.name}' has no animation")
    t = min(max(float(t), 0.0), 1.0)
    return animator(view, image[:3].cpu(), t)


@dataclass(frozen=True)
class AnimationSpec:
    """How long the parts of an animation last, in frame periods."""

    hold: int = 30  # periods each view's pose stays on screen
    transition: int = 20  # in-between frames of each leg (a view leaving or reaching its pose)

    def __post_init__(self) -> None:
        if self.hold < 1:
            raise ValueError(f"hold must be at least 1 frame period, got {self.hold}")
        if self.transition < 1:
            raise ValueError(f"transition must be at least 1 frame, got {self.transition}")


@dataclass(frozen=True)
class Step:
    """One distinct frame of an animation.

    Attributes:
        view: index of the view whose ``frame`` draws it.
        t: the time passed to ``frame`` (eased).
        repeat: how many frame periods it stays on screen (``spec.hold`` for a pose).
        source, target: the views whose poses the current segment goes from and to (equal while a
            pose is held); they choose the caption.
        progress: 0 at ``source``'s pose, 1 at ``target``'s, linear in frames.
    """

    view: int
    t: float
    repeat: int
    source: int
    target: int
    progress: float


def timeline(views: Sequence[View], spec: AnimationSpec | None = None) -> list[Step]:
    """The frames of an animation cycling through ``views``' poses and back to the first.

    Each pose is held for ``spec.hold`` periods.  Going from view ``a`` to view ``b``, ``a`` goes
    back to the identity (``spec.transition`` frames, the last being the identity itself, drawn
    once between two moving legs) and ``b`` moves to its pose; a leg whose view stands still is
    skipped.  Between two hybrid-image views the image zooms straight from one distance to the
    other (``spec.transition`` frames).  One view gives one held frame.
    """
    spec = spec or AnimationSpec()
    if not views:
        raise ViewError("an animation needs at least one view")
    for view in views:
        if not is_animated(view):
            raise ViewError(f"view '{view.name}' has no animation")
    steps: list[Step] = []
    count = len(views)
    n = spec.transition
    for a in range(count):
        steps.append(Step(a, 1.0, spec.hold, a, a, 0.0))
        if count == 1:
            break
        b = (a + 1) % count
        moves_a, moves_b = not is_static(views[a]), not is_static(views[b])
        if moves_a and moves_b and isinstance(views[a], _HYBRID) and isinstance(views[b], _HYBRID):
            steps += _zoom_between(views, a, b, n)
            continue
        # (view, linear time) of every in-between frame; ends (the poses) excluded.
        legs: list[tuple[int, float]] = []
        if moves_a:
            legs += [(a, 1 - i / (n + 1)) for i in range(1, n + 1)]
        if moves_a and moves_b:
            legs.append((a, 0.0))  # the identity, between the two legs
        if moves_b:
            legs += [(b, i / (n + 1)) for i in range(1, n + 1)]
        for k, (v, u) in enumerate(legs):
            steps.append(Step(v, ease(u), 1, a, b, (k + 1) / (len(legs) + 1)))
    return steps


def _zoom_between(views: Sequence[View], a: int, b: int, n: int) -> list[Step]:
    """``n`` frames zooming from view ``a``'s distance to view ``b``'s (both zooming views).

    The apparent distance ``1 / scale`` goes linearly (eased) from one to the other; each frame is
    drawn by the view that zooms furthest, at the time that gives that distance.
    """
    dist_a, dist_b = 1 / zoom_scale(views[a]), 1 / zoom_scale(views[b])
    host, far = (a, dist_a) if dist_a >= dist_b else (b, dist_b)
    if far <= 1:
        return []  # blurs so narrow that neither view shrinks the image: nothing moves
    steps = []
    for i in range(1, n + 1):
        distance = dist_a + (dist_b - dist_a) * ease(i / (n + 1))
        steps.append(Step(host, (distance - 1) / (far - 1), 1, a, b, i / (n + 1)))
    return steps


def render(views: Sequence[View], image: torch.Tensor, step: Step) -> torch.Tensor:
    """The canvas of one step: ``frame(views[step.view], image, step.t)``, ``(3, F, F)``."""
    return frame(views[step.view], image, step.t)
