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
   as in PyTorch's own kernels.
2. **The normalisation as one multiply-add per element**, with a per-(sample, channel) scale and
   shift held in buffers of their own. Left to itself inductor inlines the small computations
   that make the scale and shift (a reciprocal square root among them) into the elementwise
   kernel, and repeats them for every element.
3. **Resnet blocks' inputs and outputs pinned to channels-last.** Inductor lays out a
   concatenation (the up blocks' skip connections) in NCHW unless an input's layout is already
   fixed as channels-last; the kernels after it then read across the channels of every pixel
   and write transposed copies for the convolutions.

On an H200 these took a compiled IF-II-M call of 16 rows from 75.1 to 64.7 ms (36.6 % to 42.6 %
of the dense fp16 peak). Only :meth:`illusions.models.UNetStage.compile` applies them: the
default (eager) path keeps diffusers' modules, and so the reference implementation's results.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


def channel_stats_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` through per-channel statistics."""
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group norm: {c} channels do not split into {num_groups} groups")
    pixels = tuple(range(2, x.ndim))
    xf = x.float()
    var_c, mean_c = torch.var_mean(xf, dim=pixels, correction=0)  # (n, c)
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
    shape = (n, c) + (1,) * len(pixels)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    scale, shift = _pinned(scale, scale.stride()), _pinned(shift, shift.stride())
    return (xf * scale + shift).to(x.dtype)


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


def _swap_classes(module: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    changed = 0
    for sub in module.modules():
        if type(sub) is old:
            sub.__class__ = new
            changed += 1
    return changed


def apply_inductor_rewrites(unet: nn.Module, enabled: bool = True) -> dict[str, int]:
    """Rewrite ``unet``'s group norms and resnet blocks in place as the module docstring says (same
    parameters, same state dict), or undo that with ``enabled=False``. Returns how many of each
    changed."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers inductor_force_stride_order)

    pairs = {"group_norms": (nn.GroupNorm, ChannelStatsGroupNorm),
             "resnet_blocks": (ResnetBlock2D, ChannelsLastResnetBlock2D)}
    return {name: _swap_classes(unet, *(pair if enabled else pair[::-1]))
            for name, pair in pairs.items()}
