"""Views for visual anagrams and factorized diffusion (Geng et al., CVPR 2024).

A *view* is a transformation of the image that the diffusion model denoises.  During sampling every
view is applied to the current noisy image (``view``), the UNet predicts noise for each viewed
image, and the prediction is mapped back into the frame of the original image (``inverse_view``)
before the predictions are combined.  Two families exist:

* Geometric views (flips, rotations, pixel permutations, negation): ``view`` rearranges or negates
  pixels and ``inverse_view`` undoes it exactly.
* Factorized views (low/high pass, grayscale/color, motion blur, scale): the model input is left
  unchanged (``view`` is the identity) and ``inverse_view`` extracts one *component* of the noise
  estimate; the components of complementary views add back up to the full estimate.

Tensor layout is ``(..., C, H, W)`` with any number of leading batch dimensions.  ``C`` is 3 for
the stage-1 noisy image, 6 for the stage-2 input (noisy image concatenated with the upscaled
conditioning image) and 6 for UNet outputs (3 noise channels, then 3 variance channels).  Nothing
here modifies its input in place.

The numerics follow the public reference implementation (``visual_anagrams/views``) so that
results can be compared with it; where the reference is undefined (other image sizes, odd
sizes) the behaviour is the natural generalisation documented on each view.
"""

from __future__ import annotations

import abc
import difflib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from illusions import jigsaw as _jigsaw

__all__ = [
    "BASE_SIZE",
    "VIEWS",
    "ColorView",
    "FactorizedView",
    "FlipView",
    "GrayscaleView",
    "HighPassView",
    "IdentityView",
    "InnerCircleView",
    "JigsawView",
    "LowPassView",
    "MotionBlurResView",
    "MotionBlurView",
    "NegateView",
    "PatchPermuteView",
    "PermutationView",
    "PixelPermuteView",
    "Rotate180View",
    "RotateCCWView",
    "RotateCWView",
    "ScaleView",
    "SkewView",
    "SquareHingeView",
    "TripleHighPassView",
    "TripleLowPassView",
    "TripleMediumPassView",
    "View",
    "ViewArg",
    "ViewError",
    "ViewInfo",
    "build_view",
    "build_views",
    "gaussian_blur",
    "gaussian_kernel1d",
    "invert_permutation",
    "parse_view_args",
    "scaled_blur_params",
    "size_factor",
]

# The reference tunes its blur kernels (hybrid images, motion blur) for the 64x64 stage-1 image and
# scales them for larger images by ``factor = H // BASE_SIZE``: sigma * factor, and kernel size
# k * factor + ((factor + 1) % 2), the extra 1 keeping the kernel odd when the factor is even.
BASE_SIZE = 64
# Views of one illusion at most: more is a mistake, and each UNet call would take 2x as many rows.
MAX_VIEWS = 16
# Patch and piece counts per side that tile the 64, 256 and 1024 images alike.
BASE_DIVISORS = [n for n in range(2, BASE_SIZE + 1) if BASE_SIZE % n == 0]


class ViewError(ValueError):
    """A view name, view argument or input tensor is invalid; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewArg:
    """One constructor argument of a view, as exposed on the command line."""

    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class ViewInfo:
    """Registry entry: a view's name, class, arguments and a one-line description."""

    name: str
    cls: type[View]
    args: tuple[ViewArg, ...]
    description: str


class View(abc.ABC):
    """Base class of all views.

    Subclasses set ``name`` (registry key), ``description`` (one line), ``args`` (the
    ``ViewArg`` list matching their keyword constructor arguments) and ``factorized`` (True when
    ``view`` is the identity and ``inverse_view`` extracts a component of the noise estimate).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    args: ClassVar[tuple[ViewArg, ...]] = ()
    factorized: ClassVar[bool] = False

    @abc.abstractmethod
    def view(self, im: torch.Tensor) -> torch.Tensor:
        """Transform a model input.

        Args:
            im: ``(..., C, H, W)``; C is 3 (stage-1 noisy image) or 6 (stage-2 noisy image
                concatenated with the upscaled conditioning image).
        Returns:
            Tensor of the same shape.  May be ``im`` itself for views that change nothing.
        """

    @abc.abstractmethod
    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        """Map a UNet output back into the frame of the un-viewed image.

        Args:
            noise: ``(..., 6, H, W)`` UNet output (channels ``[:3]`` noise estimate, ``[3:]``
                variance estimate) or ``(..., 3, H, W)`` (inverse-problem mode).
        Returns:
            Tensor of the same shape; ``noise`` itself is never modified.
        """

    def display(self, im: torch.Tensor) -> torch.Tensor:
        """What a person sees for this view of an image, for the sheet of views.

        Args:
            im: ``(..., C, H, W)`` with C >= 3; only channels ``[:3]`` are shown.
        Returns:
            ``(..., 3, H, W)``.
        """
        return self.view(_check_image(im, self.name, min_channels=3)[..., :3, :, :])

    @classmethod
    def _create(
        cls, kwargs: dict[str, Any], generator: torch.Generator | None, seed: int
    ) -> View:
        """Construct from parsed arguments; random views override this to take the generator."""
        return cls(**kwargs)

    def __repr__(self) -> str:
        params = ", ".join(f"{a.name}={getattr(self, a.name)!r}" for a in self.args)
        return f"{type(self).__name__}({params})"


def _check_image(x: torch.Tensor, who: str, min_channels: int = 1) -> torch.Tensor:
    """Validate a ``(..., C, H, W)`` tensor and return it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise ViewError(f"view '{who}' expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ViewError(
            f"view '{who}' expects a tensor shaped (..., C, H, W) with at least 3 dimensions, "
            f"got shape {tuple(x.shape)}; add a channel dimension"
        )
    if x.shape[-3] < min_channels:
        raise ViewError(
            f"view '{who}' needs at least {min_channels} channels (noise estimate in [:3]), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def _check_square(h: int, w: int, who: str) -> int:
    """Return the side of a square ``h x w`` image, or raise ViewError."""
    if h != w:
        raise ViewError(
            f"view '{who}' needs a square image (H == W, e.g. 64x64, 256x256, 1024x1024), "
            f"got {h}x{w}"
        )
    return h


def _split_estimate(
    noise: torch.Tensor, who: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn`` to channels ``[:3]`` (the noise estimate) and pass channels ``[3:]`` through.

    The variance channels are left alone, as in the reference: transforming a variance estimate
    the way the noise is transformed (e.g. negating it) is meaningless.
    """
    _check_image(noise, who, min_channels=3)
    head = fn(noise[..., :3, :, :])
    if noise.shape[-3] == 3:
        return head
    return torch.cat([head, noise[..., 3:, :, :]], dim=-3)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a 1-D permutation: ``perm[inv] == inv[perm] == arange(len(perm))``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


# --------------------------------------------------------------------------------------------
# Simple geometric views
# --------------------------------------------------------------------------------------------


class IdentityView(View):
    name = "identity"
    description = "The image as it is."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        return _check_image(im, self.name)

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        return _check_image(noise, self.name)


class FlipView(View):
    name = "flip"
    description = "Upside down: the image mirrored top to bottom (flip along H)."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        # The reference flips dim 1 of a (C, H, W) tensor, i.e. the rows.
        return torch.flip(_check_image(im, self.name), dims=(-2,))

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        return torch.flip(_check_image(noise, self.name), dims=(-2,))


class RotateCWView(View):
    name = "rotate_cw"
    description = "Rotated 90 degrees clockwise."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        # The reference's TF.rotate(-90, NEAREST) on a square image is exactly rot90(k=-1).
        _check_square(*_check_image(im, self.name).shape[-2:], self.name)
        return torch.rot90(im, k=-1, dims=(-2, -1))

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        _check_square(*_check_image(noise, self.name).shape[-2:], self.name)
        return torch.rot90(noise, k=1, dims=(-2, -1))


class RotateCCWView(View):
    name = "rotate_ccw"
    description = "Rotated 90 degrees counter-clockwise."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        _check_square(*_check_image(im, self.name).shape[-2:], self.name)
        return torch.rot90(im, k=1, dims=(-2, -1))

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        _check_square(*_check_image(noise, self.name).shape[-2:], self.name)
        return torch.rot90(noise, k=-1, dims=(-2, -1))


class Rotate180View(View):
    name = "rotate_180"
    description = "Rotated 180 degrees."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        return torch.rot90(_check_image(im, self.name), k=2, dims=(-2, -1))

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        return torch.rot90(_check_image(noise, self.name), k=2, dims=(-2, -1))


class NegateView(View):
    name = "negate"
    description = "Photographic negative: every value negated."

    def view(self, im: torch.Tensor) -> torch.Tensor:
        return -_check_image(im, self.name)

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        # Only the noise estimate is negated; negating the variance estimate would be nonsense
        # (the reference does the same).
        return _split_estimate(noise, self.name, torch.neg)


# --------------------------------------------------------------------------------------------
# Pixel permutations
# --------------------------------------------------------------------------------------------


class PermutationView(View):
    """A view that rearranges pixels by a fixed permutation for each image size.

    ``view`` gathers: the flattened output pixel ``j`` is input pixel ``perm[j]`` (the reference's
    ``patches[perm]``); ``inverse_view`` gathers with the inverse permutation.  The same pixels
    move in every channel.  Permutations are built lazily on the CPU for each ``(H, W)`` and
    cached, with a copy per device.
    """

    def __init__(self) -> None:
        self._cpu_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._device_cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @abc.abstractmethod
    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        """Gather index for an ``height x width`` image: ``(height * width,)`` int64 on CPU."""

    def _permutations(
        self, height: int, width: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width)
        if key not in self._cpu_cache:
            perm = self._make_permutation(height, width).to(torch.int64)
            self._cpu_cache[key] = (perm, invert_permutation(perm))
        device = torch.device("cpu" if device is None else device)
        if device.type == "cpu":
            return self._cpu_cache[key]
        dkey = (height, width, str(device))
        if dkey not in self._device_cache:
            perm, inv = self._cpu_cache[key]
            self._device_cache[dkey] = (perm.to(device), inv.to(device))
        return self._device_cache[dkey]

    def permutation(
        self, height: int, width: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Gather index used by ``view`` at this size: ``(height * width,)`` int64.

        ``view(x).flatten(-2) == x.flatten(-2)[..., perm]``.  ``width`` defaults to ``height``.
        """
        return self._permutations(height, height if width is None else width, device)[0]

    def inverse_permutation(
        self, height: int, width: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Gather index used by ``inverse_view``: the inverse of ``permutation``."""
        return self._permutations(height, height if width is None else width, device)[1]

    def _apply(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        _check_image(x, self.name)
        h, w = x.shape[-2:]
        perm, inv = self._permutations(h, w, x.device)
        flat = x.reshape(*x.shape[:-2], h * w)
        return flat.index_select(-1, inv if inverse else perm).reshape(x.shape)

    def view(self, im: torch.Tensor) -> torch.Tensor:
        return self._apply(im, inverse=False)

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        return self._apply(noise, inverse=True)

    def __getstate__(self) -> dict[str, Any]:
        # Caches can be large (1024x1024 index tensors, possibly on a GPU): rebuild after pickling.
        state = dict(self.__dict__)
        state["_cpu_cache"] = {}
        state["_device_cache"] = {}
        return state


def _skew_shifts(width: int, height: int, skew_factor: float) -> list[int]:
    """Roll of every column: ``int(skew_factor * (i - H // 2))``, truncated toward zero."""
    centre = height // 2
    return [int(skew_factor * (i - centre)) for i in range(width)]


# Shifts wrap around the image, so large factors only alias smaller ones; beyond this the
# per-column shifts no longer fit in 64-bit integers.
MAX_SKEW_FACTOR = 1000.0


class SkewView(PermutationView):
    name = "skew"
    description = "Columns rolled vertically by amounts growing across the image (a shear)."
    args = (
        ViewArg("skew_factor", float, 1.5, "column i rolls by int(skew_factor * (i - H // 2))"),
    )

    def __init__(self, skew_factor: float = 1.5) -> None:
        super().__init__()
        if not math.isfinite(skew_factor) or abs(skew_factor) > MAX_SKEW_FACTOR:
            raise ViewError(f"skew_factor must be a finite number from -{MAX_SKEW_FACTOR:g} to "
                            f"{MAX_SKEW_FACTOR:g} (1.5 is usual), got {skew_factor}")
        # At the 64x64 stage-1 size the largest |i - H//2| is 32: a smaller factor moves nothing,
        # and the "illusion" would be the plain image; so does one whose every roll is a whole
        # turn (64, 128, ...).
        if not any(shift % BASE_SIZE for shift in _skew_shifts(BASE_SIZE, BASE_SIZE, skew_factor)):
            why = (f"every column rolls by whole turns of {BASE_SIZE}"
                   if abs(skew_factor) >= 2 / BASE_SIZE else
                   f"use |skew_factor| >= {2 / BASE_SIZE:g}")
            raise ViewError(
                f"skew_factor={skew_factor} moves no pixel at {BASE_SIZE}x{BASE_SIZE} (the view "
                f"would be the identity): {why}; e.g. 1.5"
            )
        self.skew_factor = float(skew_factor)

    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        # torch.roll by d: out[y] = in[(y - d) mod H], independently for every column.
        shifts = torch.tensor(_skew_shifts(width, height, self.skew_factor), dtype=torch.int64)
        y = torch.arange(height, dtype=torch.int64)[:, None]
        x = torch.arange(width, dtype=torch.int64)[None, :]
        src_y = torch.remainder(y - shifts[None, :], height)
        return (src_y * width + x).reshape(-1)


class PatchPermuteView(PermutationView):
    name = "patch_permute"
    description = "The image cut into num_patches x num_patches squares, shuffled."
    args = (
        ViewArg(
            "num_patches",
            int,
            8,
            "patches per side; must divide 64 (1 < n <= 64) so it also divides 256 and 1024",
        ),
    )

    def __init__(
        self,
        num_patches: int = 8,
        *,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        """Draw the patch permutation with ``torch.randperm(num_patches**2, generator=...)``.

        ``generator`` defaults to a fresh CPU generator seeded with ``seed``.
        """
        super().__init__()
        if isinstance(num_patches, bool) or not isinstance(num_patches, int):
            raise ViewError(f"num_patches must be an integer, got {num_patches!r}")
        if num_patches not in BASE_DIVISORS:
            raise ViewError(
                f"num_patches={num_patches} must divide {BASE_SIZE} so that the patches tile the "
                f"64, 256 and 1024 images; use one of {BASE_DIVISORS}"
            )
        self.num_patches = num_patches
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        # The reference draws with the global RNG right after torch.manual_seed(view_seed); a
        # dedicated generator seeded the same way draws the identical permutation.
        self.perm = torch.randperm(num_patches**2, generator=generator)
        self.perm_inv = invert_permutation(self.perm)

    @classmethod
    def _create(
        cls, kwargs: dict[str, Any], generator: torch.Generator | None, seed: int
    ) -> View:
        return cls(**kwargs, generator=generator, seed=seed)

    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        n = self.num_patches
        if height % n or width % n:
            raise ViewError(
                f"view '{self.name}' with num_patches={n} needs H and W divisible by {n}, got "
                f"{height}x{width}; use sizes such as 64, 256 or 1024"
            )
        ph, pw = height // n, width // n
        y = torch.arange(height, dtype=torch.int64)[:, None]
        x = torch.arange(width, dtype=torch.int64)[None, :]
        # Output patch j (raster order) shows input patch perm[j], pixel for pixel.
        src_patch = self.perm[(y // ph) * n + (x // pw)]
        src_y = (src_patch // n) * ph + y % ph
        src_x = (src_patch % n) * pw + x % pw
        return (src_y * width + src_x).reshape(-1)


class PixelPermuteView(PatchPermuteView):
    name = "pixel_permute"
    description = "Every pixel of the 64x64 image shuffled (64x64 patches; 4x4 pixels at 256)."
    args = (
        ViewArg(
            "num_patches",
            int,
            64,
            "patches per side; 64 shuffles single pixels at 64x64; must divide 64",
        ),
    )

    def __init__(
        self,
        num_patches: int = 64,
        *,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_patches, generator=generator, seed=seed)


# A layout of G x G pieces takes O(G^2) memory and time to draw (64: 0.2 s); a bigger grid is a
# mistake (64 px images have no pieces smaller than a pixel) and could exhaust a server's memory.
MAX_JIGSAW_GRID = 64


class JigsawView(PermutationView):
    """Jigsaw puzzle: pieces with round tabs, rearranged and turned by quarter turns.

    Geometry lives in :mod:`illusions.jigsaw`.  The layout is drawn once, from a CPU generator
    seeded with ``seed`` (the view seed) that no other view shares, so the layout is identical
    at 64, 256 and 1024 and other views' random draws are unaffected.  ``view`` moves every piece
    to its destination; ``inverse_view`` puts it back.
    """

    name = "jigsaw"
    description = "Jigsaw puzzle pieces rearranged and rotated."
    args = (ViewArg("grid", int, 4, "pieces per side; must divide 64 (2, 4, 8, 16, 32 or 64)"),)

    def __init__(self, grid: int = 4, *, seed: int = 0) -> None:
        super().__init__()
        if isinstance(grid, bool) or not isinstance(grid, int) or grid not in BASE_DIVISORS:
            raise ViewError(
                f"jigsaw grid must divide {BASE_SIZE} so that the pieces tile the 64, 256 and 1024 "
                f"images: use one of {BASE_DIVISORS}, got {grid!r}"
            )
        self.grid = grid
        self.seed = seed
        self.layout = _jigsaw.make_layout(grid, torch.Generator().manual_seed(seed))
        self._label_cache: dict[int, torch.Tensor] = {}

    @classmethod
    def _create(
        cls, kwargs: dict[str, Any], generator: torch.Generator | None, seed: int
    ) -> View:
        return cls(**kwargs, seed=seed)

    def _size(self, height: int, width: int) -> int:
        if height != width or height % self.grid:
            raise ViewError(
                f"view 'jigsaw' with grid={self.grid} needs a square image whose side is a "
                f"multiple of {self.grid}, got {height}x{width}"
            )
        return height

    def piece_labels(self, size: int) -> torch.Tensor:
        """``(size, size)`` int64 CPU map: the piece (its starting cell index) of every pixel."""
        size = self._size(size, size)
        if size not in self._label_cache:
            self._label_cache[size] = _jigsaw.piece_labels(self.layout, size)
        return self._label_cache[size]

    @property
    def destination(self) -> tuple[int, ...]:
        """``destination[k]``: the cell where piece ``k`` lands in the view."""
        return self.layout.destination

    @property
    def quarter_turns(self) -> tuple[int, ...]:
        """``quarter_turns[k]``: clockwise quarter turns (about the image centre) of piece ``k``."""
        return self.layout.quarter_turns

    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        size = self._size(height, width)
        # destination_index says where each pixel goes; gathering needs where each comes from.
        return invert_permutation(_jigsaw.destination_index(self.layout, size))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_label_cache"] = {}
        return state


class InnerCircleView(PermutationView):
    name = "inner_circle"
    description = "A central disc (radius 3/8 of the side) turned 180 degrees; border unchanged."

    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        size = _check_square(height, width, self.name)
        # Radius 24 / 96 / 384 at 64 / 256 / 1024, as in the reference (int(3/8 * size)).
        radius = 3 * size // 8
        idx = torch.arange(size, dtype=torch.int64)
        # Doubled centred coordinates are exact integers, so the disc is exactly symmetric under
        # the half turn (for even sizes this is the reference's (i - S//2 + 0.5) test, doubled).
        doubled = 2 * idx - (size - 1)
        inside = doubled[:, None] ** 2 + doubled[None, :] ** 2 < (2 * radius) ** 2
        y, x = idx[:, None], idx[None, :]
        src_y = torch.where(inside, size - 1 - y, y)
        src_x = torch.where(inside, size - 1 - x, x)
        return (src_y * size + src_x).reshape(-1)


class SquareHingeView(PermutationView):
    name = "square_hinge"
    description = "3x3 grid of squares, each turned 90 degrees in alternating directions."

    def _make_permutation(self, height: int, width: int) -> torch.Tensor:
        size = _check_square(height, width, self.name)
        # Squares of size // 3; leftover rows/columns (e.g. the last one at 64 and 256) stay put.
        side = size // 3
        index = torch.arange(size * size, dtype=torch.int64).reshape(size, size)
        for bi in range(3):
            for bj in range(3):
                # Squares on the even checkerboard colour turn one way, the others the other way.
                k = -1 if (bi + bj) % 2 == 0 else 1
                rows = slice(bi * side, (bi + 1) * side)
                cols = slice(bj * side, (bj + 1) * side)
                index[rows, cols] = torch.rot90(index[rows, cols], k=k, dims=(0, 1))
        return index.reshape(-1)


# --------------------------------------------------------------------------------------------
# Filters shared by the factorized views
# --------------------------------------------------------------------------------------------


def size_factor(height: int) -> int:
    """How many times larger than the 64x64 base image this image is: ``max(1, H // 64)``.

    The reference uses ``H // 64`` and breaks below 64 (factor 0); we clamp to 1.
    """
    return max(1, height // BASE_SIZE)


def scaled_blur_params(kernel_size: int, sigma: float, height: int) -> tuple[int, float]:
    """Kernel size and sigma of a base-size blur scaled to an image of height ``height``.

    ``(kernel_size * f + ((f + 1) % 2), sigma * f)`` with ``f = size_factor(height)``: e.g.
    33 / 2.0 becomes 133 / 8.0 at 256 and 529 / 32.0 at 1024.
    """
    f = size_factor(height)
    return kernel_size * f + ((f + 1) % 2), sigma * f


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, as torchvision's ``gaussian_blur``: ``(kernel_size,)`` float32.

    Taps at ``x = linspace(-(k-1)/2, (k-1)/2, k)``, weights ``exp(-0.5 * (x / sigma)**2)``.
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


@functools.lru_cache(maxsize=256)
def _device_kernel1d(kernel_size: int, sigma: float, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """:func:`gaussian_kernel1d` rounded to ``dtype`` as a ``(1, 1, k)`` conv1d weight in the
    accumulation dtype, on ``device``: made once, since a copy to a GPU waits for the work queued
    there, and a blur view runs every step of every job."""
    k1 = gaussian_kernel1d(kernel_size, sigma).to(dtype)
    return k1.to(device=device, dtype=torch.promote_types(dtype, torch.float32)).view(1, 1, -1)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur with torchvision ``gaussian_blur`` semantics, in plain torch.

    Args:
        x: ``(..., C, H, W)`` floating tensor; every channel is blurred independently.
        kernel_size: odd kernel side.
        sigma: standard deviation in pixels (> 0).
    Returns:
        ``(..., C, H, W)``, same dtype.  Borders use reflect padding of ``kernel_size // 2``.

    The 2-D kernel is the outer product of the 1-D one, so blurring rows then columns gives the
    same result as torchvision's single 2-D convolution at a fraction of the cost (the 1024x1024
    kernel is 529 taps wide).
    """
    if not torch.is_floating_point(x):
        raise ViewError(f"gaussian_blur needs a floating-point tensor, got {x.dtype}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ViewError(f"gaussian_blur kernel_size must be odd and positive, got {kernel_size}")
    if not sigma > 0:
        raise ViewError(f"gaussian_blur sigma must be > 0, got {sigma}")
    *lead, c, h, w = x.shape
    pad = kernel_size // 2
    if pad >= h or pad >= w:
        raise ViewError(
            f"blur kernel of size {kernel_size} is too large for a {h}x{w} image (reflect padding "
            f"needs kernel_size // 2 < H and W); use a larger image or a smaller kernel_size"
        )
    # Kernel computed in float32, then cast to the input's dtype (as the reference's torchvision
    # did).  Half-precision inputs are summed in float32 and rounded once at the end, like a
    # single 2-D convolution on a GPU, rather than rounded again between the two passes.
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    k1 = _device_kernel1d(kernel_size, float(sigma), x.device, x.dtype)
    y = F.pad(x.reshape(-1, c, h, w).to(acc_dtype), (pad, pad, pad, pad), mode="reflect")
    padded_h, padded_w = y.shape[-2:]
    # Every row (then every column) is an independent 1-D signal: a single-channel conv1d over
    # them is much faster on CPU than a grouped conv2d, and gives the same sums.
    y = F.conv1d(y.reshape(-1, 1, padded_w), k1).reshape(-1, padded_h, w)
    y = y.transpose(-1, -2).contiguous()
    y = F.conv1d(y.reshape(-1, 1, padded_h), k1).reshape(-1, w, h)
    return y.transpose(-1, -2).reshape(*lead, c, h, w).to(x.dtype)


# Narrower blurs change nothing (the kernel is one tap of 1); far narrower ones underflow to 0 and
# would make the kernel NaN.
MIN_SIGMA = 0.01


def _check_sigma(sigma: float, arg: str) -> float:
    if not (math.isfinite(sigma) and sigma >= MIN_SIGMA):
        raise ViewError(f"{arg} must be a finite number >= {MIN_SIGMA:g} (blur width in pixels), "
                        f"got {sigma}")
    return float(sigma)


# Kernel sizes are given at 64x64 and scaled with the image: a kernel must fit in the image (the
# blurs pad by half a kernel), and the cost of a blur grows with its size.
MAX_KERNEL_SIZE = 63


def _check_kernel_size(kernel_size: int, arg: str = "kernel_size") -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ViewError(f"{arg} must be an integer, got {kernel_size!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ViewError(
            f"{arg} must be an odd integer >= 3 (kernels are centred on a pixel), got "
            f"{kernel_size}"
        )
    if kernel_size > MAX_KERNEL_SIZE:
        raise ViewError(
            f"{arg} must be at most {MAX_KERNEL_SIZE} (sizes are at 64x64, and a kernel must fit "
            f"in the image), got {kernel_size}"
        )
    return kernel_size


def _motion_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Diagonal motion blur of every channel of ``(..., C, H, W)``, scaled to the image size.

    Same result as the reference's per-channel ``conv2d`` with kernel ``eye(s) / s``
    (``s = size * f + ((f + 1) % 2)``, kept odd) and zero padding ``s // 2``: each output pixel
    is the mean of the ``s`` pixels on the diagonal through it, zeros beyond the border.  It is
    computed as a sum of ``s`` shifted copies, which costs O(s) per pixel instead of O(s**2).
    """
    h, w = x.shape[-2:]
    f = size_factor(h)
    s = size * f + ((f + 1) % 2)
    half = s // 2
    # Accumulate in float32 at least (as GPU convolutions do for half precision inputs).
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weight = torch.tensor(1.0 / s, dtype=torch.float32).to(x.dtype).to(acc_dtype)
    padded = F.pad(x.to(acc_dtype), (half, half, half, half))
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    for t in range(s):
        out += padded[..., t : t + h, t : t + w]
    return (out * weight).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Factorized views
# --------------------------------------------------------------------------------------------


class FactorizedView(View):
    """Base of factorized views: the model sees the image unchanged; the noise is filtered."""

    factorized = True

    def view(self, im: torch.Tensor) -> torch.Tensor:
        # Factorized diffusion never changes the model input.
        return _check_image(im, self.name)

    def inverse_view(self, noise: torch.Tensor) -> torch.Tensor:
        return _split_estimate(noise, self.name, self.component)

    @abc.abstractmethod
    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        """This view's component of a ``(..., 3, H, W)`` noise estimate (same shape)."""


class _HybridView(FactorizedView):
    args = (
        ViewArg("sigma", float, 2.0, "blur sigma in pixels at 64x64 (scaled with the size)"),
        ViewArg("kernel_size", int, 33, "odd blur kernel size at 64x64 (scaled with the size)"),
    )

    def __init__(self, sigma: float = 2.0, kernel_size: int = 33) -> None:
        self.sigma = _check_sigma(sigma, "sigma")
        self.kernel_size = _check_kernel_size(kernel_size)

    def low(self, estimate: torch.Tensor) -> torch.Tensor:
        """Low-pass part of a ``(..., 3, H, W)`` estimate."""
        k, sigma = scaled_blur_params(self.kernel_size, self.sigma, estimate.shape[-2])
        return gaussian_blur(estimate, k, sigma)


class LowPassView(_HybridView):
    name = "low_pass"
    description = "Hybrid image, low frequencies (seen from afar); pair with high_pass."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.low(estimate)


class HighPassView(_HybridView):
    name = "high_pass"
    description = "Hybrid image, high frequencies (seen up close); pair with low_pass."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return estimate - self.low(estimate)


class _TripleHybridView(FactorizedView):
    args = (
        ViewArg("sigma_1", float, 1.0, "sigma splitting high from medium, pixels at 64x64"),
        ViewArg("sigma_2", float, 2.0, "sigma splitting medium from low, pixels at 64x64"),
        ViewArg("kernel_size", int, 25, "odd blur kernel size at 64x64 (scaled with the size)"),
    )

    def __init__(self, sigma_1: float = 1.0, sigma_2: float = 2.0, kernel_size: int = 25) -> None:
        self.sigma_1 = _check_sigma(sigma_1, "sigma_1")
        self.sigma_2 = _check_sigma(sigma_2, "sigma_2")
        self.kernel_size = _check_kernel_size(kernel_size)

    def bands(self, estimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(low, medium, high)`` bands of a ``(..., 3, H, W)`` estimate; they sum to it."""
        h = estimate.shape[-2]
        k, s1 = scaled_blur_params(self.kernel_size, self.sigma_1, h)
        _, s2 = scaled_blur_params(self.kernel_size, self.sigma_2, h)
        blurred = gaussian_blur(estimate, k, s1)
        low = gaussian_blur(blurred, k, s2)
        return low, blurred - low, estimate - blurred


class TripleLowPassView(_TripleHybridView):
    name = "triple_low_pass"
    description = "Triple hybrid, low band (seen from far away)."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.bands(estimate)[0]


class TripleMediumPassView(_TripleHybridView):
    name = "triple_medium_pass"
    description = "Triple hybrid, medium band (seen from a middle distance)."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.bands(estimate)[1]


class TripleHighPassView(_TripleHybridView):
    name = "triple_high_pass"
    description = "Triple hybrid, high band (seen up close)."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.bands(estimate)[2]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Channel mean of ``(..., 3, H, W)``, repeated on 3 channels."""
    return x.mean(dim=-3, keepdim=True).expand(x.shape).contiguous()


class GrayscaleView(FactorizedView):
    name = "grayscale"
    description = "Grayscale component (channel mean); pair with color."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return _gray(estimate)

    def display(self, im: torch.Tensor) -> torch.Tensor:
        # Shown as the gray image, like the reference's save_view.
        return _gray(_check_image(im, self.name, min_channels=3)[..., :3, :, :])


class ColorView(FactorizedView):
    name = "color"
    description = "Color component (image minus its channel mean); pair with grayscale."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return estimate - _gray(estimate)


class _MotionView(FactorizedView):
    args = (
        ViewArg("size", int, 7, "odd diagonal blur length in pixels at 64x64 (scaled with size)"),
    )

    def __init__(self, size: int = 7) -> None:
        self.size = _check_kernel_size(size, "size")


class MotionBlurView(_MotionView):
    name = "motion"
    description = "Diagonal motion-blurred component; pair with motion_res."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return _motion_blur(estimate, self.size)

    def display(self, im: torch.Tensor) -> torch.Tensor:
        # Shown blurred, like the reference's save_view.
        return _motion_blur(_check_image(im, self.name, min_channels=3)[..., :3, :, :], self.size)


class MotionBlurResView(_MotionView):
    name = "motion_res"
    description = "Residual of the diagonal motion blur (sharp detail); pair with motion."

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return estimate - _motion_blur(estimate, self.size)


class ScaleView(FactorizedView):
    name = "scale"
    description = "Noise estimate multiplied by scale (for inverse problems)."
    args = (ViewArg("scale", float, 0.5, "factor applied to the noise estimate; 0 < scale <= "
                                         "1000"),)

    def __init__(self, scale: float = 0.5) -> None:
        # Far larger factors overflow the estimate in fp16/fp32 (1e38 gave a NaN image).
        if not (math.isfinite(scale) and 0 < scale <= 1000):
            raise ViewError(f"scale must be a finite number > 0 and at most 1000, got {scale}")
        self.scale = float(scale)

    def component(self, estimate: torch.Tensor) -> torch.Tensor:
        return self.scale * estimate


# --------------------------------------------------------------------------------------------
# Registry and construction
# --------------------------------------------------------------------------------------------

_VIEW_CLASSES: tuple[type[View], ...] = (
    IdentityView,
    FlipView,
    RotateCWView,
    RotateCCWView,
    Rotate180View,
    NegateView,
    SkewView,
    PatchPermuteView,
    PixelPermuteView,
    JigsawView,
    InnerCircleView,
    SquareHingeView,
    LowPassView,
    HighPassView,
    TripleLowPassView,
    TripleMediumPassView,
    TripleHighPassView,
    GrayscaleView,
    ColorView,
    MotionBlurView,
    MotionBlurResView,
    ScaleView,
)

VIEWS: dict[str, ViewInfo] = {
    cls.name: ViewInfo(cls.name, cls, cls.args, cls.description) for cls in _VIEW_CLASSES
}


def _unknown_view(name: str) -> ViewError:
    close = difflib.get_close_matches(str(name), list(VIEWS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ViewError(f"unknown view {name!r}.{hint} Valid views: {', '.join(VIEWS)}")


def _convert(view: str, arg: ViewArg, raw: Any) -> Any:
    expected = "an integer" if arg.type is int else "a number"
    if isinstance(raw, str):
        try:
            return arg.type(raw.strip())
        except ValueError:
            raise ViewError(
                f"view '{view}': {arg.name} expects {expected}, got {raw!r} ({arg.help})"
            ) from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ViewError(f"view '{view}': {arg.name} expects {expected}, got {raw!r}")
    if arg.type is int and not float(raw).is_integer():
        raise ViewError(f"view '{view}': {arg.name} expects {expected}, got {raw!r}")
    return arg.type(raw)


def parse_view_args(name: str, args: Sequence[str] = ()) -> dict[str, Any]:
    """Parse CLI-style argument strings for view ``name`` into constructor keyword arguments.

    Arguments are positional (``["4"]``) or ``key=value`` (``["num_patches=4"]``); positional
    ones come first.  Missing arguments are left out (the constructor defaults apply).
    """
    if name not in VIEWS:
        raise _unknown_view(name)
    spec = VIEWS[name].args
    if args is None:
        args = ()
    elif isinstance(args, str):
        args = [args]
    names = [a.name for a in spec]
    usage = (
        f"view '{name}' takes no arguments"
        if not spec
        else f"view '{name}' takes " + ", ".join(f"{a.name} (default {a.default})" for a in spec)
    )
    parsed: dict[str, Any] = {}
    seen_keyword = False
    for position, raw in enumerate(args):
        if isinstance(raw, str) and "=" in raw:
            key, value = (part.strip() for part in raw.split("=", 1))
            if key not in names:
                raise ViewError(f"unknown argument {key!r} for view '{name}'; {usage}")
            seen_keyword = True
            arg = spec[names.index(key)]
        else:
            if seen_keyword:
                raise ViewError(
                    f"positional argument {raw!r} for view '{name}' follows a key=value one; "
                    f"put positional arguments first or name them ({usage})"
                )
            if position >= len(spec):
                raise ViewError(f"too many arguments for view '{name}': {list(args)!r}; {usage}")
            arg, value = spec[position], raw
        if arg.name in parsed:
            raise ViewError(f"argument {arg.name!r} given twice for view '{name}'; {usage}")
        parsed[arg.name] = _convert(name, arg, value)
    return parsed


def build_view(
    name: str,
    args: Sequence[str] = (),
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> View:
    """Build one view from its registry name and CLI-style argument strings.

    Args:
        name: a key of ``VIEWS``.
        args: e.g. ``["4"]`` or ``["num_patches=4"]``.
        generator: CPU generator for views with a random permutation (patch_permute,
            pixel_permute); if None, one seeded with ``seed`` is used.
        seed: seed of that default generator, and the seed of the jigsaw layout (the jigsaw
            always uses its own generator so it never shifts other views' draws).
    Raises:
        ViewError: unknown name or invalid argument.
    """
    kwargs = parse_view_args(name, args)
    return VIEWS[name].cls._create(kwargs, generator, seed)


def build_views(
    names: Sequence[str],
    args: Sequence[Sequence[str]] | None = None,
    view_seed: int = 0,
) -> list[View]:
    """Build the views of one illusion, drawing their randomness as the reference does.

    Random views draw from ONE CPU generator seeded with ``view_seed``, in view order; this
    reproduces the reference, which calls ``torch.manual_seed(view_seed)`` and then builds its
    views with unseeded ``torch.randperm``.  ``args`` has one (possibly empty) list per view.
    """
    if isinstance(names, str):
        names = [names]
    if args is None:
        args = [() for _ in names]
    if len(args) != len(names):
        raise ViewError(
            f"got {len(names)} view names but {len(args)} argument lists; pass one list per "
            f"view (an empty list for defaults)"
        )
    for name in names:
        if name not in VIEWS:
            raise _unknown_view(name)
    generator = torch.Generator().manual_seed(view_seed)
    views = []
    for name, view_args in zip(names, args, strict=True):
        if view_args is None:
            view_args = ()
        elif isinstance(view_args, str):
            view_args = [view_args]
        views.append(build_view(name, view_args, generator=generator, seed=view_seed))
    return views
