"""Rewrites of IF's UNets that torch.compile (inductor) turns into faster kernels.

Profiles of a compiled IF-II-M call (16 rows, H200; docs/benchmarks.md, session 6) showed the
convolutions at about 65 % of the dense fp16 peak and the fused group-norm/GELU kernels between
them far below the memory bandwidth, for three reasons this module removes. Each rewrite computes
the same function as the module it replaces; outputs differ by float rounding only, and the
parameters and state dict are unchanged.

1. **Group norm from per-channel statistics** (:class:`ChannelStatsGroupNorm`). ``nn.GroupNorm``
   reduces each (sample, group) over the group's channels and all pixels at once. In the
   channels-last layout inductor gives convolutions, a group's elements are a few channels out of
   every pixel: strided loads. Here the mean and variance are taken per (sample, channel) over the
   pixels first, and each group's from its channels' (the pooled variance: the mean of the channel
   variances plus the variance of the channel means, free of cancellation). Statistics are fp32,
   as in PyTorch's own kernels. They are plain sums of shifted values in one pass
   (:func:`channel_var_mean`), not ``var_mean``, which inductor makes a Welford reduction bound by
   its per-element division.
2. **The normalisation as one multiply-add per element**, with a per-(sample, channel) scale and
   shift held in buffers of their own. Left to itself inductor inlines the small computations
   that make the scale and shift (a reciprocal square root among them) into the elementwise
   kernel, and repeats them for every element.
3. **Resnet blocks' inputs and outputs pinned to channels-last**, and the upsampling inside the
   up blocks' last resnets (:class:`ChannelsLastUpsample2D`). Inductor lays out a
   concatenation (the up blocks' skip connections) in NCHW unless an input's layout is already
   fixed as channels-last; the kernels after it then read across the channels of every pixel
   and write transposed copies for the convolutions.
4. **GELU from a fitted erfc** (:class:`ErfcFitGELU`, only while compiling). Exact GELU is
   ``x * Φ(x)``; PyTorch computes ``Φ`` as ``0.5 * (1 + erf(x / √2))``, and the fp32 ``erf``
   made the fused normalise + GELU kernels bound by instructions: 0.21 ms against 0.13 ms for
   the same kernel with ReLU (16 x 128 x 256 x 256 fp16 values, H200). Here
   ``erfc(t) = 2 ** -(t * R(t))`` with ``R`` a polynomial of degree 9 fitted on
   ``0 <= t <= 4.5`` (see :data:`ERFC_FIT`), one branch-free exponential. It is closer to the
   exact GELU than PyTorch's own: ``1 + erf`` cancels for negative inputs, ``erfc`` does not. On
   normal inputs of standard deviation 3, 0.02 % of its fp16 results differ from the correctly
   rounded GELU, against 3.6 % for inductor's ``erf`` GELU (7.7 % on the CPU).
5. **Convolutions of few channels padded with zeros** (:class:`ChannelPaddedConv2d`, only
   while compiling): input channels to a multiple of 8, output channels that are not a multiple
   of 8 to a multiple of 32 (the extra outputs are dropped). cuDNN has no tensor-core kernel for
   IF-II's 6-channel ``conv_in`` and ran it on CUDA cores in 1.04 ms a call (16 rows, H200),
   against 0.27 ms for the same convolution with 8 channels. For IF-II-L's ``conv_out``
   (160 → 6 channels at 256 x 256) it picks an Ampere kernel without shared memory, 2.1 ms a call
   of 16 rows; with 32 outputs, 0.37 ms (8 and 16 outputs: 1.7 and 1.9 ms), and the compiled call
   took 112.9 ms instead of 114.1. The other IF models' ``conv_out`` lose 0.01–0.08 ms to it (H200,
   session 15). The padding adds products of zeros and outputs that nothing reads.

On an H200 rewrites 1–3 took a compiled IF-II-M call of 16 rows from 75.1 to 64.7 ms (36.6 % to
42.6 % of the dense fp16 peak), and 4–5 (input padding only) from 64.4 to 62.1 ms (44.3 %). Only
:meth:`illusions.models.UNetStage.compile` applies them: the default (eager) path keeps
diffusers' modules, and so the reference implementation's results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


def channel_stats_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` through per-channel statistics
    (:func:`channel_var_mean`)."""
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group norm: {c} channels do not split into {num_groups} groups")
    xf = x.float()
    var_c, mean_c = channel_var_mean(xf)  # (n, c)
    var_c = var_c.view(n, num_groups, -1)
    mean_c = mean_c.view(n, num_groups, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = (var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + eps).expand_as(mean_c)
    if weight is not None:
        scale = scale * weight.float().view(1, num_groups, -1)
    shift = -mean_g * scale
    if bias is not None:
        shift = shift + bias.float().view(1, num_groups, -1)
    shape = (n, c) + (1,) * (x.ndim - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    scale, shift = _pinned(scale, scale.stride()), _pinned(shift, shift.stride())
    return (xf * scale + shift).to(x.dtype)


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance (biased) and mean of each (sample, channel) of ``x`` (N, C, *pixels), in ``x``'s
    dtype, from one pass of plain sums rather than ``torch.var_mean``.

    Inductor turns ``var_mean`` over many pixels into a Welford reduction, a division and a running
    update for every element, which bounds it by instructions rather than memory. Here the sums of
    ``x - k`` and its square are taken in one pass, with ``k`` the mean of the first
    ``x.shape[-1]`` pixels of the channel (one row of an image): a shift close to the channel's
    mean, so that ``E[(x-k)²] - E[x-k]²`` does not cancel even for channels far from zero (the
    shifted-data variance). The result is clamped at zero against rounding."""
    flat = x.flatten(2)
    shift = flat[:, :, :x.shape[-1]].mean(-1, keepdim=True)
    d = flat - shift
    mean_d = d.mean(-1)
    var = (d.square().mean(-1) - mean_d.square()).clamp_min(0)
    return var, mean_d + shift.squeeze(-1)


class ChannelStatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the same parameters, computed by :func:`channel_stats_group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_stats_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _pinned(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` as a buffer of its own with ``stride`` while inductor compiles (its values are then
    computed once, not inside every consumer, and its layout is fixed before its consumers choose
    theirs); ``t`` itself when not compiling."""
    if not torch.compiler.is_compiling():
        return t
    return torch.ops.prims.inductor_force_stride_order(t, stride)


def _pinned_channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 4:
        return t
    _, c, h, w = t.shape
    return _pinned(t, (h * w * c, 1, w * c, c))


class ChannelsLastResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` with its input and output pinned to channels-last."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        out = super().forward(_pinned_channels_last(input_tensor), temb, *args, **kwargs)
        return _pinned_channels_last(out)


class ChannelsLastUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` without a convolution, its output pinned to channels-last.

    diffusers makes the input of a nearest-neighbour upsampling contiguous (NCHW) when it has 64
    rows or more, against a failure of PyTorch's channels-last CUDA kernel at large batches. Under
    inductor, which generates its own upsampling kernel, that only moved the up blocks' resnets
    that upsample (and their convolutions) to NCHW at 64 rows: cuDNN then ran them in NCHW, with
    layout conversions around them (IF-I-XL, 64 rows: 6.3 ms of a 347 ms call)."""

    @classmethod
    def wants(cls, up: nn.Module) -> bool:
        """Whether ``up`` is a plain interpolation, whose output can be pinned."""
        return not (up.use_conv or up.use_conv_transpose or up.norm is not None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _pinned_channels_last(super().forward(hidden_states, *args, **kwargs))


ERFC_FIT_END = 4.5
"""Where the fit of :data:`ERFC_FIT` ends; beyond it ``erfc`` is below 2e-10 and ``Φ`` is 0 or 1
to fp16 precision, and ``t`` is clamped to it."""
ERFC_FIT = (1.6279092283988021, 0.9183934667665686, 0.14860236256913173, -0.028452793735829474,
            0.00082864180379514, 0.0016501988424356124, -0.0006194160603167661,
            0.00011549200473811584, -1.1530734544236317e-05, 4.8914926741185e-07)
"""Coefficients (constant term first) of ``R(t) = -log2(erfc(t)) / t``: a Chebyshev least-squares
fit of degree 9 to float64 ``erfc`` on ``0 < t <= 4.5``. ``2 ** -(t * R(t))`` evaluated in fp32 is
within 1e-5 of ``erfc(t)`` relative, and ``R(0) = log2(e) * 2 / √π``."""


def erfc_fit_gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of ``x``, computed in fp32 as ``x * Φ(x)`` with ``Φ`` from :data:`ERFC_FIT`
    and returned in ``x``'s dtype: ``Φ(x) = erfc(t) / 2`` for ``x < 0`` and ``1 - erfc(t) / 2``
    otherwise, ``t = |x| / √2``. Within 1e-6 of float64 GELU, absolute."""
    xf = x.float()
    t = (xf.abs() * (1 / math.sqrt(2))).clamp(max=ERFC_FIT_END)
    r = torch.full_like(t, ERFC_FIT[-1])
    for c in ERFC_FIT[-2::-1]:
        r = r * t + c
    half_erfc = 0.5 * torch.exp2(-(r * t))
    phi = torch.where(xf >= 0, 1 - half_erfc, half_erfc)
    return (xf * phi).to(x.dtype)


class ErfcFitGELU(nn.GELU):
    """``nn.GELU`` computed by :func:`erfc_fit_gelu` while inductor compiles it (one fused kernel);
    PyTorch's own GELU otherwise, and for ``approximate="tanh"``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate != "none" or not torch.compiler.is_compiling():
            return super().forward(x)
        return erfc_fit_gelu(x)


class ChannelPaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input channels are padded with zeros to a multiple of
    :attr:`CHANNEL_MULTIPLE` (input and weight), and whose output channels are padded to a multiple
    of :attr:`OUTPUT_MULTIPLE` (zero weights and bias; the extra outputs dropped), while inductor
    compiles it; unchanged otherwise."""

    CHANNEL_MULTIPLE = 8
    OUTPUT_MULTIPLE = 32

    @classmethod
    def wants(cls, conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain 2D convolution whose input or output channels need padding."""
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
                and (conv.in_channels % cls.CHANNEL_MULTIPLE != 0
                     or conv.out_channels % cls.CHANNEL_MULTIPLE != 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        extra_in = -self.in_channels % self.CHANNEL_MULTIPLE
        extra_out = (-self.out_channels % self.OUTPUT_MULTIPLE
                     if self.out_channels % self.CHANNEL_MULTIPLE else 0)
        weight, bias = self.weight, self.bias
        if extra_in:
            # F.pad counts from the last dimension: (W, H, channels) for the input
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, extra_in))
        if extra_in or extra_out:
            weight = F.pad(weight, (0, 0) * (weight.ndim - 2) + (0, extra_in, 0, extra_out))
        if extra_out and bias is not None:
            bias = F.pad(bias, (0, extra_out))
        out = self._conv_forward(x, weight, bias)
        return out[:, :self.out_channels] if extra_out else out


def _swap_classes(module: nn.Module, old: type[nn.Module], new: type[nn.Module],
                  wants: Callable[[nn.Module], bool] | None = None) -> int:
    changed = 0
    for sub in module.modules():
        if type(sub) is old and (wants is None or wants(sub)):
            sub.__class__ = new
            changed += 1
    return changed


def apply_inductor_rewrites(unet: nn.Module, enabled: bool = True) -> dict[str, int]:
    """Rewrite ``unet``'s group norms, resnet blocks, upsamplers, GELUs and convolutions of few
    channels in place as the module docstring says (same parameters, same state dict), or
    undo that with ``enabled=False``. Returns how many of each changed."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers inductor_force_stride_order)

    pairs = {"group_norms": (nn.GroupNorm, ChannelStatsGroupNorm),
             "resnet_blocks": (ResnetBlock2D, ChannelsLastResnetBlock2D),
             "upsamplers": (Upsample2D, ChannelsLastUpsample2D),
             "gelus": (nn.GELU, ErfcFitGELU),
             "padded_convs": (nn.Conv2d, ChannelPaddedConv2d)}
    if not enabled:
        return {name: _swap_classes(unet, new, old) for name, (old, new) in pairs.items()}
    return {name: _swap_classes(unet, old, new, getattr(new, "wants", None))
            for name, (old, new) in pairs.items()}
